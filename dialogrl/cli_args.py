"""Argument types and checks of the ``dialogrl`` command line: each turns bad input into one line naming the
flag, before any work."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dialogrl.types import DialogRLError


def count_arg(text: str) -> int:
    """A positive whole number (episodes, repeats, timesteps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def name_arg(text: str) -> str:
    """A non-empty name (a method in reports)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def seed_arg(text: str) -> int:
    """A seed: a whole number, zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return value


def out_path_arg(text: str) -> Path:
    """A non-empty output path (what it may be is checked by the command, before any work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty path {text!r}")
    return Path(text)


def check_out_file(path: Path, flag: str = "--out", example: str = "eval.json") -> None:
    """Fail before any work when the file option ``flag`` cannot become a file: one line naming the user's path."""
    if path.is_dir():
        raise DialogRLError(f"{flag} {path}: is a directory; give a file path, e.g. {path / example}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest existing folder; the rest is created
        folder = folder.parent
    if not folder.is_dir():
        raise DialogRLError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DialogRLError(f"{flag} {path}: cannot write in {folder} (permission denied)")


def add_env_args(p: argparse.ArgumentParser, split: str) -> None:
    """The environment options of ``logs`` and ``eval`` (``split``: the default split)."""
    p.add_argument("--env", default="dialogrl/CustomerService-v0", help="registered env id")
    p.add_argument("--split", default=split, choices=["train", "test"])
    p.add_argument("--episodes", type=count_arg, default=200, help="number of scenarios")
    p.add_argument("--seed", type=seed_arg, default=0, help="scenario seeds are derived from this seed")
    p.add_argument("--reward", action="append", metavar="NAME_OR_PATH[=WEIGHT]",
                   help="reward component (repeatable); default: the built-in weighted mix")
    p.add_argument("--scenario", action="append", metavar="YAML", help="extra scenario file (repeatable)")
    p.add_argument("--intent", action="append", help="keep only these intents (repeatable)")
    p.add_argument("--max-turns", type=count_arg, default=12)


def env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The environment keyword arguments those options give."""
    kwargs: dict[str, Any] = {"max_turns": args.max_turns}
    if args.reward:
        kwargs["reward"] = args.reward
    if args.scenario:
        kwargs["scenario_files"] = args.scenario
    if args.intent:
        kwargs["intents"] = args.intent
    return kwargs


def add_error_args(p: argparse.ArgumentParser) -> None:
    """``--error NAME=RATE`` (repeatable): the historical agent's error rates."""
    p.add_argument("--error", action="append", default=[], metavar="NAME=RATE", dest="errors",
                   help="an error rate of the historical agent (HistoricalErrors field), e.g. skip_verification=0.7")


def check_model_copy_target(out: Path, model_files: set[str] | None) -> None:
    """``bootstrap --out`` may be new, empty or an earlier copy of a base model (replaced), nothing else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DialogRLError(f"--out {out}: is a file; give a folder for the model (new or empty)")
    held = {p.name for p in out.iterdir()}
    if not held:
        return
    strangers = sorted(held - model_files) if model_files is not None else [] if "config.json" in held else sorted(held)
    if strangers:
        raise DialogRLError(f"--out {out}: holds files that are not a base model's ({strangers[0]}); give a new or "
                            "empty folder")
