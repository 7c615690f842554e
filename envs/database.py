"""The per-episode back-office database: customers, orders, a product catalogue, and the tools acting on them.

Tools state decision facts plainly (eligibility and its reason), as real back-office systems do, so the agent
reads a decision instead of doing date arithmetic. Business policy is enforced here: a forbidden action is
refused with a tool error and reported as a violation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dialogrl.types import ActionResult, ParsedAction

REFUND_WINDOW_DAYS = 30
RETURN_WINDOW_DAYS = 60


@dataclass
class Customer:
    id: str
    name: str
    phone: str
    zip: str
    locked: bool = False
    subscription: str | None = None
    reset_sent: bool = False


@dataclass
class Order:
    id: str
    customer_id: str
    status: str  # processing | shipped | delivered
    total: float
    items: list[str]
    address: str
    days_since_delivery: int | None = None
    refunded: bool = False
    returned: bool = False


@dataclass(frozen=True)
class Product:
    name: str
    price: float
    warranty_months: int
    in_stock: bool

    def describe(self) -> str:
        stock = "in stock" if self.in_stock else "out of stock"
        return f"product {self.name}: price ${self.price:.2f}, warranty {self.warranty_months} months, stock: {stock}"


def refund_rule(order: Order) -> tuple[bool, str]:
    if order.refunded:
        return False, "already refunded"
    if order.returned:
        return False, "already returned"
    if order.status != "delivered" or order.days_since_delivery is None:
        return False, "not delivered yet"
    days = order.days_since_delivery
    if days > REFUND_WINDOW_DAYS:
        return False, f"{days} days since delivery, window {REFUND_WINDOW_DAYS} days"
    return True, f"{days} of {REFUND_WINDOW_DAYS} days"


def return_rule(order: Order) -> tuple[bool, str]:
    if order.returned or order.refunded:
        return False, "already " + ("returned" if order.returned else "refunded")
    if order.status != "delivered" or order.days_since_delivery is None:
        return False, "not delivered yet"
    days = order.days_since_delivery
    if days > RETURN_WINDOW_DAYS:
        return False, f"{days} days since delivery, window {RETURN_WINDOW_DAYS} days"
    return True, f"{days} of {RETURN_WINDOW_DAYS} days"


def address_rule(order: Order) -> tuple[bool, str]:
    if order.status != "processing":
        return False, f"already {order.status}"
    return True, "not shipped yet"


ORDER_RULES = {"refund": refund_rule, "return": return_rule, "update_address": address_rule}


def _copy(record: Any) -> Any:
    """A shallow copy of a plain dataclass record: every field, several times faster than ``replace``."""
    new = object.__new__(type(record))
    new.__dict__.update(record.__dict__)
    return new


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@dataclass
class Database:
    customers: dict[str, Customer]
    orders: dict[str, Order]
    products: dict[str, Product]
    verified: str | None = None
    escalated: bool = False
    log: list[str] = field(default_factory=list)

    def clone(self) -> Database:
        """A copy whose mutable records can change independently (products are immutable)."""
        orders = {k: _copy(v) for k, v in self.orders.items()}
        for order in orders.values():
            order.items = list(order.items)
        return Database(
            customers={k: _copy(v) for k, v in self.customers.items()},
            orders=orders,
            products=self.products,
            verified=self.verified,
            escalated=self.escalated,
        )

    def state(self) -> tuple:
        """Everything an action can change; success compares this with the goal's expected state."""
        return (  # tuple([...]): a list comprehension is faster than a generator here
            tuple([(o.id, o.status, o.address, o.refunded, o.returned) for o in self.orders.values()]),
            tuple([(c.id, c.locked, c.subscription, c.reset_sent) for c in self.customers.values()]),
            self.escalated,
        )

    # --- tools -----------------------------------------------------------------------------------------
    def apply(self, action: ParsedAction) -> ActionResult:
        handler = getattr(self, "_do_" + action.name)
        return handler(action)

    def _ok(self, action: ParsedAction, message: str) -> ActionResult:
        self.log.append(action.name)
        return ActionResult(action, True, message, "ok")

    @staticmethod
    def _invalid(action: ParsedAction, message: str) -> ActionResult:
        return ActionResult(action, False, "error: " + message, "invalid")

    @staticmethod
    def _violation(action: ParsedAction, message: str) -> ActionResult:
        return ActionResult(action, False, "error: policy - " + message, "violation")

    def _do_verify(self, a: ParsedAction) -> ActionResult:
        phone, zip_code = a.args["phone"], a.args["zip"]
        for c in self.customers.values():
            if c.phone == phone and c.zip == zip_code:
                self.verified = c.id
                plan = c.subscription or "none"
                # The reply repeats what was checked, as lookup replies repeat the order id: the agent sees
                # what it sent, and the logs hold each phone/zip once more.
                return self._ok(a, f"verified: yes - phone {phone}, zip {zip_code}: customer {c.name}; "
                                   f"account locked: {_yes(c.locked)}; subscription: {plan}")
        return self._invalid(a, f"verified: no - phone {phone} and zip {zip_code} do not match our records")

    def _order(self, a: ParsedAction) -> Order | None:
        return self.orders.get(a.args["order"].upper())

    def _do_lookup_order(self, a: ParsedAction) -> ActionResult:
        order = self._order(a)
        if order is None:
            return self._invalid(a, f"no order {a.args['order']}")
        if order.status == "delivered":
            status = f"status delivered ({order.days_since_delivery} days ago)"
        elif order.status == "shipped":
            status = "status shipped (in transit)"
        else:
            status = "status processing (not shipped yet)"
        facts = [f"{name.replace('_', ' ')} eligible: {_yes(ok)} ({why})" for name, (ok, why) in
                 ((n, rule(order)) for n, rule in ORDER_RULES.items())]
        return self._ok(
            a,
            f"order {order.id}: {status}, total ${order.total:.2f}, items: {', '.join(order.items)}, "
            f"ship to {order.address}; " + "; ".join(facts),
        )

    def _change_order(self, a: ParsedAction) -> tuple[Order | None, ActionResult | None]:
        """Common checks for order changes: the order exists, the customer is verified and owns it, policy allows."""
        order = self._order(a)
        if order is None:
            return None, self._invalid(a, f"no order {a.args['order']}")
        if self.verified is None:
            return None, self._violation(a, "verify the customer's identity before changing an order")
        if order.customer_id != self.verified:
            return None, self._violation(a, f"order {order.id} belongs to another customer")
        allowed, why = ORDER_RULES[a.name](order)
        if not allowed:
            return None, self._violation(a, f"{a.name.replace('_', ' ')} not allowed: {why}")
        return order, None

    def _do_refund(self, a: ParsedAction) -> ActionResult:
        order, error = self._change_order(a)
        if order is None:
            return error  # type: ignore[return-value]
        order.refunded = True
        return self._ok(a, f"refund issued: ${order.total:.2f} for order {order.id}")

    def _do_return(self, a: ParsedAction) -> ActionResult:
        order, error = self._change_order(a)
        if order is None:
            return error  # type: ignore[return-value]
        order.returned = True
        return self._ok(a, f"return opened for order {order.id}: return label emailed to the customer")

    def _do_update_address(self, a: ParsedAction) -> ActionResult:
        order, error = self._change_order(a)
        if order is None:
            return error  # type: ignore[return-value]
        order.address = " ".join(a.args["address"].split())
        return self._ok(a, f"address updated for order {order.id}: {order.address}")

    def _verified_customer(self, a: ParsedAction) -> tuple[Customer | None, ActionResult | None]:
        if self.verified is None:
            return None, self._violation(a, "verify the customer's identity before changing an account")
        return self.customers[self.verified], None

    def _do_reset_password(self, a: ParsedAction) -> ActionResult:
        customer, error = self._verified_customer(a)
        if customer is None:
            return error  # type: ignore[return-value]
        customer.locked, customer.reset_sent = False, True
        return self._ok(a, "password reset link sent to the customer's email; account unlocked")

    def _do_cancel_subscription(self, a: ParsedAction) -> ActionResult:
        customer, error = self._verified_customer(a)
        if customer is None:
            return error  # type: ignore[return-value]
        if customer.subscription is None:
            return self._invalid(a, "no active subscription")
        plan, customer.subscription = customer.subscription, None
        return self._ok(a, f"subscription cancelled (was {plan})")

    def _do_lookup_product(self, a: ParsedAction) -> ActionResult:
        product = self.products.get(" ".join(a.args["name"].lower().split()))
        if product is None:
            return self._invalid(a, f"no product '{a.args['name'][:40]}'")
        return self._ok(a, product.describe())

    def _do_escalate(self, a: ParsedAction) -> ActionResult:
        self.escalated = True
        return self._ok(a, "escalated to a human specialist")

    def _do_end(self, a: ParsedAction) -> ActionResult:
        return self._ok(a, "conversation ended")
