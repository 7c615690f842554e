"""dialogrl: train customer-service dialogue agents with reinforcement learning.

Importing the package registers the Gymnasium ids (``dialogrl/CustomerService-v0`` and friends).
"""

from dialogrl import envs as _envs  # noqa: F401  (registers the environments)

__version__ = "0.1.0"
