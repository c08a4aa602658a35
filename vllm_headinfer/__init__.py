"""HeadInfer for vLLM: per layer, only the first ``resident_kv_heads`` KV heads
stay in device KV pages; the other heads' KV lives in host memory under the
same block ids and is read from there for exact attention.

vLLM loads this package through its entry points; users select it with
``--attention-backend HEADINFER``. Importing the package has no side effects.
"""

__version__ = "0.1.0"
BACKEND_NAME = "HEADINFER"
BACKEND_PATH = "vllm_headinfer.backend.HeadInferBackend"
