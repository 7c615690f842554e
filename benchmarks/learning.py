"""Does RL beat the supervised baseline on held-out conversations? The product's central claim, measured.

Runs the quickstart pipeline (cached base model -> historical logs -> SFT -> filtered SFT -> PPO -> DPO, PPO on
a learned reward model instead of the rule reward, ``ppo-rm``, and SFT on the scripted expert's logs of the same
customers, ``sft-expert``) for several training seeds, evaluates every run greedily on the same held-out
test-split scenarios, and compares each method with SFT: paired bootstrap 95% CIs over the shared scenarios,
training seeds pooled. The scripted expert is the ceiling, the historical agent (whose logs SFT imitates) the
reference SFT should land near, and ``sft-expert`` the imitation ceiling: what this base model reaches by
imitating flawless behaviour, so how much the logs' mistakes leave for RL to win.

Targets (issues 3-5): PPO and DPO each beat SFT by >= 0.20 held-out success with the CI's low end above 0;
SFT lands within +-0.10 of the historical agent. ``ppo-rm`` has no target: it shows whether the learned reward
transfers to true success (judged from the database, as for every method).

    python benchmarks/learning.py                    # 3 seeds (tens of minutes on 2 cores)
    python benchmarks/learning.py --seeds 1 --quick  # a smoke run: tiny budgets, says nothing about the claim
    python benchmarks/learning.py --log-errors skip_verification=0.7 --work runs/learning-habits \
        --out benchmarks/results/learning_habits.json  # logs whose author has a habit, not just slips
    python benchmarks/learning.py --base steps=4000 corpus_episodes=60000 --methods sft,sft-filtered,ppo,dpo,sft-expert \
        --work runs/learning-base4k --out benchmarks/results/learning_base4k.json  # a base pre-trained twice as long
    python benchmarks/learning.py --base n_embd=192 --methods sft,sft-filtered,ppo,dpo,sft-expert \
        --work runs/exp/base-wide --out benchmarks/results/learning_wide.json  # a wider base (2.6M parameters)

Every training run (with its evaluations) runs in a fresh process, as in the quickstart (``isolate_steps``): in
one process, the rounding left by earlier steps changed PPO's runs, and its held-out success is sensitive enough to
that for a seed to move by 0.16 (see docs/results.md).

Writes benchmarks/results/learning.json (and the full report under --work, with ``report_vs_filtered/`` and
``report_vs_expert_logs/``: every method against filtered SFT and against SFT on the expert's logs). A rerun on
the same --work resumes: finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dialogrl.evaluation import write_json

RL_TARGET = 0.20
SFT_TOLERANCE = 0.10


def summarise(report: dict[str, Any], seconds: float, args: argparse.Namespace,
              vs_other: dict[str, dict[str, Any]] | None = None, untimed: list[str] | None = None) -> dict[str, Any]:
    """The benchmark's JSON: per-method success, each method's paired difference to SFT (and to filtered SFT and
    SFT on the expert's logs when they ran: ``vs_sft_filtered``, ``vs_sft_expert``), targets met or not."""
    methods = report["methods"]
    rows = {name: {"success_rate": m["success_rate"], "success_ci95": m["success_ci"],
                   "mean_return": m["mean_return"], "violation_rate": m["violation_rate"],
                   "mean_reply_chars": m["mean_reply_chars"], "training_seeds": m["training_seeds"],
                   **({"kl_to_reference": m["kl_to_reference"]} if "kl_to_reference" in m else {}),
                   **({"vs_sft": m["vs_baseline"]["success_rate"], "flags": m["flags"]}
                      if "vs_baseline" in m else {}),
                   **({"vs_sft_runs_resampled": m["vs_baseline"]["success_rate_runs_resampled"]}
                      if "success_rate_runs_resampled" in m.get("vs_baseline", {}) else {})}
            for name, m in methods.items()}
    for baseline, other in (vs_other or {}).items():
        for name, m in other["methods"].items():
            if name in rows and "vs_baseline" in m and name not in ("expert", "historical"):
                rows[name][f"vs_{baseline.replace('-', '_')}"] = m["vs_baseline"]["success_rate"]
    targets: dict[str, Any] = {}
    for rl in ("ppo", "dpo"):
        if rl in rows:
            diff = rows[rl]["vs_sft"]
            targets[f"{rl}_beats_sft"] = {"target": f"success - sft >= {RL_TARGET} and CI low > 0",
                                          "diff": diff["mean_diff"], "ci95": [diff["low"], diff["high"]],
                                          "met": diff["mean_diff"] >= RL_TARGET and diff["low"] > 0}
            # Not the target's CI (the is over scenarios): the one that also resamples training seeds.
            if "vs_sft_runs_resampled" in rows[rl]:
                runs = rows[rl]["vs_sft_runs_resampled"]
                targets[f"{rl}_beats_sft"]["ci95_runs_resampled"] = [runs["low"], runs["high"]]
    if "sft" in rows and "historical" in rows:
        gap = rows["sft"]["success_rate"] - rows["historical"]["success_rate"]
        targets["sft_imitates_logs"] = {"target": f"|sft - historical| <= {SFT_TOLERANCE}", "gap": gap,
                                        "met": abs(gap) <= SFT_TOLERANCE}
    return {"benchmark": "learning", "decoding": "greedy", "seeds": args.seeds, "methods_run": args.methods,
            "eval_episodes": args.episodes, "log_errors": args.log_errors, "base": args.base, "quick": args.quick,
            "seconds": round(seconds, 1), "untimed_steps": untimed or [], "methods": rows, "targets": targets,
            "ceiling": rows.get("expert", {}).get("success_rate"),
            # SFT on flawless logs of the same customers: what imitation can reach on this base model, so the room
            # the logs' mistakes leave RL over SFT (RL beyond it would be learning what no demonstration shows).
            "imitation_ceiling": rows.get("sft-expert", {}).get("success_rate")}


def main() -> None:
    from dialogrl.config import yaml_value
    from dialogrl.policies.scripted import parse_error_rates
    from dialogrl.quickstart import QuickstartConfig, run_quickstart
    from dialogrl.types import DialogRLError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--episodes", type=int, default=200, help="held-out test scenarios")
    parser.add_argument("--work", default="runs/learning-benchmark", help="run directories and the full report")
    parser.add_argument("--out", default="benchmarks/results/learning.json")
    parser.add_argument("--methods", default="sft,sft-filtered,ppo,dpo,ppo-rm,sft-expert",
                        help="comma-separated, in order")
    parser.add_argument("--log-errors", nargs="*", default=[], metavar="NAME=RATE",
                        help="error rates of the historical agent behind the logs (HistoricalErrors fields)")
    parser.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE",
                        help="base-model config overrides (BootstrapConfig fields), e.g. steps=4000")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing only")
    args = parser.parse_args()
    try:
        args.log_errors = parse_error_rates(args.log_errors)
    except DialogRLError as exc:
        parser.error(f"--log-errors: {exc}")
    base: dict[str, Any] = {}
    for item in args.base:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--base: expected KEY=VALUE, got {item!r}")
        base[key] = yaml_value(value)  # checked against BootstrapConfig by the quickstart, before any work
    args.base = base
    cfg = QuickstartConfig(out=args.work, seeds=args.seeds, eval_episodes=args.episodes,
                           methods=args.methods.split(","), log_errors=args.log_errors, base=base)
    if args.quick:
        cfg.log_episodes, cfg.sft = 200, ["max_steps=20"]
        cfg.ppo, cfg.dpo = ["iterations=1", "episodes_per_iteration=16"], ["rounds=1", "scenarios_per_round=8"]
        cfg.reward_model = ["collect_episodes=40", "epochs=1"]
    report = run_quickstart(cfg)
    # No targets: whether RL adds anything over filtered cloning, and over imitating flawless logs.
    from dialogrl.report import compare

    work = Path(args.work)
    runs = [work / f"{m}-s{s}" / "eval.json" for m in cfg.methods for s in range(cfg.seeds)]
    vs_other = {name: compare(runs, name, work / f"report_vs_{folder}")
                for name, folder in (("sft-filtered", "filtered"), ("sft-expert", "expert_logs"))
                if name in cfg.methods}
    # Seconds of every step behind the results, earlier runs of a resumed benchmark included.
    # Steps whose outputs were copied into the folder are listed, not counted.
    timings = json.loads((Path(args.work) / "timings.json").read_text())
    result = summarise(report, timings["total"], args, vs_other, timings.get("untimed", []))
    write_json(result, Path(args.out))
    print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
