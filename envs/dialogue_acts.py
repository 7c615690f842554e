"""Dialogue acts and a rule-based state tracker that reads them off the visible conversation.

The tracker sees only what an agent sees (customer text and tool messages), never the hidden goal. Scripted
policies and the dialogue-act environment both use it: an act is turned into reply text by ``render_act``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from dialogrl.types import Message

from .actions import format_action
from .scenario import PRODUCTS

ACTS = (
    "greet", "ask_identity", "ask_order", "ask_address", "ask_product",
    "verify", "lookup_order", "lookup_product",
    "refund", "return", "update_address", "reset_password", "cancel_subscription",
    "inform", "escalate", "end",
)
"""The Discrete action set of ``CustomerServiceActs-v0``, by index."""
RESOLUTION_ACTS = ("refund", "return", "update_address", "reset_password", "cancel_subscription")

PHONE = re.compile(r"(?<![\w-])\d{3}-\d{3}-\d{4}(?![\w-])")
ZIP = re.compile(r"(?<![\w$.])\d{5}(?!\w|\.\d)")
ORDER_ID = re.compile(r"\bA\d{5}\b")
ADDRESS = re.compile(r"\d{1,3} [A-Z][a-z]+ (?:Street|Avenue|Road|Lane|Drive), [A-Z][a-z]+")
ELIGIBLE = re.compile(r"(refund|return|update address) eligible: (yes|no)")
PRODUCT_NAMES = sorted((p.name for p in PRODUCTS), key=len, reverse=True)


@dataclass
class DialogueState:
    """What the agent has learnt so far; updated message by message."""

    phone: str = ""
    zip: str = ""
    order: str = ""
    address: str = ""
    product: str = ""
    verified: bool = False
    order_facts: str = ""
    product_facts: str = ""
    eligible: dict[str, bool] = field(default_factory=dict)
    resolved: str = ""
    """The resolution action that succeeded (e.g. ``refund``), or empty."""
    resolution_message: str = ""
    informed: bool = False
    last_error: bool = False
    customer_thanked: bool = False
    turns: int = 0
    seen: int = 0

    def update(self, messages: list[Message]) -> DialogueState:
        """Read the messages not seen yet."""
        for message in messages[self.seen:]:
            role, text = message["role"], str(message.get("content", ""))
            if role == "user":
                self._read_customer(text)
            elif role == "tool":
                self._read_tool(text)
            elif role == "assistant":
                self.turns += 1
        self.seen = len(messages)
        return self

    def _read_customer(self, text: str) -> None:
        lower = text.lower()
        if m := PHONE.search(text):
            self.phone = m.group(0)
        if m := ZIP.search(text):
            self.zip = m.group(0)
        if m := ORDER_ID.search(text):
            self.order = m.group(0)
        if m := ADDRESS.search(text):
            self.address = m.group(0)
        for name in PRODUCT_NAMES:
            if name in lower:
                self.product = name
                break
        self.customer_thanked = any(w in lower for w in ("thank", "thanks"))

    def _read_tool(self, text: str) -> None:
        self.last_error = text.startswith("error")
        if text.startswith("verified: yes"):
            self.verified = True
        elif text.startswith("order "):
            self.order_facts = text
            self.eligible = {k.replace("update address", "update_address"): v == "yes" for k, v in ELIGIBLE.findall(text)}
        elif text.startswith("product "):
            self.product_facts = text
        elif text.startswith(("refund issued", "return opened", "address updated", "password reset", "subscription")):
            self.resolved = {"refund": "refund", "return": "return", "addres": "update_address",
                             "passwo": "reset_password", "subscr": "cancel_subscription"}[text[:6]]
            self.resolution_message = text


def outcome_text(state: DialogueState) -> str:
    """Tell the customer what happened, from the facts the tools returned."""
    if state.resolved == "refund":
        amount = re.search(r"\$[\d.]+", state.resolution_message)
        return f"Your refund of {amount.group(0) if amount else 'the full amount'} has been issued."
    if state.resolved == "return":
        return "Your return is open and a return label has been emailed to you."
    if state.resolved == "update_address":
        return f"Your shipping address has been updated to {state.address}."
    if state.resolved == "reset_password":
        return "I have sent you a password reset link and your account is unlocked."
    if state.resolved == "cancel_subscription":
        return "Your subscription has been cancelled."
    if state.product_facts:
        m = re.search(r"price \$([\d.]+), warranty (\d+) months, stock: ([a-z ]+)", state.product_facts)
        if m:
            return (f"The {state.product} costs ${m.group(1)}, has a warranty of {m.group(2)} months "
                    f"and is {m.group(3)}.")
    if state.order_facts:
        m = re.search(r"status (\w+)", state.order_facts)
        return f"Your order {state.order} is {m.group(1) if m else 'being handled'}."
    return "I have looked into your request."


def _order_or_unknown(state: DialogueState) -> str:
    return state.order or "unknown"


# One renderer per act, so a reply renders only its own act.
_RENDER: dict[str, Callable[[DialogueState], str]] = {
    "greet": lambda s: "Hello! How can I help you today?",
    "ask_identity": lambda s: "To verify your identity, could you give me your "
    + ("zip code?" if s.phone else "phone number?" if s.zip else "phone number and zip code?"),
    "ask_order": lambda s: "What is your order number?",
    "ask_address": lambda s: "What new address should the order go to?",
    "ask_product": lambda s: "Which product are you asking about?",
    "verify": lambda s: format_action("verify", phone=s.phone or "unknown", zip=s.zip or "unknown"),
    "lookup_order": lambda s: format_action("lookup_order", order=_order_or_unknown(s)),
    "lookup_product": lambda s: format_action("lookup_product", name=s.product or "unknown"),
    "refund": lambda s: format_action("refund", order=_order_or_unknown(s)),
    "return": lambda s: format_action("return", order=_order_or_unknown(s)),
    "update_address": lambda s: format_action("update_address", order=_order_or_unknown(s),
                                              address=s.address or "unknown"),
    "reset_password": lambda s: format_action("reset_password"),
    "cancel_subscription": lambda s: format_action("cancel_subscription"),
    "inform": lambda s: outcome_text(s) + " Is there anything else I can do for you?",
    "escalate": lambda s: "This request is outside our policy, so I am handing you to a specialist. "
    + format_action("escalate", reason="outside policy"),
    "end": lambda s: "Thank you for contacting us, have a great day! " + format_action("end"),
}


def render_act(act: str, state: DialogueState) -> str:
    """The reply text for one dialogue act, filling slots from the tracked state."""
    return _RENDER[act](state)
