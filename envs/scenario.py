"""Scenario files (YAML) and the seeded world each episode draws from them.

A scenario is one customer intent. The schema (documented in the README) is validated on load, and a file
missing a key fails with one line naming the file and the key.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from dialogrl.config import read_yaml
from dialogrl.types import DialogRLError, ParsedAction

from .database import ORDER_RULES, Customer, Database, Order, Product
from .rng import Draws, weighted_index

SCENARIO_DIR = Path(__file__).parent / "scenarios"
TARGETS = ("order", "account", "product")
RESOLUTIONS = ("none", "refund", "return", "update_address", "reset_password", "cancel_subscription")
SPLITS = ("train", "test")
INFORM_FIELDS = frozenset({"status", "total", "order", "address", "product", "answer"})
TEMPLATE_FIELDS = frozenset({"product", "question"})

def _made_up_names(count: int) -> list[str]:
    """``count`` distinct pronounceable made-up first names (consonant-vowel syllables), in a fixed order."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "l", "r", "s"]
    syllables = [o + v for o in onsets for v in vowels]
    total = len(syllables) ** 2 * len(codas)
    names: list[str] = []
    for i in range(total):
        first, rest = divmod((i * 7919) % total, len(syllables) * len(codas))  # a fixed stride spreads the letters
        second, coda = divmod(rest, len(codas))
        names.append((syllables[first] + syllables[second] + codas[coda]).capitalize())
        if len(names) == count:
            break
    return names


# Disjoint per split, so no test customer, phone number or order id is ever seen in training. Names come from one
# generator, every eighth to the test split: test customers are new people whose names are spelled with the same
# syllables, and hundreds of training names mean an agent must copy a customer's name, not recall one.
_NAMES = _made_up_names(480)
FIRST_NAMES = {"train": [n for i, n in enumerate(_NAMES) if i % 8], "test": _NAMES[::8]}
LAST_NAMES = ("Smith Jones Patel Garcia Chen Novak Okafor Rossi Silva Kim Murphy Dubois Larsen Haddad Ivanova "
              "Tanaka Moreau Fischer Costa Nguyen").split()
STREETS = "Oak Maple Cedar Pine Elm Birch Willow Hill Lake River Park Mill".split()
STREET_KINDS = "Street Avenue Road Lane Drive".split()
CITIES = "Springfield Riverton Lakeside Fairview Ashford Brookhaven Clifton Dover".split()
PRODUCTS = (
    Product("desk lamp", 34.99, 24, True), Product("office chair", 189.0, 36, True),
    Product("wireless mouse", 24.5, 12, True), Product("mechanical keyboard", 89.99, 24, False),
    Product("monitor stand", 45.0, 12, True), Product("noise cancelling headphones", 149.0, 24, True),
    Product("webcam", 59.99, 12, False), Product("usb hub", 19.99, 6, True),
    Product("laptop sleeve", 29.0, 6, True), Product("standing desk", 399.0, 60, False),
)
ITEM_NAMES = [p.name for p in PRODUCTS]
_CATALOGUE = {p.name: p for p in PRODUCTS}
_ANY_STATUS = {"processing": 1, "shipped": 1, "delivered": 1}
ORDER_KEYS = ("status", "days_since_delivery", "refunded_prob")
ACCOUNT_KEYS = ("locked_prob", "subscription_prob")


@dataclass
class Scenario:
    """One intent, as loaded from a scenario YAML file."""

    intent: str
    summary: str
    target: str
    resolution: str
    requires_verification: bool
    inform: list[str]
    templates: dict[str, list[str]]
    order: dict[str, Any] = field(default_factory=dict)
    account: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _require(data: dict, key: str, path: Path) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DialogRLError(f"scenario file {path}: missing key '{key}'")
        node = node[part]
    return node


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate one scenario file."""
    path = Path(path)
    data = read_yaml(path, "scenario file")
    if not isinstance(data, dict):
        raise DialogRLError(f"scenario file {path}: expected a mapping at the top level")
    keys = ["intent", "summary", "target", "resolution", "requires_verification", "inform",
            "templates.train", "templates.test"]
    values = {k: _require(data, k, path) for k in keys}
    for key in ("intent", "summary"):
        if not isinstance(values[key], str) or not values[key].strip():
            raise DialogRLError(f"scenario file {path}: key '{key}' must be a non-empty string, got {values[key]!r}")
    if not isinstance(values["requires_verification"], bool):
        raise DialogRLError(f"scenario file {path}: key 'requires_verification' must be true or false, "
                            f"got {values['requires_verification']!r}")
    if values["target"] not in TARGETS:
        raise DialogRLError(f"scenario file {path}: key 'target' must be one of {TARGETS}, got {values['target']!r}")
    if values["resolution"] not in RESOLUTIONS:
        raise DialogRLError(
            f"scenario file {path}: key 'resolution' must be one of {RESOLUTIONS}, got {values['resolution']!r}")
    for split in SPLITS:
        lines = values[f"templates.{split}"]
        if not isinstance(lines, list) or not lines or not all(isinstance(t, str) for t in lines):
            raise DialogRLError(f"scenario file {path}: key 'templates.{split}' must be a non-empty list of strings")
    if not isinstance(values["inform"], list) or not all(isinstance(x, str) for x in values["inform"]):
        raise DialogRLError(f"scenario file {path}: key 'inform' must be a list of strings")
    for key in ("order", "account"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise DialogRLError(f"scenario file {path}: key '{key}' must be a mapping, got {data[key]!r}")
    days = (data.get("order") or {}).get("days_since_delivery", [1, 90])
    if not (isinstance(days, list) and len(days) == 2 and all(isinstance(d, int) and not isinstance(d, bool)
                                                               for d in days) and 0 <= days[0] <= days[1]):
        raise DialogRLError(f"scenario file {path}: key 'order.days_since_delivery' must be [low, high] whole days "
                            f"with 0 <= low <= high, got {days!r}")
    _check_draws(path, data)
    _check_fields(path, "inform", values["inform"], INFORM_FIELDS)
    for split in SPLITS:
        _check_fields(path, f"templates.{split}", values[f"templates.{split}"], TEMPLATE_FIELDS)
    known = {"intent", "summary", "target", "resolution", "requires_verification", "inform", "templates", "order",
             "account", "description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DialogRLError(f"scenario file {path}: unknown key '{unknown[0]}'")
    return Scenario(
        intent=str(values["intent"]), summary=str(values["summary"]), target=values["target"],
        resolution=values["resolution"], requires_verification=bool(values["requires_verification"]),
        inform=[str(x) for x in values["inform"]],
        templates={s: list(values[f"templates.{s}"]) for s in SPLITS},
        order=dict(data.get("order") or {}), account=dict(data.get("account") or {}), source=str(path),
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_draws(path: Path, data: dict) -> None:
    """The ``order`` and ``account`` draws: known keys, probabilities in [0, 1], status weights that can be drawn."""
    for section, allowed in (("order", ORDER_KEYS), ("account", ACCOUNT_KEYS)):
        for key, value in (data.get(section) or {}).items():
            if key not in allowed:
                raise DialogRLError(f"scenario file {path}: unknown key '{section}.{key}'; known: "
                                    + ", ".join(f"{section}.{k}" for k in allowed))
            if str(key).endswith("_prob") and not (_number(value) and 0 <= value <= 1):
                raise DialogRLError(f"scenario file {path}: key '{section}.{key}' must be a probability in [0, 1], "
                                    f"got {value!r}")
    weights = (data.get("order") or {}).get("status", _ANY_STATUS)
    statuses = ", ".join(_ANY_STATUS)
    if not isinstance(weights, dict) or not weights:
        raise DialogRLError(f"scenario file {path}: key 'order.status' must map order statuses ({statuses}) to "
                            f"weights, e.g. {{delivered: 1}}, got {weights!r}")
    for name, weight in weights.items():
        if name not in _ANY_STATUS:
            raise DialogRLError(f"scenario file {path}: key 'order.status': unknown status {name!r}; known: {statuses}")
        if not (_number(weight) and weight >= 0):
            raise DialogRLError(f"scenario file {path}: key 'order.status.{name}' must be a non-negative number, "
                                f"got {weight!r}")
    if not (0 < sum(weights.values()) < math.inf):
        raise DialogRLError(f"scenario file {path}: key 'order.status' weights must have a positive, finite sum, "
                            f"got {weights!r}")


def _check_fields(path: Path, key: str, texts: list, allowed: frozenset[str]) -> None:
    """Every ``{placeholder}`` must be one the environment fills in; stray braces are errors too."""
    for text in texts:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(str(text)) if name is not None}
        except ValueError as exc:
            raise DialogRLError(f"scenario file {path}: key '{key}': bad template {text!r} ({exc})") from None
        unknown = sorted(names - allowed)
        if unknown:
            raise DialogRLError(f"scenario file {path}: key '{key}': unknown placeholder '{{{unknown[0]}}}'; "
                                f"known: {', '.join(sorted(allowed))}")


@cache
def _builtin() -> tuple[Scenario, ...]:
    return tuple(load_scenario(p) for p in sorted(SCENARIO_DIR.glob("*.yaml")) if not p.name.startswith("_"))


def builtin_scenarios() -> list[Scenario]:
    """The scenarios shipped in the package (parsed once per process)."""
    return list(_builtin())


@dataclass
class Goal:
    """What a perfect agent achieves in this episode."""

    eligible: bool
    """Whether policy allows the resolution; if not, the correct outcome is an escalation."""
    expected_state: tuple
    """The database state a perfect agent leaves behind (compared with ``Database.state()``)."""
    inform: list[str]
    """Facts the customer must be told after the resolution (empty when escalation is correct)."""
    slots: dict[str, str]
    """What the customer knows and can tell: phone, zip, and order / address / product when relevant."""
    question: str = ""
    """For product questions: price, warranty or stock."""


def split_of_id(value: str) -> str:
    """The split an order id (A + 5 digits) or phone number (###-###-####) belongs to: the parity of its digit sum.

    Disjoint, yet every digit takes every value in both splits. (Disjoint ranges, e.g. A1xxxx-A5xxxx for training,
    would give test ids leading digits a learned model never copied, a shift that has nothing to do with the task.)
    """
    return SPLITS[sum(int(c) for c in value if c.isdigit()) % 2]


def _choice(rng: Draws, options: list | tuple) -> Any:
    return options[rng.integers(len(options))]  # numpy's int64 indexes a list as well


def _weighted(rng: Draws, weights: dict[str, float]) -> str:
    return list(weights)[weighted_index(rng, tuple(weights.values()))]


@cache
def _placeholders(facts: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name for fact in facts for _, name, _, _ in string.Formatter().parse(fact) if name)


def _address(rng: Draws) -> str:
    return f"{rng.integers(1, 1000)} {_choice(rng, STREETS)} {_choice(rng, STREET_KINDS)}, {_choice(rng, CITIES)}"


def _customer(rng: Draws, split: str, index: int, taken: set[str]) -> Customer:
    while True:
        first, last = _choice(rng, FIRST_NAMES[split]), _choice(rng, LAST_NAMES)
        phone = f"{rng.integers(200, 1000)}-{rng.integers(200, 1000)}-{rng.integers(0, 10000):04d}"
        if phone not in taken and split_of_id(phone) == split:
            taken.add(phone)
            break
    return Customer(id=f"C{index}", name=f"{first} {last}", phone=phone, zip=f"{rng.integers(10000, 100000)}")


def _order(rng: Draws, split: str, customer: Customer, spec: dict, taken: set[str]) -> Order:
    while (oid := f"A{rng.integers(10000, 100000)}") in taken or split_of_id(oid) != split:
        pass  # f-strings print numpy and Python ints alike
    taken.add(oid)
    status = _weighted(rng, spec.get("status", _ANY_STATUS))
    items = sorted({_choice(rng, ITEM_NAMES) for _ in range(rng.integers(1, 3))})
    order = Order(id=oid, customer_id=customer.id, status=status, items=items, address=_address(rng),
                  total=round(float(rng.integers(900, 40000)) / 100, 2))
    if status == "delivered":
        lo_d, hi_d = spec.get("days_since_delivery", [1, 90])
        order.days_since_delivery = int(rng.integers(lo_d, hi_d + 1))
        order.refunded = bool(rng.random() < spec.get("refunded_prob", 0.0))
    return order


def sample_world(rng: Draws, scenario: Scenario, split: str) -> tuple[Database, Goal, Customer]:
    """Draw the episode's database and goal; returns (db, goal, the customer in the conversation)."""
    taken: set[str] = set()
    customers = [_customer(rng, split, i, taken) for i in range(3)]
    me = customers[0]
    acct = scenario.account
    me.locked = bool(rng.random() < acct.get("locked_prob", 0.3))
    if rng.random() < acct.get("subscription_prob", 0.5):
        me.subscription = _choice(rng, ["basic", "premium"])
    order_ids: set[str] = set()
    orders = [_order(rng, split, c, {}, order_ids) for c in customers for _ in range(int(rng.integers(1, 3)))]
    target_order = _order(rng, split, me, scenario.order, order_ids) if scenario.target == "order" else None
    if target_order is not None:
        orders.insert(int(rng.integers(len(orders) + 1)), target_order)
    db = Database(customers={c.id: c for c in customers}, orders={o.id: o for o in orders},
                  products=dict(_CATALOGUE))

    slots = {"phone": me.phone, "zip": me.zip}
    context: dict[str, Any] = {}
    question = ""
    if target_order is not None:
        slots["order"] = target_order.id
        context.update(order=target_order.id, status=target_order.status, total=f"{target_order.total:.2f}")
    if scenario.resolution == "update_address":
        while (new := _address(rng)) == (target_order.address if target_order else ""):
            pass
        slots["address"] = context["address"] = new
    if scenario.target == "product":
        product = _choice(rng, PRODUCTS)
        question = _choice(rng, ["price", "warranty", "stock"])
        slots["product"] = context["product"] = product.name
        context["answer"] = {"price": f"{product.price:.2f}", "warranty": f"{product.warranty_months} months",
                             "stock": "in stock" if product.in_stock else "out of stock"}[question]

    eligible = True
    if scenario.resolution in ORDER_RULES and target_order is not None:
        eligible = ORDER_RULES[scenario.resolution](target_order)[0]
    ideal = db.clone()
    if not eligible:
        ideal.escalated = True
    elif scenario.resolution != "none":
        ideal.verified = me.id
        args = {k: v for k, v in (("order", slots.get("order")), ("address", slots.get("address"))) if v}
        result = ideal.apply(ParsedAction(scenario.resolution, args, ""))
        if not result.ok:
            raise DialogRLError(f"scenario {scenario.source}: resolution cannot succeed ({result.message})")
    missing = sorted(_placeholders(tuple(scenario.inform)) - context.keys())
    if missing:
        raise DialogRLError(f"scenario {scenario.source}: inform placeholder '{{{missing[0]}}}' has no value "
                            f"for target '{scenario.target}'")
    inform = [fact.format(**context) for fact in scenario.inform] if eligible else []
    return db, Goal(eligible, ideal.state(), inform, slots, question), me
