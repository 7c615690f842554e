"""dialogrl: train customer-service dialogue agents with reinforcement learning.

Importing the package registers the Gymnasium ids (``dialogrl/CustomerService-v0`` and friends).
"""

import warnings

from dialogrl import envs as _envs  # noqa: F401  (registers the environments)

# peft and TRL ask transformers 5 the deprecated ``is_gradient_checkpointing`` on every adapter load and trainer
# start: the answer is right and the FutureWarning theirs to fix, only noise in a dialogrl user's script.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
