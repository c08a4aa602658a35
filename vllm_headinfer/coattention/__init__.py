"""CPU co-attention: in decode and verify steps CPU threads attend a share of
a layer's offloaded KV heads in host memory while the GPU reads the others
over the link (share.py says how a layer's heads divide).

* split.py: the split policy (how many heads, how many threads), pure;
* host_cores.py: the cores the host leaves a rank (affinity, cgroup quota);
* share.py: a layer's share, a step's metadata on the host, this rank's split;
* runtime.py: the process's co-attention on CUDA (slots, post and collect);
* service.py: the serving thread that runs posted calls;
* kernel.py: the numba kernel; intrinsics.py: its pointer and clock helpers;
* probe.py: the startup measurement behind auto's split; tuning.py: auto's
  split retuned from the engine's own calls;
* device_flags.py: the GPU's side of the handshake.

numba (the kernel's compiler) is imported only where a layer uses the
kernel: on vLLM 0.32's CPU platform, an engine started in a process that has
loaded numba's llvmlite fails (its worker's scan of every module for Triton
kernels trips over llvmlite's library object). Importing this package
imports nothing.
"""
