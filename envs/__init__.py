"""Customer-service Gymnasium environments. Importing this module registers the ids below."""

from __future__ import annotations

import gymnasium as gym

from .customer_service import CustomerServiceEnv

# Registration is data: id -> entry point and default kwargs.
ENV_SPECS: list[dict] = [
    {"id": "dialogrl/CustomerService-v0", "entry_point": "dialogrl.envs.customer_service:CustomerServiceEnv",
     "kwargs": {}},
    {"id": "dialogrl/CustomerServiceActs-v0", "entry_point": "dialogrl.envs.acts:CustomerServiceActsEnv",
     "kwargs": {}},
] + [
    {"id": f"dialogrl/{name}-v0", "entry_point": "dialogrl.envs.customer_service:CustomerServiceEnv",
     "kwargs": {"intents": [intent]}}
    for intent, name in [
        ("order_status", "OrderStatus"), ("refund", "Refund"), ("return_exchange", "ReturnExchange"),
        ("address_change", "AddressChange"), ("password_reset", "PasswordReset"),
        ("cancel_subscription", "CancelSubscription"), ("product_question", "ProductQuestion"),
    ]
]

for _spec in ENV_SPECS:
    if _spec["id"] not in gym.registry:
        gym.register(**_spec)

ENV_IDS = [s["id"] for s in ENV_SPECS]

__all__ = ["CustomerServiceEnv", "ENV_IDS", "ENV_SPECS"]
