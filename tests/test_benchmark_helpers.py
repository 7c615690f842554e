"""Benchmark helpers: the rollout benchmark's accounting of idle decoding rows on a hand-counted case, and the
fresh-scenario benchmark's input checks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def rollout_speed() -> ModuleType:  # benchmarks/ is a folder of scripts, not a package
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_speed.py"
    spec = importlib.util.spec_from_file_location("rollout_speed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_idle_rows_are_counted_per_call(rollout_speed: ModuleType) -> None:
    # Batch of 2: the first call answers two conversations (replies of 3 and 5 tokens, so 5 steps), the second
    # only the one still going (4 tokens, 4 steps).
    chunks = [[3, 5], [4]]
    assert rollout_speed.decode_row_utilization(chunks) == pytest.approx((3 + 5 + 4) / (5 * 2 + 4 * 1))
    assert rollout_speed.batch_row_occupancy(chunks, batch=2) == pytest.approx((5 * 2 + 4 * 1) / (5 * 2 + 4 * 2))


def test_chunk_log_records_each_generate_call_and_restores_the_policy(rollout_speed: ModuleType) -> None:
    class Policy:
        def _generate_chunk(self, prompts: list, reuse: list) -> tuple[list, list]:
            return [SimpleNamespace(response_ids=[0] * len(p)) for p in prompts], []

    policy = Policy()
    with rollout_speed.ChunkLog(policy) as log:  # type: ignore[arg-type]
        policy._generate_chunk([[1, 2], [1, 2, 3]], [])
        policy._generate_chunk([[1]], [])
    assert log.chunks == [[2, 3], [1]]
    policy._generate_chunk([[1]], [])
    assert log.chunks == [[2, 3], [1]]  # no longer recorded


FRESH = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_fresh_scenarios.py"


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("none", [], "is not a learning-benchmark folder"),
    ("settings", ["--eval-seed", "0"], "--eval-seed: 0 is the folder's own evaluation seed"),
    ("settings", ["--methods", "sft"], "no finished run in"),
    ("settings", ["--extra", "gae=runs/ppo"], "expected NAME=PATTERN, NAME not in --methods, {seed} in PATTERN"),
    ("settings", ["--extra", "ppo=runs/ppo-s{seed}"], "NAME not in --methods"),
    ("settings", ["--methods", "ppo"], "every method is compared with sft"),
])
def test_fresh_scenario_benchmark_refuses_bad_input_before_any_work(
        tmp_path: Path, setup: str, args: list[str], message: str) -> None:
    if setup == "settings":
        (tmp_path / "quickstart.json").write_text('{"eval_seed": 0}')
    done = subprocess.run([sys.executable, str(FRESH), "--work", str(tmp_path), *args],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("fresh-scenarios-*"))
