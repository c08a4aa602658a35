"""The process's CPU co-attention on CUDA: the serving thread, its pinned
slots and handshake words, and the tuning of auto's split that reads its
loop's figures. One object per process (``process_coattention``); each
metadata builder hands it to its layers' data path (ops/cuda_attention.py),
which posts a layer's host share and later collects it, and to nothing else.

Per layer call, with nothing on the host waiting for the GPU (service.py has
the handshake):

1. ``post``: the call is posted to the serving thread; on the current
   stream the CPU heads' queries are copied into a pinned slot and the
   call's number is written to a pinned word. This step's K/V were written
   into the pool (through its UVA view) earlier on the same stream, so the
   serving thread, which waits for that word, reads them;
2. the data path launches the GPU's attention as without co-attention, over
   its narrower slice of the pool's UVA view, and its part of the split head
   beside it on the side stream;
3. the serving thread runs the kernel into pinned output slots and writes
   the call's number to a second word, while the GPU reads its share;
4. ``collect``: the stream writes the number to a third word (the serving
   thread's count of which reader was last), waits for the second word,
   copies the outputs to the device and merges the split head's two parts.

Should the serving thread fail (service.py: it raised, or stopped answering),
the stream's waits pass and the model's thread raises at its next post or
step (``between_steps``).

The call numbers are arguments of the stream's write and wait, new in every
call, so such steps do not replay from CUDA graphs: where co-attention is
on, metadata.py keeps attention out of full graphs (piecewise graphs capture
the rest of the model).
"""

from __future__ import annotations

import weakref

import torch

from vllm_headinfer.coattention.share import CpuShare, HostStep, count_call, merge_split_head
from vllm_headinfer.coattention.tuning import SplitTuning


class CudaCoattention:
    """The serving thread (service.py), its pinned query and output slots of
    ``slot_bytes`` and ``lse_bytes``, and the handshake words the GPU writes
    and waits on, for queries of ``query_dtype``."""

    def __init__(self, query_dtype: torch.dtype, slot_bytes: int, lse_bytes: int) -> None:
        from vllm_headinfer.coattention.device_flags import DeviceFlags
        from vllm_headinfer.coattention.kernel import raw_words
        from vllm_headinfer.coattention.service import FLAG_WORDS, CoattentionService

        self.query_dtype = query_dtype
        self.slot_bytes = (slot_bytes, lse_bytes)
        self.queries, self.out, self.lse = (
            torch.empty(size, dtype=dtype, pin_memory=True)
            for size, dtype in ((slot_bytes // query_dtype.itemsize, query_dtype),
                                (slot_bytes // 4, torch.float32), (lse_bytes // 4, torch.float32)))
        self.flags = DeviceFlags(FLAG_WORDS)
        self.service = CoattentionService(
            self.flags.host, *raw_words(self.queries), self.out.numpy(), self.lse.numpy(),
            drain=torch.cuda.synchronize)

    def register(self) -> None:
        """Every co-attending layer of the running model and the metadata
        tables of this step's groups (the first call of the process, or of
        a new group or engine: the serving loop restarts)."""
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        layers = []
        for layer in context.no_compile_layers.values():
            impl = getattr(layer, "impl", None)
            share = getattr(impl, "cpu_share", None)
            if share is None:
                continue
            pages = impl.pool_for(layer).layer(impl.host_layer_name(layer))
            layers.append(served_entry(self.service, share, layer, pages, impl.ops.query_scale))
        metadata = context.attn_metadata
        steps = {id(m.host_step.buffers): m.host_step.buffers
                 for m in (metadata.values() if isinstance(metadata, dict) else [])
                 if getattr(m, "host_step", None) is not None and m.host_step.buffers}
        self.service.register(layers, [served_tables(b) for b in steps.values()])


def served_entry(service, share: CpuShare, layer, pages: torch.Tensor, query_scale):
    """``(key, ServedLayer)`` of ``share``'s layer for ``service.register``.
    The service forgets its layers when the share goes (its engine went):
    their views of the host pool go with them, and the pool can be freed."""
    # peek() is (object, callback, args, kwargs), or None once it has run.
    current = share.finalizer.peek() if share.finalizer is not None else None
    if current is None or current[1] != service.forget:
        if share.finalizer is not None:
            share.finalizer.detach()  # (a service of another query format, forgotten)
        share.finalizer = weakref.finalize(share, service.forget)
        # At exit the process's threads and memory go anyway, and a drain
        # could meet a CUDA context already torn down.
        share.finalizer.atexit = False
    return share.key, served_layer(share, layer, pages, query_scale)


def served_layer(share: CpuShare, layer, pages: torch.Tensor, query_scale):
    """``share``'s layer as the serving loop reads it: ``pages`` the
    layer's host pages ``[blocks, H_off, 2, N, D]``."""
    from vllm_headinfer.coattention.kernel import flat_pages, head_scales, page_format
    from vllm_headinfer.coattention.service import ServedLayer

    pages = pages[:, share.pool_start:]
    flat, block_stride, head_stride = flat_pages(pages)
    kwargs = share.kernel_arguments(layer, query_scale)
    return ServedLayer(
        flat, block_stride, head_stride, pages.shape[3],
        page_format(pages.dtype, kwargs.get("fp8")), share.heads, share.group, pages.shape[4],
        share.split_keep, share.threads, kwargs["scale"],
        head_scales(share.heads, kwargs.get("k_scale", 1.0), kwargs.get("v_scale", 1.0)),
        share.gpu_heads)


def served_tables(buffers: tuple[torch.Tensor, ...]):
    """A HostStepCopies' pinned buffers, keyed as HostStep.buffers, as the
    serving loop reads them."""
    return buffers, tuple(b.numpy() for b in buffers)


class CoattentionRuntime:
    """The process's co-attention state: the slots' sizes its builders
    reserved, the serving thread with its slots (``cuda``, made at the first
    post) and the tuning of auto's split, which reads that thread's loop."""

    def __init__(self) -> None:
        self.slot_bytes = 0  # the query and output slots'
        self.lse_bytes = 0  # the log-sum-exps'
        self.cuda: CudaCoattention | None = None
        self.tuning = SplitTuning(service=lambda: self.service)

    @property
    def service(self):
        """The serving loop's service, None before the first post."""
        return self.cuda.service if self.cuda is not None else None

    def reserve(self, requests: int, batched_tokens: int, query_len: int, num_heads: int,
                head_size: int) -> None:
        """Room for the largest short-query step: ``requests`` with their
        most query tokens (``query_len``), at most ``batched_tokens``, all
        query heads (of at most 4 bytes an element), and per token a
        log-sum-exp of each query head."""
        if self.cuda is not None and self.cuda.service.failure is not None:
            # A new engine's builders (the one whose serving thread failed
            # is dead, by that failure's error): this one gets its own.
            self.cuda.service.close()
            self.cuda = None
        tokens = min(requests * query_len, batched_tokens)
        self.slot_bytes = max(self.slot_bytes, tokens * num_heads * head_size * 4)
        self.lse_bytes = max(self.lse_bytes, tokens * num_heads * 4)

    def slots(self, query_dtype: torch.dtype) -> CudaCoattention:
        """The serving thread and slots for queries of ``query_dtype``, made
        anew where the queries' format changed or an engine reserved larger
        slots than they have (everything made from the slots goes with
        them)."""
        cuda, reserved = self.cuda, (self.slot_bytes, self.lse_bytes)
        if (cuda is None or cuda.query_dtype != query_dtype
                or any(want > have for want, have in zip(reserved, cuda.slot_bytes))):
            if cuda is not None:
                cuda.service.close()
                # The GPU's last waits and copies read the old words and
                # slots: they must be past before that pinned memory goes.
                cuda.service.drain()
            self.cuda = CudaCoattention(query_dtype, *reserved)
        return self.cuda

    def between_steps(self) -> None:
        """The serving loop's business in the model's thread between steps
        (every step's metadata calls it): its failure raised
        (service.CoattentionFailure), for vLLM to make an engine error of;
        the layers of a share that went let go."""
        if self.cuda is not None:
            self.cuda.service.raise_failure()
            self.cuda.service.release_forgotten()

    def warm_up(self, pages_dtype: torch.dtype, query_dtype: torch.dtype) -> float:
        """Compiles the serving loop at startup for an engine's page and
        query formats (service.warm_up); returns the seconds it took."""
        from vllm_headinfer.coattention.kernel import flat_pages, raw_words
        from vllm_headinfer.coattention.service import warm_up

        pages, _, _ = flat_pages(torch.zeros(1, 1, 2, 1, 1, dtype=pages_dtype))
        return warm_up(pages, *raw_words(torch.zeros(1, dtype=query_dtype)))

    def post(self, share: CpuShare, query: torch.Tensor, step: HostStep) -> int:
        """Step 1 of a layer call: posts ``share``'s part of ``query`` to
        the serving thread and, on the current stream, copies its queries to
        the slot and publishes the call. Returns the call's number."""
        from vllm_headinfer.coattention.service import PUBLISHED

        t, dim = step.tokens, query.shape[2]
        n, blocks = step.block_table.shape
        cuda = self.slots(query.dtype)
        service = cuda.service
        if share.key not in service.layers or step.buffers not in service.tables:
            cuda.register()
        call = service.post(share.key, step.buffers, n, blocks, t)
        rows = t * share.heads * share.group
        cuda.queries[: rows * dim].view(t, share.heads * share.group, dim).copy_(
            query[:t, share.query_heads], non_blocking=True)
        cuda.flags.write(PUBLISHED, call)
        return call

    def collect(self, call: int, share: CpuShare, step: HostStep, output: torch.Tensor,
                split_part: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Step 4, once the GPU's share is launched: the stream says the
        GPU's part ended, waits for the call's outputs and writes them into
        ``output``, a split head merged with ``split_part``, the GPU's part
        (output and log-sum-exps). Nothing here waits for the GPU."""
        from vllm_headinfer.coattention.service import DONE, FINISHED

        cuda = self.cuda
        t, g, dim = step.tokens, share.group, output.shape[2]
        rows = t * share.heads * g
        split = 1 if share.split_keep else 0
        cuda.flags.write(FINISHED, call)  # (which reader was last: the serving thread counts)
        cuda.flags.wait(DONE, call)
        # Whole prefixes of the slots: a contiguous pinned source is copied in
        # stream order (a strided one would be gathered on the host first, now).
        device = output.device
        out = cuda.out[: rows * dim].to(device, non_blocking=True).view(t, share.heads, g, dim)
        if share.heads > split:
            output[:t, share.whole_query_heads].copy_(out[:, split:].reshape(t, -1, dim))
        if split:
            gpu_out, gpu_lse = split_part
            lse = cuda.lse[:rows].to(device, non_blocking=True).view(t, share.heads, g)
            merge_split_head(output[:t, share.split_query_heads], gpu_out, gpu_lse,
                             out[:, 0].to(output.dtype), lse[:, 0].T.contiguous())
        count_call(t, step.block_table.shape[0])


# The one per process: its builders hand it on (metadata.py).
process_coattention = CoattentionRuntime()
