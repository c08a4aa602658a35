"""How the staged prefill path splits offloaded heads into copy groups."""

import pytest

pytest.importorskip("triton")
from vllm_headinfer.ops.staging import SINGLE_GROUP_BYTES, plan_head_groups  # noqa: E402

MIB = 1 << 20
BUFFER = 512 * MIB


def test_small_layers_stage_in_one_group():
    assert plan_head_groups(8, 1 * MIB, BUFFER) == [(0, 8)]
    assert plan_head_groups(8, SINGLE_GROUP_BYTES // 8, BUFFER) == [(0, 8)]


def test_large_layers_use_four_groups_to_overlap_copies():
    assert plan_head_groups(8, 64 * MIB, BUFFER) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert plan_head_groups(3, 100 * MIB, BUFFER) == [(0, 1), (1, 2), (2, 3)]


def test_groups_never_exceed_a_buffer():
    groups = plan_head_groups(8, 300 * MIB, BUFFER)
    assert groups == [(h, h + 1) for h in range(8)]
    assert plan_head_groups(8, BUFFER + 1, BUFFER) is None


def test_groups_cover_every_head_once():
    for heads in range(1, 17):
        for per_head in (MIB, 40 * MIB, 200 * MIB):
            groups = plan_head_groups(heads, per_head, BUFFER)
            covered = [h for a, b in groups for h in range(a, b)]
            assert covered == list(range(heads))
            assert all((b - a) * per_head <= BUFFER for a, b in groups)
