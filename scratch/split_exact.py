import torch
from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func as fa, get_scheduler_metadata as gsm
torch.manual_seed(0)
dev = "cuda"
B, H, G, D, N = 5, 4, 2, 128, 16
lens = torch.tensor([7, 130, 700, 1500, 3000], dtype=torch.int32, device=dev)
nb = int(((lens + N - 1) // N).sum()) + 1
k = torch.randn(nb, N, H, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
bt = torch.zeros(B, 200, dtype=torch.int32, device=dev)
o = 0
for i, L in enumerate(lens.tolist()):
    n = (L + N - 1) // N; bt[i, :n] = torch.arange(o, o + n); o += n
q = torch.randn(B, H * G, D, device=dev, dtype=torch.bfloat16)
cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
def call(qs, ks, vs, md, hq, hk):
    return fa(q=qs, k=ks, v=vs, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=lens, max_seqlen_k=3000,
              softmax_scale=D ** -0.5, causal=True, block_table=bt, fa_version=3, scheduler_metadata=md)
def meta(hq, hk):
    return gsm(B, 1, 3000, hq, hk, D, lens, qkv_dtype=torch.bfloat16, cu_seqlens_q=cu, page_size=N, causal=True)
full = call(q, k, v, meta(H * G, H), H * G, H)
for r in (1, 2, 3):
    for md_kind in ("full", "own", "none"):
        outs = []
        for hs in (slice(0, r), slice(r, H)):
            qs = q[:, hs.start * G:(hs.stop) * G]
            hq, hk = qs.shape[1], hs.stop - hs.start
            md = meta(H * G, H) if md_kind == "full" else meta(hq, hk) if md_kind == "own" else None
            outs.append(call(qs.contiguous(), k[:, :, hs].contiguous(), v[:, :, hs].contiguous(), md, hq, hk))
        got = torch.cat(outs, 1)
        print(f"R={r} metadata={md_kind}: max diff {(got.float() - full.float()).abs().max().item():.3e} equal={torch.equal(got, full)}")
