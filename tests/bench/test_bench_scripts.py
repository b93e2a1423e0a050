"""The benchmark scripts end to end: ``python -m nexus bench newton_schulz`` and bench/trainer.py on a small run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _only_record(folder: Path, name: str) -> dict:
    (path,) = folder.glob(f"{name}-*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_nexus_bench_runs_newton_schulz_with_paired_ratios(tmp_path):
    env = {**os.environ, "NEXUS_BENCH_RESULTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "nexus", "bench", "newton_schulz"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "median of 5 rounds with min and max" in out.stdout
    record = _only_record(tmp_path, "newton_schulz")
    assert record["config"]["pairs"] == 5
    compared = [c for c in record["comparisons"] if "error" not in c]
    assert compared, record["comparisons"]
    for c in compared:
        assert c["baseline"] == "reference" and len(c["ratios"]) == 5
        assert c["min"] <= c["median"] <= c["max"]
        assert c["verdict"] in out.stdout
    assert {r["verdict"] for r in record["rows"] if r["impl"] == "reference"} == {"baseline"}


@pytest.mark.slow
def test_trainer_bench_runs_pairs_of_trainer_and_bare_chunks(small_run, tmp_path, monkeypatch, capsys):
    from bench.trainer import main

    monkeypatch.setenv("NEXUS_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["trainer.py", "--config", str(small_run("bench")), "--steps", "2"])
    main()
    out = capsys.readouterr().out
    assert "Trainer overhead: median" in out and "over 5 pairs" in out
    record = _only_record(tmp_path, "trainer")
    (c,) = record["comparisons"]
    assert (c["baseline"], c["arm"]) == ("bare loop", "Trainer")
    assert len(c["ratios"]) == len(c["baseline_s"]) == len(c["arm_s"]) == 5
    assert c["verdict"] in out
    assert record["config"]["overhead_median"] == pytest.approx(c["median"] - 1)
    assert record["config"]["final_checkpoint_s"] > 0
