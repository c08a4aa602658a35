"""The data paths of HEADINFER's layers, one class per platform of one shape
(``placed``, ``write``, ``forward``, ``query_scale``): torch_attention.py on
CPU, cuda_attention.py on CUDA, with the staging buffers (staging.py) and the
mirror of flash attention's KV-split choice (flash_splits.py) beside it.
impl.py keeps vLLM's AttentionImpl contract and delegates to one of them."""
