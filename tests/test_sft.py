"""SFT baseline: trains a LoRA adapter with TRL on CPU, writes a reloadable run directory atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dialogrl.agents.sft import SFTConfig, main_sft, train_sft
from dialogrl.config import load_config
from dialogrl.types import DialogRLError

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
REAL_FILES = ["multiwoz21/train_sample.jsonl", "taskmaster4/train_sample.jsonl",
              "tau_bench/trajectories_train.jsonl", "abcd/sample.jsonl"]


def conversation(i: int, success: bool) -> dict[str, Any]:
    order = f"A10{i % 10}"
    return {
        "messages": [
            {"role": "system", "content": "Refunds need a verified customer."},
            {"role": "user", "content": f"Where is my order {order}?"},
            {"role": "assistant", "content": f"Let me check. [lookup_order order={order}]"},
            {"role": "tool", "content": f"order {order}: shipped"},
            {"role": "assistant", "content": f"Your order {order} has shipped."},
        ],
        "success": success, "intent": "order_status",
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def model_dir(tiny_model_dir: str | Path) -> Path:
    """The session's tiny base model (GPT-2 + tokenizer with a chat template), as a Path."""
    return Path(tiny_model_dir)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_train_reload_and_generate(model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "logs.jsonl", [conversation(i, success=i % 4 != 0) for i in range(16)])
    out = tmp_path / "runs" / "sft"
    run_dir = main_sft(str(REPO / "configs" / "sft.yaml"), [
        f"model={model_dir}", f"train_file={data}", f"output_dir={out}", "filter_success=true",
        "max_steps=6", "eval_steps=3", "logging_steps=1", "per_device_train_batch_size=4", "max_length=128",
        "eval_fraction=0.25", "seed=3",
    ])
    assert run_dir == out
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.yaml", "run.json"]
    assert leftovers(out.parent) == []  # the temp dir was renamed, and its checkpoints removed

    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "sft-filtered" and run["seed"] == 3
    assert run["base_model"] == str(model_dir.resolve())
    assert {"torch", "transformers", "trl", "peft", "dialogrl"} <= set(run["versions"])
    metrics = run["metrics"]
    assert metrics["loaded_conversations"] == 12  # 4 of 16 failed and were filtered out
    assert metrics["train_conversations"] + metrics["eval_conversations"] == 12
    assert metrics["eval_conversations"] == 3
    assert metrics["steps"] == 6 and [s for s, _ in metrics["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in metrics["eval_loss"]] == [3, 6]
    assert metrics["best_eval_loss"] == min(loss for _, loss in metrics["eval_loss"])
    assert metrics["wall_time_s"] > 0

    config = load_config(SFTConfig, out / "config.yaml")
    assert config.max_steps == 6 and config.train_file == str(data) and config.filter_success

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    model.eval()
    prompt = tokenizer.apply_chat_template(
        conversation(1, True)["messages"][:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        tuned = model(**prompt).logits
        with model.disable_adapter():
            plain = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    assert not torch.allclose(tuned, plain)  # LoRA starts as a no-op; training moved it
    # The reloaded adapter drives generation: its first greedy token is the tuned model's most likely one.
    assert generated[0, prompt["input_ids"].shape[1]] == tuned[0, -1].argmax()


def test_long_conversations_are_cut_and_counted_without_a_false_alarm(model_dir: Path, tmp_path: Path) -> None:
    """Longer than the context: kept (TRL trains on their start) and counted, or dropped when no assistant token
    is left; the tokenizer's "will result in indexing errors" warning does not fire for them."""
    import logging

    long_tail, long_start = conversation(1, True), conversation(2, True)
    long_tail["messages"].append({"role": "user", "content": "thanks again for all of it " * 60})
    long_start["messages"][1]["content"] = "hello there, I have a question " * 60
    rows = [conversation(i, True) for i in range(4)] + [long_tail, long_tail, long_start]
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        out = train_sft(SFTConfig(model=str(model_dir), train_file=str(write_jsonl(tmp_path / "l.jsonl", rows)),
                                  output_dir=str(tmp_path / "sft"), eval_fraction=0, max_steps=1,
                                  per_device_train_batch_size=2, max_length=128))
    finally:
        logger.removeHandler(handler)
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["dropped_no_assistant_within_max_length"] == 1 and metrics["cut_at_max_length"] == 2
    assert metrics["train_conversations"] == 6
    assert not [m for m in seen if "maximum sequence length" in m]


def test_max_length_stops_at_a_gpt2_models_learned_positions(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """GPT-2 has no position embedding past its 256 positions: the default max_length (512) is cut to them (a
    longer batch raised IndexError deep inside torch), and run.json records the length used."""
    long_tail = conversation(1, True)
    long_tail["messages"].append({"role": "user", "content": "thanks again for all of it " * 60})
    rows = [conversation(i, True) for i in range(4)] + [long_tail]
    out = train_sft(SFTConfig(model=str(tiny_gpt2_dir), train_file=str(write_jsonl(tmp_path / "l.jsonl", rows)),
                              output_dir=str(tmp_path / "sft"), eval_fraction=0, max_steps=2,
                              per_device_train_batch_size=5))
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["max_length"] == 256 and metrics["cut_at_max_length"] == 1 and metrics["steps"] == 2


def test_the_best_checkpoint_is_saved_not_the_last(model_dir: Path, tmp_path: Path) -> None:
    # A learning rate far too high makes the validation loss bounce, so the last evaluation is not the best.
    data = write_jsonl(tmp_path / "logs.jsonl", [conversation(i, True) for i in range(16)])
    run_dir = train_sft(SFTConfig(
        model=str(model_dir), train_file=str(data), output_dir=str(tmp_path / "run"), max_steps=12, eval_steps=1,
        early_stopping_patience=0, learning_rate=30.0, lr_scheduler_type="constant", eval_fraction=0.25,
        per_device_train_batch_size=4, max_length=128,
    ))
    metrics = json.loads((run_dir / "run.json").read_text())["metrics"]
    losses = dict(metrics["eval_loss"])
    assert metrics["best_step"] < metrics["steps"] and losses[metrics["steps"]] > metrics["best_eval_loss"]
    # saved_eval_loss is measured again on the weights written to adapter/
    assert metrics["saved_eval_loss"] == pytest.approx(metrics["best_eval_loss"], abs=1e-6)


def test_loss_decreases_on_repetitive_data(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rep.jsonl", [conversation(i, True) for i in range(8)])
    run_dir = train_sft(SFTConfig(
        model=str(model_dir), train_file=str(data), output_dir=str(tmp_path / "run"), eval_fraction=0,
        max_steps=30, logging_steps=1, learning_rate=1e-2, per_device_train_batch_size=4, max_length=128,
        lora_dropout=0.0,
    ))
    losses = [loss for _, loss in json.loads((run_dir / "run.json").read_text())["metrics"]["train_loss"]]
    assert len(losses) == 30
    first, last = losses[0], sum(losses[-5:]) / 5
    # batch-to-batch noise on this data is ~0.03; LoRA on a random tiny base lowers the loss by 3-15 %
    assert last < 0.97 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared/realdata is absent")
@pytest.mark.parametrize("name", REAL_FILES)
def test_a_few_steps_on_real_data(model_dir: Path, tmp_path: Path, name: str) -> None:
    run_dir = train_sft(SFTConfig(
        model=str(model_dir), train_file=str(REALDATA / name), output_dir=str(tmp_path / "run"),
        eval_fraction=0, max_steps=2, logging_steps=1, per_device_train_batch_size=2, max_length=256,
    ))
    metrics = json.loads((run_dir / "run.json").read_text())["metrics"]
    assert metrics["steps"] == 2 and metrics["train_conversations"] > 0
    assert all(loss > 0 for _, loss in metrics["train_loss"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("strategy", "sampler"), [("group_by_length", "LengthGroupedSampler"),
                                                   ("random", "RandomSampler")])
def test_sampling_strategy_reaches_the_trainer(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               strategy: str, sampler: str) -> None:
    from transformers import Trainer

    used: list[str] = []
    original = Trainer._get_train_sampler

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = original(self, *args, **kwargs)
        used.append(type(made).__name__)
        return made

    monkeypatch.setattr(Trainer, "_get_train_sampler", spy)
    data = write_jsonl(tmp_path / "logs.jsonl", [conversation(i, True) for i in range(4)])
    train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                        eval_fraction=0, max_length=128, train_sampling_strategy=strategy))
    assert used == [sampler]


def test_neftune_noise_reaches_training(model_dir: Path, tmp_path: Path) -> None:
    """The same step on the same data and seed: NEFTune's embedding noise changes its loss, and nothing else does."""
    data = write_jsonl(tmp_path / "logs.jsonl", [conversation(i, True) for i in range(4)])

    def first_loss(name: str, alpha: float | None) -> float:
        run = train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(tmp_path / name),
                                  max_steps=1, eval_fraction=0, max_length=128, neftune_noise_alpha=alpha))
        return json.loads((run / "run.json").read_text())["metrics"]["train_loss"][0][1]

    plain = first_loss("plain", None)
    assert first_loss("again", None) == plain
    assert first_loss("noisy", 15.0) != plain


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"conversation": []}, "no 'messages' field"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_jsonl_fails_before_writing(model_dir: Path, tmp_path: Path, line: Any, needle: str) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [conversation(0, True), conversation(1, True), line])
    out = tmp_path / "runs" / "sft"
    with pytest.raises(DialogRLError) as info:
        train_sft(SFTConfig(model=str(model_dir), train_file=[str(data)], output_dir=str(out), max_steps=1))
    assert "bad.jsonl row 3" in str(info.value) and needle in str(info.value)
    assert not out.exists() and (not out.parent.exists() or leftovers(out.parent) == [])


def test_bad_model_and_existing_output(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "ok.jsonl", [conversation(0, True), conversation(1, True)])
    out = tmp_path / "runs" / "sft"
    with pytest.raises(DialogRLError, match="model directory not found: .*nope"):
        train_sft(SFTConfig(model=str(tmp_path / "nope"), train_file=str(data), output_dir=str(out)))
    assert not out.parent.exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"model_type": "gpt2"}')  # no weights, no tokenizer files
    with pytest.raises(DialogRLError, match="fake"):
        train_sft(SFTConfig(model=str(fake), train_file=str(data), output_dir=str(out), eval_fraction=0))
    assert not out.exists() and leftovers(out.parent) == []
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old run")
    with pytest.raises(DialogRLError, match="already exists"):
        train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(out)))
    assert (out / "keep.txt").read_text() == "old run" and leftovers(out.parent) == []
    with pytest.raises(DialogRLError, match="no conversations with success=true"):
        write_jsonl(data, [conversation(0, False)])
        train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(out.parent / "other"),
                            filter_success=True))
    assert not (out.parent / "other").exists()


def test_empty_model_means_the_cached_base_model(model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import dialogrl.policies.bootstrap as bootstrap

    asked: list[bool] = []
    monkeypatch.setattr(bootstrap, "default_base_model", lambda: asked.append(True) or model_dir)
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(0, True), "not json"])
    with pytest.raises(DialogRLError, match="bad.jsonl row 2"):
        train_sft(SFTConfig(train_file=str(bad), output_dir=str(tmp_path / "bad_run"), max_steps=1))
    assert asked == []  # bad data fails before the base model is built
    data = write_jsonl(tmp_path / "ok.jsonl", [conversation(i, True) for i in range(4)])
    run_dir = train_sft(SFTConfig(train_file=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                                  eval_fraction=0))
    run = json.loads((run_dir / "run.json").read_text())
    assert asked == [True] and run["base_model"] == str(model_dir.resolve())
    assert run["config"]["model"] == str(model_dir.resolve())  # the resolved path, not the empty default


@pytest.mark.parametrize(("overrides", "needle"), [
    (["lr_scheduler_type=bogus"], "lr_scheduler_type=bogus: not a transformers SchedulerType; use one of linear, "
                                  "cosine, "),
    (["lr_scheduler_type=cosine_with_min_lr"], "lr_scheduler_type=cosine_with_min_lr: needs lr_scheduler_kwargs"),
    (["lr_scheduler_type=reduce_lr_on_plateau", "eval_fraction=0"], "needs eval_fraction > 0"),
    (["lora_dropout=1"], "lora_dropout=1.0: must be a finite number in [0, 1)"),
    (["lora_dropout=-0.1"], "lora_dropout=-0.1"),
    (["learning_rate=nan"], "learning_rate=nan: must be a finite number > 0"),  # `nan <= 0` is False: it trained
    (["learning_rate=.inf"], "learning_rate=inf"),
    (["num_train_epochs=0"], "num_train_epochs=0.0: must be a finite number > 0"),  # trained 0 steps, exit 0
    (["num_train_epochs=-1"], "num_train_epochs=-1.0"),
    (["weight_decay=-0.1"], "weight_decay=-0.1: must be a finite number >= 0"),
    (["lora_alpha=0"], "lora_alpha=0: must be a finite number > 0"),
    (["lora_r=0"], "lora_r=0: must be at least 1"),
    (["neftune_noise_alpha=0"], "neftune_noise_alpha=0.0: must be a finite number > 0"),
    (["train_sampling_strategy=shortest"], "train_sampling_strategy=shortest: not a transformers sampling "
                                           "strategy; use one of random, sequential, group_by_length"),
    (["seed=-1"], "seed=-1: must be a seed in [0, 4294967295]"),  # was a numpy traceback
    (["seed=4294967296"], "seed=4294967296: must be a seed"),
    (["train_file="], 'train_file="": name one or more JSONL files'),  # said "data file not found: ."
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    out = tmp_path / "runs" / "sft"
    with pytest.raises(DialogRLError) as info:
        main_sft(None, [f"output_dir={out}", *overrides])
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not out.parent.exists()
    assert load_config(SFTConfig, None, ["max_steps=5", "num_train_epochs=0"]).max_steps == 5  # epochs unread


def test_lora_targets_that_match_nothing_fail_before_writing(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "ok.jsonl", [conversation(i, True) for i in range(4)])
    out = tmp_path / "runs" / "sft"
    with pytest.raises(DialogRLError) as info:
        train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(out), max_steps=1,
                            eval_fraction=0, lora_target_modules=["bogus", "q_projj"]))
    assert str(info.value).startswith("lora_target_modules=[bogus, q_projj]: matches no module of the model; "
                                      "its layers include q_proj, k_proj")
    assert not out.exists() and leftovers(out.parent) == []


def test_config_validation_and_yaml_defaults() -> None:
    with pytest.raises(DialogRLError, match="eval_fraction"):
        load_config(SFTConfig, None, ["eval_fraction=1.5"])
    with pytest.raises(DialogRLError, match="unknown key 'lora_rank'"):
        load_config(SFTConfig, None, ["lora_rank=4"])
    # the shipped YAML states every default explicitly
    shipped = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())
    assert load_config(SFTConfig, REPO / "configs" / "sft.yaml") == SFTConfig()
    assert set(shipped) == set(SFTConfig.__dataclass_fields__)


def test_overwrite_replaces_only_an_earlier_run(model_dir: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    data = write_jsonl(precious / "train.jsonl", [conversation(i, True) for i in range(4)])
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(DialogRLError, match="not a run directory"):
        train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(precious), overwrite=True,
                            max_steps=1, eval_fraction=0))
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt", "train.jsonl"]
    run = train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(tmp_path / "run"),
                              max_steps=1, eval_fraction=0))
    with pytest.raises(DialogRLError, match="holds the input"):  # the logs inside the run it would replace
        train_sft(SFTConfig(model=str(model_dir), train_file=str(run / "config.yaml"), output_dir=str(run),
                            overwrite=True, max_steps=1, eval_fraction=0))
    again = train_sft(SFTConfig(model=str(model_dir), train_file=str(data), output_dir=str(run), overwrite=True,
                                max_steps=1, eval_fraction=0))
    assert again == run and (run / "run.json").is_file() and leftovers(tmp_path) == []


def test_terminated_run_leaves_nothing_behind(model_dir: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    data = write_jsonl(tmp_path / "logs.jsonl", [conversation(i, True) for i in range(8)])
    out = tmp_path / "runs" / "sft"
    proc = subprocess.Popen([sys.executable, "-m", "dialogrl.cli", "sft", f"model={model_dir}", f"train_file={data}",
                             f"output_dir={out}", "max_steps=100000", "eval_fraction=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.parent.glob(".sft.tmp-*/trainer")):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)  # as `kill` or `timeout` do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.decode().strip().splitlines()[-1] == "dialogrl: terminated"
    assert not out.exists() and leftovers(out.parent) == []
