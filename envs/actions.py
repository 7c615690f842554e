"""The inline action syntax agents use inside their replies.

An action is a bracketed command anywhere in the reply::

    [name key=value key="a value with spaces"]

Names and keys are lower-case identifiers. Square brackets are reserved for actions: any other bracketed text
is reported as an invalid action, never an exception. The tool set:

| action | arguments | effect |
|---|---|---|
| ``verify`` | ``phone``, ``zip`` | verifies the customer's identity |
| ``lookup_order`` | ``order`` | shows an order with its eligibility facts (read-only) |
| ``refund`` | ``order`` | refunds a delivered order inside the refund window |
| ``return`` | ``order`` | opens a return inside the return window |
| ``update_address`` | ``order``, ``address`` | changes the shipping address of an unshipped order |
| ``reset_password`` | | sends a reset link and unlocks the verified customer's account |
| ``cancel_subscription`` | | cancels the verified customer's subscription |
| ``lookup_product`` | ``name`` | shows price, warranty and stock of a catalogue product |
| ``escalate`` | ``reason`` (optional) | hands the conversation to a human specialist and ends it |
| ``end`` | | ends the conversation |
"""

from __future__ import annotations

import re

from dialogrl.types import ParsedAction

ACTION_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (required arguments, optional arguments)
    "verify": (("phone", "zip"), ()),
    "lookup_order": (("order",), ()),
    "refund": (("order",), ()),
    "return": (("order",), ()),
    "update_address": (("order", "address"), ()),
    "reset_password": ((), ()),
    "cancel_subscription": ((), ()),
    "lookup_product": (("name",), ()),
    "escalate": ((), ("reason",)),
    "end": ((), ()),
}
_ALLOWED = {name: frozenset(required + optional) for name, (required, optional) in ACTION_ARGS.items()}
CHANGES_STATE = frozenset({"refund", "return", "update_address", "reset_password", "cancel_subscription"})
MAX_REPLY_CHARS = 2000
"""Longer replies are cut before parsing, so a 100 kB reply costs no more than a long one."""
MAX_ACTIONS = 4
"""More actions than this in one reply are rejected as invalid."""

_BRACKET = re.compile(r"\[([^\[\]]*)\]|\[[^\]]*$")
_NAME = re.compile(r"\s*([a-z_]+)")
_ARG = re.compile(r'\s+([a-z_]+)=("([^"]*)"|[^\s"]+)')


class ParseError(ValueError):
    """A bracketed segment that is not a well-formed action; carries the raw text."""

    def __init__(self, raw: str, reason: str) -> None:
        super().__init__(reason)
        self.raw = raw
        self.reason = reason


def parse_reply(reply: str) -> tuple[list[ParsedAction | ParseError], str]:
    """Split a reply into its actions (or parse errors, in order) and the text addressed to the customer."""
    reply = reply[:MAX_REPLY_CHARS]
    if "[" not in reply:  # no action, open or closed
        return [], " ".join(reply.split())
    found: list[ParsedAction | ParseError] = []
    outside: list[str] = []  # the text around the actions, each action replaced by a space
    end = 0
    for match in _BRACKET.finditer(reply):
        outside.append(reply[end:match.start()])
        end = match.end()
        raw = match.group(0)
        if match.group(1) is None:
            found.append(ParseError(raw, "unclosed '['"))
        else:
            found.append(_parse_one(raw, match.group(1)))
    outside.append(reply[end:])
    return found, " ".join(" ".join(outside).split())


def _parse_one(raw: str, body: str) -> ParsedAction | ParseError:
    name_match = _NAME.match(body)
    if not name_match:
        return ParseError(raw, "expected an action name after '['")
    name = name_match.group(1)
    if name not in ACTION_ARGS:
        return ParseError(raw, f"unknown action '{name}'")
    args: dict[str, str] = {}
    pos = name_match.end()
    while pos < len(body):
        arg = _ARG.match(body, pos)
        if not arg:
            if body[pos:].strip():
                return ParseError(raw, f"cannot read arguments '{body[pos:].strip()[:40]}'")
            break
        key, value, quoted = arg.groups()
        args[key] = (value if quoted is None else quoted).strip()
        pos = arg.end()
    required, optional = ACTION_ARGS[name]
    for key in required:  # plain checks first: the error lists are built only for a bad action
        if not args.get(key):
            missing = [k for k in required if not args.get(k)]
            return ParseError(raw, f"'{name}' needs {', '.join(missing)}")
    if not args.keys() <= _ALLOWED[name]:
        unknown = [k for k in args if k not in required + optional]
        return ParseError(raw, f"'{name}' takes no argument '{unknown[0]}'")
    return ParsedAction(name, args, raw)


def format_action(action: str, **args: str) -> str:
    """Write an action in the inline syntax, quoting values that contain spaces."""
    parts = [action] + [f'{k}="{v}"' if (" " in v or not v) else f"{k}={v}" for k, v in args.items()]
    return "[" + " ".join(parts) + "]"
