"""The ``dialogrl`` command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dialogrl.cli_args import (
    add_env_args,
    add_error_args,
    check_model_copy_target,
    check_out_file,
    count_arg,
    env_kwargs,
    name_arg,
    out_path_arg,
    seed_arg,
)
from dialogrl.types import DialogRLError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        command = self.prog.partition(" ")[2]  # "dialogrl sft" -> "sft"; the top level adds nothing
        raise DialogRLError(f"{command}: {message}" if command else message)


CONFIG_CLASSES = {
    "sft": "dialogrl.agents.sft:SFTConfig", "ppo": "dialogrl.agents.ppo_config:PPOConfig",
    "dpo": "dialogrl.agents.dpo:DPOConfig", "reward-model": "dialogrl.agents.reward_model_train:RewardModelConfig",
    "quickstart": "dialogrl.quickstart:QuickstartConfig", "bootstrap": "dialogrl.policies.bootstrap:BootstrapConfig",
    "sb3": "dialogrl.agents.sb3:SB3Config",
}
"""The config dataclass behind each command's KEY=VALUE overrides, listed by ``dialogrl COMMAND --help``."""


class _HelpWithKeys(argparse.Action):
    """``-h``/``--help`` that also lists the command's config keys with their defaults and docstrings. Built only
    when asked for: some config modules import torch, which ``dialogrl --help`` should not wait for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help message, with every config key, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        import importlib

        from dialogrl.config_help import describe_config

        command = parser.prog.partition(" ")[2]
        module, _, name = CONFIG_CLASSES[command].partition(":")
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        where = "as KEY=VALUE" if command in ("sb3", "bootstrap") else "in the --config YAML or as KEY=VALUE"
        parser.epilog = (f"config keys (set {where}; unknown keys are errors):\n"
                         f"{describe_config(getattr(importlib.import_module(module), name))}")
        parser.print_help()
        parser.exit()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``), raised like Ctrl-C so every half-written run is cleaned up on the way out."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dialogrl", description="Train and evaluate customer-service dialogue agents with RL. "
                     "Every user error is one line on stderr and exit code 2.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("envs", help="list registered environment ids")
    sub.add_parser("rewards", help="list registered reward functions")

    p = sub.add_parser("logs", help="write conversation logs (HF messages JSONL) from a scripted policy")
    p.add_argument("--policy", default="historical")
    p.add_argument("--out", required=True, type=out_path_arg)
    add_error_args(p)
    add_env_args(p, "train")

    p = sub.add_parser("eval", help="evaluate a policy on held-out scenarios")
    p.add_argument("--policy", required=True, help="expert | historical | random | a run directory")
    p.add_argument("--repeats", type=count_arg, default=1, help="episodes per scenario (for pass^k)")
    p.add_argument("--batch-size", type=count_arg, default=64,
                   help="conversations per generate call; a sampled evaluation repeats exactly for the same seed, "
                        "episodes and batch size (64: as a run's own eval_sampled.json)")
    p.add_argument("--out", type=out_path_arg)
    p.add_argument("--method", type=name_arg, help="method name in reports (default: the run's method, else the policy's name)")
    p.add_argument("--decoding", choices=["greedy", "sampled"],
                   help="replies of a language-model run directory (default: greedy)")
    p.add_argument("--transcripts", type=out_path_arg,
                   help="also write every conversation (HF messages JSONL, the format of `dialogrl logs`)")
    add_error_args(p)
    add_env_args(p, "test")

    p = sub.add_parser("compare", help="compare evaluations with a baseline: report.md, report.json, report.png")
    p.add_argument("inputs", nargs="+", help="eval JSON files or run directories holding eval.json")
    p.add_argument("--baseline", required=True, help="method name of the baseline")
    p.add_argument("--out", required=True, type=Path)

    p = _config_command(sub, "sb3", "train stable-baselines3 on the dialogue-act env and evaluate it")
    p.add_argument("--algo", choices=["ppo", "dqn"], help="default: ppo")
    p.add_argument("--timesteps", type=count_arg,
                   help="default: configs/sb3.yaml; rounded up to whole rollouts (PPO collects n_envs * n_steps = "
                        "512 steps per rollout by default, DQN n_envs per step), and the run prints the steps taken")
    p.add_argument("--seed", type=seed_arg, help="default: 0")
    p.add_argument("--out", required=True, type=out_path_arg,
                   help="output folder; an existing one is refused unless overwrite=true and it holds an earlier "
                        "sb3 run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="SB3Config overrides (configs/sb3.yaml), e.g. overwrite=true")

    p = _config_command(sub, "bootstrap", "build (or reuse from the cache) the offline base model")
    p.add_argument("--out", type=Path, help="also copy the model here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="BootstrapConfig overrides")

    for name, what in (("sft", "supervised LoRA baseline (TRL SFTTrainer)"), ("ppo", "multi-turn PPO with LoRA"),
                       ("dpo", "iterative DPO on environment-ranked reply pairs (TRL DPOTrainer)"),
                       ("reward-model", "train a learned reward model (TRL RewardTrainer)"),
                       ("quickstart", "the main job: base -> logs -> SFT -> filtered SFT -> PPO, DPO -> evaluation -> report")):
        p = _config_command(sub, name, what)
        p.add_argument("--config", help=f"YAML config (default: configs/{name.replace('-', '_')}.yaml defaults)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    sub.choices["quickstart"].add_argument("--seeds", type=count_arg, help="training seeds per method")
    return parser


def _config_command(sub: Any, name: str, what: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=what, add_help=False)
    parser.add_argument("-h", "--help", action=_HelpWithKeys)
    return parser


def _cmd_envs(_: argparse.Namespace) -> None:
    from dialogrl.envs import ENV_SPECS

    for spec in ENV_SPECS:
        print(spec["id"], spec["kwargs"] or "")


def _cmd_rewards(_: argparse.Namespace) -> None:
    from dialogrl.rewards import DEFAULT_WEIGHTS, list_rewards

    for name, doc in list_rewards().items():
        weight = DEFAULT_WEIGHTS.get(name)
        print(f"{name:16s} {'default weight ' + str(weight) if weight is not None else '':22s} {doc}")


def _load_policy(spec: str, seed: int, errors: list[str] | None = None, decoding: str = "greedy") -> Any:
    from dialogrl.policies.scripted import SCRIPTED, make_scripted, parse_error_rates

    if spec in SCRIPTED:
        return make_scripted(spec, seed=seed, errors=parse_error_rates(errors or []))
    if errors:
        raise DialogRLError(f"--error sets the historical agent's error rates; the policy is '{spec}'")
    if Path(spec).is_dir():
        from dialogrl.policies.lm import LMPolicy

        return LMPolicy.from_run_dir(spec, decoding=decoding)
    raise DialogRLError(f"unknown policy '{spec}'; use one of {', '.join(SCRIPTED)} or a run directory")


def _cmd_logs(args: argparse.Namespace) -> None:
    from dialogrl.data import write_logs
    from dialogrl.evaluation import make_env, require_text_env, run_episodes, scenario_seeds, text_policy_act

    check_out_file(args.out, example="logs.jsonl")
    policy = _load_policy(args.policy, args.seed, args.errors)
    kwargs = {"split": args.split, **env_kwargs(args)}
    require_text_env(args.env, kwargs)
    records = run_episodes(lambda: make_env(args.env, **kwargs), text_policy_act(policy),
                           scenario_seeds(args.seed, args.episodes), keep_messages=True)
    write_logs(records, args.out)
    rate = sum(r["success"] for r in records) / len(records)
    print(f"wrote {len(records)} conversations to {args.out} (success rate {rate:.3f})")


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from dialogrl.evaluation import evaluate, require_text_env, write_json
    from dialogrl.policies.scripted import SCRIPTED

    for path, flag, example in ((args.out, "--out", "eval.json"), (args.transcripts, "--transcripts",
                                                                    "transcripts.jsonl")):
        if path is not None:
            check_out_file(path, flag, example)
    if args.out is not None and args.out == args.transcripts:
        raise DialogRLError(f"--out and --transcripts are the same file: {args.out}")
    scripted = args.policy in SCRIPTED
    if scripted and args.decoding:
        raise DialogRLError(f"--decoding applies to language-model run directories, not '{args.policy}'")
    decoding = "scripted" if scripted else args.decoding or "greedy"
    if scripted:
        run: dict[str, Any] = {}
    else:  # the recorded name and seed (compare pools seeds), checked before a model loads
        from dialogrl.policies.lm import run_dir_parts

        names = ", ".join(SCRIPTED)
        if Path(args.policy).is_file():
            raise DialogRLError(f"--policy {args.policy}: a file; give a run directory (run.json, adapter/) or a "
                                f"scripted policy ({names})")
        if not Path(args.policy).exists():  # a mistyped scripted name reads better as one
            raise DialogRLError(f"--policy {args.policy}: neither a scripted policy ({names}) nor a local run "
                                "directory (Hugging Face Hub ids are never downloaded)")
        run = run_dir_parts(args.policy)[3]
    require_text_env(args.env, {"split": args.split, **env_kwargs(args)})  # bad env options fail before a model loads
    policy = _load_policy(args.policy, args.seed, args.errors, decoding)
    method, training_seed = args.method or run.get("method"), run.get("seed")
    result = evaluate(policy, args.env, split=args.split, episodes=args.episodes, seed=args.seed,
                      repeats=args.repeats, env_kwargs=env_kwargs(args), method=method, decoding=decoding,
                      batch_size=args.batch_size,
                      training_seed=training_seed if isinstance(training_seed, int) else None,
                      keep_messages=args.transcripts is not None)
    print(format_metrics({result["method"]: result}))
    if args.transcripts:
        from dialogrl.data import write_logs

        write_logs(result["records"], args.transcripts)
        for record in result["records"]:  # the evaluation JSON stays small: conversations are in the transcripts
            del record["messages"]
        print(f"wrote {args.transcripts}")
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return result


def format_metrics(results: dict[str, dict[str, Any]]) -> str:
    """A console table of the headline metrics, one row per method."""
    cols = ("success_rate", "mean_return", "mean_turns", "violation_rate", "invalid_action_rate")
    if any("kl_to_reference" in r["metrics"] for r in results.values()):
        cols += ("kl_to_reference",)  # LM policies with an adapter
    lines = [f"{'method':14s}" + "".join(f"{c:>20s}" for c in cols)]
    for name, result in results.items():
        lines.append(f"{name:14s}" + "".join(f"{result['metrics'][c]:20.3f}" if c in result["metrics"]
                                             else f"{'—':>20s}" for c in cols))
    return "\n".join(lines)


def _cmd_compare(args: argparse.Namespace) -> None:
    from dialogrl.report import compare, format_table

    report = compare(args.inputs, args.baseline, args.out)
    print(format_table(report))
    print(f"wrote {args.out}/report.md, report.json, report.png")


def _cmd_sb3(args: argparse.Namespace) -> None:
    from dialogrl.agents.sb3 import main_sb3

    main_sb3(args.algo, args.timesteps, args.out, args.seed, overrides=args.overrides)


def _cmd_bootstrap(args: argparse.Namespace) -> None:
    import shutil

    from dialogrl.config import load_config
    from dialogrl.outputs import replace_dir, temp_dir_beside
    from dialogrl.policies.bootstrap import BootstrapConfig, cached_base_model
    from dialogrl.policies.corpus import CORPUS_VERSION, domain_corpus

    cfg = load_config(BootstrapConfig, None, args.overrides)
    if args.out:
        check_model_copy_target(args.out, None)  # before a build of minutes
    path = cached_base_model(cfg, lambda: domain_corpus(cfg.corpus_episodes, cfg.seed), corpus_version=CORPUS_VERSION)
    if args.out:
        names = {p.name for p in path.iterdir()}
        check_model_copy_target(args.out, names)
        tmp = temp_dir_beside(args.out)
        try:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            # An earlier copy (only a model's file names in it) is moved aside, replaced, then deleted.
            replace_dir(tmp, args.out, overwrite=True, marker=("config.json",), key="--out")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path = args.out
    print(f"base model: {path}")


def _cmd_sft(args: argparse.Namespace) -> None:
    from dialogrl.agents.sft import main_sft

    print(f"run directory: {main_sft(args.config, args.overrides)}")


def _cmd_ppo(args: argparse.Namespace) -> None:
    from dialogrl.agents.ppo import main_ppo

    print(f"run directory: {main_ppo(args.config, args.overrides)}")


def _cmd_dpo(args: argparse.Namespace) -> None:
    from dialogrl.agents.dpo import main_dpo

    print(f"run directory: {main_dpo(args.config, args.overrides)}")


def _cmd_reward_model(args: argparse.Namespace) -> None:
    from dialogrl.agents.reward_model_train import main_reward_model

    print(f"run directory: {main_reward_model(args.config, args.overrides)}")


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from dialogrl.quickstart import main_quickstart

    overrides = list(args.overrides) + ([f"seeds={args.seeds}"] if args.seeds else [])
    main_quickstart(args.config, overrides)


COMMANDS = {"envs": _cmd_envs, "rewards": _cmd_rewards, "logs": _cmd_logs, "eval": _cmd_eval,
            "compare": _cmd_compare, "sb3": _cmd_sb3, "bootstrap": _cmd_bootstrap, "sft": _cmd_sft,
            "ppo": _cmd_ppo, "dpo": _cmd_dpo, "reward-model": _cmd_reward_model, "quickstart": _cmd_quickstart}


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM is turned into Ctrl-C for this call only: a program that calls main() keeps its own handler.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    _quiet_libraries()
    try:
        return _run(argv)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except DialogRLError as exc:
        print(f"dialogrl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --out, missing file: one line, not a traceback
        print(f"dialogrl: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("dialogrl: terminated" if isinstance(exc, Terminated) else "dialogrl: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


def _quiet_libraries() -> None:
    """No per-load progress bars ("Loading weights") from transformers: errors stay one line, logs stay readable.
    Training bars (ours, the Trainer's) are tqdm's own and unaffected. Read when transformers is first imported
    (later, by the command), so nothing heavy is imported here; a value the user set wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def console_main() -> int:
    """The ``dialogrl`` command (and ``python -m dialogrl.cli``): :func:`main` in a process of its own, so the
    rollout trainers may bound its heap (process-wide, which a program calling ``main()`` would not expect)."""
    from dialogrl.step_process import limit_heap_growth_for

    limit_heap_growth_for(sys.argv[1] if len(sys.argv) > 1 else "")
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
