"""``dialogrl compare``: methods against a baseline on shared held-out scenarios -> report.md/json/png."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dialogrl.report_render import format_table, write_report
from dialogrl.stats import paired_bootstrap_ci, pass_hat_k, runs_and_scenarios_bootstrap_ci, wilson_interval
from dialogrl.types import DialogRLError

__all__ = ["compare", "format_table", "load_eval"]

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
    _check_no_extra_copies(file, data, records)
    metrics = data.get("metrics", {})
    kl = metrics.get("kl_to_reference") if isinstance(metrics, dict) else None
    if kl is not None and not _finite(kl):
        raise DialogRLError(f"{file}: metrics.kl_to_reference must be a finite number, got {kl!r}")
    data["_path"], data["_method"] = str(file), method
    return data


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_no_extra_copies(file: Path, data: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """A (scenario seed, repeat) pair appears as often as the evaluation drew that seed: scenario seeds are drawn
    with replacement, so a large evaluation meets some customers twice, but a copied record would weigh its
    scenario once more than the draw did."""
    seen: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        seen[(r["scenario_seed"], r["repeat"])].append(i)
    repeated = {trial: at for trial, at in seen.items() if len(at) > 1}
    if not repeated:
        return
    drawn: dict[int, int] = {}
    if isinstance(data.get("seed"), int) and isinstance(data.get("episodes"), int) and data["seed"] >= 0:
        from dialogrl.evaluation import scenario_seeds  # only now: it imports gymnasium

        for s in scenario_seeds(data["seed"], data["episodes"]):
            drawn[s] = drawn.get(s, 0) + 1
    for (seed, repeat), at in sorted(repeated.items()):
        if len(at) > drawn.get(seed, 1):
            raise DialogRLError(f"{file}: records[{at[-1]}] repeats records[{at[0]}] (scenario_seed {seed}, repeat "
                                f"{repeat}) more often than the evaluation drew that scenario ({drawn.get(seed, 1)})")


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
    for field in ("env_id", "split", "reward"):  # "reward": returns under different rewards do not compare
        values = {json.dumps(e[field], sort_keys=True): e["_path"] for e in evals if field in e}
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


def _runs(evals: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    """Records by training run: the files of one training seed are one run (e.g. its evaluation split in parts);
    a file without a seed is a run of its own."""
    runs: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for i, e in enumerate(evals):
        seed = e.get("training_seed")
        runs[("seed", seed) if seed is not None else ("file", i)] += e["records"]
    return dict(sorted(runs.items(), key=lambda kv: (kv[0][0] == "file", kv[0][1])))


def _success_by_run(runs: dict[Any, list[dict[str, Any]]], shared: list[int]) -> np.ndarray | None:
    """(runs, shared scenarios) success, each run's repeats of a scenario averaged; None if a run lacks one."""
    rows = []
    for records in runs.values():
        by: dict[int, list[bool]] = defaultdict(list)
        for r in records:
            by[int(r["scenario_seed"])].append(bool(r["success"]))
        if any(s not in by for s in shared):
            return None
        rows.append([float(np.mean(by[s])) for s in shared])
    return np.array(rows)


def _success_over_runs(evals: list[dict[str, Any]], base_evals: list[dict[str, Any]], shared: list[int],
                       n_boot: int, seed: int) -> dict[str, Any] | None:
    """The success difference with training runs resampled too, when both sides have two runs or more (each
    covering every shared scenario); runs are paired when both sides have the same training seeds. Each run's
    repeats are averaged before runs are, so with unequal repeats its mean can differ from the pooled one."""
    runs_a, runs_b = _runs(evals), _runs(base_evals)
    if len(runs_a) < 2 or len(runs_b) < 2:
        return None
    a, b = _success_by_run(runs_a, shared), _success_by_run(runs_b, shared)
    if a is None or b is None:
        return None
    paired = list(runs_a) == list(runs_b) and all(kind == "seed" for kind, _ in runs_a)
    return runs_and_scenarios_bootstrap_ci(a, b, paired, n_boot=n_boot, seed=seed)


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
        over_runs = _success_over_runs(groups[name], groups[baseline], shared, n_boot, seed)
        if over_runs is not None:
            vs["success_rate_runs_resampled"] = over_runs
        methods[name]["vs_baseline"] = vs
        methods[name]["flags"] = _flags(methods[name], methods[baseline])
    first = evals[0]
    report = {"baseline": baseline, "env_id": first.get("env_id"), "split": first.get("split"),
              "n_boot": n_boot, "bootstrap_seed": seed, "methods": methods}
    write_report(report, Path(out_dir))
    return report
