"""Per-step attention metadata, and the builder that also owns host pools."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from vllm_headinfer.capacity import layer_index
from vllm_headinfer.coattention.runtime import process_coattention
from vllm_headinfer.coattention.share import HostStep, HostStepCopies, rank_split
from vllm_headinfer.coattention.split import SHARE_STEPS, RankSplit, heads_text, startup_line
from vllm_headinfer.config import HeadInferConfig
from vllm_headinfer.ops.flash_splits import all_heads_num_splits, covers
from vllm_headinfer.host_pool import host_pools
from vllm_headinfer.kv_quant import fp8_dtype
from vllm_headinfer.spec import HeadInferAttentionSpec

logger = init_logger("vllm.headinfer.metadata")

# Flash attention's (left, right) window of a layer without sliding window.
FULL_ATTENTION_WINDOW = (-1, -1)
# Query tokens per request up to which FA3 reads K/V over UVA once per step:
# a verify step of 2 to 32 tokens took what a decode step takes on the H100
# (10.8-11.2 ms against 11.0 ms for 128K tokens of 8 heads,
# ../shared/reference/h100-measured.md); longer queries re-read K/V per
# query tile and are staged.
IN_PLACE_QUERY_TILE = 32


def _coattention_heads(vllm_config, cfg: HeadInferConfig, kv_cache_spec) -> float:
    """Offloaded heads CPU co-attention takes in the layers of this KV cache
    group (its spec may hold one spec per layer)."""
    from vllm.v1.kv_cache_interface import iter_layer_specs

    specs = [s for s in iter_layer_specs(kv_cache_spec) if getattr(s, "num_offloaded_kv_heads", 0)]
    if not specs:
        return 0
    split = rank_split(vllm_config, cfg, specs[0])
    return sum(split.cpu_share(s.num_offloaded_kv_heads) for s in specs)


def step_context_tokens(m: CommonAttentionMetadata) -> int:
    """Context tokens of a step's requests (an upper bound where vLLM keeps
    only the longest length on the host)."""
    bound = m.seq_lens_cpu_upper_bound
    if bound is None:
        return m.max_seq_len * m.num_reqs
    return int(bound[: m.num_reqs].sum())


def in_place_query_len(vllm_config) -> int:
    """The longest query per request whose offloaded heads are read in place:
    1, or 1 + the draft length when speculative decoding verifies drafts."""
    spec = vllm_config.speculative_config
    drafts = spec.num_speculative_tokens if spec is not None else 0
    return min(1 + (drafts or 0), IN_PLACE_QUERY_TILE)


@dataclass
class HeadInferMetadata:
    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1], device
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1], host
    seq_lens: torch.Tensor  # [num_reqs], device; includes this step's tokens
    seq_lens_cpu: torch.Tensor  # [num_reqs], host upper bound (exact for prefills)
    block_table: torch.Tensor  # [num_reqs, max_blocks], device
    slot_mapping: torch.Tensor  # [num_actual_tokens], device
    causal: bool = True
    # The split count of FLASH_ATTN's call for this batch (CUDA, FA3): its
    # fixed bound under full CUDA graphs, else the count FA3 picks for one
    # call over all heads; and the KV-split plan over *all* KV heads of the
    # layer for that count. Every call passes both, so each head is split and
    # rounded exactly as in that one call. Without a plan, or for a head size
    # flash_splits does not cover, both are unset and each call plans for
    # itself.
    scheduler_metadata: torch.Tensor | None = None
    num_splits: int = 0
    # Whether every request's query is short enough for offloaded heads to be
    # read in place: decode steps, and speculative verify steps (see
    # in_place_query_len).
    short_queries: bool = False
    # Short-query steps of layers with CPU co-attention: the metadata the
    # CPU kernel reads, on the host.
    host_step: HostStep | None = None


class HeadInferMetadataBuilder(AttentionMetadataBuilder[HeadInferMetadata]):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Decode steps, and the uniform verify steps of speculative decoding
        (1 + k query tokens per request), read resident pages and the host
        pool in place: static addresses, no host work, so they run inside
        full CUDA graphs. Steps with prefill stage copies planned per step
        and run eagerly between captured pieces (PIECEWISE). So do all steps
        where CPU co-attention takes heads of these layers: the host runs
        its share inside each layer."""
        cfg = HeadInferConfig.from_vllm_config(vllm_config)
        if not current_platform.is_cuda() or cfg.decode_path not in ("auto", "uva"):
            return AttentionCGSupport.NEVER
        if _coattention_heads(vllm_config, cfg, kv_cache_spec):
            return AttentionCGSupport.NEVER
        spec = vllm_config.speculative_config
        drafts = (spec.num_speculative_tokens or 0) if spec is not None else 0
        if drafts and 1 + drafts <= in_place_query_len(vllm_config):
            return AttentionCGSupport.UNIFORM_BATCH
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(
        self,
        kv_cache_spec: HeadInferAttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # The settings, parsed once here for this group's layers and their
        # data paths; the process's co-attention, handed to both.
        cfg = HeadInferConfig.from_vllm_config(vllm_config)
        self.coattention = process_coattention
        # FLASH_ATTN's own builder for the full-head spec plans the KV splits
        # (and, under full CUDA graphs, keeps them in its persistent buffer
        # with its fixed split bound): flash attention otherwise picks the
        # split count from the heads in a call, so the resident and offloaded
        # calls would round differently from one FLASH_ATTN call.
        self.flash = None
        if current_platform.is_cuda():
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            self.flash = FlashAttentionMetadataBuilder(
                kv_cache_spec, layer_names, vllm_config, device
            )
            # It would take its window from the model's FLASH_ATTN layers
            # (those of other kinds when HEADINFER serves full attention
            # only); HEADINFER layers have none.
            self.flash.aot_sliding_window = FULL_ATTENTION_WINDOW
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.fp8 = fp8_dtype(vllm_config.cache_config.cache_dtype) is not None
        self.in_place_query_len = in_place_query_len(vllm_config)
        # This group's layers adopt the head split the engine core placed in
        # their spec. The real cache is planned by now (the worker sets
        # num_gpu_blocks before building backends); the memory-profiling
        # pass builds from the workers' own all-resident specs.
        # A drafter's layers come as plain full-attention specs: all resident.
        offloaded = getattr(kv_cache_spec, "num_offloaded_kv_heads", 0)
        pool = None
        split = RankSplit(fixed=0)
        if offloaded > 0:
            num_blocks = vllm_config.cache_config.num_gpu_blocks
            assert num_blocks, "heads are placed off the device only with a planned cache"
            pool = host_pools.ensure(
                layer_names, kv_cache_spec, num_blocks, pin=current_platform.is_cuda()
            )
            split = rank_split(vllm_config, cfg, kv_cache_spec)
            line = startup_line(split, [layer_index(n) for n in layer_names],
                                [offloaded] * len(layer_names))
            if line is not None:
                logger.info_once("HEADINFER CPU co-attention: %s", line)
        else:
            host_pools.release_layers(layer_names)
        cpu_share = split.cpu_share(offloaded)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        for layer in layers.values():
            layer.impl.place(cfg, offloaded, pool, cpu_share, split.threads, self.coattention)
        # Auto's split follows the engine's own calls (coattention/tuning.py).
        self.split, self.cpu_share, self.offloaded = split, cpu_share, offloaded
        self.token_head_bytes = kv_cache_spec.token_head_bytes
        self.impls = [layer.impl for layer in layers.values()]
        self.retunes = bool(cpu_share) and split.fixed is None and current_platform.is_cuda()
        self.tuned_version = 0
        if self.retunes:
            self.coattention.tuning.reset()
        # A short-query step's metadata on the host, for the CPU kernel, in
        # steps with at least min_coattention_tokens of context.
        self.host_step_copies = None
        self.min_coattention_tokens = 0
        if cpu_share:
            self.min_coattention_tokens = split.min_step_tokens(
                cpu_share, kv_cache_spec.token_head_bytes)
            self.host_step_copies = HostStepCopies(
                vllm_config.scheduler_config.max_num_seqs, kv_cache_spec.block_size
            )
            if current_platform.is_cuda():
                impl = next(iter(layers.values())).impl
                scheduler = vllm_config.scheduler_config
                self.coattention.reserve(scheduler.max_num_seqs,
                                         scheduler.max_num_batched_tokens,
                                         self.in_place_query_len, impl.num_heads, impl.head_size)
                # Before any request: a first compile takes about a minute,
                # which would otherwise fall inside a served step.
                seconds = self.coattention.warm_up(kv_cache_spec.dtype,
                                                   vllm_config.model_config.dtype)
                logger.info("HEADINFER CPU co-attention: serving loop ready in %.1f s "
                            "(compiled, or loaded from numba's cache)", seconds)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> HeadInferMetadata:
        m = common_attn_metadata
        n = m.num_actual_tokens
        plan = None
        if self.flash is not None:
            plan = self.flash.build(common_prefix_len, m, fast_build)
        split_plan, num_splits = self._split_plan(plan, m)
        short_queries = m.max_query_len <= self.in_place_query_len
        host_step = None
        if self.host_step_copies is not None:
            # (a failure raised in any step, not only the next co-attending one)
            self.coattention.between_steps()
        if short_queries and self.retunes:
            self._retune()
        if (short_queries and self.host_step_copies is not None
                and step_context_tokens(m) >= self.min_coattention_tokens):
            host_step = self.host_step_copies(m)
        return HeadInferMetadata(
            num_actual_tokens=n,
            num_reqs=m.num_reqs,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            query_start_loc_cpu=m.query_start_loc_cpu,
            seq_lens=m.seq_lens,
            seq_lens_cpu=m.seq_lens_cpu_upper_bound,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping[:n],
            causal=m.causal if isinstance(m.causal, bool) else True,
            scheduler_metadata=split_plan,
            num_splits=num_splits,
            short_queries=short_queries,
            host_step=host_step,
        )

    def _retune(self) -> None:
        """Resizes this group's CPU shares to the latest rates of the
        engine's own calls (coattention/tuning.py), between steps."""
        tuning = self.coattention.tuning
        version, split = tuning.current(self.split)
        if version == self.tuned_version:
            return
        self.tuned_version = version
        # At least a sixteenth: these layers' steps were planned to run
        # attention outside full CUDA graphs, and the share keeps its place
        # with the serving thread.
        share = max(split.cpu_share(self.offloaded), 1 / SHARE_STEPS)
        self.min_coattention_tokens = split.min_step_tokens(share, self.token_head_bytes)
        logger.info(
            "HEADINFER CPU co-attention: split retuned (%s: CPU %.1f GB/s, GPU link %.1f GB/s "
            "at once): CPU threads attend %s of %d offloaded KV heads per layer (were %s)",
            tuning.change, split.cpu_rate / 1e9, split.gpu_rate / 1e9, heads_text(share),
            self.offloaded, heads_text(self.cpu_share))
        for impl in self.impls:
            impl.cpu_share.resize(share)  # (the same size keeps the share as it is)
        self.cpu_share = share

    def _split_plan(self, plan, m: CommonAttentionMetadata) -> tuple[torch.Tensor | None, int]:
        """The plan and split count every call of this batch passes.

        The count is FLASH_ATTN's: its fixed bound under full CUDA graphs
        (with its persistent plan), else the count FA3 picks for one call
        over all heads. A call sizes its split buffers from its count, and
        FA3 only checks a plan's length, so an eager plan is made here for
        that count, not taken from FLASH_ATTN: the same plan when the count
        is FA3's own (FA3 computes it from the same inputs), and one that
        fits the buffers if it were not. One split leaves nothing to plan.
        Without a plan, for a head size ``flash_splits`` does not cover, or
        over an fp8 cache (FA3 tiles fp8 K/V otherwise), the count is 0 and
        each call plans for itself (head-split calls then round within bf16
        of FLASH_ATTN): a plan with more splits than a call chooses would
        overrun its buffers."""
        if plan is None:
            return None, 0
        if plan.max_num_splits > 0:
            bound = plan.max_num_splits
            return (plan.scheduler_metadata if bound > 1 else None), bound
        flash = self.flash
        if plan.scheduler_metadata is None or self.fp8 or not covers(flash.headdim):
            return None, 0
        num_splits = all_heads_num_splits(
            num_heads=flash.num_heads_q,
            num_kv_heads=flash.num_heads_kv,
            head_size=flash.headdim,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            block_size=flash.block_size,
            num_sms=self.num_sms,
        )
        if num_splits == 1:
            return None, 1
        return flash._get_scheduler_metadata(
            aot_schedule=True,
            batch_size=m.num_reqs,
            cu_query_lens=m.query_start_loc,
            max_query_len=m.max_query_len,
            seqlens=m.seq_lens,
            max_seq_len=m.max_seq_len,
            causal=m.causal,
            max_num_splits=num_splits,
        ), num_splits
