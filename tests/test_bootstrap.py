"""The offline base model: tokenizer, chat template (assistant mask), build, determinism and the cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dialogrl.policies.bootstrap import (
    BootstrapConfig,
    build_base_model,
    cache_root,
    cached_base_model,
    train_tokenizer,
)
from dialogrl.types import DialogRLError

ALL_ROLES = [
    {"role": "system", "content": "Refunds need a verified customer."},
    {"role": "user", "content": "Hi, where is order A10420? Ça va — 5 € ✓"},
    {"role": "assistant", "content": "Let me check. [lookup_order order=A10420]"},
    {"role": "tool", "content": "order A10420: shipped"},
    {"role": "assistant", "content": "It has shipped.  Anything else?"},
    {"role": "user", "content": "No, thanks."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def test_saved_directory_is_a_plain_hf_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "bootstrap.json"} <= names
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    cfg = BootstrapConfig.tiny()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.max_position_embeddings) == (
        cfg.n_layer, cfg.n_embd, cfg.n_positions)
    stats = json.loads((tiny_model_dir / "bootstrap.json").read_text())["stats"]
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())
    assert stats["final_loss"] < stats["first_loss"] - 1.0  # pre-training learned something


@pytest.mark.parametrize("text", ["[refund order=A10420] done.", "  two  spaces\nand a newline", "Ça va — 5 € ✓ 🙂"])
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer)


def test_split_digits_gives_every_digit_its_own_token(make_corpus) -> None:
    text = "Your refund of $387.68 for order A44643 [verify phone=606-639-1334 zip=60837]"
    conversations = make_corpus(40) + [[{"role": "user", "content": "387 387 387 4643 4643 1334 1334"}]] * 20
    merged = train_tokenizer(BootstrapConfig.tiny(), conversations)
    split = train_tokenizer(replace(BootstrapConfig.tiny(), split_digits=True), conversations)
    pieces = [split.decode([i]) for i in split(text, add_special_tokens=False)["input_ids"]]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [c for c in text if c.isdigit()]
    assert split.decode(split(text, add_special_tokens=False)["input_ids"]) == text
    merged_pieces = [merged.decode([i]) for i in merged(text, add_special_tokens=False)["input_ids"]]
    assert any(sum(c.isdigit() for c in p) > 1 for p in merged_pieces)  # the default merges digits
    assert BootstrapConfig().cache_key("v7") != replace(BootstrapConfig(), split_digits=True).cache_key("v7")


def test_chat_template_renders_every_role_and_generation_prompt(tokenizer) -> None:
    text = tokenizer.apply_chat_template(ALL_ROLES, tokenize=False)
    expected = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in ALL_ROLES)
    assert text == expected
    prompt = tokenizer.apply_chat_template(ALL_ROLES, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|assistant|>"
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # role markers are single special tokens that decode back
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(m["content"] for m in ALL_ROLES)
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:
    out = tokenizer.apply_chat_template(ALL_ROLES, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    masked = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == "".join(m["content"] + "<|end|>" for m in ALL_ROLES if m["role"] == "assistant")
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "lookup_order" not in unmasked and "<|assistant|>" in unmasked and "Refunds" in unmasked


def test_cache_builds_once_per_config_and_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            make_corpus) -> None:
    calls: list[int] = []

    def corpus():
        calls.append(1)
        return make_corpus(40)

    cfg = BootstrapConfig.tiny()
    cfg.steps = 20
    monkeypatch.setenv("DIALOGRL_CACHE", str(tmp_path / "cache"))
    first = cached_base_model(cfg, corpus, corpus_version="t1", progress=False)
    assert first.parent == tmp_path / "cache" and len(calls) == 1
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = cached_base_model(cfg, corpus, corpus_version="t1", progress=False)
    assert again == first and len(calls) == 1 and (first / "model.safetensors").stat().st_mtime_ns == mtime

    # Same config and corpus elsewhere: identical weights (seeded). Another corpus version: another entry.
    other = cached_base_model(cfg, corpus, cache_dir=tmp_path / "other", corpus_version="t1", progress=False)
    assert (other / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert BootstrapConfig.tiny().cache_key("t1") != cfg.cache_key("t1") != cfg.cache_key("t2")

    # bf16 autocast is another build (another key, other weights); float32 keys are those from before the field.
    half = replace(cfg, bf16=True)
    built = cached_base_model(half, corpus, corpus_version="t1", progress=False)
    assert built != first and (built / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    stats = json.loads((built / "bootstrap.json").read_text())["stats"]
    assert stats["final_loss"] < stats["first_loss"]
    assert BootstrapConfig().cache_key("v7") == "f1534436a5d51693"  # the cached default model stays valid


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DIALOGRL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dialogrl"
    monkeypatch.setenv("DIALOGRL_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("DIALOGRL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "dialogrl"


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = BootstrapConfig.tiny()
    with pytest.raises(DialogRLError, match="conversation 1: unknown message role 'robot'"):
        build_base_model(cfg, [ALL_ROLES, [{"role": "robot", "content": "x"}]], tmp_path / "a", progress=False)
    with pytest.raises(DialogRLError, match="vocab_size=100"):
        build_base_model(BootstrapConfig(vocab_size=100), [ALL_ROLES], tmp_path / "b", progress=False)
    with pytest.raises(DialogRLError, match="empty"):
        build_base_model(cfg, [], tmp_path / "c", progress=False)
    with pytest.raises(DialogRLError, match="already exists"):
        build_base_model(cfg, [ALL_ROLES], tiny_model_dir, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("override", "needle"), [
    ("lr=-1", "lr=-1.0: must be a finite number > 0"),  # was a traceback from torch's Adam
    ("dropout=2", "dropout=2.0: must be a finite number in [0, 1)"),
    ("n_embd=0", "n_embd=0: must be at least 1"),  # was a ZeroDivisionError
    ("num_threads=-1", "num_threads=-1: must be at least 0"),
    ("warmup=-5", "warmup=-5: must be at least 0"),  # was accepted
    ("corpus_episodes=0", "corpus_episodes=0: must be at least 1"),  # was accepted
    ("tokenizer_conversations=-1", "tokenizer_conversations=-1: must be at least 0"),
    ("seed=-1", "seed=-1: must be a seed in [0, 4294967295]"),
    ("n_embd=130", "n_embd=130: must be a multiple of n_head=4"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(override: str, needle: str) -> None:
    from dialogrl.config import load_config

    with pytest.raises(DialogRLError) as err:
        load_config(BootstrapConfig, None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bootstrap_out_is_new_empty_or_an_earlier_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import asdict

    from dialogrl.cli import main

    monkeypatch.setenv("DIALOGRL_CACHE", str(tmp_path / "cache"))
    tiny = [f"{k}={json.dumps(v)}" for k, v in asdict(BootstrapConfig.tiny()).items()]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["bootstrap", "--out", str(mine), *tiny]) == 2
    assert "holds files that are not a base model's (notes.txt)" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before the build
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["bootstrap", "--out", str(afile), *tiny]) == 2
    assert f"--out {afile}: is a file" in capsys.readouterr().err
    out = tmp_path / "model"
    assert main(["bootstrap", "--out", str(out), *tiny]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "config.json" in files
    assert main(["bootstrap", "--out", str(out), *tiny]) == 0  # an earlier copy is replaced by the same model
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    (out / "notes.txt").write_text("mine")  # a model folder the user added to: named, and left as it is
    assert main(["bootstrap", "--out", str(out), *tiny]) == 2
    assert "holds files that are not a base model's (notes.txt)" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {*files, "notes.txt"}
    (out / "notes.txt").unlink()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cache", "mine", "model"]  # no temp folder left
