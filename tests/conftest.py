"""Shared helpers: tiny models, the engine-runner subprocess, result comparison.

vLLM engines never run in the pytest process: ``run_engines`` runs
``tests/engine_runner.py`` on a JSON spec (several engines and scenarios per
run) in a process of its own, forked from a runner that has imported vLLM
(``--serve``) where the test left the environment as it was, and returns its
parsed JSON result. The plugin is loaded by vLLM's entry points in those
processes, never imported by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Each folder of tests/ is a layer, marked by its name: ``pytest tests/unit``
# (or ``-m unit``) needs no engine, server or JIT compile and is the check
# after every edit; ``pytest tests`` runs every layer.
LAYERS = ("unit", "kernels", "engine", "server", "gpu")
REPO = TESTS.parent
RUNNER = TESTS / "engine_runner.py"
RESULT_MARK = "HEADINFER_RESULT "
LOGPROB_TOL = 1e-3

# Engine settings every comparison uses: float32, CPU_ATTN-compatible blocks
# of 32 tokens, no compilation.
BASE_LLM = dict(
    dtype="float32",
    block_size=32,
    enforce_eager=True,
    disable_log_stats=False,
    seed=0,
)

# Model shapes: (arch, query heads, KV heads). KV heads per rank are H.
MODEL_SHAPES = {
    "llama-mha": dict(arch="llama", num_heads=4, num_kv_heads=4),
    "llama-gqa": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "qwen2-mha": dict(arch="qwen2", num_heads=4, num_kv_heads=4),
    "qwen2-gqa": dict(arch="qwen2", num_heads=4, num_kv_heads=2),
}


def resident_counts(num_kv_heads: int) -> list[int]:
    """0, 1, H-1 and H."""
    return sorted({0, 1, num_kv_heads - 1, num_kv_heads})


def headinfer_llm(resident: int | None = None, **headinfer) -> dict:
    """LLM(...) kwargs selecting HEADINFER with the given settings."""
    if resident is not None:
        headinfer["resident_kv_heads"] = resident
    return {"attention_backend": "HEADINFER", "additional_config": {"headinfer": headinfer}}


def random_tokens(rng: random.Random, n: int) -> list[int]:
    # Ids the tiny tokenizer knows (it has ~428 tokens; 0-2 are specials).
    return [rng.randrange(3, 420) for _ in range(n)]


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = Path(item.path).relative_to(TESTS).parts[0]
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.path}: tests live in one of tests/{{{','.join(LAYERS)}}}/")
        item.add_marker(layer)


# Numba compiles each of the kernels' signatures on first use, minutes of
# one core each on CI's two, and keeps them in its on-disk cache (cache=True:
# the package's __pycache__, or NUMBA_CACHE_DIR) for every later process.
# The kernel tests run after the engine tests, whose engines (tiny models)
# mostly keep one Python thread busy; so where a session runs both, the
# selected kernel tests also run at its start in a background pytest on the
# other core, and the session's own kernel tests wait for it and find every
# signature compiled.
_WARMING = "HEADINFER_TESTS_KERNEL_WARMUP"
WARMUP_TIMEOUT = 1800
_warmup: subprocess.Popen | None = None


# The cores this run may use, before a test worker takes its share of them.
ALL_CORES = sorted(os.sched_getaffinity(0))


def pytest_configure(config):
    # pytest -n N (pytest-xdist, what .ci/run uses): each worker and what it
    # starts (engines, servers, compiles) keep to the worker's own share of
    # the cores, and its engines bind vLLM's CPU threads to them. Two
    # engines on one core would each wait at every OpenMP region for a
    # thread the other one holds, several times slower than one after the
    # other. A multi-rank engine binds its ranks to cores of their own
    # (cpu_thread_binding).
    global _session_env
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        mine = ALL_CORES[int(worker.removeprefix("gw")) % len(ALL_CORES)::count] or ALL_CORES
        os.sched_setaffinity(0, mine)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))
    _session_env = _runner_env()


def on_all_cores() -> None:
    """A child's affinity widened to every core of the run (a server's API
    process, engine core and worker hand requests to each other, which one
    core would serialise)."""
    os.sched_setaffinity(0, ALL_CORES)


def pytest_collection_finish(session):
    items = session.items
    kernels = [i for i, item in enumerate(items) if item.get_closest_marker("kernels")]
    engines_first = kernels and any(item.get_closest_marker("engine") for item in items[: kernels[0]])
    # (Under pytest -n the other worker is the background: no warm-up.)
    if (engines_first and not session.config.option.collectonly and not os.environ.get(_WARMING)
            and "PYTEST_XDIST_WORKER" not in os.environ):
        _start_kernel_warmup(session.config, [items[i].nodeid for i in kernels])


def _start_kernel_warmup(config, nodeids: list[str]) -> None:
    global _warmup
    workdir = config._tmp_path_factory.getbasetemp() / "kernel-warmup"
    workdir.mkdir()
    with open(workdir / "pytest.log", "w") as log:
        _warmup = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--basetemp", str(workdir / "tmp"), *nodeids],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
            env={**os.environ, _WARMING: "1"}, start_new_session=True,
        )  # fmt: skip
    config.add_cleanup(lambda: _kill_group(_warmup))


def pytest_runtest_setup(item):
    # Its results are the session's own to report: the background run only
    # fills the cache, so a failure there shows here.
    if _warmup is not None and item.get_closest_marker("kernels"):
        try:
            _warmup.wait(timeout=WARMUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(_warmup)  # the tests compile what it had not


@contextlib.contextmanager
def _environment_kept():
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


# Each test module and each test leave os.environ as they found it. vLLM's
# CPU platform sets variables for its workers (LD_PRELOAD,
# VLLM_WORKER_MULTIPROC_METHOD, ...) wherever a test builds an engine config
# in the pytest process; the runners of later tests would inherit them.
@pytest.fixture(autouse=True, scope="module")
def _module_environment_kept():
    with _environment_kept():
        yield


@pytest.fixture(autouse=True)
def _test_environment_kept():
    with _environment_kept():
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_models(model_dir):
    """Builds (once per session) and returns key -> path for MODEL_SHAPES."""
    from vllm_headinfer.tiny_model import build_tiny_model

    built = {}

    def get(key: str) -> str:
        if key not in built:
            built[key] = str(build_tiny_model(model_dir / key, **MODEL_SHAPES[key]))
        return built[key]

    return get


class RunnerError(AssertionError):
    pass


def _kill_group(proc: subprocess.Popen) -> None:
    _kill_pid_group(proc.pid)
    proc.wait()


def _kill_pid_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# Results of default-backend engines run in-process, by reference_key: a
# test comparing against an engine an earlier test of the session ran (same
# model, settings, prompts and sampling) reads its results instead of
# building it again. Multi-process runs are not shared: their tests read the
# engines' own log lines from the runner's output.
_references: dict[str, dict] = {}


def reference_key(spec: dict, engine: dict) -> str | None:
    """The key of a default-backend in-process engine's results (None for
    any other engine): its model, LLM(...) kwargs, environment, prompt
    logprobs and its scenarios' requests in the order it runs them (a prefix
    cache filled by one scenario serves the next)."""
    llm = engine["llm"]
    if not spec.get("inprocess") or "attention_backend" in llm or engine.get("config_only"):
        return None
    models = {**{k: m["path"] for k, m in spec.get("models", {}).items()}, **spec.get("paths", {})}
    return json.dumps(
        {
            "model": models[engine["model"]],
            "llm": llm,
            "env": engine.get("env", {}),
            "prompt_logprobs": engine.get("prompt_logprobs", False),
            "scenarios": [spec["scenarios"][s] for s in engine.get("scenarios", [])],
        },
        sort_keys=True,
    )


def run_engines(spec: dict, workdir: Path, name: str, timeout: float = 600) -> tuple[dict, str]:
    """Runs the engine runner on ``spec``; returns (results, combined output).

    Default-backend engines that ran in an earlier call of the session with
    the same reference_key are not run again; their results are the earlier
    ones (and their log lines are not in the output). The runner and every
    process it starts share a new process group, which is killed if the run
    exceeds ``timeout``.
    """
    keys = {e["name"]: reference_key(spec, e) for e in spec["engines"]}
    known = {n: _references[k] for n, k in keys.items() if k in _references}
    to_run = [e for e in spec["engines"] if e["name"] not in known]
    if known:
        print(f"engine runner {name}: default-backend results of {sorted(known)} from earlier runs")
    results, output = {"engines": {}}, ""
    if to_run:
        results, output = _run_runner({**spec, "engines": to_run}, workdir, name, timeout)
        for engine in to_run:
            key, res = keys[engine["name"]], results["engines"][engine["name"]]
            if key is not None and res.get("error") is None and res.get("scenario_error") is None:
                _references[key] = res
    # The engines in the spec's order, as the runner would give them.
    results["engines"] = {
        e["name"]: known.get(e["name"]) or results["engines"][e["name"]] for e in spec["engines"]
    }
    return results, output


def _run_runner(spec: dict, workdir: Path, name: str, timeout: float) -> tuple[dict, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{name}.json"
    log_path = workdir / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = _runner_env()
    t0 = time.monotonic()
    fork_server = _runner_fork_server(env)
    if fork_server is not None:
        rc = fork_server.run(spec_path, log_path, env, timeout)
    else:
        rc = _run_fresh(spec_path, log_path, env, timeout)
    output = log_path.read_text(errors="replace")
    lines = [ln for ln in output.splitlines() if ln.startswith(RESULT_MARK)]
    if rc is None:
        raise RunnerError(f"engine runner {name} exceeded {timeout} s; log {log_path}:\n"
                          + _tail(log_path))
    if rc != 0 or not lines:
        raise RunnerError(f"engine runner {name} failed (rc={rc}); log {log_path}:\n" + _tail(log_path))
    print(f"engine runner {name}: {time.monotonic() - t0:.1f} s")
    return json.loads(lines[-1][len(RESULT_MARK) :]), output


def _runner_env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    return env


def _differing(env: dict, other: dict, ignored: set[str]) -> set[str]:
    return {k for k in env.keys() | other.keys() if env.get(k) != other.get(k)} - ignored


def _run_fresh(spec_path: Path, log_path: Path, env: dict, timeout: float) -> int | None:
    """The runner as a new process; its exit code, None past ``timeout``."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(RUNNER), str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(REPO), env=env, start_new_session=True,
        )  # fmt: skip
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            # Engine-core/worker processes outlive a crashed runner otherwise.
            _kill_group(proc)


class _RunnerForkServer:
    """``engine_runner.py --serve``, a fork server: one process per test
    worker that has imported vLLM and forks a child per spec, so a spec's
    run starts with vLLM imported (its own process all the same: a crash or
    hang takes only the child, which runs in the environment given). Used
    where that environment is the session's but for what importing vLLM
    sets (and pytest's own variable): a variable a test set may change
    what importing vLLM does."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=str(REPO), env=env, start_new_session=True, bufsize=0,
        )  # fmt: skip
        try:
            imported = json.loads(self._answer("ready", time.monotonic() + 300))
        except TimeoutError:
            self.close()
            raise RunnerError("the engine runners' fork server did not import vLLM in 300 s") from None
        self.ignored = _differing(imported, env, set()) | {"PYTEST_CURRENT_TEST"}

    def serves(self, env: dict) -> bool:
        return self.proc.poll() is None and not _differing(env, self.env, self.ignored)

    def run(self, spec_path: Path, log_path: Path, env: dict, timeout: float) -> int | None:
        """The spec's exit code, as a runner of its own would give it;
        None where it ran past ``timeout`` (its process group is killed)."""
        self.proc.stdin.write((json.dumps([str(spec_path), str(log_path), env]) + "\n").encode())
        try:
            pid = int(self._answer("started", time.monotonic() + 60))
        except TimeoutError:
            self.close()
            raise RunnerError("the engine runners' fork server did not fork in 60 s") from None
        end = time.monotonic() + timeout
        try:
            return int(self._answer("exited", end))
        except TimeoutError:
            _kill_pid_group(pid)
            self._answer("exited", time.monotonic() + 60)
            return None
        finally:
            _kill_pid_group(pid)  # what the child started and left

    def _answer(self, word: str, end: float) -> str:
        line = b""
        while not line.endswith(b"\n"):
            remaining = end - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                raise TimeoutError(word)
            chunk = self.proc.stdout.read(1)
            if not chunk:
                raise RunnerError(f"the engine runners' fork server ended (rc={self.proc.wait()})")
            line += chunk
        got, _, value = line.decode().strip().partition(" ")
        assert got == word, line
        return value

    def close(self) -> None:
        _kill_group(self.proc)


_fork_server: _RunnerForkServer | None = None
# The runners' environment as the session began (pytest_configure): specs
# run under another one (a test changed a variable) get a runner of their own.
_session_env: dict | None = None


def _runner_fork_server(env: dict) -> _RunnerForkServer | None:
    global _fork_server
    if _fork_server is None:
        _fork_server = _RunnerForkServer(_session_env)
        atexit.register(_fork_server.close)
    return _fork_server if _fork_server.serves(env) else None


def _tail(path: Path, n: int = 80) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def engine_ok(results: dict, name: str) -> dict:
    res = results["engines"][name]
    for key, what in (("error", "failed to start"), ("scenario_error", "failed while generating")):
        if res.get(key) is not None:
            raise AssertionError(
                f"engine {name} {what}: {res[key]['type']}: {res[key]['message']}\n"
                + "\n".join(res[key].get("chain", []))
            )
    return res


def engine_log(output: str, name: str) -> list[str]:
    """The log lines printed while engine ``name`` ran (the runner marks the
    end of each engine)."""
    ends = [(m.group(1), m.end()) for m in re.finditer(r"engine_runner: (\S+) done", output)]
    start = 0
    for engine, end in ends:
        if engine == name:
            return output[start:end].splitlines()
        start = end
    raise AssertionError(f"no output of engine {name}")


def assert_same_outputs(expected: list[dict], actual: list[dict], what: str) -> None:
    """Identical token ids; sampled-token (and prompt) logprobs within 1e-3."""
    assert len(expected) == len(actual), what
    for i, (e, a) in enumerate(zip(expected, actual)):
        where = f"{what}, request {i}"
        assert a["token_ids"] == e["token_ids"], (
            f"{where}: token ids differ\n default:   {e['token_ids']}\n HEADINFER: {a['token_ids']}"
        )
        assert len(a["logprobs"]) == len(e["logprobs"]) == len(e["token_ids"]), where
        worst = max((abs(x - y) for x, y in zip(e["logprobs"], a["logprobs"])), default=0.0)
        assert worst <= LOGPROB_TOL, f"{where}: sampled-token logprob differs by {worst:.2e}"
        if "prompt_logprobs" in e or "prompt_logprobs" in a:
            pe, pa = e["prompt_logprobs"], a["prompt_logprobs"]
            assert len(pe) == len(pa), where
            diffs = [abs(x - y) for x, y in zip(pe, pa) if x is not None]
            assert diffs, where
            assert max(diffs) <= LOGPROB_TOL, (
                f"{where}: prompt logprob differs by {max(diffs):.2e}"
            )


def expand_counts(text: str) -> list[float]:
    """``3 in layers 0-1, 2.5 in 2`` -> ``[3, 3, 2.5]``."""
    counts = []
    for count, first, last in re.findall(r"([\d.]+) in (?:layers? )?(\d+)(?:-(\d+))?", text):
        counts += [float(count) if "." in count else int(count)] * (int(last or first) - int(first) + 1)
    return counts


def placement_of(lines: list[str]) -> dict:
    """Parses the (last) HEADINFER placement log line. ``resident`` and
    ``offloaded`` are per layer where every layer has the same count."""
    pat = re.compile(
        r"HEADINFER placement: (\d+)/(\d+) KV head-layers resident per rank "
        r"\((\d+) KV heads x (\d+) layers: ([^)]*)\); device KV ([\d.]+) GiB, "
        r"host KV ([\d.]+) GiB; pool (\d+) blocks = (\d+) tokens \(limited by "
        r"([^)]*\)?)\); decode reads ([\d.]+) MiB (?:over the link|from the host pool) per 1K tokens"
    )
    found = [m for m in map(pat.search, lines) if m]
    assert found, "no 'HEADINFER placement' log line:\n" + "\n".join(lines[-20:])
    m = found[-1]
    counts = expand_counts(m[5])
    heads = int(m[3])
    assert len(counts) == int(m[4]) and sum(counts) == int(m[1]), m[0]
    uniform = len(set(counts)) == 1
    return {
        "resident_head_layers": int(m[1]),
        "head_layers": int(m[2]),
        "heads": heads,
        "layers": int(m[4]),
        "counts": counts,
        "resident": counts[0] if uniform else None,
        "offloaded": heads - counts[0] if uniform else None,
        "device_gib": float(m[6]),
        "host_gib": float(m[7]),
        "blocks": int(m[8]),
        "tokens": int(m[9]),
        "limited_by": m[10],
        "link_mib_per_1k": float(m[11]),
    }


def planned_line(model_path: str, llm: dict) -> str:
    """The startup line vllm-headinfer-plan predicts for the engine ``llm``
    (LLM(...) kwargs)."""
    flags = [
        "--dtype", llm["dtype"], "--block-size", str(llm["block_size"]),
        "--max-model-len", str(llm["max_model_len"]),
        "--max-num-batched-tokens", str(llm["max_num_batched_tokens"]),
        "--kv-cache-memory-bytes", str(llm["kv_cache_memory_bytes"]),
        "--attention-backend", "HEADINFER",
        "--additional-config", json.dumps(llm["additional_config"]),
        "--kv-cache-dtype", llm.get("kv_cache_dtype", "auto"),
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "vllm_headinfer.plan", model_path, *flags],
        capture_output=True, text=True, cwd=str(REPO), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("startup line: ")]
    return line.removeprefix("startup line: ")


def cpu_thread_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND with one core per tensor-parallel worker:
    vLLM's automatic binding wants a NUMA node per rank, which a small
    machine does not have."""
    cores = ALL_CORES
    if len(cores) < ranks:
        pytest.skip(f"TP = {ranks} on CPU needs {ranks} cores")
    return "|".join(str(c) for c in cores[:ranks])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
