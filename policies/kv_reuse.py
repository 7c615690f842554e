"""Keep each conversation's KV cache from one turn to the next, so a turn encodes only its new tokens.

A conversation's next prompt starts with the previous prompt and the reply the model generated, so recomputing
their keys and values every turn (what a plain ``generate`` call does) is wasted prefill. HF ``generate`` resumes
from a cache passed in, but keeps nothing across calls for a batch whose rows grew by different amounts and were
padded differently; the per-row bookkeeping below (hand-written: no library offers it) does that:

- after a call, each row's cache entries (padding dropped) are stored with the token ids they encode;
- at the next call, each prompt takes the stored entry with the longest common token prefix (a reply that
  re-tokenizes differently simply reuses less), and the batch is laid out as

      [left pad | cached tokens][pad | new tokens]

  The attention mask hides both pads; ``generate`` derives position ids from the mask's cumulative sum, so every
  token keeps the position it had when it was cached.

Only the last call's entries are kept, and all of them are dropped when the weights change (an optimizer step,
another adapter), detected from the parameters' version counters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np


@dataclass
class CachedPrefix:
    """The KV entries of one encoded token sequence (no padding)."""

    ids: np.ndarray
    """The tokens the entries encode."""
    layers: list[tuple[Any, Any]]
    """Per layer (keys, values), each shaped (heads, tokens, head_dim)."""


@lru_cache(maxsize=1)
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that appends into spare capacity instead of ``torch.cat`` (which copies the whole cache
        at every decoding step: most of a small model's step time at batch 32-64). Greedy/sampled decoding only:
        ``crop`` and beam reordering are not supported."""

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.length = 0
                self._k, self._v = key_states[..., :0, :], value_states[..., :0, :]
            n = key_states.shape[-2]
            if self.length + n > self._k.shape[-2]:
                capacity = max(2 * self._k.shape[-2], self.length + n, 64)
                k = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
                k[..., :self.length, :] = self._k[..., :self.length, :]
                v[..., :self.length, :] = self._v[..., :self.length, :]
                self._k, self._v = k, v
            self._k[..., self.length:self.length + n, :] = key_states
            self._v[..., self.length:self.length + n, :] = value_states
            self.length += n
            self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]
            return self.keys, self.values

    return GrowingLayer


def new_cache(n_layers: int) -> Any:
    """An empty DynamicCache whose layers grow in place (see ``GrowingLayer``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer = _growing_layer_class()
    cache.layers = [layer() for _ in range(n_layers)]
    return cache


def weights_fingerprint(model: Any) -> tuple[Any, ...]:
    """Changes whenever a parameter is replaced or updated in place (optimizer steps bump ``_version``) and when
    a PEFT adapter is switched off or swapped (``disable_adapter()``, ``set_adapter``), which changes no parameter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = tuple((m.disable_adapters, tuple(m.active_adapters)) for m in model.modules()
                     if isinstance(m, BaseTunerLayer))
    return (id(model), adapters, *((id(p), p._version) for p in model.parameters()))


class PrefixStore:
    """The previous call's per-conversation caches, matched to new prompts by longest common token prefix."""

    def __init__(self) -> None:
        self.entries: list[CachedPrefix] = []
        self.fingerprint: tuple[Any, ...] | None = None
        self._table: np.ndarray | None = None

    def sync(self, model: Any) -> None:
        """Forget everything if the weights changed since the entries were computed."""
        fingerprint = weights_fingerprint(model)
        if fingerprint != self.fingerprint:
            self.entries, self._table, self.fingerprint = [], None, fingerprint

    def match(self, prompt: list[int]) -> tuple[int, CachedPrefix | None]:
        """(reusable tokens, entry). At least one prompt token is always left to encode."""
        if not self.entries:
            return 0, None
        if self._table is None:
            width = max(len(e.ids) for e in self.entries)
            self._table = np.full((len(self.entries), width), -1, dtype=np.int64)
            for row, e in enumerate(self.entries):
                self._table[row, :len(e.ids)] = e.ids
        n = min(len(prompt) - 1, self._table.shape[1])
        if n <= 0:
            return 0, None
        same = self._table[:, :n] == np.asarray(prompt[:n], dtype=np.int64)
        common = np.where(same.all(axis=1), n, np.argmin(same, axis=1))
        best = int(np.argmax(common))
        return (int(common[best]), self.entries[best]) if common[best] > 0 else (0, None)

    def replace(self, entries: list[CachedPrefix]) -> None:
        self.entries, self._table = entries, None


def build_batch(prompts: list[list[int]], reuse: list[tuple[int, CachedPrefix | None]], pad_id: int,
                model_config: Any) -> tuple[Any, Any, Any]:
    """input_ids, attention mask, and a cache holding the reused prefixes (empty if nothing is reused).

    Row layout: ``[pad | cached][pad | new]``; the first part is the cache's width, the whole is the input width.
    """
    import torch

    cached = max(c for c, _ in reuse)
    new = max(len(p) - c for p, (c, _) in zip(prompts, reuse, strict=True))
    input_ids = torch.full((len(prompts), cached + new), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), cached + new), dtype=torch.long)
    for row, (p, (c, _)) in enumerate(zip(prompts, reuse, strict=True)):
        if c:
            input_ids[row, cached - c:cached] = torch.tensor(p[:c], dtype=torch.long)
            attention[row, cached - c:cached] = 1
        input_ids[row, cached + new - (len(p) - c):] = torch.tensor(p[c:], dtype=torch.long)
        attention[row, cached + new - (len(p) - c):] = 1
    cache = new_cache(model_config.num_hidden_layers)
    if not cached:
        return input_ids, attention, cache
    template = next(e for c, e in reuse if e is not None).layers
    for layer, (k0, v0) in enumerate(template):
        keys = k0.new_zeros((len(prompts), k0.shape[0], cached, k0.shape[2]))
        values = v0.new_zeros((len(prompts), v0.shape[0], cached, v0.shape[2]))
        for row, (c, entry) in enumerate(reuse):
            if c and entry is not None:
                keys[row, :, cached - c:] = entry.layers[layer][0][:, :c]
                values[row, :, cached - c:] = entry.layers[layer][1][:, :c]
        cache.update(keys, values, layer)
    return input_ids, attention, cache


class _PaddedWidthAlarm(logging.Filter):
    """Drops transformers' "generation call has exceeded the model's predefined maximum length" reminder."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exceeded the model's predefined maximum length" not in record.getMessage()


@contextmanager
def padded_width_alarm_silenced() -> Iterator[None]:
    """While ``generate`` runs a :func:`build_batch` layout. Its input width is the longest cached part plus the
    longest new part, which can pass the model's context while every row (prompt budgeted to fit, with its own
    positions) stays inside it; transformers compares the width, so its reminder is a false alarm here. (It is a
    once-per-process warning: one dropped here does not show later for the caller's own ``generate`` either.)"""
    logger, alarm = logging.getLogger("transformers.generation.stopping_criteria"), _PaddedWidthAlarm()
    logger.addFilter(alarm)
    try:
        yield
    finally:
        logger.removeFilter(alarm)


def split_cache(cache: Any, attention: Any, sequences: Any, reply_lengths: list[int], width: int) -> list[CachedPrefix]:
    """Each row's entries after ``generate``: its unpadded prompt and the reply tokens the cache holds."""
    import torch

    layers = [(layer.keys, layer.values) for layer in cache.layers]
    held = layers[0][0].shape[2]  # the last generated token is never fed back, so it has no entry
    out = []
    for row, n in enumerate(reply_lengths):
        keep = torch.cat([attention[row, :width].nonzero().squeeze(1),
                          torch.arange(width, min(width + n, held))])
        out.append(CachedPrefix(sequences[row, keep].numpy(),
                                [(k[row][:, keep].clone(), v[row][:, keep].clone()) for k, v in layers]))
    return out
