"""The host pool's huge-page share, which its startup line reports and warns
about (the GPU reads 4 KiB host pages 25-47% slower over the link)."""

from __future__ import annotations

import mmap

import pytest
import torch

from vllm_headinfer.host_pool import _prefault, huge_page_mapping, huge_page_share, thp_mode

NBYTES = 64 << 20


def _faulted(mapping: mmap.mmap) -> torch.Tensor:
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    _prefault(tensor.data_ptr(), NBYTES)
    return tensor


def test_small_pages_count_as_none():
    mapping = mmap.mmap(-1, NBYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    tensor = _faulted(mapping)
    assert huge_page_share(tensor.data_ptr(), NBYTES) == 0.0


@pytest.mark.skipif(thp_mode() == "unknown" or "[never]" in thp_mode(), reason="THP is off here")
def test_the_pool_mapping_is_on_huge_pages():
    tensor = _faulted(huge_page_mapping(NBYTES))
    assert huge_page_share(tensor.data_ptr(), NBYTES) > 0.9
