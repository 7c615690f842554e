"""``dialogrl compare``: methods against a baseline on shared held-out scenarios -> report.md/json/png."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dialogrl.stats import paired_bootstrap_ci, pass_hat_k
from dialogrl.types import DialogRLError

HOW_TO_READ = """\
**How to read this.** Every method met the same held-out test-split customers (paired scenario seeds).
*Success* is judged from the final database state, what the customer was told, and policy violations; it is
independent of the reward the agent was trained on. *Return* is the training reward. A method whose return
rises while success does not, or whose violations, invalid actions or reply length grow, or whose KL to its
reference is large, is gaming the reward rather than solving the task. "vs baseline" is the mean paired
difference in success with a 95% bootstrap CI over scenarios (training seeds are averaged per scenario first);
a CI entirely above 0 means the method measurably beat the baseline on these scenarios.
"""
METRICS = ("success_rate", "mean_return", "mean_turns", "violation_rate", "invalid_action_rate", "mean_reply_chars")


def load_eval(path: str | Path) -> dict[str, Any]:
    """An eval JSON file, or a run directory holding ``eval.json``."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DialogRLError(f"{file}: no such evaluation file") from None
    except (OSError, ValueError) as exc:
        raise DialogRLError(f"{file}: not a readable evaluation JSON ({exc})") from None
    for key in ("records", "metrics"):
        if key not in data:
            raise DialogRLError(f"{file}: missing key '{key}' (not written by `dialogrl eval`?)")
    if not data["records"]:
        raise DialogRLError(f"{file}: no episode records")
    data["_path"] = str(file)
    return data


def _per_scenario(evals: list[dict[str, Any]], field: str) -> dict[int, float]:
    """Mean of ``field`` per scenario seed over training seeds and repeats (pooling)."""
    values: dict[int, list[float]] = defaultdict(list)
    for e in evals:
        for r in e["records"]:
            values[int(r["scenario_seed"])].append(float(r[field]))
    return {seed: float(np.mean(v)) for seed, v in values.items()}


def _method_block(name: str, evals: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    records = [r for e in evals for r in e["records"]]
    turns = sum(r["turns"] for r in records)
    success = _per_scenario(evals, "success")
    ci = paired_bootstrap_ci(list(success.values()), np.zeros(len(success)), n_boot=n_boot, seed=seed)
    by_persona: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_persona[r["persona"]].append(bool(r["success"]))
    block: dict[str, Any] = {
        "method": name, "files": [e["_path"] for e in evals],
        "training_seeds": sorted({e.get("training_seed") for e in evals}, key=str),
        "decoding": sorted({str(e.get("decoding", "unknown")) for e in evals}),
        "episodes": len(records), "scenarios": len(success),
        "success_rate": float(np.mean([r["success"] for r in records])),
        "success_ci": [ci["low"], ci["high"]],
        "mean_return": float(np.mean([r["return"] for r in records])),
        "mean_turns": float(np.mean([r["turns"] for r in records])),
        "violation_rate": float(np.mean([r["violations"] > 0 for r in records])),
        "invalid_action_rate": sum(r["invalid_actions"] for r in records) / max(turns, 1),
        "mean_reply_chars": float(np.mean([r.get("reply_chars", 0.0) for r in records])),
        "by_persona": {p: float(np.mean(v)) for p, v in sorted(by_persona.items())},
    }
    kls = [e["metrics"]["kl_to_reference"] for e in evals if "kl_to_reference" in e.get("metrics", {})]
    if kls:
        block["kl_to_reference"] = float(np.mean(kls))
    block["pass_hat_k"] = _pass_k(evals)
    return block


def _pass_k(evals: list[dict[str, Any]]) -> dict[str, float]:
    """pass^k for k = 1..n when every scenario was repeated n >= 2 times (averaged over training seeds)."""
    per_eval = []
    for e in evals:
        trials: dict[int, list[bool]] = defaultdict(list)
        for r in e["records"]:
            trials[int(r["scenario_seed"])].append(bool(r["success"]))
        n = min(len(t) for t in trials.values())
        if n >= 2:
            per_eval.append({str(k): pass_hat_k(trials, k) for k in range(1, n + 1)})
    if not per_eval:
        return {}
    ks = set.intersection(*(set(p) for p in per_eval))
    return {k: float(np.mean([p[k] for p in per_eval])) for k in sorted(ks, key=int)}


def compare(paths: list[str | Path], baseline: str, out_dir: str | Path, n_boot: int = 10_000,
            seed: int = 0) -> dict[str, Any]:
    """Group evaluations by method (pooling training seeds), pair each with the baseline, write the report."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in paths:
        e = load_eval(p)
        groups[str(e.get("method") or e.get("policy"))].append(e)
    if baseline not in groups:
        raise DialogRLError(f"unknown baseline '{baseline}'; methods: {', '.join(sorted(groups))}")
    methods = {name: _method_block(name, evals, n_boot, seed) for name, evals in groups.items()}
    base_success = _per_scenario(groups[baseline], "success")
    base_return = _per_scenario(groups[baseline], "return")
    for name, evals in groups.items():
        if name == baseline:
            continue
        success, ret = _per_scenario(evals, "success"), _per_scenario(evals, "return")
        shared = sorted(set(success) & set(base_success))
        if not shared:
            raise DialogRLError(f"method '{name}' shares no scenario seed with baseline '{baseline}': "
                                "evaluate both with the same --seed")
        diff = paired_bootstrap_ci([success[s] for s in shared], [base_success[s] for s in shared], n_boot, seed)
        rdiff = paired_bootstrap_ci([ret[s] for s in shared], [base_return[s] for s in shared], n_boot, seed)
        methods[name]["vs_baseline"] = {"success": diff, "return": rdiff, "shared_scenarios": len(shared)}
    report = {"baseline": baseline, "n_boot": n_boot, "methods": methods}
    _write(report, Path(out_dir))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The comparison as a fixed-width console table."""
    head = f"{'method':16s}{'seeds':>6s}  {'success [95% CI]':22s}{'vs ' + report['baseline'] + ' [95% CI]':28s}" \
           f"{'return':>8s}{'turns':>7s}{'violations':>11s}{'invalid':>9s}{'reply chars':>12s}"
    lines = [head]
    for name, m in report["methods"].items():
        vs = m.get("vs_baseline", {}).get("success")
        vs_text = f"{vs['mean_diff']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]" if vs else "baseline"
        lines.append(f"{name:16s}{len(m['training_seeds']):>6d}  "
                     f"{m['success_rate']:.3f} [{m['success_ci'][0]:.3f}, {m['success_ci'][1]:.3f}]  "
                     f"{vs_text:28s}{m['mean_return']:8.3f}{m['mean_turns']:7.2f}{m['violation_rate']:11.3f}"
                     f"{m['invalid_action_rate']:9.3f}{m['mean_reply_chars']:12.1f}")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    lines = [f"# Comparison with baseline `{report['baseline']}`", "", HOW_TO_READ,
             "| method | training seeds | decoding | episodes | success [95% CI] | vs baseline [95% CI] | return "
             "| turns | violation rate | invalid / turn | reply chars | KL to reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        vs = m.get("vs_baseline", {}).get("success")
        vs_text = f"{vs['mean_diff']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]" if vs else "—"
        kl = f"{m['kl_to_reference']:.3f}" if "kl_to_reference" in m else "—"
        lines.append(f"| {name} | {', '.join(map(str, m['training_seeds']))} | {', '.join(m['decoding'])} | "
                     f"{m['episodes']} | {m['success_rate']:.3f} [{m['success_ci'][0]:.3f}, {m['success_ci'][1]:.3f}]"
                     f" | {vs_text} | {m['mean_return']:.3f} | {m['mean_turns']:.2f} | {m['violation_rate']:.3f} | "
                     f"{m['invalid_action_rate']:.3f} | {m['mean_reply_chars']:.1f} | {kl} |")
    personas = sorted({p for m in methods.values() for p in m["by_persona"]})
    lines += ["", "## Success by persona", "", "| method | " + " | ".join(personas) + " |",
              "|---|" + "---|" * len(personas)]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{m['by_persona'].get(p, float('nan')):.3f}" for p in personas)
                     + " |")
    with_k = {n: m["pass_hat_k"] for n, m in methods.items() if m["pass_hat_k"]}
    if with_k:
        ks = sorted({k for v in with_k.values() for k in v}, key=int)
        lines += ["", "## pass^k (scenarios repeated)", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for name, v in with_k.items():
            lines.append(f"| {name} | " + " | ".join(f"{v[k]:.3f}" if k in v else "—" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    ms = [report["methods"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rates = [m["success_rate"] for m in ms]
    err = [[r - m["success_ci"][0] for r, m in zip(rates, ms, strict=True)],
           [m["success_ci"][1] - r for r, m in zip(rates, ms, strict=True)]]
    left.bar(names, rates, yerr=err, capsize=4, color="#4c72b0")
    left.set_ylim(0, 1)
    left.set_ylabel("held-out success rate (95% CI)")
    left.tick_params(axis="x", rotation=30)
    others = [(n, m["vs_baseline"]["success"]) for n, m in zip(names, ms, strict=True) if "vs_baseline" in m]
    if others:
        y = np.arange(len(others))
        diffs = [d["mean_diff"] for _, d in others]
        xerr = [[d["mean_diff"] - d["low"] for _, d in others], [d["high"] - d["mean_diff"] for _, d in others]]
        right.errorbar(diffs, y, xerr=xerr, fmt="o", capsize=4, color="#dd8452")
        right.set_yticks(y, [n for n, _ in others])
    right.axvline(0, color="grey", lw=1)
    right.set_xlabel(f"success minus {report['baseline']} (paired, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(report: dict[str, Any], out_dir: Path) -> None:
    """All three files into a temp dir first, then moved in: nothing half-written on error."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        _plot(report, tmp / "report.png")
        out_dir.mkdir(exist_ok=True)
        for name in ("report.json", "report.md", "report.png"):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
