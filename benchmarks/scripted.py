"""Scripted policies on the held-out test split: expert >= 0.95, random <= 0.05, historical in [0.35, 0.70]."""

from __future__ import annotations

import argparse
import time

from dialogrl.evaluation import evaluate, write_json
from dialogrl.policies.scripted import make_scripted

TARGETS = {"expert": (0.95, 1.0), "historical": (0.35, 0.70), "random": (0.0, 0.05)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/scripted.json")
    args = parser.parse_args()
    results = {}
    for name, (low, high) in TARGETS.items():
        start = time.perf_counter()
        result = evaluate(make_scripted(name, seed=args.seed), split="test", episodes=args.episodes, seed=args.seed)
        rate = result["metrics"]["success_rate"]
        results[name] = {"success_rate": rate, "target": [low, high], "met": low <= rate <= high,
                         "metrics": result["metrics"], "by_persona": result["by_persona"],
                         "seconds": round(time.perf_counter() - start, 2)}
        print(f"{name:11s} success {rate:.3f}  target [{low}, {high}]  met={results[name]['met']}")
    write_json({"episodes": args.episodes, "seed": args.seed, "split": "test", "policies": results,
                "met": all(r["met"] for r in results.values())}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
