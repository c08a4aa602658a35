"""The host-computed FA3 split count against the counts flash attention
picked on the H100 (vLLM 0.32.0's build, 132 SMs), recorded by run 8 of
``benchmarks/RESULTS.md``: a change to ``vllm_headinfer.ops.flash_splits`` that
would make head-split calls disagree with FLASH_ATTN fails here, on CPU."""

from __future__ import annotations

import json

from conftest import REPO

from vllm_headinfer.ops.flash_splits import all_heads_num_splits, covers

MEASURED = REPO / "benchmarks/results/2026-11-22-h100-run8-split-counts.json"


def test_split_count_matches_flash_attention_on_the_h100():
    rows = json.loads(MEASURED.read_text())["rows"]
    assert len(rows) == 13440
    differ = [
        row for row in rows
        if all_heads_num_splits(
            num_heads=row[1] * row[2], num_kv_heads=row[1], head_size=row[0],
            max_query_len=row[3], max_seq_len=row[4] * row[5], block_size=row[5], num_sms=132,
        ) != row[6]
    ]
    assert not differ, differ[:10]


def test_only_checked_head_sizes_are_covered():
    assert [h for h in (32, 64, 80, 96, 112, 128, 192, 256) if covers(h)] == [32, 64, 112, 128]
