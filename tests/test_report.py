"""The comparison report: CI arithmetic on known cases, pooling, pairing, files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dialogrl.report import compare, format_table
from dialogrl.stats import paired_bootstrap_ci, pass_hat_k, wilson_interval
from dialogrl.types import DialogRLError


def test_constant_difference_gives_a_zero_width_ci() -> None:
    ci = paired_bootstrap_ci([0.7, 0.2, 0.9], [0.5, 0.0, 0.7])
    assert ci["mean_diff"] == pytest.approx(0.2)
    assert ci["low"] == pytest.approx(0.2) and ci["high"] == pytest.approx(0.2)


def test_all_wins_give_difference_one() -> None:
    ci = paired_bootstrap_ci([1, 1, 1, 1], [0, 0, 0, 0])
    assert (ci["mean_diff"], ci["low"], ci["high"]) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_brackets_the_truth_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        a = rng.random(n) < 0.6
        b = rng.random(n) < 0.4
        ci = paired_bootstrap_ci(a, b, n_boot=4000, seed=2)
        assert ci["low"] < ci["mean_diff"] < ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert ci["low"] < 0.2 < ci["high"]  # the true difference, at n=1600
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4 of the width


def test_known_bootstrap_case_matches_the_binomial_standard_error() -> None:
    # 400 scenarios, half wins and half ties: diff mean 0.5, sd 0.5, se 0.025 -> 95% CI ~ 0.5 +- 0.049.
    a, b = np.r_[np.ones(200), np.zeros(200)], np.zeros(400)
    ci = paired_bootstrap_ci(a, b, n_boot=20000, seed=0)
    assert ci["low"] == pytest.approx(0.451, abs=0.01) and ci["high"] == pytest.approx(0.549, abs=0.01)


def test_pass_hat_k_hand_computed() -> None:
    trials = {1: [True, True, False, True], 2: [False, False, True, False]}
    # scenario 1: C(3,2)/C(4,2) = 3/6; scenario 2: C(1,2)/C(4,2) = 0 -> mean 0.25
    assert pass_hat_k(trials, 2) == pytest.approx(0.25)
    assert pass_hat_k(trials, 1) == pytest.approx((0.75 + 0.25) / 2)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


def _eval(path: Path, method: str, successes: dict[int, list[bool]], training_seed: int = 0) -> Path:
    records = [{"scenario_seed": s, "repeat": i, "intent": "refund", "persona": "vague" if s % 2 else "cooperative",
                "success": ok, "return": float(ok), "turns": 3, "violations": 0, "invalid_actions": 0,
                "reply_chars": 40.0, "reward_components": {"success": float(ok)}}
               for s, oks in successes.items() for i, ok in enumerate(oks)]
    data = {"policy": method, "method": method, "decoding": "greedy", "training_seed": training_seed,
            "metrics": {"success_rate": float(np.mean([r["success"] for r in records]))}, "records": records}
    path.write_text(json.dumps(data))
    return path


def test_compare_pools_seeds_pairs_on_shared_scenarios_and_writes_files(tmp_path: Path) -> None:
    base = _eval(tmp_path / "sft.json", "sft", {s: [s % 4 == 0] for s in range(40)})
    ppo0 = _eval(tmp_path / "ppo0.json", "ppo", {s: [True] for s in range(40)}, training_seed=0)
    ppo1 = _eval(tmp_path / "ppo1.json", "ppo", {s: [s % 2 == 0] for s in range(10, 50)}, training_seed=1)
    report = compare([base, ppo0, ppo1], "sft", tmp_path / "out", n_boot=2000)
    ppo = report["methods"]["ppo"]
    assert ppo["training_seeds"] == [0, 1]
    vs = ppo["vs_baseline"]
    assert vs["shared_scenarios"] == 40  # seeds 40..49 of seed 1 have no baseline pair
    # scenarios 0..9: ppo 1.0; 10..39: (1 + even) / 2; baseline wins on multiples of 4
    per_scenario = [1.0 if s < 10 else (1.0 + (s % 2 == 0)) / 2 for s in range(40)]
    expected = np.mean(per_scenario) - np.mean([s % 4 == 0 for s in range(40)])
    assert vs["success"]["mean_diff"] == pytest.approx(expected)
    assert vs["success"]["low"] > 0
    for name in ("report.md", "report.json", "report.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "How to read this" in (tmp_path / "out" / "report.md").read_text()
    assert "ppo" in format_table(report)


def test_pass_k_reported_when_scenarios_repeat(tmp_path: Path) -> None:
    path = _eval(tmp_path / "rep.json", "sft", {s: [True, s % 2 == 0, True] for s in range(10)})
    report = compare([path], "sft", tmp_path / "out", n_boot=100)
    assert report["methods"]["sft"]["pass_hat_k"]["3"] == pytest.approx(0.5)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    base = _eval(tmp_path / "sft.json", "sft", {1: [True]})
    with pytest.raises(DialogRLError, match="unknown baseline 'nope'; methods: sft"):
        compare([base], "nope", tmp_path / "out")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DialogRLError, match="bad.json"):
        compare([base, tmp_path / "bad.json"], "sft", tmp_path / "out")
    other = _eval(tmp_path / "other.json", "ppo", {99: [True]})
    with pytest.raises(DialogRLError, match="shares no scenario seed"):
        compare([base, other], "sft", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
