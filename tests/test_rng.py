"""EpisodeRandom must draw exactly what numpy's default_rng draws: worlds stay reproducible and documented."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dialogrl.envs.rng import EpisodeRandom

BOUNDS = st.one_of(st.integers(1, 10), st.integers(1, 2**20), st.integers(1, 2**40), st.just(2**63 - 101))


@settings(max_examples=200, deadline=None)
@given(seed=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3),
       calls=st.lists(st.tuples(st.booleans(), st.integers(0, 100), BOUNDS), min_size=1, max_size=80))
def test_same_draws_as_numpy(seed: list[int], calls: list[tuple[bool, int, int]]) -> None:
    ours, numpy_rng = EpisodeRandom(seed), np.random.default_rng(seed)
    for is_float, low, span in calls:
        if is_float:
            assert ours.random() == numpy_rng.random()
        else:
            assert ours.integers(low, low + span) == int(numpy_rng.integers(low, low + span))
