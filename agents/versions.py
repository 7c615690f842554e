"""Package versions recorded in every run directory."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("dialogrl", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "gymnasium",
            "stable-baselines3")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
