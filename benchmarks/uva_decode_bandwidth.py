"""Where decode over UVA loses link bandwidth: flash attention decode reading
pinned host KV in place, one query token, 8 KV heads x 128, 32 query heads,
131,072 tokens per layer in 16-token blocks (and 64, vLLM 0.34's default) of random order.

Compared, each as GB/s of K/V read per second of attention:
* working set: the same 512 MiB layer read 32 times, vs 32 different layers
  (16 GiB, as a 32-layer decode step reads them);
* host page layout: K and V interleaved per token ([B, H, N, 2D], the pool's
  layout) vs K and V planes per block and head ([B, H, 2, N, D]);
* pinning: cudaHostRegister on a plain allocation (what the pool does), with
  and without transparent huge pages (madvise), vs PyTorch's pinned allocator;
* the split plan: FA3's own heuristic (eager decode) vs the plan vLLM's
  builder makes under full CUDA graphs (scheduler metadata with at most 32
  splits), which the engine's decode graphs replay.

Usage (GPU host with CUDA vLLM): python benchmarks/uva_decode_bandwidth.py
"""

from __future__ import annotations

import json
import mmap
import sys
import time

import torch

TOKENS, HEADS, D, QH = 131072, 8, 128, 32
LAYER_BYTES = TOKENS * HEADS * 2 * D * 2


def host_buffer(nbytes: int, how: str) -> torch.Tensor:
    if how == "pin_memory":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if how == "register+thp":
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        t._keep = mm  # noqa: SLF001 - the tensor must keep its mapping alive
    else:
        t = torch.empty(nbytes, dtype=torch.uint8)
    t.fill_(0)
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    assert int(err) == 0, err
    return t


def views(buf: torch.Tensor, layers: int, layout: str, block: int = 16):
    """Per layer K and V device views [blocks, N, H, D] of a host buffer."""
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    dev = get_accelerator_view_from_cpu_tensor(buf.view(torch.bfloat16))
    blocks = TOKENS // block
    out = []
    for layer in range(layers):
        part = dev[layer * LAYER_BYTES // 2 : (layer + 1) * LAYER_BYTES // 2]
        if layout == "interleaved":
            pages = part.view(blocks, HEADS, block, 2 * D).transpose(1, 2)
            k, v = pages[..., :D], pages[..., D:]
        else:
            pages = part.view(blocks, HEADS, 2, block, D)
            k, v = pages[:, :, 0].transpose(1, 2), pages[:, :, 1].transpose(1, 2)
        out.append((k, v))
    return out


def graph_plan(seqused_k: torch.Tensor, cu_seqlens_q: torch.Tensor, block: int, max_splits: int = 32) -> dict:
    """The split plan FlashAttentionMetadataBuilder hands a full-graph decode
    (``flash_attn_max_num_splits_for_cuda_graph`` defaults to 32)."""
    from vllm.v1.attention.backends.fa_utils import get_scheduler_metadata

    plan = get_scheduler_metadata(
        batch_size=1, max_seqlen_q=1, max_seqlen_k=TOKENS, num_heads_q=QH, num_heads_kv=HEADS,
        headdim=D, cache_seqlens=seqused_k, qkv_dtype=torch.bfloat16, cu_seqlens_q=cu_seqlens_q,
        page_size=block, causal=True, window_size=(-1, -1), num_splits=max_splits)
    return dict(scheduler_metadata=plan, num_splits=max_splits)


def measure(kv, fa_version: int, graph_split_plan: bool = False, in_cuda_graph: bool = False,
            block: int = 16) -> float:
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    blocks = TOKENS // block
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(1, -1)
    q = torch.randn(1, QH, D, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    args = dict(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                max_seqlen_q=1, seqused_k=torch.tensor([TOKENS], dtype=torch.int32, device="cuda"),
                max_seqlen_k=TOKENS, softmax_scale=D**-0.5, causal=True, block_table=table,
                fa_version=fa_version)
    if graph_split_plan:
        args.update(graph_plan(args["seqused_k"], args["cu_seqlens_q"], block))
    reps = 32

    def step() -> None:
        for i in range(reps):
            k, v = kv[i % len(kv)]
            flash_attn_varlen_func(q=q, k=k, v=v, out=out, **args)

    for k, v in kv[:2]:
        flash_attn_varlen_func(q=q, k=k, v=v, out=out, **args)
    run = step
    if in_cuda_graph:  # the calls replayed as one graph, as the engine's decode step is
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
        run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return reps * LAYER_BYTES / (time.perf_counter() - t) / 1e9


def main() -> None:
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    fa = get_flash_attn_version(head_size=D)
    results = {"fa_version": fa}
    for how in ("register", "register+thp", "pin_memory"):
        layers = 32 if how != "pin_memory" else 1  # the caching allocator rounds up
        buf = host_buffer(layers * LAYER_BYTES, how)
        for layout in ("interleaved", "planes"):
            kv = views(buf, layers, layout)
            results[f"{how}/{layout}/1-layer"] = measure(kv[:1], fa)
            if layers > 1:
                results[f"{how}/{layout}/32-layers"] = measure(kv, fa)
                results[f"{how}/{layout}/32-layers/graph-split-plan"] = measure(kv, fa, True)
                results[f"{how}/{layout}/32-layers/graph-split-plan/replayed"] = measure(kv, fa, True, True)
                if how == "register+thp" and layout == "planes":
                    # vLLM 0.34's default block is 64 tokens (0.32's: 16)
                    kv64 = views(buf, layers, layout, 64)
                    results[f"{how}/{layout}/32-layers/block64"] = measure(kv64, fa, block=64)
                    results[f"{how}/{layout}/32-layers/block64/graph-split-plan/replayed"] = measure(
                        kv64, fa, True, True, block=64)
            print(json.dumps(results), flush=True)
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr()) if how != "pin_memory" else None
        del buf
    with open(sys.argv[1] if len(sys.argv) > 1 else "uva_bandwidth.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
