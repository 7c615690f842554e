"""``dialogrl COMMAND --help`` lists every config key with its default and docstring."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from dialogrl.cli import CONFIG_CLASSES, main
from dialogrl.config_help import describe_config, field_docs


def _config(command: str) -> type:
    module, _, name = CONFIG_CLASSES[command].partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("command", sorted(CONFIG_CLASSES))
def test_every_config_key_has_a_docstring(command: str) -> None:
    cls = _config(command)
    keys = [f.name for f in dataclasses.fields(cls) if f.init]
    assert [k for k in keys if k not in field_docs(cls)] == []


def test_docstrings_come_from_the_class_and_its_bases() -> None:
    @dataclasses.dataclass
    class Base:
        seed: int = 0
        """Seeds everything."""

    @dataclasses.dataclass
    class Child(Base):
        steps: int = 3
        """How many
        steps."""
        undocumented: str = "x"

    assert field_docs(Child) == {"seed": "Seeds everything.", "steps": "How many steps."}
    text = describe_config(Child)
    assert "  steps (int) = 3\n      How many steps." in text
    assert "  undocumented (str) = 'x'" in text
    assert field_docs(dataclasses.make_dataclass("NoSource", [("a", int, 1)])) == {}  # no source: keys only


def test_command_help_lists_keys_defaults_and_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ppo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: dialogrl ppo" in out
    assert "  kl_coef (float) = 0.05\n      Per-token KL penalty to the reference policy" in out
    assert "  max_update_kl (float | None) = None" in out
    assert "config keys (set in the --config YAML or as KEY=VALUE" in out


@pytest.mark.parametrize("command", ["sb3", "bootstrap"])
def test_help_of_commands_without_a_config_file_does_not_offer_one(command: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "config keys (set as KEY=VALUE;" in out and "--config" not in out  # said "set in the --config YAML"


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in sorted(CONFIG_CLASSES))])
def test_help_imports_no_torch(args: list[str]) -> None:
    code = (f"import sys\nfrom dialogrl.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("command", sorted(c for c in CONFIG_CLASSES if c != "bootstrap"))  # bootstrap: no YAML
def test_each_config_yaml_lists_every_key_at_its_default(command: str) -> None:
    import yaml

    from dialogrl.config import load_config

    cls = _config(command)
    path = Path(__file__).parents[1] / "configs" / f"{command.replace('-', '_')}.yaml"
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(cls) if f.init}
    assert load_config(cls, path) == cls()
