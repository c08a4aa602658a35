"""The GPU's side of CPU co-attention's handshake: a stream writes a 32-bit
word of pinned host memory, or waits until one reaches a value, in order
with the rest of its work (the CUDA driver's stream memory operations,
version 2: available on every platform since CUDA 11.7).

A write comes after everything earlier on the stream (the driver fences it
like ``__threadfence_system``): the query copy before it has landed in host
memory when the host sees the word. A wait holds back what follows on the
stream, with no host thread involved: the output copy after it reads what
the host wrote before the word.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

# CUstreamWaitValue_flags: wait until (int32)(*word - value) >= 0.
_WAIT_GEQ = 0x0
_WRITE_DEFAULT = 0x0


def _driver_function(name: str):
    try:
        function = getattr(ctypes.CDLL("libcuda.so.1"), name)
    except (OSError, AttributeError) as error:
        raise RuntimeError(
            f"HEADINFER CPU co-attention needs the CUDA driver's {name} (driver for CUDA 11.7 "
            "or later); set additional_config.headinfer.cpu_attention to 'off' on this "
            f"machine ({error})") from error
    function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


class DeviceFlags:
    """``words`` int32 handshake words in pinned host memory: ``host`` is
    them as numpy (what the host reads and writes), and streams write or
    wait on them by index."""

    def __init__(self, words: int) -> None:
        from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

        self.tensor = torch.zeros(words, dtype=torch.int32, pin_memory=True)
        self.host: np.ndarray = self.tensor.numpy()
        self._device_view = get_accelerator_view_from_cpu_tensor(self.tensor)
        self._address = self._device_view.data_ptr()
        self._write = _driver_function("cuStreamWriteValue32_v2")
        self._wait = _driver_function("cuStreamWaitValue32_v2")

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"HEADINFER CPU co-attention: {what} failed (CUDA error {result})")

    def write(self, index: int, value: int) -> None:
        """The current stream writes ``value``'s low 32 bits at ``index``."""
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self._write(stream, self._address + 4 * index, value & 0xFFFFFFFF,
                                _WRITE_DEFAULT), "cuStreamWriteValue32")

    def wait(self, index: int, value: int) -> None:
        """The current stream waits until the word at ``index`` reaches
        ``value`` (cyclically in 32 bits). A wait, not an equality: a host
        that gives up (service.GIVE_UP) sets the word past every value
        waited for, and the stream runs on."""
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self._wait(stream, self._address + 4 * index, value & 0xFFFFFFFF, _WAIT_GEQ),
                    "cuStreamWaitValue32")
