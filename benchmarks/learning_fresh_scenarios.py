"""The learning benchmark's runs on held-out scenarios that no choice was made on.

Every default behind ``benchmarks/learning.py`` (PPO's per-customer baseline and iteration count, ``keep:
average``, the KL coefficient of ``ppo-rm``, ...) was chosen by comparing runs on the benchmark's held-out
scenarios (test split, evaluation seed 0), so its differences carry some selection on those 200 scenarios. This
re-evaluates the finished runs of a learning-benchmark folder, unchanged, on test-split scenarios drawn from
another evaluation seed (same held-out phrasings, other customers, orders and personas), greedily, each run in
a fresh ``dialogrl eval`` process, and compares every method with SFT as ``learning.py`` does (paired bootstrap
CIs over the shared scenarios, training seeds pooled; the same targets, judged the same way).

    python benchmarks/learning_fresh_scenarios.py --work runs/learning-benchmark-v8 \
        --extra ppo-gae=runs/learning-benchmark-v7/ppo-s{seed}   # also the runs of an earlier default

Writes benchmarks/results/learning_fresh_scenarios.json, and the evaluations and the report under
``WORK/fresh-scenarios-seed{N}/``. A rerun resumes: evaluations already written are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from learning import summarise

from dialogrl.evaluation import write_json
from dialogrl.report import compare

METHODS = "sft,sft-filtered,ppo,dpo,ppo-rm,sft-expert"


def _evaluate(policy: str, out: Path, args: argparse.Namespace, extra: list[str]) -> float | None:
    """One greedy evaluation in its own process; seconds taken (None when the file was already there)."""
    if out.exists():
        return None
    started = time.perf_counter()
    command = [sys.executable, "-m", "dialogrl.cli", "eval", "--policy", policy, "--episodes", str(args.episodes),
               "--seed", str(args.eval_seed), "--out", str(out), *extra]
    print("dialogrl " + " ".join(command[3:]), flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:  # the command printed its own one-line reason
        sys.exit(f"the evaluation of {policy} failed (exit {done.returncode})")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/learning-benchmark", help="a finished learning-benchmark folder")
    parser.add_argument("--eval-seed", type=int, default=1, help="held-out scenario seed (not the folder's own)")
    parser.add_argument("--episodes", type=int, default=1000, help="held-out test scenarios")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--methods", default=METHODS, help="comma-separated, in order; their runs must exist")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATTERN",
                        help="more runs to evaluate under NAME, PATTERN a run folder with {seed}")
    parser.add_argument("--out", default="benchmarks/results/learning_fresh_scenarios.json")
    args = parser.parse_args()

    work = Path(args.work)
    settings_file = work / "quickstart.json"
    if not settings_file.is_file():
        parser.error(f"--work: {work} is not a learning-benchmark folder (no quickstart.json)")
    settings = json.loads(settings_file.read_text())
    if args.eval_seed == settings["eval_seed"]:
        parser.error(f"--eval-seed: {args.eval_seed} is the folder's own evaluation seed; pick another")
    if args.episodes < 1 or args.seeds < 1:
        parser.error("--episodes and --seeds must be at least 1")
    methods = args.methods.split(",")
    if "sft" not in methods:
        parser.error(f"--methods: every method is compared with sft, which {args.methods!r} leaves out")
    # (evaluation name, policy for `dialogrl eval`, its extra arguments)
    jobs = [(f"{m}-s{s}", str(work / f"{m}-s{s}"), []) for m in methods for s in range(args.seeds)]
    for item in args.extra:
        name, sep, pattern = item.partition("=")
        if not sep or not name or "{seed}" not in pattern or name in methods:
            parser.error(f"--extra: expected NAME=PATTERN, NAME not in --methods, {{seed}} in PATTERN; got {item!r}")
        jobs += [(f"{name}-s{s}", pattern.replace("{seed}", str(s)), ["--method", name]) for s in range(args.seeds)]
    missing = [path for _, path, _ in jobs if not (Path(path) / "run.json").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        parser.error(f"no finished run in {missing[0]}{more}")

    folder = work / f"fresh-scenarios-seed{args.eval_seed}"
    folder.mkdir(exist_ok=True)
    timings_file = folder / "timings.json"  # seconds of every evaluation, earlier runs of a resumed one included
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    errors = [arg for name, rate in sorted((settings.get("log_errors") or {}).items())
              for arg in ("--error", f"{name}={rate}")]
    jobs += [("expert", "expert", []), ("historical", "historical", errors)]
    paths, untimed = [], []
    for key, policy, extra in jobs:
        paths.append(folder / f"{key}.json")
        seconds = _evaluate(policy, paths[-1], args, extra)
        if seconds is not None:
            timings[key] = seconds
            write_json(timings, timings_file)
        elif key not in timings:  # an evaluation file put there by hand (e.g. copied from another folder)
            untimed.append(key)

    report = compare(paths, "sft", folder / "report")
    vs_other = {name: compare(paths, name, folder / f"report_vs_{sub}")
                for name, sub in (("sft-filtered", "filtered"), ("sft-expert", "expert_logs"))
                if name in methods}
    summary_args = argparse.Namespace(seeds=args.seeds, methods=args.methods, episodes=args.episodes,
                                      log_errors=settings.get("log_errors"), base=settings.get("base"), quick=False)
    result = summarise(report, sum(timings[key] for key, _, _ in jobs if key in timings), summary_args, vs_other,
                       untimed)
    result.update({"benchmark": "learning_fresh_scenarios", "work": str(work), "eval_seed": args.eval_seed,
                   "runs_eval_seed": settings["eval_seed"], "extra_runs": dict(item.split("=", 1)
                                                                              for item in args.extra)})
    write_json(result, Path(args.out))
    print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
