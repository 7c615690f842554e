"""SB3 PPO on the dialogue-act env, at most 60 s of training: test success must beat random acts by >= 0.5.

Trains with the tuned defaults of configs/sb3.yaml under a wall-clock limit (a callback stops ``learn``), then
evaluates the model deterministically on held-out test episodes and uniformly random acts on the same seeds.
With several ``--seeds``, every seed must meet the target. The measured training seconds, steps and the
machine's load are recorded: on a shared CPU, 60 s buys fewer steps when others are busy.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from dialogrl.agents.sb3 import ENV_ID, SB3Config, evaluate_model, evaluate_random_acts, train_model
from dialogrl.config import config_to_dict, load_config
from dialogrl.evaluation import write_json

TARGET = 0.5
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sb3.yaml"


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    cfg = load_config(SB3Config, CONFIG, [f"seed={seed}", f"time_limit_s={args.seconds}", "timesteps=10000000",
                                          f"eval_episodes={args.episodes}", f"eval_seed={args.eval_seed}",
                                          *args.overrides])
    load = os.getloadavg()[0]
    model, stats = train_model(cfg)
    result = evaluate_model(model, cfg)
    return {"seed": seed, "config": config_to_dict(cfg), "load_average_before": round(load, 2), **stats,
            "success_rate": result["metrics"]["success_rate"], "metrics": result["metrics"],
            "by_intent": result["by_intent"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall-time budget per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--episodes", type=int, default=500, help="held-out test episodes")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/sb3_learning.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="SB3Config overrides")
    args = parser.parse_args()

    runs = [run_seed(seed, args) for seed in args.seeds]
    random = evaluate_random_acts(args.episodes, args.eval_seed)
    baseline = random["metrics"]["success_rate"]
    for run in runs:
        run["difference"] = round(run["success_rate"] - baseline, 4)
        run["met"] = run["difference"] >= TARGET
        print(f"seed {run['seed']}: {run['timesteps']} steps in {run['seconds']:.1f}s "
              f"({run['steps_per_second']:.0f}/s, load {run['load_average_before']}) -> test success "
              f"{run['success_rate']:.3f} vs random {baseline:.3f} (+{run['difference']:.3f}) met={run['met']}")
    mean = sum(r["success_rate"] for r in runs) / len(runs)
    write_json({
        "env_id": ENV_ID, "algo": "ppo", "split": "test", "episodes": args.episodes, "eval_seed": args.eval_seed,
        "time_budget_s": args.seconds, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "sb3_success_rate": mean, "random_success_rate": baseline, "difference": round(mean - baseline, 4),
        "training_seconds": [r["seconds"] for r in runs], "timesteps": [r["timesteps"] for r in runs],
        "target": TARGET, "met": all(r["met"] for r in runs),
        "random": {"metrics": random["metrics"], "by_intent": random["by_intent"]}, "runs": runs,
    }, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
