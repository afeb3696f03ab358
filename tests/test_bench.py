"""The peer benchmark runs (no timing is asserted: speed lives in the recorded figures), and the README shows
exactly the recorded peer timings."""

import json

import pytest

from rwlib import bench, catalog

pytest.importorskip("adamp")
pytest.importorskip("peft")


def test_peer_cases_run_and_give_positive_ratios():
    rows = bench.peer_cases(rounds=2, reps=0.1)
    assert {r["method"].split()[0] for r in rows} >= {"AdamP", "SGDP", "LoRA", "Bat", "GRPO", "LIFT"}
    assert all(r["ratio"] > 0 and r["ours_ms"] > 0 and r["peer_ms"] > 0 for r in rows)


def test_readme_table_is_the_recorded_one():
    recorded = json.loads((catalog.ROOT / "data" / "results" / "peer_timings.json").read_text())
    assert bench.markdown_table(recorded) in (catalog.ROOT / "README.md").read_text()
