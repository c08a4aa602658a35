"""The CUDA pieces of the offload path, checked one by one against torch.

* K/V written through the UVA view of a pinned host pool land exactly where
  the torch reference writes them;
* the staging gather copies the requested blocks of a head group exactly;
* flash attention over staged copies (remapped block table) and over the
  host pool read in place both match the fp32 torch reference;
* HEADINFER's split calls, with FLASH_ATTN's KV-split plan and split count,
  equal one FLASH_ATTN call over all heads bit for bit (prefill and decode
  batches, under a fixed split bound and eager);
* the split count computed on the host equals the one flash attention picks;
* an fp8 cache: K/V quantised through the UVA view land as on the device and
  as the torch path quantises them; flash attention over fp8 host pages (all
  heads, and one-head slices) equals the same call over a device copy bit for
  bit, and the torch reference within fp8 rounding (of the probabilities
  too, which FA3 multiplies with V in fp8);
* CPU co-attention's split head: flash attention's part (the first blocks
  over UVA, with its log-sum-exps; none for a one-block context) and the CPU
  kernel's rest, merged by vLLM's CUDA merge kernel, match the torch
  reference over the whole head, in decode and verify batches.

Also the small case for ``compute-sanitizer --tool racecheck``:
``python tests/gpu/test_kernels.py`` runs every check once without pytest.
"""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BLOCK, HEADS, D, Q_PER_KV = 16, 4, 128, 4


def _pool(num_blocks: int, dtype=torch.bfloat16):
    from vllm_headinfer.host_pool import HostKVPool
    from vllm_headinfer.spec import split_spec
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = split_spec(
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=D, dtype=dtype), 0
    )
    return HostKVPool(["layer.0"], spec, num_blocks, pin=True)


def _batch(seq_lens, q_lens, num_blocks, gen):
    """Block tables with shuffled block ids, and slots of the new tokens."""
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    max_blocks = max(-(-s // BLOCK) for s in seq_lens)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    start = 0
    for r, s in enumerate(seq_lens):
        n = -(-s // BLOCK)
        table[r, :n] = perm[start : start + n]
        start += n
    return table, _slots(table, seq_lens, q_lens)


def _slots(table, seq_lens, q_lens):
    """Slots of the last ``q_lens[r]`` tokens of each request."""
    return torch.tensor([int(table[r, pos // BLOCK]) * BLOCK + pos % BLOCK
                         for r, (s, q) in enumerate(zip(seq_lens, q_lens))
                         for pos in range(s - q, s)], dtype=torch.int64)


# One batch for the UVA and fp8 checks: a prefill, decodes and a chunk with
# context.
SEQ_LENS, Q_LENS = [300, 17, 611, 1], [300, 1, 77, 1]


def _flash_args(table, seq_lens, q_lens):
    """Query starts and sequence lengths (host), and the flash attention
    arguments every call over this batch shares."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    common = dict(cu_seqlens_q=qsl.cuda(), max_seqlen_q=max(q_lens), seqused_k=sl.cuda(),
                  max_seqlen_k=max(seq_lens), softmax_scale=D**-0.5, causal=True,
                  fa_version=get_flash_attn_version(head_size=D), block_table=table.cuda())
    return qsl, sl, common


def check_all(seed: int = 0) -> None:
    from vllm._custom_ops import reshape_and_cache_flash
    from vllm_headinfer.layout import fa_view
    from vllm_headinfer.layout import host_kv
    from vllm_headinfer.ops.staging import gather_pages
    from vllm_headinfer.ops.torch_attention import paged_attention, write_paged
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

    gen = torch.Generator().manual_seed(seed)
    num_blocks = 96
    seq_lens, q_lens = SEQ_LENS, Q_LENS
    table, slots = _batch(seq_lens, q_lens, num_blocks, gen)
    pool = _pool(num_blocks)
    host = pool.layer("layer.0")
    ref = torch.randn(host.shape, generator=gen).to(torch.bfloat16)
    host.copy_(ref)  # context written by earlier steps
    t = int(sum(q_lens))
    key = torch.randn(t, HEADS, D, generator=gen).to(torch.bfloat16)
    value = torch.randn(t, HEADS, D, generator=gen).to(torch.bfloat16)
    write_paged(*host_kv(ref), key, value, slots)

    dev = pool.device_layer("layer.0")
    k_cache, v_cache = host_kv(dev)
    one = torch.ones((), device="cuda")
    reshape_and_cache_flash(key.cuda(), value.cuda(), k_cache.transpose(1, 2),
                            v_cache.transpose(1, 2), slots.cuda(), "auto", one, one)
    torch.cuda.synchronize()
    assert torch.equal(host, ref), "UVA write differs from the reference write"

    ids = table.reshape(-1).cuda()
    staged = torch.empty(ids.numel(), 2, 2, BLOCK, D, dtype=torch.bfloat16, device="cuda")
    gather_pages(dev[:, 1:3], ids, staged)
    torch.cuda.synchronize()
    assert torch.equal(staged.cpu(), ref[table.reshape(-1).long(), 1:3]), "gather differs"

    qsl, sl, common = _flash_args(table, seq_lens, q_lens)
    query = torch.randn(t, HEADS * Q_PER_KV, D, generator=gen).to(torch.bfloat16)
    expect = torch.zeros(t, HEADS * Q_PER_KV, D)
    paged_attention(query.float(), *host_kv(ref.float()), table, qsl, sl, D**-0.5, expect)

    q = query.cuda()
    out_uva = torch.empty_like(q)
    k, v = map(fa_view, host_kv(dev))
    flash_attn_varlen_func(q=q, k=k, v=v, out=out_uva, **common)
    # Staged: heads 1..2 only, compact copy, remapped table, strided q/out slices.
    out_staged = torch.zeros_like(q)
    remapped = torch.arange(ids.numel(), dtype=torch.int32, device="cuda").view(table.shape)
    k, v = map(fa_view, host_kv(staged))
    hq = slice(1 * Q_PER_KV, 3 * Q_PER_KV)
    flash_attn_varlen_func(q=q[:, hq], k=k, v=v, out=out_staged[:, hq],
                           **{**common, "block_table": remapped})
    distinct = check_long_decode_split_plan()
    for batch in (slice(None), slice(1, 2)):  # the mixed batch; one decode request
        distinct += check_split_plan(q, dev, table, qsl, sl, q_lens, seq_lens, batch)
    if get_flash_attn_version(head_size=D) == 3:
        assert distinct, "no eager case where a head subset would split differently"
    torch.cuda.synchronize()
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_uva.float().cpu(), expect, **tol)
    torch.testing.assert_close(out_staged[:, hq].float().cpu(), expect[:, hq], **tol)
    assert torch.equal(out_staged[:, :Q_PER_KV], torch.zeros_like(out_staged[:, :Q_PER_KV])), (
        "a head-slice write leaked outside its slice"
    )
    pool.release()


def check_fp8(seed: int = 2) -> None:
    from vllm._custom_ops import reshape_and_cache_flash
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
    from vllm_headinfer.layout import fa_view
    from vllm_headinfer.kv_quant import Fp8Scales, dequantize
    from vllm_headinfer.layout import host_kv
    from vllm_headinfer.ops.torch_attention import paged_attention, write_paged

    gen = torch.Generator().manual_seed(seed)
    num_blocks = 96
    seq_lens, q_lens = SEQ_LENS, Q_LENS
    table, _ = _batch(seq_lens, q_lens, num_blocks, gen)
    pool = _pool(num_blocks, torch.uint8)
    host, dev = pool.layer("layer.0"), pool.device_layer("layer.0")
    on_device = torch.zeros(host.shape, dtype=torch.uint8, device="cuda")
    # Every slot of the requests, as if earlier steps had written them.
    all_slots = _slots(table, seq_lens, seq_lens)
    t = all_slots.numel()
    key = (torch.randn(t, HEADS, D, generator=gen) * 2).to(torch.bfloat16)
    value = torch.randn(t, HEADS, D, generator=gen).to(torch.bfloat16)
    k_scale = torch.tensor(0.5, device="cuda")
    v_scale = torch.tensor(0.25, device="cuda")
    for pages in (dev, on_device):
        k_cache, v_cache = host_kv(pages)
        reshape_and_cache_flash(key.cuda(), value.cuda(), k_cache.transpose(1, 2),
                                v_cache.transpose(1, 2), all_slots.cuda(), "fp8", k_scale, v_scale)
    torch.cuda.synchronize()
    assert torch.equal(host, on_device.cpu()), "fp8 UVA write differs from the device write"
    scales = Fp8Scales(torch.float8_e4m3fn, k_scale.cpu(), v_scale.cpu())
    expect_pages = torch.zeros_like(host)
    write_paged(*host_kv(expect_pages), key.float(), value.float(), all_slots, scales)
    assert torch.equal(host, expect_pages), "fp8 bytes differ from the torch path's quantisation"

    qsl, sl, common = _flash_args(table, seq_lens, q_lens)
    query = torch.randn(int(sum(q_lens)), HEADS * Q_PER_KV, D, generator=gen).to(torch.bfloat16)
    fp8 = current_platform.fp8_dtype()
    q = query.cuda().to(fp8)  # as the layer quantises queries (q scale 1)
    expect = torch.zeros(q.shape[0], HEADS * Q_PER_KV, D)
    paged_attention(dequantize(q.cpu().view(torch.uint8), torch.tensor(1.0), fp8, 1, torch.float32),
                    *host_kv(host), table, qsl, sl, D**-0.5, expect, scales)
    for kv_heads in (slice(0, HEADS), slice(2, 3), slice(1, 3)):
        heads = kv_heads.stop - kv_heads.start
        hq = slice(kv_heads.start * Q_PER_KV, kv_heads.stop * Q_PER_KV)
        shape = (len(seq_lens), heads)
        descale = dict(q_descale=torch.ones((), device="cuda").expand(shape),
                       k_descale=k_scale.expand(shape), v_descale=v_scale.expand(shape))
        outs = []
        for pages in (dev, on_device):
            k, v = (fa_view(x.view(fp8)) for x in host_kv(pages[:, kv_heads]))
            out = torch.zeros(q.shape[0], HEADS * Q_PER_KV, D, dtype=torch.bfloat16, device="cuda")
            flash_attn_varlen_func(q=q[:, hq], k=k, v=v, out=out[:, hq], **descale, **common)
            outs.append(out)
        torch.cuda.synchronize()
        assert torch.equal(outs[0], outs[1]), f"fp8 over host pages differs from device, heads {kv_heads}"
        # FA3 also rounds the softmax probabilities to fp8 for the PV product.
        torch.testing.assert_close(outs[0][:, hq].float().cpu(), expect[:, hq], atol=0.1, rtol=0.05)
    pool.release()


def check_split_plan(q, pages, table, qsl, sl, q_lens, seq_lens, batch) -> int:
    """HEADINFER's split calls, given the split count of FLASH_ATTN's call and
    the plan for all heads made for that count, as
    ``HeadInferMetadataBuilder.build`` gives them, equal one FLASH_ATTN call
    over all heads that reads vLLM's cache layout ``[blocks, heads, N, 2D]``
    with FLASH_ATTN's own plan, bit for bit. The R = 1 split: head 0 from such
    pages, heads [1, HEADS) from the host pool's K/V planes.
    * a fixed split bound (full CUDA graphs; 32 is vLLM's default);
    * eager (FLASH_ATTN passes no bound): the count FA3 picks for all heads,
      also with vLLM's wide block tables.
    Returns how many eager cases split, with a count that calls over one or
    three KV heads alone would not pick."""
    from vllm_headinfer.layout import fa_view
    from vllm_headinfer.ops.flash_splits import all_heads_num_splits
    from vllm_headinfer.layout import device_kv, host_kv
    from vllm.v1.attention.backends.fa_utils import (
        flash_attn_varlen_func,
        get_flash_attn_version,
        get_scheduler_metadata,
    )

    fa = get_flash_attn_version(head_size=D)
    if fa != 3:
        print(f"split-plan check not run: flash attention {fa} plans inside each call")
        return 0
    reqs = range(len(seq_lens))[batch]
    q_lens = [q_lens[r] for r in reqs]
    seqused = sl[batch].cuda()
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    rows = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in reqs]).cuda()
    q = q[rows]
    shape = dict(max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens[r] for r in reqs))
    hk, hv = host_kv(pages)
    device_pages = torch.cat([hk, hv], dim=-1).contiguous()  # FLASH_ATTN's layout
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    narrow = table[batch].cuda()
    wide = torch.zeros(narrow.shape[0], 1024, dtype=torch.int32, device="cuda")
    wide[:, : narrow.shape[1]] = narrow

    def plan_for(num_splits: int):
        return get_scheduler_metadata(
            batch_size=len(q_lens), num_heads_q=HEADS * Q_PER_KV, num_heads_kv=HEADS, headdim=D,
            cache_seqlens=seqused, qkv_dtype=torch.bfloat16, cu_seqlens_q=cu, page_size=BLOCK,
            causal=True, num_splits=num_splits, **shape)

    def count(kv_heads: int) -> int:
        return all_heads_num_splits(
            num_heads=kv_heads * Q_PER_KV, num_kv_heads=kv_heads, head_size=D,
            max_query_len=shape["max_seqlen_q"], max_seq_len=shape["max_seqlen_k"],
            block_size=BLOCK, num_sms=num_sms)

    distinct = 0
    for block_table, bound in ((narrow, 32), (narrow, 0), (wide, 0)):

        def attend(k, v, heads: slice, out, num_splits: int, plan) -> None:
            hq = slice(heads.start * Q_PER_KV, heads.stop * Q_PER_KV)
            flash_attn_varlen_func(
                q=q[:, hq], k=fa_view(k), v=fa_view(v), out=out[:, hq], cu_seqlens_q=cu,
                seqused_k=seqused, softmax_scale=D**-0.5, causal=True, fa_version=fa,
                block_table=block_table, num_splits=num_splits, scheduler_metadata=plan,
                **shape)

        splits = bound or count(HEADS)
        # As HeadInferMetadataBuilder._split_plan: one split takes no plan.
        split_plan = None if splits == 1 else plan_for(splits)
        reference, got = torch.empty_like(q), torch.empty_like(q)
        attend(*device_kv(device_pages, D), slice(0, HEADS), reference, bound, plan_for(bound))
        attend(*device_kv(device_pages[:, :1], D), slice(0, 1), got, splits, split_plan)
        attend(hk[:, 1:], hv[:, 1:], slice(1, HEADS), got, splits, split_plan)
        torch.cuda.synchronize()
        alone = (count(1), count(HEADS - 1))
        label = (f"bound {bound}, table width {block_table.shape[1]}, "
                 f"splits {splits} (1 and {HEADS - 1} KV heads alone: {alone[0]}, {alone[1]})")
        print("split plan:", label)
        assert torch.equal(got, reference), (
            f"{label}: differs from FLASH_ATTN's call by "
            f"{(got.float() - reference.float()).abs().max().item()}"
        )
        distinct += not bound and splits > 1 and splits not in alone
    return distinct


def check_long_decode_split_plan(seed: int = 1) -> int:
    """check_split_plan on one decode request of 8,192 tokens, where the
    offloaded heads of a long context would pick more splits on their own."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = 8192
    num_blocks = seq_len // BLOCK + 1
    pool = _pool(num_blocks)
    host = pool.layer("layer.0")
    host.copy_(torch.randn(host.shape, generator=gen).to(torch.bfloat16))
    table = (torch.arange(num_blocks - 1, dtype=torch.int32) + 1).view(1, -1)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    sl = torch.tensor([seq_len], dtype=torch.int32)
    q = torch.randn(1, HEADS * Q_PER_KV, D, generator=gen).to(torch.bfloat16).cuda()
    try:
        return check_split_plan(q, pool.device_layer("layer.0"), table, qsl, sl, [1], [seq_len],
                                slice(None))
    finally:
        pool.release()


def _requested_bytes() -> int:
    """Bytes requested from the caching allocator so far (sizes as asked
    for, before its rounding)."""
    return torch.cuda.memory_stats()["requested_bytes.all.allocated"]


def _flash_split_count(kv_heads, group, head_size, max_q, width, block) -> int:
    """The split count flash attention picks for one eager call, read from
    the split buffers it allocates: ``num_splits`` float32 partial outputs
    and log-sum-exps per query row and head, and the plan's per-request
    split counts (int32, requests rounded up to 4). 1 allocates none."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    heads = kv_heads * group
    q = torch.zeros(1, heads, head_size, dtype=torch.bfloat16, device="cuda")
    kv = torch.zeros(1, block, kv_heads, head_size, dtype=torch.bfloat16, device="cuda")
    args = dict(
        q=q, k=kv, v=kv, cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
        seqused_k=torch.ones(1, dtype=torch.int32, device="cuda"), max_seqlen_q=max_q,
        max_seqlen_k=width * block, causal=True, fa_version=3,
        block_table=torch.zeros(1, width, dtype=torch.int32, device="cuda"),
    )

    def allocated(num_splits: int) -> int:
        before = _requested_bytes()
        flash_attn_varlen_func(num_splits=num_splits, **args)
        return _requested_bytes() - before

    extra = allocated(0) - allocated(1)
    if extra == 0:
        return 1
    per_split, per_plan = heads * (head_size + 1) * 4, 4 * 4
    if (extra - per_plan) % per_split == 0 and extra > per_plan + per_split:
        return (extra - per_plan) // per_split
    raise AssertionError(f"unexpected split buffers of {extra} bytes")


def check_split_count() -> None:
    """``flash_splits.all_heads_num_splits`` equals the split count flash
    attention picks, over KV head counts, query group sizes, head sizes,
    query lengths and block-table widths (KV lengths)."""
    from vllm_headinfer.ops.flash_splits import all_heads_num_splits
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    if get_flash_attn_version(head_size=D) != 3:
        print("split-count check not run: not flash attention 3")
        return
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = misses = 0
    seen = set()
    grid = itertools.product(
        (64, 128),  # head size
        (1, 2, 3, 4, 8),  # KV heads
        (1, 4, 8),  # query heads per KV head
        (1, 2, 8, 16, 17, 33, 64, 65, 100, 200, 416, 600, 2048),  # longest query
        (1, 4, 5, 8, 9, 16, 33, 64, 100, 257, 1024, 4096, 16384),  # block-table width
        (16, 128),  # block size
    )
    for head_size, kv_heads, group, max_q, width, block in grid:
        shape = (kv_heads, group, head_size, max_q, width, block)
        want = _flash_split_count(*shape)
        got = all_heads_num_splits(
            num_heads=kv_heads * group, num_kv_heads=kv_heads, head_size=head_size,
            max_query_len=max_q, max_seq_len=width * block, block_size=block, num_sms=num_sms)
        cases += 1
        seen.add(want)
        if got != want:
            misses += 1
            if misses <= 20:
                print(f"split count (kv_heads, group, head_size, max_q, width, block)={shape}: "
                      f"flash attention {want}, computed {got}")
    print(f"split count: {cases - misses} of {cases} shapes agree; counts seen {sorted(seen)}")
    assert misses == 0, f"{misses} of {cases} shapes differ"


def check_split_head(seed: int = 3) -> None:
    from types import SimpleNamespace

    from vllm_headinfer.coattention.share import merge_split_head, split_prefix_tokens
    from vllm_headinfer.coattention.kernel import decode_attention
    from vllm_headinfer.ops.cuda_attention import CudaHeadAttention
    from vllm_headinfer.layout import host_kv
    from vllm_headinfer.ops.torch_attention import paged_attention
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    gen = torch.Generator().manual_seed(seed)
    seq_lens, q_lens = [1, 40, 2000, 700, 33], [1, 1, 1, 4, 3]
    num_blocks = sum(-(-s // BLOCK) for s in seq_lens) + 1
    table, _ = _batch(seq_lens, q_lens, num_blocks, gen)
    pool = _pool(num_blocks)
    host = pool.layer("layer.0")
    host.copy_(torch.randn(host.shape, generator=gen).to(torch.bfloat16))
    t, head, keep = sum(q_lens), 2, 7  # the split head; the GPU's 7/16 of its blocks
    query = torch.randn(t, HEADS * Q_PER_KV, D, generator=gen).to(torch.bfloat16)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    ops = object.__new__(CudaHeadAttention)
    ops.impl = SimpleNamespace(num_resident=0, group=Q_PER_KV, scale=D**-0.5)
    ops.fa_version, ops.fp8 = get_flash_attn_version(head_size=D), None
    m = SimpleNamespace(query_start_loc=qsl.cuda(), max_query_len=max(q_lens), seq_lens=sl.cuda(),
                        max_seq_len=max(seq_lens), block_table=table.cuda(),
                        scheduler_metadata=None, num_splits=0)
    prefix = split_prefix_tokens(sl.cuda(), qsl.cuda(), BLOCK, keep)
    assert prefix[0] == 0 and prefix[2] > 0
    gpu_out, gpu_lse = ops.attend_split_head(None, query.cuda(), pool.device_layer("layer.0"), m,
                                             head, keep, prefix, torch.bfloat16)
    rows = slice(head * Q_PER_KV, (head + 1) * Q_PER_KV)
    cpu_out = torch.empty(t, Q_PER_KV, D, dtype=torch.bfloat16)
    cpu_lse = torch.empty(Q_PER_KV, t)
    decode_attention(query[:, rows], host[:, head : head + 1], table, sl, qsl, D**-0.5,
                     torch.empty(t, 0, D, dtype=torch.bfloat16), split_keep=keep,
                     split_out=cpu_out, split_lse=cpu_lse)
    merged = torch.empty(t, HEADS * Q_PER_KV, D, dtype=torch.bfloat16, device="cuda")
    merge_split_head(merged[:, rows], gpu_out, gpu_lse, cpu_out.cuda(), cpu_lse.cuda())
    expect = torch.zeros(t, Q_PER_KV, D)
    paged_attention(query[:, rows].float(), *host_kv(host[:, head : head + 1].float()), table, qsl,
                    sl, D**-0.5, expect)
    torch.testing.assert_close(merged[:, rows].float().cpu(), expect, atol=2e-2, rtol=2e-2)
    pool.release()


def test_split_head_parts_merge_on_the_gpu():
    check_split_head()


def test_uva_write_gather_and_attention():
    check_all()


def test_fp8_pages_in_host_memory_read_as_on_device():
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    if get_flash_attn_version(head_size=D) != 3:
        pytest.skip("fp8 attention needs flash attention 3")
    check_fp8()


def test_split_count_matches_flash_attention():
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    if get_flash_attn_version(head_size=D) != 3:
        pytest.skip("flash attention 3 only")
    check_split_count()


if __name__ == "__main__":
    check_split_head()
    check_all()
    check_fp8()
    check_split_count()
    print("kernel checks passed")
