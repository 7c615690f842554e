"""How far an LM policy has moved from its reference, measured on the conversations it had.

The reference is the same model with its LoRA adapter disabled: the base model for an SFT run, the SFT policy
for PPO and DPO runs (their ``base/`` is the merged SFT model). The comparison report shows it next to success and
return, so a method that buys reward by drifting far from where it started is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dialogrl.types import Message

BATCH = 16
"""Sequences per forward pass."""


def reply_kl(policy_logits: Callable[[Any, Any], Any], reference_logits: Callable[[Any, Any], Any], tokenizer: Any,
             conversations: Sequence[Sequence[Message]], context: int, pad_id: int) -> float | None:
    """Mean over the assistant replies of the summed per-token KL(policy || reference), or None without replies.

    At every reply token the two models' full next-token distributions (temperature 1) are compared, teacher-forced
    on the conversation as it happened: an exact KL at the states the policy visited, for greedy and sampled
    decoding alike. ``*_logits(input_ids, attention_mask)`` return logits. One pass per conversation when it fits
    in ``context`` tokens; else one pass per reply, with as much of the conversation before it as fits.
    """
    import torch

    pieces = [piece for conv in conversations for piece in _pieces(tokenizer, conv, context)]
    replies = sum(_runs(mask) for _, mask in pieces)
    if not replies:
        return None
    total = 0.0
    for start in range(0, len(pieces), BATCH):
        chunk = pieces[start:start + BATCH]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (seq, mask) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            scored[row, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
        with torch.no_grad():
            # Logits at position t predict token t + 1: score the positions just before each reply token.
            at = scored[:, 1:]
            logp = torch.log_softmax(policy_logits(ids, attention)[:, :-1][at].float(), dim=-1)
            logq = torch.log_softmax(reference_logits(ids, attention)[:, :-1][at].float(), dim=-1)
            total += float((logp.exp() * (logp - logq)).sum())
    return total / replies


def _pieces(tokenizer: Any, conversation: Sequence[Message], context: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, reply-token mask) sequences that cover every assistant reply of the conversation once."""
    last = max((i for i, m in enumerate(conversation) if m.get("role") == "assistant"), default=-1)
    if last < 0:
        return []
    enc = tokenizer.apply_chat_template(list(conversation[:last + 1]), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True,
                                        tokenizer_kwargs={"verbose": False})  # over-long: handled below
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    if mask[:1] == [1]:
        mask[0] = 0  # a first token has no position before it to be predicted from
    if len(ids) <= context:
        return [(ids, mask)]
    pieces = []
    for begin, end in _spans(mask):
        low = max(0, end - context)
        if begin > low:  # the reply fits with at least one token of its past
            pieces.append((ids[low:end], [0] * (begin - low) + [1] * (end - begin)))
    return pieces


def _spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[begin, end) of each run of ones."""
    spans, begin = [], None
    for i, m in enumerate([*mask, 0]):
        if m and begin is None:
            begin = i
        elif not m and begin is not None:
            spans.append((begin, i))
            begin = None
    return spans


def _runs(mask: Sequence[int]) -> int:
    return len(_spans(mask))
