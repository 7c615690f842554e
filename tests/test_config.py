"""load_config / dump_config: YAML + overrides, type checks, one-line errors naming file, key and value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from dialogrl.config import check_at_least, check_number, config_to_dict, dump_config, load_config
from dialogrl.types import DialogRLError


@dataclass
class Lora:
    r: int = 16
    """Rank."""
    target_modules: list[str] | str = field(default_factory=lambda: ["c_attn"])
    """Modules or 'all-linear'."""


@dataclass
class Demo:
    model: str = "base"
    """Model path."""
    learning_rate: float = 2e-3
    """Learning rate."""
    steps: int = 10
    """Steps."""
    filter_success: bool = False
    """Filter."""
    train_file: list[str] | str = "a.jsonl"
    """One path or several."""
    output_dir: Path = Path("runs/x")
    """Where to write."""
    seed: int | None = None
    """Seed."""
    decoding: Literal["greedy", "sampled"] = "greedy"
    """Decoding."""
    weights: dict[str, float] = field(default_factory=dict)
    """Reward weights."""
    lora: Lora = field(default_factory=Lora)
    """Nested."""


@dataclass
class Required:
    model: str
    """No default."""
    steps: int = 1
    """Steps."""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    cfg = load_config(Demo, None)
    assert cfg == Demo()


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model: tiny\nlearning_rate: 1\nsteps: 5\nlora:\n  r: 4\n")
    cfg = load_config(
        Demo, path, ["steps=7", "filter_success=true", "train_file=[a.jsonl, b.jsonl]", "lora.r=8",
                     "lora.target_modules=all-linear", "weights.success=2", "seed=3", "decoding=sampled"]
    )
    assert cfg.model == "tiny"
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.steps == 7
    assert cfg.filter_success is True
    assert cfg.train_file == ["a.jsonl", "b.jsonl"]
    assert cfg.lora == Lora(r=8, target_modules="all-linear")
    assert cfg.weights == {"success": 2.0}
    assert cfg.seed == 3
    assert cfg.decoding == "sampled"


def test_string_field_keeps_override_text_and_path_converts(tmp_path: Path) -> None:
    cfg = load_config(Demo, None, ["model=2024", "output_dir=out/run1", "learning_rate=1e-3"])
    assert cfg.model == "2024"
    assert cfg.output_dir == Path("out/run1")
    assert cfg.learning_rate == pytest.approx(1e-3)
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field still takes it as the number meant
    assert load_config(Demo, write(tmp_path, "learning_rate: 1e-4\n")).learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("learnin_rate: 0.1\n", ["c.yaml", "learnin_rate", "did you mean 'learning_rate'"]),
        ("steps: many\n", ["c.yaml", "'steps'", "'many'", "integer"]),
        ("filter_success: 1\n", ["c.yaml", "filter_success", "true or false"]),
        ("decoding: beam\n", ["c.yaml", "decoding", "'beam'"]),
        ("lora:\n  rank: 3\n", ["c.yaml", "lora.rank"]),
        ("lora: 3\n", ["c.yaml", "lora", "mapping"]),
        ("model: [1, 2]\n", ["c.yaml", "model", "[1, 2]"]),
        ("weights:\n  success: high\n", ["c.yaml", "weights", "'high'"]),
        ("- a\n- b\n", ["c.yaml", "mapping"]),
        ("model: [unclosed\n", ["c.yaml", "invalid YAML", "line"]),
    ],
)
def test_bad_file_values_are_one_line_errors(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DialogRLError) as info:
        load_config(Demo, path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("steps=abc", ["override 'steps=abc'", "integer"]),
        ("stepz=3", ["override 'stepz=3'", "unknown key 'stepz'", "did you mean 'steps'"]),
        ("lora.rr=3", ["lora.rr"]),
        ("nothing.here=3", ["override 'nothing.here=3'", "unknown key 'nothing'"]),
        ("learning_rate", ["expected key=value"]),
        ("seed=1.5", ["seed", "1.5"]),
    ],
)
def test_bad_overrides(override: str, needles: list[str]) -> None:
    with pytest.raises(DialogRLError) as info:
        load_config(Demo, None, [override])
    for needle in needles:
        assert needle in str(info.value)


def test_missing_file_and_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(DialogRLError, match="config file not found: .*nope.yaml"):
        load_config(Demo, tmp_path / "nope.yaml")
    with pytest.raises(DialogRLError, match="missing required key 'model'"):
        load_config(Required, write(tmp_path, "steps: 2\n"))
    assert load_config(Required, None, ["model=m"]).model == "m"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(Demo, write(tmp_path, "# nothing\n")) == Demo()


def test_post_init_errors_name_the_file(tmp_path: Path) -> None:
    @dataclass
    class Checked:
        fraction: float = 0.1
        """Must be in (0, 1)."""

        def __post_init__(self) -> None:
            if not 0 < self.fraction < 1:
                raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")

    with pytest.raises(DialogRLError, match=r"c.yaml: invalid Checked: fraction must be in \(0, 1\), got 2.0"):
        load_config(Checked, write(tmp_path, "fraction: 2\n"))


@dataclass
class Ranged:
    steps: int = 1
    """At least 1."""
    rate: float = 0.5
    """Finite, > 0."""
    dropout: float = 0.0
    """In [0, 1)."""
    coef: float = 0.0
    """Finite, >= 0."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "steps")
        check_number(self, "rate", above=0)
        check_number(self, "dropout", at_least=0, below=1)
        check_number(self, "coef", at_least=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=0", "steps=0: must be at least 1"),
        ("rate=0", "rate=0.0: must be a finite number > 0"),
        ("rate=nan", "rate=nan: must be a finite number > 0"),  # NaN <= 0 is False: a plain comparison lets it by
        ("rate=.inf", "rate=inf: must be a finite number > 0"),
        ("dropout=1", "dropout=1.0: must be a finite number in [0, 1)"),
        ("dropout=-0.5", "dropout=-0.5: must be a finite number in [0, 1)"),
        ("coef=-1", "coef=-1.0: must be a finite number >= 0"),
        ("coef=-.inf", "coef=-inf: must be a finite number >= 0"),
    ],
)
def test_range_checks_name_key_and_value(override: str, message: str) -> None:
    with pytest.raises(DialogRLError) as info:
        load_config(Ranged, None, [override])
    assert str(info.value) == message  # no "<defaults>:" prefix: the key and value say it all
    assert load_config(Ranged, None, ["steps=1", "rate=1e-9", "dropout=0", "coef=0"]) == Ranged(1, 1e-9, 0.0, 0.0)


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(Demo, None, ["model=m", "lora.r=2", "weights.a=0.5", "train_file=[x, y]"])
    out = dump_config(cfg, tmp_path / "sub" / "config.yaml")
    data = yaml.safe_load(out.read_text())
    assert data["output_dir"] == "runs/x" and data["lora"]["r"] == 2
    assert load_config(Demo, out) == cfg
    assert config_to_dict(cfg) == data
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_a_dotted_override_on_a_plain_field_is_named() -> None:
    with pytest.raises(DialogRLError, match=r"^override 'steps.x=1': expected an integer"):
        load_config(Ranged, None, ["steps.x=1"])
