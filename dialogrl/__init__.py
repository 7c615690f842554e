"""dialogrl: train customer-service dialogue agents with reinforcement learning.

Importing the package registers the Gymnasium ids (``dialogrl/CustomerService-v0`` and friends).
"""

import warnings

from dialogrl import envs as _envs  # noqa: F401  (registers the environments)


def silence_library_deprecations() -> None:
    """Hide the one deprecation our dependencies raise among themselves: peft and TRL ask transformers 5 the
    deprecated ``is_gradient_checkpointing`` on every adapter load and trainer start. The answer is right; the
    FutureWarning is theirs to fix, and only noise in a dialogrl user's script. Run on import."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


silence_library_deprecations()

__version__ = "0.1.0"
