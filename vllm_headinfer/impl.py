"""HeadInferImpl: split each layer's heads into resident and offloaded parts.

KV heads ``[0, R)`` of this rank are resident: their K/V live in the layer's
device pages (``kv_cache``). Heads ``[R, H)`` are offloaded to the host pool
under the same block ids (layout.py shows both page layouts). Query heads follow their
KV head (``G = num_heads // num_kv_heads`` per KV head), so the query and
output slices of the two parts are contiguous ranges and each part writes its
own slice of ``output``: heads are independent and no merge is needed.

The data path is the platform's (ops/): this class keeps vLLM's
AttentionImpl contract and the layer's head split, and delegates.
"""

from __future__ import annotations

import torch
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from vllm_headinfer.coattention.share import CpuShare
from vllm_headinfer.config import HeadInferConfig
from vllm_headinfer.host_pool import HostKVPool, host_pools
from vllm_headinfer.layout import device_kv, host_kv
from vllm_headinfer.metadata import HeadInferMetadata
from vllm_headinfer.ops.torch_attention import TorchHeadAttention


def _unsupported(feature: str) -> NotImplementedError:
    return NotImplementedError(
        f"HEADINFER does not support {feature}; serve this model with the "
        "default attention backend."
    )


class HeadInferImpl(AttentionImpl[HeadInferMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        if attn_type != AttentionType.DECODER:
            raise _unsupported(f"attention type {attn_type!r}")
        if alibi_slopes is not None:
            raise _unsupported("ALiBi")
        if sliding_window is not None:
            raise _unsupported("sliding-window layers")
        if logits_soft_cap:
            raise _unsupported("attention logit soft-capping")
        if sinks is not None:
            raise _unsupported("attention sinks")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.group = num_heads // self.num_kv_heads

        # Every head resident until the engine core's placement reaches this
        # layer's metadata builder (``place``): the memory-profiling pass
        # runs as the default backend would.
        self.num_resident = self.num_kv_heads
        self.num_offloaded = 0
        self.resident_q = num_heads
        self.host_pool: HostKVPool | None = None
        # The offloaded heads CPU threads attend in short-query steps (CPU
        # co-attention); None when they do not.
        self.cpu_share: CpuShare | None = None
        # The platform's data path (ops/).
        if current_platform.is_cuda():
            from vllm_headinfer.ops.cuda_attention import CudaHeadAttention

            self.ops = CudaHeadAttention(self)
        else:
            self.ops = TorchHeadAttention(self)
        # Whether the layer hands fp8 queries over an fp8 cache (the attention
        # layer reads this after building the impl): as FLASH_ATTN on CUDA;
        # the CPU path attends dequantised K/V with the model's queries.
        self.supports_quant_query_input = self.ops.supports_quant_query_input

    def place(
        self, cfg: HeadInferConfig, offloaded: int, pool: HostKVPool | None,
        cpu_share: float = 0, threads: int = 1, coattention=None,
    ) -> None:
        """Adopts the settings ``cfg``, this layer's head split (its KV cache
        spec's offloaded heads), the host pool of those heads (None when
        none) and how many of them (in sixteenths) CPU threads attend in
        short-query steps, with how many threads; ``coattention`` is the
        process's co-attention (coattention/runtime.py), which the CUDA data
        path posts the host's share to."""
        self.num_offloaded = offloaded
        self.num_resident = self.num_kv_heads - self.num_offloaded
        self.resident_q = self.num_resident * self.group
        self.host_pool = pool
        self.cpu_share = CpuShare(self, cpu_share, threads) if cpu_share else None
        self.ops.placed(cfg, coattention)

    def host_layer_name(self, layer) -> str:
        """The layer whose host pages ``layer`` reads: a layer that shares
        another layer's KV reads that layer's."""
        return self.kv_sharing_target_layer_name or layer.layer_name

    def pool_for(self, layer) -> HostKVPool:
        """The host pool of ``layer`` (that of the layer it shares KV with)."""
        if self.host_pool is None:
            self.host_pool = host_pools.get(self.host_layer_name(layer))
        assert self.host_pool is not None, "offloaded heads without a host pool"
        return self.host_pool

    def kv_parts(
        self, layer, kv_cache: torch.Tensor, pool: HostKVPool | None, uva: bool, cpu_heads: int = 0
    ):
        """``(K pages, V pages, KV-head slice, query-head slice)`` of each part
        of this layer: the resident heads in the device pages, then the
        offloaded heads in the host pool (through its device view if ``uva``)
        but the last ``cpu_heads``, which CPU co-attention takes (a split
        head among them).
        Pages are ``[blocks, heads, N, D]``."""
        r, rq = self.num_resident, self.resident_q
        parts = []
        if r:
            parts.append((*device_kv(kv_cache, self.head_size), slice(0, r), slice(0, rq)))
        offloaded = self.num_offloaded - cpu_heads
        if pool is not None and offloaded:
            name = self.host_layer_name(layer)
            pages = pool.device_layer(name) if uva else pool.layer(name)
            parts.append((*host_kv(pages[:, :offloaded]), slice(r, r + offloaded),
                          slice(rq, rq + offloaded * self.group)))
        return parts

    def do_kv_cache_update(
        self,
        layer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        pool = self.pool_for(layer) if self.num_offloaded else None
        self.ops.write(layer, key, value, kv_cache, pool, slot_mapping)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: HeadInferMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise _unsupported("fused output quantization")
        if attn_metadata is None:
            # Profiling run: no KV to attend to.
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        pool = self.pool_for(layer) if self.num_offloaded else None
        self.ops.forward(layer, query[:n], kv_cache, pool, attn_metadata, output[:n])
        return output
