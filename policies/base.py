"""The policy protocol every agent implements, scripted or learned."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from dialogrl.types import Message


@runtime_checkable
class Policy(Protocol):
    """Maps many live conversations to one reply each, in one call (so LM policies can batch generation)."""

    name: str

    def act_batch(self, conversations: list[list[Message]], infos: list[dict[str, Any]]) -> list[str]:
        """One reply per conversation. ``infos`` are the env's latest info dicts (scripted policies read the
        scenario's intent from them, as a routing label; LM policies ignore them)."""
        ...
