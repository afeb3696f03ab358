"""Recorded full-mode runs: save and load round-trip, the pip-install case, and bad names."""

import json

import pytest

from rwlib import recorded
from rwlib.sweep import sweep


def _one(arm, seed):
    return {"acc": seed + (0.5 if arm == "b" else 0.0)}


def test_save_and_load_round_trip(tmp_path):
    res = sweep(_one, ["a", "b"], seeds=[3, 4])
    path = recorded.save("99-toy", res, chapter=99, what="toy", parameters={"x": 1}, t0=0.0, threads=1,
                         command="python toy.py", directory=tmp_path)
    raw = json.loads(path.read_text())
    assert raw["provenance"]["threads"] == 1 and raw["provenance"]["command"] == "python toy.py"
    assert not list(tmp_path.glob("*.tmp*"))   # nothing half-written left beside it
    rec = recorded.load("99-toy", tmp_path)
    assert rec.result.arms == ["a", "b"] and rec.result.seeds == [3, 4]
    g = rec.result.gap("acc", "b", "a")
    assert g.mean == pytest.approx(0.5) and g.wins == 2
    assert rec.parameters == {"x": 1} and len(rec.date) == 10


def test_no_results_folder_is_none_and_a_bad_name_lists_the_recorded_ones(tmp_path):
    assert recorded.load("01-x", tmp_path / "absent") is None
    res = sweep(_one, ["a"], seeds=[0])
    recorded.save("01-real", res, chapter=1, what="", parameters={}, t0=0.0, threads=1, command="",
                  directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="'01-typo'.*recorded: 01-real"):
        recorded.load("01-typo", tmp_path)


def test_the_committed_recorded_runs_load():
    for p in sorted(recorded.FULL_DIR.glob("*.json")):
        rec = recorded.load(p.stem)
        t = rec.result.table   # every declared arm at every seed (a run may hold several settings per arm)
        assert set(t.arm) == set(rec.result.arms) and set(t.seed) == set(rec.result.seeds), p.name
        assert t.groupby(["arm", "seed"]).size().min() >= 1, p.name
        assert rec.provenance["wall_s"] > 0 and rec.provenance["git"], p.name


def test_script_args_sets_the_threads_and_the_output(monkeypatch, tmp_path):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr("sys.argv", ["rec.py", "--threads", "1", "--out", str(tmp_path / "x.json")])
    try:
        args, t0 = recorded.script_args("Recorded toy.\n\nMore.", threads=2, out=tmp_path / "d.json")
        assert args.threads == 1 == torch.get_num_threads() and args.out == str(tmp_path / "x.json")
        monkeypatch.setattr("sys.argv", ["rec.py"])
        args, _ = recorded.script_args("Recorded toy.", threads=2)
        assert args.threads == 2 and not hasattr(args, "out") and t0 > 0
    finally:
        torch.set_num_threads(before)
