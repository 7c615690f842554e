"""``dialogrl compare``: methods against a baseline on shared held-out scenarios -> report.md/json/png."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dialogrl.outputs import temp_dir_beside
from dialogrl.stats import paired_bootstrap_ci, pass_hat_k, wilson_interval
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
bootstrap CI over the shared scenarios; a CI entirely above 0 means a measurable gain on these scenarios. The
success CI of one method is a Wilson interval over its scenarios. Greedy and sampled decoding can differ a lot:
compare methods only under the decoding listed for each.
"""
KL_FLAG = 3.0
"""KL to the reference (nats per reply) at which the report flags a method as far from where it started: a
heuristic: on the learning benchmarks, per run, PPO on the rule reward sits at 0.4-2.5, PPO gaming a learned
reward at 4.6-9.7."""
_RECORD_KEYS = ("scenario_seed", "repeat", "intent", "persona", "success", "return", "turns", "violations",
                "invalid_actions", "reply_chars")
_PAIRED = (("success", "success_rate"), ("return", "mean_return"), ("violated", "violation_rate"),
           ("reply_chars", "mean_reply_chars"))
"""(per-scenario field, report name) of the quantities compared with the baseline, scenario by scenario."""


def load_eval(path: str | Path) -> dict[str, Any]:
    """An eval JSON file (written by ``dialogrl eval``), or a run directory holding ``eval.json``."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if path.is_dir() and (path / "run.json").is_file():  # e.g. an SFT run: trained, never evaluated
            raise DialogRLError(f"{file}: no such evaluation file; evaluate the run first: "
                                f"dialogrl eval --policy {path} --out {file}") from None
        raise DialogRLError(f"{file}: no such evaluation file") from None
    except (OSError, ValueError) as exc:
        raise DialogRLError(f"{file}: not a readable evaluation JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DialogRLError(f"{file}: expected a JSON object, got {type(data).__name__}")
    method = data.get("method") or data.get("policy")
    if not isinstance(method, str):
        raise DialogRLError(f"{file}: needs a 'method' or 'policy' name (not written by `dialogrl eval`?)")
    records = data.get("records")
    if not isinstance(records, list) or not records:
        raise DialogRLError(f"{file}: missing or empty 'records' (not written by `dialogrl eval`?)")
    for i, r in enumerate(records):
        _check_record(file, i, r)
    metrics = data.get("metrics", {})
    kl = metrics.get("kl_to_reference") if isinstance(metrics, dict) else None
    if kl is not None and not _finite(kl):
        raise DialogRLError(f"{file}: metrics.kl_to_reference must be a finite number, got {kl!r}")
    data["_path"], data["_method"] = str(file), method
    return data


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_record(file: Path, i: int, r: Any) -> None:
    if not isinstance(r, dict):
        raise DialogRLError(f"{file}: records[{i}] is not an object")
    for key in _RECORD_KEYS:
        if key not in r:
            raise DialogRLError(f"{file}: records[{i}] has no '{key}'")
        value = r[key]
        if key in ("intent", "persona"):
            ok = isinstance(value, str)
        elif key == "success":
            ok = isinstance(value, bool) or (_finite(value) and value in (0, 1))
        elif key in ("scenario_seed", "repeat"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = _finite(value)
        if not ok:
            raise DialogRLError(f"{file}: records[{i}].{key} has a bad value {value!r}")
    comps = r.get("reward_components", {})
    if not isinstance(comps, dict) or not all(_finite(v) for v in comps.values()):
        raise DialogRLError(f"{file}: records[{i}].reward_components must map names to finite numbers")


def _group(evals: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Evaluations by method; a method evaluated under several decodings becomes ``method@decoding`` each."""
    decodings: dict[str, set[str]] = defaultdict(set)
    for e in evals:
        decodings[e["_method"]].add(str(e.get("decoding", "unknown")))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evals:
        label = e["_method"]
        groups[f"{label}@{e.get('decoding', 'unknown')}" if len(decodings[label]) > 1 else label].append(e)
    return dict(groups)


def _check_same_setting(evals: list[dict[str, Any]]) -> None:
    """Pairing by scenario seed only means something within one env and split, and each file once."""
    seen: dict[Path, str] = {}
    for e in evals:
        key = Path(e["_path"]).resolve()
        if key in seen:
            raise DialogRLError(f"{e['_path']}: given twice (it would be counted as two training seeds)")
        seen[key] = e["_path"]
    same: dict[tuple[str, str, str, str], str] = {}  # a copy of one evaluation at another path is still one run
    for e in evals:
        identity = (e["_method"], json.dumps(e.get("training_seed")), str(e.get("decoding", "unknown")),
                    json.dumps(e["records"], sort_keys=True))
        if identity in same:
            raise DialogRLError(f"{e['_path']} and {same[identity]} hold the same evaluation (method, training seed, "
                                "decoding and records): it would be counted as two runs; give each run once")
        same[identity] = e["_path"]
    for field in ("env_id", "split"):
        values = {str(e[field]): e["_path"] for e in evals if field in e}
        if len(values) > 1:
            raise DialogRLError(f"evaluations differ in {field}: " + "; ".join(f"{f}: {v}" for v, f in
                                                                              values.items()))


def _pool(evals: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One row per scenario seed: outcomes averaged over training seeds and repeats (hand-written pooling)."""
    raw: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for e in evals:
        for r in e["records"]:
            raw[int(r["scenario_seed"])].append((e["_path"], r))
    table = {}
    for s, rows in sorted(raw.items()):
        first_file, first = rows[0]
        for file, r in rows:
            _same_scenario(s, first_file, first, file, r)
        rs = [r for _, r in rows]
        comps = sorted({k for r in rs for k in r.get("reward_components", {})})
        table[s] = {
            "intent": first["intent"], "persona": first["persona"], "file": first_file, "episodes": len(rs),
            "success": float(np.mean([bool(r["success"]) for r in rs])),
            "return": float(np.mean([r["return"] for r in rs])),
            "turns": float(np.mean([r["turns"] for r in rs])),
            "violated": float(np.mean([r["violations"] > 0 for r in rs])),
            "reply_chars": float(np.mean([r["reply_chars"] for r in rs])),
            "turns_sum": float(sum(r["turns"] for r in rs)),
            "invalid_sum": float(sum(r["invalid_actions"] for r in rs)),
            "components": {c: float(np.mean([r.get("reward_components", {}).get(c, 0.0) for r in rs]))
                           for c in comps},
        }
    return table


def _same_scenario(seed: int, file_a: str, a: dict[str, Any], file_b: str, b: dict[str, Any]) -> None:
    if (a["intent"], a["persona"]) != (b["intent"], b["persona"]):
        raise DialogRLError(f"scenario seed {seed} is {a['intent']}/{a['persona']} in {file_a} but "
                            f"{b['intent']}/{b['persona']} in {file_b}: evaluate with the same env options")


def _breakdown(table: dict[int, dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.values():
        by[row[key]].append(row)
    return {k: {"scenarios": len(rows), "success_rate": float(np.mean([r["success"] for r in rows])),
                "mean_return": float(np.mean([r["return"] for r in rows]))} for k, rows in sorted(by.items())}


def _pass_k(evals: list[dict[str, Any]]) -> dict[str, float]:
    """pass^k for k = 1..n_min when scenarios were repeated (n_min >= 2); per training seed, then averaged.

    Seeds are not pooled as trials: each training seed is a different policy, and pass^k asks how reliably
    one policy solves the same scenario again.
    """
    per_eval = []
    for e in evals:
        trials: dict[int, list[bool]] = defaultdict(list)
        for r in e["records"]:
            trials[int(r["scenario_seed"])].append(bool(r["success"]))
        n_min = min(len(t) for t in trials.values())
        if n_min >= 2:
            per_eval.append({k: pass_hat_k(trials, k) for k in range(1, n_min + 1)})
    if not per_eval:
        return {}
    k_max = min(len(p) for p in per_eval)
    return {str(k): float(np.mean([p[k] for p in per_eval])) for k in range(1, k_max + 1)}


def _method_block(name: str, evals: list[dict[str, Any]], table: dict[int, dict[str, Any]]) -> dict[str, Any]:
    rows = list(table.values())
    successes = float(sum(r["success"] for r in rows))
    comps = sorted({c for r in rows for c in r["components"]})
    seeds = {e.get("training_seed") for e in evals}
    block: dict[str, Any] = {
        "method": name, "files": [e["_path"] for e in evals],
        "training_seeds": sorted(seeds - {None}) + ([None] if None in seeds else []),
        "decoding": sorted({str(e.get("decoding", "unknown")) for e in evals}),
        "episodes": int(sum(r["episodes"] for r in rows)), "scenarios": len(rows),
        "success_rate": successes / len(rows), "success_ci": list(wilson_interval(successes, len(rows))),
        "mean_return": float(np.mean([r["return"] for r in rows])),
        "mean_turns": float(np.mean([r["turns"] for r in rows])),
        "violation_rate": float(np.mean([r["violated"] for r in rows])),
        "invalid_action_rate": sum(r["invalid_sum"] for r in rows) / max(sum(r["turns_sum"] for r in rows), 1.0),
        "mean_reply_chars": float(np.mean([r["reply_chars"] for r in rows])),
        "reward_components": {c: float(np.mean([r["components"].get(c, 0.0) for r in rows])) for c in comps},
        "by_persona": _breakdown(table, "persona"), "by_intent": _breakdown(table, "intent"),
        "pass_hat_k": _pass_k(evals),
    }
    kls = [e["metrics"]["kl_to_reference"] for e in evals
           if isinstance(e.get("metrics"), dict) and e["metrics"].get("kl_to_reference") is not None]
    if kls:
        block["kl_to_reference"] = float(np.mean(kls))
    return block


def _flags(m: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Hints that the reward and the independent outcomes disagree: the report's reward-hacking check."""
    vs, flags = m["vs_baseline"], []
    if vs["mean_return"]["low"] > 0 and vs["success_rate"]["low"] <= 0:
        flags.append("return rose but success did not measurably rise")
    if vs["violation_rate"]["low"] > 0:
        flags.append("more business-policy violations than the baseline")
    if m["invalid_action_rate"] > base["invalid_action_rate"] + 0.05:
        flags.append("more invalid actions per turn than the baseline (+0.05 or more)")
    if vs["success_rate"]["high"] < 0:
        flags.append("success measurably below the baseline")
    ratio = m["mean_reply_chars"] / max(base["mean_reply_chars"], 1.0)
    if ratio > 1.5 or ratio < 2 / 3:
        flags.append(f"replies {ratio:.2f}x as long as the baseline's")
    turns = m["mean_turns"] / max(base["mean_turns"], 1.0)
    if turns >= 1.25:  # e.g. asking the same question again and again for a per-turn reward
        flags.append(f"conversations {turns:.2f}x as long (turns) as the baseline's")
    if m.get("kl_to_reference", 0.0) >= KL_FLAG:
        flags.append(f"far from its reference: KL {m['kl_to_reference']:.1f} nats per reply (>= {KL_FLAG:g})")
    return flags


def compare(paths: list[str | Path], baseline: str, out_dir: str | Path, n_boot: int = 10_000,
            seed: int = 0) -> dict[str, Any]:
    """Group evaluations by method (pooling training seeds), pair each with the baseline, write the report."""
    if not paths:
        raise DialogRLError("compare needs at least one evaluation file")
    evals = [load_eval(p) for p in paths]
    _check_same_setting(evals)
    groups = _group(evals)
    if baseline not in groups:
        raise DialogRLError(f"unknown baseline '{baseline}'; methods: {', '.join(sorted(groups))}")
    tables = {name: _pool(es) for name, es in groups.items()}
    methods = {name: _method_block(name, es, tables[name]) for name, es in groups.items()}
    base_table = tables[baseline]
    for name, table in tables.items():
        if name == baseline:
            continue
        shared = sorted(set(table) & set(base_table))
        if not shared:
            raise DialogRLError(f"method '{name}' shares no scenario seed with baseline '{baseline}': "
                                "evaluate both with the same --seed")
        for s in shared:
            _same_scenario(s, table[s]["file"], table[s], base_table[s]["file"], base_table[s])
        vs: dict[str, Any] = {"shared_scenarios": len(shared)}
        for field, label in _PAIRED:
            vs[label] = paired_bootstrap_ci([table[s][field] for s in shared], [base_table[s][field] for s in shared],
                                            n_boot=n_boot, seed=seed)
        vs["success"], vs["return"] = vs["success_rate"], vs["mean_return"]  # short aliases
        methods[name]["vs_baseline"] = vs
        methods[name]["flags"] = _flags(methods[name], methods[baseline])
    first = evals[0]
    report = {"baseline": baseline, "env_id": first.get("env_id"), "split": first.get("split"),
              "n_boot": n_boot, "bootstrap_seed": seed, "methods": methods}
    _write(report, Path(out_dir))
    return report


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


def _write(report: dict[str, Any], out_dir: Path) -> None:
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
