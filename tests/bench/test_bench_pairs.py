"""Paired timing in bench/_common.py and bench/trainer.py, driven by fake timers (no real timing)."""
import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from bench._common import (MAX_SPREAD, MIN_PAIRS, Alternation, Comparison, add_pair_arguments, compare, setup,
                           time_fn, write_json)


class ScriptedTimer:
    """A ``measure`` for ``compare``: calls the arm (which returns its name), logs it, returns the next
    scripted seconds for that arm."""

    def __init__(self, seconds: dict[str, list[float]]):
        self.seconds = {name: list(times) for name, times in seconds.items()}
        self.calls: list[str] = []

    def __call__(self, fn) -> float:
        name = fn()
        self.calls.append(name)
        return self.seconds[name].pop(0)


def arm(name, log=None):
    def fn():
        if log is not None:
            log.append(name)
        return name
    return fn


def test_compare_alternates_arms_and_warms_each_up_first():
    warm: list[str] = []
    timer = ScriptedTimer({"A": [1.0] * 5, "B": [2.0] * 5})
    result = compare({"A": arm("A", warm), "B": arm("B", warm)}, baseline="A", pairs=5, measure=timer, warmup=2)
    assert warm[:4] == ["A", "A", "B", "B"]  # warm-up calls come before any timing
    assert timer.calls == ["A", "B"] * 5
    assert result.times == {"A": [1.0] * 5, "B": [2.0] * 5}
    assert result.comparisons["B"].ratios == (2.0,) * 5


def test_three_arms_take_turns_in_the_given_order():
    timer = ScriptedTimer({"B": [1.0] * 6, "A": [1.0] * 6, "C": [1.0] * 6})
    compare({"B": arm("B"), "A": arm("A"), "C": arm("C")}, baseline="A", pairs=6, measure=timer)
    assert timer.calls == ["B", "A", "C"] * 6


def test_median_of_per_pair_ratios_not_ratio_of_medians():
    # the machine slows down round by round; B is about 10% slower than A within each round
    a = [1.0, 2.0, 4.0, 8.0, 16.0]
    b = [1.1, 2.0, 4.6, 8.4, 17.6]
    result = compare({"A": arm("A"), "B": arm("B")}, baseline="A", measure=ScriptedTimer({"A": a, "B": b}))
    c = result.comparisons["B"]
    assert c.ratios == pytest.approx((1.1, 1.0, 1.15, 1.05, 1.1))
    assert c.ratio_median == pytest.approx(1.1)  # the ratio of medians would be 4.6 / 4 = 1.15
    assert (c.ratio_min, c.ratio_max) == pytest.approx((1.0, 1.15))
    assert c.spread == pytest.approx(0.15 / 1.1)
    assert c.conclusive and c.verdict == "no clear difference"  # one pair ties, so the range holds 1
    assert result.median_s("A") == 4.0 and result.median_s("B") == 4.6
    assert result.cells("B") == {"ratio": c.ratio_median, "min": 1.0, "max": c.ratio_max,
                                 "verdict": "no clear difference"}
    assert result.cells("A")["verdict"] == "baseline"


@pytest.mark.parametrize("arm_s, verdict", [
    ([0.5, 0.55, 0.52, 0.5, 0.51], "faster"),
    ([1.2, 1.25, 1.3, 1.22, 1.21], "slower"),
], ids=["faster", "slower"])
def test_unanimous_narrow_ratios_name_the_winner(arm_s, verdict):
    c = Comparison("base", "x", [1.0] * 5, arm_s)
    assert c.conclusive and c.verdict == verdict
    assert verdict in c.describe() and "over 5 pairs" in c.describe()


def test_wide_spread_is_flagged_inconclusive():
    # ratios 1, 2, 1, 2, 1.5: (2 - 1) / 1.5 = 67% spread
    c = Comparison("base", "x", [1.0] * 5, [1.0, 2.0, 1.0, 2.0, 1.5])
    assert c.spread == pytest.approx(1 / 1.5)
    assert not c.conclusive
    assert c.verdict == "inconclusive: spread 67%"
    assert "inconclusive: spread 67%" in c.describe()


def test_wide_spread_still_names_a_unanimous_sign():
    c = Comparison("base", "x", [1.0] * 5, [2.0, 4.0, 2.2, 3.0, 2.5])
    assert c.verdict == "inconclusive: spread 80% (slower in every pair)"


def test_threshold_is_the_max_spread():
    ratios = [1.0, 1.2, 1.1, 1.1, 1.1]  # spread 0.2 / 1.1 = 18%
    assert Comparison("b", "x", [1.0] * 5, ratios, max_spread=0.2).conclusive
    assert Comparison("b", "x", [1.0] * 5, ratios, max_spread=0.15).verdict == "inconclusive: spread 18%"
    assert MAX_SPREAD == 0.25


def test_fewer_than_five_pairs_is_inconclusive():
    c = Comparison("b", "x", [1.0] * 4, [1.0] * 4)
    assert MIN_PAIRS == 5
    assert not c.conclusive and c.verdict == "inconclusive: 4 pairs, need 5"


@pytest.mark.parametrize("base, other, match", [
    ([1.0] * 5, [1.0] * 4, "4 timings but baseline 'b' has 5"),
    ([1.0] * 5, [1.0, 0.0, 1.0, 1.0, 1.0], "timing 1 of 'x' is 0.0"),
    ([1.0, float("nan"), 1.0, 1.0, 1.0], [1.0] * 5, "timing 1 of 'b' is nan"),
    ([], [], "no paired timings"),
], ids=["unequal", "zero", "nan", "empty"])
def test_bad_timings_are_named(base, other, match):
    with pytest.raises(ValueError, match=match):
        Comparison("b", "x", base, other)


def test_alternation_refuses_a_timing_out_of_turn_or_after_the_last_round():
    alt = Alternation(["A", "B"], pairs=1)
    with pytest.raises(ValueError, match="'B' out of turn: round 1 expects 'A'"):
        alt.record("B", 1.0)
    alt.record("A", 1.0)
    alt.record("B", 1.0)
    assert alt.done
    with pytest.raises(ValueError, match="all 1 rounds are recorded"):
        alt.record("A", 1.0)


def test_alternation_keeps_turns_when_an_arm_is_dropped():
    alt = Alternation(["A", "B", "C"], pairs=2)
    for name in "ABC":
        alt.record(name, 1.0)
    alt.record("A", 1.0)
    alt.record("B", 1.0)
    alt.drop("C")  # C was due: the round is over
    assert alt.done and alt.times == {"A": [1.0, 1.0], "B": [1.0, 1.0]}


def test_failing_arm_is_reported_and_the_others_still_alternate():
    def broken():
        raise RuntimeError("no compiler here\nsecond line")

    timer = ScriptedTimer({"A": [1.0] * 5, "B": [1.0] * 5})
    result = compare({"A": arm("A"), "broken": broken, "B": arm("B")}, baseline="A", measure=timer)
    assert timer.calls == ["A", "B"] * 5
    assert result.errors == {"broken": "error: RuntimeError: no compiler here"}
    assert result.cells("broken")["verdict"] == "error: RuntimeError: no compiler here"
    assert set(result.comparisons) == {"B"}


def test_arm_failing_during_the_rounds_leaves_them():
    timer = ScriptedTimer({"A": [1.0] * 5, "B": [1.0] * 2})  # B's third timing raises IndexError
    result = compare({"A": arm("A"), "B": arm("B")}, baseline="A", measure=timer)
    assert "IndexError" in result.errors["B"]
    assert result.times == {"A": [1.0] * 5} and result.comparisons == {}


def test_failing_baseline_or_unknown_baseline_raises():
    def broken():
        raise RuntimeError("reference broke")

    with pytest.raises(RuntimeError, match="reference broke"):
        compare({"ref": broken, "B": arm("B")}, baseline="ref", measure=ScriptedTimer({}))
    with pytest.raises(ValueError, match="baseline 'ref' is not one of the arms"):
        compare({"B": arm("B")}, baseline="ref", measure=ScriptedTimer({}))


def test_pair_arguments_refuse_fewer_than_five_pairs(capsys):
    parser = argparse.ArgumentParser()
    add_pair_arguments(parser)
    assert parser.parse_args([]).pairs == 5
    assert parser.parse_args(["--pairs", "9", "--max-spread", "0.1"]).max_spread == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--pairs", "3"])
    assert "--pairs must be at least 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-spread", "0"])
    assert "--max-spread must be a positive fraction" in capsys.readouterr().err
    assert parser.parse_args([]).threads is None and parser.parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_setup_sets_and_records_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        env = setup("cpu", measure_bandwidth=False, threads=1, no_gpu_note=None)
        assert torch.get_num_threads() == 1 and env.info["torch_threads"] == 1
        assert not env.on_gpu and "1 CPU threads" in capsys.readouterr().out
        with pytest.raises(ValueError, match="copy bandwidth was not measured"):
            env.copy_bw
        with pytest.raises(ValueError, match="threads must be at least 1"):
            setup("cpu", measure_bandwidth=False, threads=0)
    finally:
        torch.set_num_threads(before)


def test_json_carries_per_pair_ratios_median_min_max_and_verdict(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_BENCH_RESULTS", str(tmp_path))
    timer = ScriptedTimer({"A": [1.0] * 5, "B": [1.0, 3.0, 1.0, 3.0, 2.0]})
    result = compare({"A": arm("A"), "B": arm("B")}, baseline="A", measure=timer)
    path = write_json("fake", [{"impl": "B", **result.cells("B")}], info={"device": "cpu"},
                      comparisons=result.to_json("group1"))
    assert path.parent == tmp_path
    record = json.loads(path.read_text())
    (c,) = record["comparisons"]
    assert c["group"] == "group1" and c["baseline"] == "A" and c["arm"] == "B"
    assert c["ratios"] == [1.0, 3.0, 1.0, 3.0, 2.0]
    assert (c["median"], c["min"], c["max"]) == (2.0, 1.0, 3.0)
    assert c["verdict"] == "inconclusive: spread 100%" and c["conclusive"] is False
    assert record["rows"][0]["verdict"] == "inconclusive: spread 100%"


def test_trainer_bench_alternates_trainer_chunks_with_bare_chunks():
    from bench.trainer import AlternateWithBareLoop

    log: list[str] = []
    clock_value = [0.0]

    def clock():
        return clock_value[0]

    bare_seconds = iter([9.0, 1.0, 1.0, 2.0, 1.0, 1.0])  # per step; the first (warm-up) is not recorded

    def run_bare(steps):
        log.append(f"bare {steps}")
        clock_value[0] += 100.0  # bare time must not leak into the Trainer's chunk
        return next(bare_seconds)

    cb = AlternateWithBareLoop(run_bare, steps=4, pairs=5, clock=clock)
    trainer_chunk_s = [50.0, 4.4, 4.2, 8.4, 4.8, 4.4]  # seconds per chunk of 4 steps; the first is warm-up
    for i, chunk in enumerate(trainer_chunk_s, start=1):
        clock_value[0] += chunk
        log.append("trainer")
        cb.on_log(SimpleNamespace(step=4 * i), {})
    clock_value[0] += 0.25  # final checkpoint write
    cb.on_train_end(SimpleNamespace(step=24))

    assert log == ["trainer", "bare 4"] * 6
    c = cb.comparison(max_spread=0.25)
    assert c.arm_s == pytest.approx((1.1, 1.05, 2.1, 1.2, 1.1)) and c.baseline_s == (1.0, 1.0, 2.0, 1.0, 1.0)
    assert c.ratio_median == pytest.approx(1.1) and c.verdict == "slower"
    assert cb.tail_s == pytest.approx(0.25)


def test_trainer_bench_refuses_an_incomplete_run():
    from bench.trainer import AlternateWithBareLoop

    cb = AlternateWithBareLoop(lambda steps: 1.0, steps=2, pairs=5)
    cb.on_log(SimpleNamespace(step=2), {})
    cb.on_log(SimpleNamespace(step=4), {})
    with pytest.raises(RuntimeError, match="stopped after 1 of 5 pairs"):
        cb.comparison(max_spread=0.25)
    with pytest.raises(RuntimeError, match="not on a chunk boundary"):
        cb.on_log(SimpleNamespace(step=5), {})


def test_time_fn_runs_on_the_threads_setup_asked_for():
    before = torch.get_num_threads()
    seen: list[int] = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            time_fn(lambda: seen.append(torch.get_num_threads()), min_run_time=0.001, warmup=0)
            assert set(seen) == {threads}
            seen.clear()
    finally:
        torch.set_num_threads(before)
