"""The README's "From Python" block runs as written (on the tiny test model instead of the cached base model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).parents[1] / "README.md"


def readme_block(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_from_python_example_runs(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import dialogrl.policies.bootstrap as bootstrap
    from dialogrl.rewards.base import _REGISTRY

    monkeypatch.setattr(bootstrap, "default_base_model", lambda progress=True: Path(tiny_model_dir))
    monkeypatch.delitem(_REGISTRY, "short_replies", raising=False)  # restored (absent) after the test
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("From Python"), str(README), "exec"), {"__name__": "readme"})

    out = tmp_path / "runs" / "from-python"
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["methods"]) == {"sft", "ppo"}
    assert (out / "report" / "report.png").is_file() and "ppo" in capsys.readouterr().out
    ppo_run = json.loads((out / "ppo" / "run.json").read_text())
    assert ppo_run["config"]["rewards"] == ["success", "violation=0.5", "short_replies=0.1"]
    assert len(ppo_run["history"]) == 2
    for run in ("sft", "ppo"):  # labelled from the policy's generation settings, not as a scripted agent
        assert json.loads((out / run / "eval.json").read_text())["decoding"] == "greedy"


@pytest.mark.parametrize("import_dialogrl", [True, False])
def test_importing_dialogrl_silences_a_deprecation_among_its_dependencies(tiny_model_dir: Path,
                                                                          import_dialogrl: bool) -> None:
    """peft and TRL ask transformers the deprecated ``is_gradient_checkpointing`` on every adapter load and trainer
    start; a user's script that imports dialogrl does not see that FutureWarning (a fresh interpreter: pytest
    resets warning filters around collection, so only a new process shows what a script gets)."""
    import subprocess
    import sys

    script = ("import warnings; warnings.simplefilter('always')\n"
              + ("import dialogrl\n" if import_dialogrl else "")
              + "from transformers import AutoModelForCausalLM\n"
              + f"AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}).is_gradient_checkpointing\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("is_gradient_checkpointing" in done.stderr) is not import_dialogrl  # shown without dialogrl: a real test
