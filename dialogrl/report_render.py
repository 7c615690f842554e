"""How ``dialogrl compare`` writes its report: the console table, ``report.md``, ``report.png``, ``report.json``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dialogrl.outputs import temp_dir_beside
from dialogrl.types import DialogRLError

HOW_TO_READ = """\
**How to read this.** Methods are paired on the held-out scenario seeds they share (same customers, same
goals). *Success* is judged by the environment from the final database state, what the customer was told and
the business-policy rules; it does not depend on the reward the agent was trained on. *Return* is that reward.
A method whose return rises while success does not, or whose violations, invalid actions, reply length or KL
to its reference grow, is gaming the reward rather than solving the task (see "Things to check"). *KL to
reference* is KL(policy || adapter disabled) summed over each reply's tokens, averaged over replies, on the
conversations evaluated: for an SFT run the reference is the base model, for PPO and DPO the SFT policy.
Several training seeds of one method are pooled: each scenario's outcome is averaged over seeds and repeats
first, and rates are means over scenarios. "Δ vs baseline" is the mean paired difference with a 95% percentile
bootstrap CI over the shared scenarios; a CI entirely above 0 means a measurable gain on these scenarios. It
does not hold the spread between training seeds: with two seeds or more on both sides, a second CI resamples the
seeds (paired when both sides have the same seeds, e.g. PPO seed s started from SFT seed s), then the scenarios;
it says whether the gain would likely hold for a fresh training run, and is conservative (each episode's own
noise counts at both levels). The success CI of one method is a Wilson interval over its scenarios. Greedy and sampled decoding can differ a lot:
compare methods only under the decoding listed for each.
"""


def _ci(d: dict[str, float] | None, fmt: str = "+.3f") -> str:
    return f"{d['mean_diff']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]" if d else "baseline"


def format_table(report: dict[str, Any]) -> str:
    """The comparison as a fixed-width console table."""
    head = (f"{'method':18s}{'runs':>5s} {'decoding':10s}{'success [95% CI]':22s}"
            f"{'diff vs ' + report['baseline'] + ' [95% CI]':28s}{'return':>8s}{'turns':>7s}{'violations':>11s}"
            f"{'invalid':>9s}{'reply chars':>12s}{'KL':>8s}")
    lines = [head]
    for name, m in report["methods"].items():
        lines.append(f"{name:18s}{len(m['files']):>5d} {','.join(m['decoding']):10s}"
                     f"{m['success_rate']:.3f} [{m['success_ci'][0]:.3f}, {m['success_ci'][1]:.3f}]  "
                     f"{_ci(m.get('vs_baseline', {}).get('success_rate')):28s}{m['mean_return']:8.3f}"
                     f"{m['mean_turns']:7.2f}{m['violation_rate']:11.3f}{m['invalid_action_rate']:9.3f}"
                     f"{m['mean_reply_chars']:12.1f}"
                     + (f"{m['kl_to_reference']:8.3f}" if "kl_to_reference" in m else f"{'—':>8s}"))
    over_runs = [f"{name} {_ci(m['vs_baseline']['success_rate_runs_resampled'])}" for name, m in report["methods"].items()
                 if "success_rate_runs_resampled" in m.get("vs_baseline", {})]
    if over_runs:  # the diff CI above resamples scenarios only
        lines.append(f"diff vs {report['baseline']} with the training seeds resampled too [95% CI, conservative]: "
                     + "; ".join(over_runs))
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _markdown(report: dict[str, Any]) -> str:
    methods, base = report["methods"], report["baseline"]
    seeds = {n: ", ".join("—" if s is None else str(s) for s in m["training_seeds"]) for n, m in methods.items()}
    lines = [f"# Comparison with baseline `{base}`", "",
             f"Env `{report['env_id']}`, split `{report['split']}`; {report['n_boot']} bootstrap resamples.", "",
             "## Outcomes and reward, side by side", ""]
    lines += _md_table(
        ["method", "decoding", "training seeds", "scenarios (episodes)", "success [95% CI]",
         "Δ success vs baseline [95% CI]", "return (env reward)", "Δ return [95% CI]", "turns", "violation rate",
         "invalid actions / turn", "reply chars", "KL to reference"],
        [[n, ", ".join(m["decoding"]), seeds[n], f"{m['scenarios']} ({m['episodes']})",
          f"{m['success_rate']:.3f} [{m['success_ci'][0]:.3f}, {m['success_ci'][1]:.3f}]",
          _ci(m.get("vs_baseline", {}).get("success_rate")), f"{m['mean_return']:.3f}",
          _ci(m.get("vs_baseline", {}).get("mean_return")), f"{m['mean_turns']:.2f}", f"{m['violation_rate']:.3f}",
          f"{m['invalid_action_rate']:.3f}", f"{m['mean_reply_chars']:.1f}",
          f"{m['kl_to_reference']:.3f}" if "kl_to_reference" in m else "—"] for n, m in methods.items()])
    paired = {n: m["vs_baseline"]["shared_scenarios"] for n, m in methods.items() if "vs_baseline" in m}
    if paired:
        lines += ["", "Paired on shared scenarios: " + ", ".join(f"{n} {k}" for n, k in paired.items()) + "."]
    over_runs = {n: m["vs_baseline"]["success_rate_runs_resampled"] for n, m in methods.items()
                 if "success_rate_runs_resampled" in m.get("vs_baseline", {})}
    if over_runs:
        lines += ["", "## Δ success with the training seeds resampled too", "",
                  "Each resample draws training seeds, then scenarios (conservative: see How to read this).", ""]
        lines += _md_table(["method", "runs (method, baseline)", "paired by seed",
                            "Δ success, scenarios resampled [95% CI]", "Δ success, seeds and scenarios [95% CI]"],
                           [[n, "{}, {}".format(*d["runs"]), "yes" if d["paired_runs"] else "no",
                             _ci(methods[n]["vs_baseline"]["success_rate"]), _ci(d)] for n, d in over_runs.items()])
    lines += ["", HOW_TO_READ]
    flagged = {n: m["flags"] for n, m in methods.items() if m.get("flags")}
    lines += ["## Things to check", ""]
    lines += [f"- **{n}**: {'; '.join(f)}" for n, f in flagged.items()] or ["- nothing flagged"]
    comps = sorted({c for m in methods.values() for c in m["reward_components"]})
    if comps:
        lines += ["", "## Reward components (mean per episode)", ""]
        lines += _md_table(["method", *comps], [[n, *(f"{m['reward_components'].get(c, 0.0):.3f}" for c in comps)]
                                                for n, m in methods.items()])
    for key, title in (("by_persona", "persona"), ("by_intent", "intent")):
        cols = sorted({p for m in methods.values() for p in m[key]})
        lines += ["", f"## Success by {title}", ""]
        lines += _md_table(["method", *cols], [[n, *(f"{m[key][c]['success_rate']:.3f}" if c in m[key] else "—"
                                                     for c in cols)] for n, m in methods.items()])
    with_k = {n: m["pass_hat_k"] for n, m in methods.items() if m["pass_hat_k"]}
    if with_k:
        ks = sorted({k for v in with_k.values() for k in v}, key=int)
        lines += ["", "## pass^k (scenarios repeated; per training seed, then averaged)", ""]
        lines += _md_table(["method", *(f"k={k}" for k in ks)],
                           [[n, *(f"{v[k]:.3f}" if k in v else "—" for k in ks)] for n, v in with_k.items()])
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # lazy; a bare Figure renders with Agg and touches no global backend

    names = list(report["methods"])
    ms = [report["methods"][n] for n in names]
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    rates = [m["success_rate"] for m in ms]
    err = [[max(0.0, r - m["success_ci"][0]) for r, m in zip(rates, ms, strict=True)],
           [max(0.0, m["success_ci"][1] - r) for r, m in zip(rates, ms, strict=True)]]
    colours = ["#8c8c8c" if n == report["baseline"] else "#4c72b0" for n in names]
    left.bar(names, rates, yerr=err, capsize=4, color=colours)
    left.set_ylim(0, 1)
    left.set_ylabel("held-out success rate (95% CI)")
    left.tick_params(axis="x", rotation=30)
    others = [(n, m["vs_baseline"]["success_rate"]) for n, m in zip(names, ms, strict=True) if "vs_baseline" in m]
    if others:
        y = np.arange(len(others))
        diffs = [d["mean_diff"] for _, d in others]
        xerr = [[max(0.0, d["mean_diff"] - d["low"]) for _, d in others],
                [max(0.0, d["high"] - d["mean_diff"]) for _, d in others]]
        right.errorbar(diffs, y, xerr=xerr, fmt="o", capsize=4, color="#dd8452")
        right.set_yticks(y, [n for n, _ in others])
        right.set_ylim(len(others) - 0.5, -0.5)  # first method on top, as in the table
    right.axvline(0, color="grey", lw=1)
    right.set_xlabel(f"success minus {report['baseline']} (paired, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """All three files into a temp dir first, then moved in: nothing half-written on error."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DialogRLError(f"{out_dir}: exists and is not a directory")
    tmp: Path | None = None
    try:
        tmp = temp_dir_beside(out_dir)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False), encoding="utf-8")
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        _plot(report, tmp / "report.png")
        out_dir.mkdir(exist_ok=True)
        for name in ("report.json", "report.md", "report.png"):
            os.replace(tmp / name, out_dir / name)
    except OSError as exc:
        raise DialogRLError(f"{out_dir}: cannot write the report ({exc})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
