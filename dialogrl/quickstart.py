"""The main job: base model -> historical logs -> SFT -> filtered SFT -> PPO, DPO -> held-out evaluation -> report.

Each step writes its output atomically and is skipped when the output already exists, so an interrupted
quickstart picks up where it stopped. Heavy libraries are imported inside the steps, and each step that trains
or loads a model runs in a process of its own (``isolate_steps``), so the job's memory is one step's, not the
sum of what every earlier step left behind.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

from dialogrl.rewards.reward_model import ENV_PATHS
from dialogrl.step_process import StepRunner, limit_heap_growth_for
from dialogrl.types import DialogRLError

METHODS = ("sft", "sft-filtered", "ppo", "dpo", "ppo-rm", "sft-expert")
SCRIPTED_REFERENCES = ("expert", "historical")
"""Scripted policies the job evaluates beside the trained methods (each can be the ``baseline``)."""
LEARNED_REWARD = "dialogrl.rewards.reward_model:from_env"
"""The reward spec ``ppo-rm`` trains on: the reward model(s) named by $DIALOGRL_REWARD_MODEL, nothing else."""
LEARNED_REWARD_PPO = ("kl_coef=1.0", "value_detach=true", "value_clip=null", "group_size=1", "iterations=20")
"""``ppo-rm``'s PPO settings (``ppo:`` overrides still win). The learned reward pays about 2 per reply (returns
around 8 per episode) against the rule reward's 0.3-0.6 per episode, so PPO's default KL coefficient 0.05 is twenty
times weaker against it: with 0.05, ppo-rm drifted to 5 nats per reply from SFT and gamed the reward model
(held-out success 0.187 over 3 seeds on the default logs); with 1.0, 0.590. At 1.0 one habit-logs seed of three
still collapsed (entropy 0.06 -> 2.7); ``kl_estimator=k3`` (never negative) kept all three (0.600 against 0.497)
but drifted further on the default logs (0.543, KL 3.2 nats per reply). Returns that large also make the value
loss large, and through the shared layers it moved the policy: with the value head reading the hidden state
detached and no value clip, 0.643 against 0.580 (3 seeds, 2026-12-02): see docs/results.md. It keeps GAE on the value
head and 20 iterations, the settings it was measured with (the rule-reward PPO moved to a group baseline and 40
iterations afterwards)."""


@dataclass
class QuickstartConfig:
    """Settings of ``dialogrl quickstart`` (defaults: ``configs/quickstart.yaml``)."""

    out: str = "runs/quickstart"
    """Folder for every artefact of the job."""
    seeds: int = 1
    """Training seeds per method (several give confidence intervals over seeds too)."""
    log_episodes: int = 1500
    """Historical conversations (train split) the supervised baselines learn from."""
    eval_episodes: int = 200
    """Held-out test-split scenarios every method is evaluated on (the same seeds for all)."""
    eval_seed: int = 0
    """Seed of the held-out scenario draw."""
    log_errors: dict[str, float] = field(default_factory=dict)
    """Error rates of the historical agent that writes the logs and is evaluated as the ``historical`` reference
    (``HistoricalErrors`` fields, e.g. ``{skip_verification: 0.7}``); empty: its defaults."""
    methods: list[str] = field(default_factory=lambda: ["sft", "sft-filtered", "ppo", "dpo"])
    """Trained methods, in order (ppo and dpo start from the same seed's sft run). ``ppo-rm``: PPO on a learned
    reward model alone (trained first on environment pairs, ``rm-s<seed>``), evaluated on true task success.
    ``sft-expert``: SFT on the scripted expert's conversations with the same customers, a diagnostic (real logs
    have no such author): what imitating flawless behaviour gives this base model, so how much room the logs'
    mistakes leave RL over SFT."""
    base: dict[str, Any] = field(default_factory=dict)
    """Overrides of the bootstrap base-model config (BootstrapConfig fields)."""
    sft: list[str] = field(default_factory=list)
    """``key=value`` overrides for both SFT runs."""
    ppo: list[str] = field(default_factory=list)
    """``key=value`` overrides for PPO."""
    dpo: list[str] = field(default_factory=list)
    """``key=value`` overrides for DPO."""
    reward_model: list[str] = field(default_factory=list)
    """``key=value`` overrides for the reward model ``ppo-rm`` trains on (RewardModelConfig fields)."""
    baseline: str = "sft"
    """Method every other one is compared with."""
    scripted_only: bool = False
    """Only evaluate the scripted policies (random, historical, expert) and compare them (no training)."""
    isolate_steps: bool = True
    """Run the up-front settings check, the base build and each training run with its evaluation in a fresh
    process (about 4 s of imports each). A step then starts from the same state whether or not other steps ran
    before it (a resumed job trains what an uninterrupted one does), and the job's memory is one step's: in one
    process, PPO after the earlier steps computed its first log-probs differently in the sixth digit, which its
    sampling amplified (seed 0: 0.505 against 0.525 held-out), and the job peaked at 2,213 MiB against 1,901 MiB.
    ``false``: all in this process."""


def _step(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from dialogrl.config import check_at_least, check_seeds
    from dialogrl.data import write_logs
    from dialogrl.evaluation import (
        evaluate,
        make_env,
        run_episodes,
        scenario_seeds,
        text_policy_act,
        write_json,
    )
    from dialogrl.policies.scripted import make_scripted
    from dialogrl.report import compare, format_table

    check_at_least(cfg, 1, "seeds", "log_episodes", "eval_episodes")
    check_seeds(cfg, "eval_seed")
    _check_out_folder(Path(cfg.out))
    if cfg.scripted_only:
        return _scripted_only(cfg)
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise DialogRLError(f"unknown method '{unknown[0]}' in quickstart; known: {', '.join(METHODS)}")
    if not cfg.methods or len(set(cfg.methods)) < len(cfg.methods):
        raise DialogRLError(f"methods={json.dumps(cfg.methods)}: name each method to train once, at least one")
    _check_owned_keys(cfg)
    if cfg.baseline not in cfg.methods and cfg.baseline not in SCRIPTED_REFERENCES:
        raise DialogRLError(f"baseline={cfg.baseline}: neither one of the methods ({', '.join(cfg.methods)}) nor a "
                            f"scripted reference ({', '.join(SCRIPTED_REFERENCES)})")
    for rl in ("ppo", "dpo", "ppo-rm"):
        if rl in cfg.methods and cfg.methods.index(rl) < (cfg.methods + ["sft"]).index("sft"):
            raise DialogRLError(f"{rl} starts from the sft run: put 'sft' before '{rl}' in methods")
    make_scripted("historical", errors=cfg.log_errors)  # bad rates fail before anything is written
    run_step = StepRunner(cfg.isolate_steps)
    run_step(_check_step_settings, cfg)  # a typo fails now, not after the base model and SFT
    out = Path(cfg.out)
    _check_same_job(cfg, out)
    # Seconds and peak memory of the run that produced each step's output: a resumed job keeps the numbers
    # of the steps it skipped.
    before = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    timings: dict[str, float] = {}
    peak_rss_mb: dict[str, float] = {}  # the job's peak resident memory so far, after each step (StepRunner.peak_mb)
    # Steps whose outputs were already there when this folder first timed them (copied in, or from before
    # timings were kept): their cost is unknown, so they are listed instead of timed as zero.
    untimed: list[str] = [step for step in before.get("untimed", []) if step not in before]

    def done(step: str, t: float, skipped: bool = False) -> None:
        if skipped and step in before:
            timings[step], peak_rss_mb[step] = before[step], before.get("peak_rss_mb", {}).get(step, 0.0)
        elif skipped:
            if step not in untimed:
                untimed.append(step)
        else:
            timings[step], peak_rss_mb[step] = time.perf_counter() - t, run_step.peak_mb()
            if step in untimed:
                untimed.remove(step)
        save_timings(final=False)

    def save_timings(final: bool) -> None:
        # Written after every step, so a job killed half-way keeps the seconds of what it finished; until the
        # job ends, steps of earlier runs it has not reached yet keep their numbers.
        steps = timings if final else {**{k: v for k, v in before.items() if k not in TIMING_META}, **timings}
        peaks = peak_rss_mb if final else {**before.get("peak_rss_mb", {}), **peak_rss_mb}
        wall = round(time.perf_counter() - started, 1)
        invocations = [*before.get("invocations", [before["total"]] if "total" in before else []), wall]
        write_json({**steps, "total": sum(steps.values()), "peak_rss_mb": peaks, "invocations": invocations,
                    "untimed": [u for u in untimed if u not in steps]}, out / "timings.json")
    started = time.perf_counter()

    t = _step("base model (built once, then cached)")
    was_cached, base_dir = run_step(_base_model, cfg.base)
    print(f"base model: {base_dir}")
    done("base", t, skipped=was_cached)  # a cached base keeps the seconds its build took here, if it was built here

    t = _step("conversation logs (train split)")
    logs, expert_logs = out / "logs" / "historical.jsonl", out / "logs" / "expert.jsonl"
    authors = [(logs, "historical")]
    if "sft-expert" in cfg.methods:
        authors.append((expert_logs, "expert"))
    logs_existed = all(path.exists() for path, _ in authors)
    for path, author in authors:
        if not path.exists():  # both authors meet the same customers
            policy = make_scripted(author, seed=0, errors=cfg.log_errors if author == "historical" else None)
            records = run_episodes(lambda: make_env("dialogrl/CustomerService-v0", split="train"),
                                   text_policy_act(policy), scenario_seeds(10_000 + cfg.eval_seed, cfg.log_episodes),
                                   keep_messages=True)
            write_logs(records, path)
    done("logs", t, skipped=logs_existed)

    evals: list[Path] = []
    for seed in range(cfg.seeds):
        for method in cfg.methods:
            run_dir = out / f"{method}-s{seed}"
            t = _step(f"{method}, training seed {seed}")
            evaluated = [run_dir / "eval.json", run_dir / "eval_sampled.json"]
            # A trained run keeps its recorded seconds; re-doing a missing evaluation (seconds) is not counted.
            existed = (run_dir / "run.json").exists()
            if not existed or not all(path.exists() for path in evaluated):
                run_step(_train_and_evaluate, cfg, method, seed, base_dir, logs, expert_logs)
            evals += evaluated
            done(f"{method}-s{seed}", t, skipped=existed)

    t = _step("scripted references")
    scripted_existed = all((out / f"{name}.eval.json").exists() for name in ("expert", "historical"))
    for name in ("expert", "historical"):
        path = out / f"{name}.eval.json"
        if not path.exists():
            policy = make_scripted(name, errors=cfg.log_errors if name == "historical" else None)
            write_json(evaluate(policy, episodes=cfg.eval_episodes, seed=cfg.eval_seed), path)
        evals.append(path)
    done("scripted", t, skipped=scripted_existed)

    t = _step("comparison report")
    report = compare([p for p in evals if p.name == "eval.json" or ".eval." in p.name], cfg.baseline,
                     out / "report")
    sampled = [p for p in evals if p.name == "eval_sampled.json"]
    if sampled:
        compare(sampled, cfg.baseline, out / "report_sampled")
    done("report", t)
    save_timings(final=True)
    print("\n" + format_table(report))
    print(f"\nreport: {out / 'report' / 'report.md'} (greedy decoding); sampled: {out / 'report_sampled'}")
    print(f"total {time.perf_counter() - started:.0f} s (all steps, including earlier runs of this folder: "
          f"{sum(timings.values()):.0f} s)")
    return report


TIMING_META = ("total", "peak_rss_mb", "invocations", "untimed")
"""Keys of ``timings.json`` that are not steps."""

RESUMABLE = ("seeds", "methods", "baseline", "out")
"""Settings a rerun in the same folder may change: every other one shaped outputs that are reused."""
SETTINGS_BEFORE_THEY_EXISTED = {"isolate_steps": False}
"""What a folder whose ``quickstart.json`` predates a setting ran with."""


def _check_same_job(cfg: QuickstartConfig, out: Path) -> None:
    """Steps whose outputs exist are skipped, so a rerun must not silently mix outputs of other settings."""
    from dialogrl.config import config_to_dict
    from dialogrl.evaluation import write_json

    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUMABLE}
    path = out / "quickstart.json"
    if path.exists():
        before = {**SETTINGS_BEFORE_THEY_EXISTED, **json.loads(path.read_text(encoding="utf-8"))}
        for key, value in settings.items():
            if before.get(key) != value:
                raise DialogRLError(f"{out} holds a quickstart run with {key}={json.dumps(before.get(key))}, not "
                                    f"{json.dumps(value)}: pass another out=DIR or delete {out}")
    write_json(settings, path)  # a folder from before this file existed is adopted unchecked


OUTPUT_NAMES = re.compile(r"(logs|quickstart\.json|timings\.json|report(_\w+)?|[\w-]+-s\d+|\w+\.eval\.json|\..*)")
"""What a quickstart folder holds (``.*``: the temporary folders of steps in progress)."""
OWNED_KEYS = {"sft": ("model", "seed", "train_file", "output_dir", "filter_success", "method"),
              "ppo": ("model", "init_adapter", "seed", "output_dir", "method"),
              "dpo": ("model", "init_adapter", "seed", "output_dir", "method"),
              "reward_model": ("model", "seed", "output_dir", "overwrite")}
"""Step settings the quickstart sets itself (paths inside ``out``, the training seed, the method's name)."""


def _check_out_folder(out: Path) -> None:
    """``out`` is new, or a folder of quickstart outputs (resumed); never a folder of the user's own files."""
    if out.exists() and not out.is_dir():
        raise DialogRLError(f"out={out}: is a file; give a folder for the job's outputs")
    if out.is_dir() and not (out / "quickstart.json").is_file():
        strangers = sorted(p.name for p in out.iterdir() if not OUTPUT_NAMES.fullmatch(p.name))
        if strangers:
            raise DialogRLError(f"out={out}: holds {strangers[0]}, which is not a quickstart output; give a new "
                                "folder or one an earlier quickstart wrote")


def _check_owned_keys(cfg: QuickstartConfig) -> None:
    for step, owned in OWNED_KEYS.items():
        for item in getattr(cfg, step):
            key = str(item).partition("=")[0].strip()
            if key in owned:
                raise DialogRLError(f"{step}=[{item}]: the quickstart sets {key} for every {step} run itself "
                                    f"(it sets {', '.join(owned)}); leave it out")


def _check_step_settings(cfg: QuickstartConfig) -> None:
    """Every step's overrides parse against its config class (imports torch, hence a step of its own)."""
    from dialogrl.agents.dpo import DPOConfig
    from dialogrl.agents.ppo import PPOConfig
    from dialogrl.agents.reward_model_train import RewardModelConfig
    from dialogrl.agents.sft import SFTConfig
    from dialogrl.config import load_config

    _base_config(cfg.base)
    for config_cls, step_overrides in ((SFTConfig, cfg.sft), (PPOConfig, cfg.ppo), (DPOConfig, cfg.dpo),
                                       (RewardModelConfig, cfg.reward_model)):
        load_config(config_cls, None, step_overrides)


def _base_config(base: dict[str, Any]) -> Any:
    """The BootstrapConfig the ``base:`` overrides describe (an unknown key or bad value fails here)."""
    from dialogrl.config import load_config
    from dialogrl.policies.bootstrap import BootstrapConfig

    return load_config(BootstrapConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def _base_model(base: dict[str, Any]) -> tuple[bool, Path]:
    """Whether the base model was cached already, and its folder (built now if it was not)."""
    from dialogrl.policies.bootstrap import cached_base_model, cached_base_path
    from dialogrl.policies.corpus import CORPUS_VERSION, domain_corpus

    base_cfg = _base_config(base)
    was_cached = (cached_base_path(base_cfg, corpus_version=CORPUS_VERSION) / "config.json").is_file()
    base_dir = cached_base_model(base_cfg, lambda: domain_corpus(base_cfg.corpus_episodes, base_cfg.seed),
                                 corpus_version=CORPUS_VERSION)
    return was_cached, base_dir


def _train_and_evaluate(cfg: QuickstartConfig, method: str, seed: int, base_dir: Path, logs: Path,
                        expert_logs: Path) -> None:
    """Train ``method``'s seed into ``<out>/<method>-s<seed>`` unless it is there, then evaluate what is missing."""
    from dialogrl.agents.dpo import DPOConfig, train_dpo
    from dialogrl.agents.ppo import PPOConfig, train_ppo
    from dialogrl.agents.sft import SFTConfig, train_sft
    from dialogrl.config import load_config
    from dialogrl.evaluation import evaluate_run

    out = Path(cfg.out)
    run_dir = out / f"{method}-s{seed}"
    if not (run_dir / "run.json").exists():
        if cfg.isolate_steps:  # this process is the step's own
            limit_heap_growth_for(method)
        if method.startswith("sft"):
            overrides = [f"model={base_dir}", f"seed={seed}",
                         f"train_file={expert_logs if method == 'sft-expert' else logs}",
                         f"output_dir={run_dir}", f"filter_success={method == 'sft-filtered'}",
                         f"method={method}", *cfg.sft]
            train_sft(load_config(SFTConfig, None, overrides))
        elif method == "ppo":
            overrides = [f"init_adapter={out / f'sft-s{seed}'}", f"seed={seed}", f"output_dir={run_dir}",
                         "eval_episodes=0", *cfg.ppo]
            train_ppo(load_config(PPOConfig, None, overrides))
        elif method == "ppo-rm":
            rm_dir = _reward_model(cfg, out / f"rm-s{seed}", base_dir, seed)
            overrides = [f"init_adapter={out / f'sft-s{seed}'}", f"seed={seed}", f"output_dir={run_dir}",
                         "eval_episodes=0", *LEARNED_REWARD_PPO, *cfg.ppo,
                         f"rewards={json.dumps([LEARNED_REWARD])}",
                         "method=ppo-rm"]
            with patch.dict(os.environ, {ENV_PATHS: str(rm_dir.resolve())}):  # restored after
                train_ppo(load_config(PPOConfig, None, overrides))
        else:
            overrides = [f"init_adapter={out / f'sft-s{seed}'}", f"seed={seed}", f"output_dir={run_dir}",
                         "eval_episodes=0", *cfg.dpo]
            train_dpo(load_config(DPOConfig, None, overrides))
    if not all((run_dir / name).exists() for name in ("eval.json", "eval_sampled.json")):
        evaluate_run(run_dir, cfg.eval_episodes, cfg.eval_seed, method=method, training_seed=seed)


def _reward_model(cfg: QuickstartConfig, rm_dir: Path, base_dir: Path, seed: int) -> Path:
    """The seed's reward model, trained on environment pairs from the train split (once; reused afterwards)."""
    from dialogrl.agents.reward_model_train import RewardModelConfig, train_reward_model
    from dialogrl.config import load_config

    if not (rm_dir / "run.json").exists():
        _step(f"reward model for ppo-rm, training seed {seed}")
        overrides = [f"model={base_dir}", f"seed={seed}", f"output_dir={rm_dir}", "overwrite=true",
                     *cfg.reward_model]
        train_reward_model(load_config(RewardModelConfig, None, overrides))
    return rm_dir


def _scripted_only(cfg: QuickstartConfig) -> dict[str, Any]:
    from dialogrl.evaluation import evaluate, write_json
    from dialogrl.policies.scripted import make_scripted
    from dialogrl.report import compare, format_table

    out = Path(cfg.out)
    paths = []
    for name in ("random", "historical", "expert"):
        _step(f"{name}: {cfg.eval_episodes} held-out test scenarios")
        policy = make_scripted(name, errors=cfg.log_errors if name == "historical" else None)
        paths.append(write_json(evaluate(policy, episodes=cfg.eval_episodes, seed=cfg.eval_seed),
                                out / f"{name}.eval.json"))
    report = compare(paths, "historical", out / "report")
    print("\n" + format_table(report))
    print(f"\nreport: {out / 'report' / 'report.md'}")
    return report


def main_quickstart(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    from dialogrl.config import load_config

    default = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    if config_path is None:
        from importlib import resources

        packaged = resources.files("dialogrl.configs") / "quickstart.yaml"
        config_path = str(packaged) if packaged.is_file() else (str(default) if default.is_file() else None)
    return run_quickstart(load_config(QuickstartConfig, config_path, overrides))
