"""The rollout benchmark's accounting of idle decoding rows, on a hand-counted case."""

from __future__ import annotations

import importlib.util
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
