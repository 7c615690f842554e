"""The comparison report: CI arithmetic on known cases, pooling, pairing, files, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dialogrl.report import compare, format_table, load_eval
from dialogrl.stats import paired_bootstrap_ci, pass_hat_k, runs_and_scenarios_bootstrap_ci, wilson_interval
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


def test_bootstrap_ci_covers_the_truth_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(3)
    hits = 0
    for rep in range(200):
        a, b = rng.random(60) < 0.7, rng.random(60) < 0.5  # true difference 0.2
        ci = paired_bootstrap_ci(a, b, n_boot=1000, seed=rep)
        hits += ci["low"] <= 0.2 <= ci["high"]
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_is_seeded_and_chunking_keeps_every_resample() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.random(3000), rng.random(3000)  # 3000 scenarios -> resamples drawn in several chunks
    first, again = paired_bootstrap_ci(a, b, n_boot=900, seed=7), paired_bootstrap_ci(a, b, n_boot=900, seed=7)
    assert first == again
    se = np.std(a - b, ddof=1) / np.sqrt(3000)
    assert first["high"] - first["low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0, float("nan")], [1.0, 2.0])


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
    assert pass_hat_k({1: [True] * 3, 2: [True, False, True]}, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_hat_k(trials, 5)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    lo, hi = wilson_interval(0, 20)  # no collapse to a zero-width interval at 0% (the bootstrap would)
    assert lo == 0.0 and hi == pytest.approx(0.161, abs=1e-3)


def test_resampling_runs_holds_the_spread_between_training_seeds() -> None:
    # Every scenario alike within a run, runs differ: pooling scenarios sees no spread at all, resampling runs
    # does. Three runs at 0, 0, 1: a draw of three runs has mean 0 with chance 8/27 and 1 with chance 1/27.
    a, b = np.array([[0.0] * 50, [0.0] * 50, [1.0] * 50]), np.zeros((3, 50))
    pooled = paired_bootstrap_ci(a.mean(axis=0), b.mean(axis=0))
    assert pooled["low"] == pytest.approx(1 / 3) and pooled["high"] == pytest.approx(1 / 3)
    ci = runs_and_scenarios_bootstrap_ci(a, b, paired_runs=False, n_boot=4000)
    assert ci["mean_diff"] == pytest.approx(1 / 3) and (ci["low"], ci["high"]) == (0.0, 1.0)
    assert ci == runs_and_scenarios_bootstrap_ci(a, b, paired_runs=False, n_boot=4000)  # seeded


def test_paired_runs_cancel_what_the_two_methods_share() -> None:
    # Method a is run r of method b plus 0.1 on every scenario (as PPO seed s starts from SFT seed s), while
    # the runs themselves differ a lot: paired draws see exactly +0.1, unpaired ones the runs' spread.
    rng = np.random.default_rng(5)
    b = rng.random((3, 80)) * 0.2 + np.array([[0.0], [0.5], [0.8]])
    paired = runs_and_scenarios_bootstrap_ci(b + 0.1, b, paired_runs=True, n_boot=2000)
    assert paired["low"] == pytest.approx(0.1) and paired["high"] == pytest.approx(0.1)
    unpaired = runs_and_scenarios_bootstrap_ci(b + 0.1, b, paired_runs=False, n_boot=2000)
    assert unpaired["low"] < -0.2 and unpaired["high"] > 0.4
    # independent episodes, no run effect: wider than the pooled CI (each episode counted at both levels), by
    # sqrt((3R - 2) / R) = 1.53 in expectation for R = 3 runs; one sample of runs moves it, so average ten
    ratios = []
    for rep in range(10):
        x, y = rng.random((3, 400)) < 0.6, rng.random((3, 400)) < 0.5
        pooled = paired_bootstrap_ci(x.mean(axis=0), y.mean(axis=0), n_boot=2000, seed=rep)
        both = runs_and_scenarios_bootstrap_ci(x, y, paired_runs=True, n_boot=2000, seed=rep)
        ratios.append((both["high"] - both["low"]) / (pooled["high"] - pooled["low"]))
    assert 1.35 < np.mean(ratios) < 1.7
    for bad in ((np.zeros((2, 5)), np.zeros((3, 5)), True), (np.zeros((2, 5)), np.zeros((2, 4)), False)):
        with pytest.raises(ValueError):
            runs_and_scenarios_bootstrap_ci(*bad)


def test_compare_resamples_training_seeds_when_both_sides_have_several(tmp_path: Path) -> None:
    # Seed 0 of ppo gains everywhere, seed 1 nowhere: the pooled CI is well above 0, the runs-resampled CI is not.
    paths = [_eval(tmp_path / f"sft{t}.json", "sft", {s: [s % 2 == 0] for s in range(60)}, training_seed=t)
             for t in (0, 1)]
    paths += [_eval(tmp_path / "ppo0.json", "ppo", {s: [True] for s in range(60)}, training_seed=0),
              _eval(tmp_path / "ppo1.json", "ppo", {s: [s % 2 == 0] for s in range(60)}, training_seed=1)]
    vs = compare(paths, "sft", tmp_path / "out", n_boot=2000)["methods"]["ppo"]["vs_baseline"]
    assert vs["success_rate"]["mean_diff"] == pytest.approx(0.25) and vs["success_rate"]["low"] > 0.1
    runs = vs["success_rate_runs_resampled"]
    assert runs["paired_runs"] and runs["runs"] == [2, 2] and runs["mean_diff"] == pytest.approx(0.25)
    # a quarter of the draws take seed 1 twice (difference 0 on every scenario), a quarter seed 0 twice (0.5, plus
    # the scenarios' noise): the CI runs from 0 to beyond 0.5
    assert runs["low"] == 0.0 and runs["high"] > 0.5 > vs["success_rate"]["high"] + 0.1
    assert "seeds and scenarios" in (tmp_path / "out" / "report.md").read_text()
    assert "training seeds resampled too" in format_table(compare(paths, "sft", tmp_path / "out", n_boot=200))


def test_runs_are_paired_by_training_seed_whatever_the_file_order(tmp_path: Path) -> None:
    # PPO seed s gains on the same scenarios (s % 4 == 1) over SFT seed s, whose runs differ a lot: paired by seed,
    # every run says the same, so the runs-resampled CI is about the pooled one; mispaired, it would be wide.
    sft = {0: {s: [s % 2 == 0] for s in range(80)}, 1: {s: [s % 4 == 0] for s in range(80)}}
    ppo = {t: {s: [ok[0] or s % 4 == 1] for s, ok in sft[t].items()} for t in (0, 1)}
    paths = [_eval(tmp_path / "ppo1.json", "ppo", ppo[1], training_seed=1),
             _eval(tmp_path / "sft0.json", "sft", sft[0], training_seed=0),
             _eval(tmp_path / "ppo0.json", "ppo", ppo[0], training_seed=0),
             _eval(tmp_path / "sft1.json", "sft", sft[1], training_seed=1)]
    vs = compare(paths, "sft", tmp_path / "out", n_boot=4000)["methods"]["ppo"]["vs_baseline"]
    runs, pooled = vs["success_rate_runs_resampled"], vs["success_rate"]
    assert runs["paired_runs"] and runs["mean_diff"] == pytest.approx(0.25)
    assert runs["high"] - runs["low"] == pytest.approx(pooled["high"] - pooled["low"], rel=0.15)
    # one seed's evaluation split over two files is still one run, and gives the same interval
    halves = [_eval(tmp_path / f"ppo1_{h}.json", "ppo", {s: v for s, v in ppo[1].items() if s % 2 == h},
                    training_seed=1) for h in (0, 1)]
    split = compare([p for p in paths if p.name != "ppo1.json"] + halves, "sft", tmp_path / "out2", n_boot=4000)
    assert split["methods"]["ppo"]["vs_baseline"]["success_rate_runs_resampled"] == runs
    # a run that lacks some of the shared scenarios: no runs-resampled CI (its runs would not be comparable)
    short = _eval(tmp_path / "ppo1_short.json", "ppo", {s: v for s, v in ppo[1].items() if s < 40}, training_seed=1)
    partial = compare([p for p in paths if p.name != "ppo1.json"] + [short], "sft", tmp_path / "out3", n_boot=500)
    assert "success_rate_runs_resampled" not in partial["methods"]["ppo"]["vs_baseline"]


def _record(s: int, repeat: int, ok: bool, bonus: float = 0.0, turns: int = 3) -> dict[str, Any]:
    return {"scenario_seed": s, "repeat": repeat, "intent": "refund", "persona": "vague" if s % 2 else "cooperative",
            "success": ok, "return": float(ok) + bonus, "turns": turns, "violations": 0, "invalid_actions": 0,
            "reply_chars": 40.0, "reward_components": {"success": float(ok), "bonus": bonus}}


def _eval(path: Path, method: str, successes: dict[int, list[bool]], training_seed: int | None = 0,
          decoding: str = "greedy", bonus: float = 0.0, turns: int = 3, **extra: object) -> Path:
    records = [_record(s, i, ok, bonus, turns) for s, oks in successes.items() for i, ok in enumerate(oks)]
    data = {"policy": method, "method": method, "env_id": "dialogrl/CustomerService-v0", "split": "test",
            "decoding": decoding, "training_seed": training_seed,
            "metrics": {"success_rate": float(np.mean([r["success"] for r in records]))}, "records": records}
    data.update(extra)
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
    assert "success_rate_runs_resampled" not in vs  # one baseline run: no spread between its seeds to resample
    # the method's own rate: per scenario over both seeds (40..49 only from seed 1), then over its 50 scenarios
    own = per_scenario + [float(s % 2 == 0) for s in range(40, 50)]
    assert ppo["scenarios"] == 50 and ppo["episodes"] == 80
    assert ppo["success_rate"] == pytest.approx(np.mean(own))
    assert ppo["success_ci"][0] < ppo["success_rate"] < ppo["success_ci"][1]
    assert ppo["by_persona"]["cooperative"]["success_rate"] == pytest.approx(np.mean(own[::2]))
    for name in ("report.md", "report.json", "report.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "How to read this" in md and "greedy" in md and "Success by persona" in md
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir cleaned up
    assert "ppo" in format_table(report)


def test_reward_hacking_is_flagged_next_to_the_outcomes(tmp_path: Path) -> None:
    outcomes = {s: [s % 3 == 0] for s in range(60)}
    base = _eval(tmp_path / "sft.json", "sft", outcomes)
    hack = _eval(tmp_path / "ppo.json", "ppo", outcomes, bonus=1.0, decoding="sampled",
                 metrics={"kl_to_reference": 2.5})
    report = compare([base, hack], "sft", tmp_path / "out", n_boot=500)
    ppo = report["methods"]["ppo"]
    assert ppo["vs_baseline"]["mean_return"]["mean_diff"] == pytest.approx(1.0)
    assert ppo["vs_baseline"]["success_rate"]["mean_diff"] == pytest.approx(0.0)
    assert ppo["flags"] == ["return rose but success did not measurably rise"]
    assert ppo["kl_to_reference"] == 2.5 and ppo["reward_components"]["bonus"] == 1.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "return rose but success did not" in md and "2.500" in md and "sampled" in md
    # A method that games a learned reward: success down, longer conversations, far from its reference.
    gamed = _eval(tmp_path / "rm.json", "ppo-rm", {s: [False] for s in range(60)}, turns=4,
                  metrics={"kl_to_reference": 5.2})
    flags = compare([base, gamed], "sft", tmp_path / "out2", n_boot=500)["methods"]["ppo-rm"]["flags"]
    assert flags == ["success measurably below the baseline", "conversations 1.33x as long (turns) as the baseline's",
                     "far from its reference: KL 5.2 nats per reply (>= 3)"]


def test_a_method_under_two_decodings_is_split_not_pooled(tmp_path: Path) -> None:
    base = _eval(tmp_path / "sft.json", "sft", {s: [True] for s in range(10)})
    greedy = _eval(tmp_path / "g.json", "ppo", {s: [True] for s in range(10)})
    sampled = _eval(tmp_path / "s.json", "ppo", {s: [False] for s in range(10)}, decoding="sampled")
    report = compare([base, greedy, sampled], "sft", tmp_path / "out", n_boot=100)
    assert set(report["methods"]) == {"sft", "ppo@greedy", "ppo@sampled"}
    assert report["methods"]["ppo@sampled"]["success_rate"] == 0.0


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


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["records"][1].pop("success"), r"records\[1\] has no 'success'"),
    (lambda d: d["records"][0].update(reply_chars="long"), r"records\[0\].reply_chars has a bad value"),
    (lambda d: d.update(records=[]), "missing or empty 'records'"),
    (lambda d: d.update(method=None, policy=None), "needs a 'method' or 'policy'"),
])
def test_malformed_eval_files_name_file_record_and_key(tmp_path: Path, mutate: Callable[[dict], object],
                                                      message: str) -> None:
    path = _eval(tmp_path / "e.json", "sft", {1: [True], 2: [False]})
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DialogRLError, match=message) as err:
        load_eval(path)
    assert "e.json" in str(err.value)


def test_inconsistent_inputs_are_refused(tmp_path: Path) -> None:
    base = _eval(tmp_path / "sft.json", "sft", {1: [True], 2: [False]})
    with pytest.raises(DialogRLError, match="given twice"):
        compare([base, tmp_path / "sft.json"], "sft", tmp_path / "out")
    other_env = _eval(tmp_path / "x.json", "ppo", {1: [True]}, env_id="dialogrl/Refund-v0")
    with pytest.raises(DialogRLError, match="differ in env_id"):
        compare([base, other_env], "sft", tmp_path / "out")
    # Returns under different rewards do not compare (files from before the field was written are let through).
    default, success_only = (_eval(tmp_path / f"{name}.json", name, {1: [True]}, reward=reward)
                             for name, reward in (("dpo", None), ("ppo", ["success"])))
    compare([base, default], "sft", tmp_path / "ok")
    with pytest.raises(DialogRLError, match=r'differ in reward: .*dpo.json: null; .*ppo.json: \["success"\]$'):
        compare([base, default, success_only], "sft", tmp_path / "out")
    twice = _eval(tmp_path / "z.json", "ppo", {1: [True], 2: [False]})
    data = json.loads(twice.read_text())
    data["records"][1]["scenario_seed"] = 1
    twice.write_text(json.dumps(data))
    with pytest.raises(DialogRLError, match=r"z.json: records\[1\] repeats records\[0\] \(scenario_seed 1, repeat 0\) "
                                            r"more often than the evaluation drew that scenario \(1\)"):
        compare([base, twice], "sft", tmp_path / "out")
    # ... but a draw that met a customer twice is kept as drawn (seed 43's 2,000 scenarios hold one seed twice).
    from dialogrl.evaluation import scenario_seeds

    drawn = scenario_seeds(43, 2000)
    assert len(set(drawn)) == 1999
    big = [_eval(tmp_path / f"{m}43.json", m, {1: [True]}, seed=43, episodes=2000) for m in ("sft", "ppo")]
    for path in big:
        data = json.loads(path.read_text())
        data["records"] = [_record(s, 0, s % 3 == 0) for s in drawn]
        path.write_text(json.dumps(data))
    compare(big, "sft", tmp_path / "big")
    swapped = _eval(tmp_path / "y.json", "ppo", {1: [True]})
    data = json.loads(swapped.read_text())
    data["records"][0]["persona"] = "angry"
    swapped.write_text(json.dumps(data))
    with pytest.raises(DialogRLError, match="scenario seed 1 is refund/angry in .*y.json but refund/vague in .*sft.json"):
        compare([base, swapped], "sft", tmp_path / "out")
    (tmp_path / "afile").write_text("")
    with pytest.raises(DialogRLError, match="not a directory"):
        compare([base], "sft", tmp_path / "afile")
    assert not (tmp_path / "out").exists()


def test_a_copy_of_an_evaluation_is_not_a_second_run(tmp_path: Path) -> None:
    base = _eval(tmp_path / "sft.json", "sft", {1: [True], 2: [False]})
    ppo = _eval(tmp_path / "ppo.json", "ppo", {1: [True], 2: [True]})
    (tmp_path / "copies").mkdir()
    copy = tmp_path / "copies" / "ppo_again.json"
    copy.write_bytes(ppo.read_bytes())
    with pytest.raises(DialogRLError) as err:
        compare([base, ppo, copy], "sft", tmp_path / "out")
    line = str(err.value)
    assert str(copy) in line and str(ppo) in line and "same evaluation" in line and "\n" not in line
    assert not (tmp_path / "out").exists()
    # Reformatted (same content, other bytes) is still the same run; another training seed is not.
    data = json.loads(ppo.read_text())
    copy.write_text(json.dumps(data, indent=2))
    with pytest.raises(DialogRLError, match="same evaluation"):
        compare([base, ppo, copy], "sft", tmp_path / "out")
    data["training_seed"] = 1
    copy.write_text(json.dumps(data))
    report = compare([base, ppo, copy], "sft", tmp_path / "out", n_boot=100)
    assert report["methods"]["ppo"]["training_seeds"] == [0, 1]


def test_run_directory_holding_eval_json_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    _eval(tmp_path / "run" / "eval.json", "sft", {1: [True]})
    assert load_eval(tmp_path / "run")["method"] == "sft"
    with pytest.raises(DialogRLError, match="no such evaluation file"):
        load_eval(tmp_path / "missing.json")
    (tmp_path / "sft_run").mkdir()
    (tmp_path / "sft_run" / "run.json").write_text("{}")  # trained, not evaluated: the error says what to run
    with pytest.raises(DialogRLError, match=r"evaluate the run first: dialogrl eval --policy .*sft_run --out"):
        load_eval(tmp_path / "sft_run")


def test_evaluations_record_their_reward_however_it_was_written() -> None:
    from dialogrl.evaluation import evaluate
    from dialogrl.policies.scripted import make_scripted
    from dialogrl.rewards import DEFAULT_WEIGHTS

    def brevity(t: object) -> float:
        return 0.0

    expert = make_scripted("expert")
    first = evaluate(expert, episodes=2, env_kwargs={"reward": ["success", {brevity: 0.5}]})  # was a TypeError
    second = evaluate(expert, episodes=2, env_kwargs={"reward": [(brevity, 0.5), f"success={DEFAULT_WEIGHTS['success']}"]})
    assert first["reward"] == second["reward"] == {"brevity": 0.5, "success": DEFAULT_WEIGHTS["success"]}
    assert json.loads(json.dumps(first))["reward"] == first["reward"]
    assert evaluate(expert, episodes=2)["reward"] is None  # the env's default mix
