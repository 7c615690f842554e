"""LMPolicy: batched generation (left padding, stop token, log-probs), seeding, truncation, LoRA adapters, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dialogrl.policies.base import Policy
from dialogrl.policies.lm import GenerationSettings, LMPolicy
from dialogrl.types import DialogRLError, Message


@pytest.fixture(scope="module")
def conversations(make_corpus) -> list[list[Message]]:
    """Conversations of different lengths, each ending before an assistant turn."""
    return [conv[:cut] for conv, cut in zip(make_corpus(6, seed=7), [2, 4, 6, 2, 4, 6], strict=True)]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> LMPolicy:
    return LMPolicy.from_pretrained(tiny_model_dir, generation=GenerationSettings(max_new_tokens=24))


def recomputed_logprobs(policy: LMPolicy, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    import torch

    seq = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = policy.model(seq).logits[0, :-1] / temperature
    logps = torch.log_softmax(logits, -1).gather(-1, seq[0, 1:, None]).squeeze(-1)
    return logps[len(prompt) - 1:].tolist()


def test_batched_generation_returns_one_reply_each(policy: LMPolicy, conversations: list[list[Message]]) -> None:
    gens = policy.generate(conversations)
    assert len(gens) == len(conversations)
    assert isinstance(policy, Policy) and policy.act_batch(conversations, [{}] * 6) == [g.text for g in gens]
    for conv, gen in zip(conversations, gens, strict=True):
        assert 0 < len(gen.response_ids) <= 24 and len(gen.logprobs) == len(gen.response_ids)
        assert all(math.isfinite(x) and x <= 0 for x in gen.logprobs)
        assert gen.finished == (gen.response_ids[-1] == policy.end_id)
        assert policy.end_id not in gen.response_ids[:-1]  # stops at the first end-of-turn token
        assert gen.text == policy.tokenizer.decode(gen.response_ids, skip_special_tokens=True).strip()
        assert "<|" not in gen.text
        prompt = policy.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert policy.tokenizer.decode(gen.prompt_ids) == prompt and not gen.truncated_prompt
    assert any(g.finished for g in gens)  # the tiny model has learned to end its turn


def test_batched_greedy_equals_one_at_a_time(policy: LMPolicy, conversations: list[list[Message]]) -> None:
    # Both sides encode their whole prompts: ``with_settings`` gives each policy its own (empty) prefix store, and
    # the module's ``policy`` may hold caches of these very prompts from earlier tests. Resumed from a cache, a
    # left-padding bug in batched prefill would be on both sides and cancel out. (Resuming: test_kv_reuse.py.)
    prompts, _ = policy.prompt_ids(conversations)
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths: the batch is left-padded
    batched = policy.with_settings(reuse_kv=False).generate(conversations)
    for conv, gen in zip(conversations, batched, strict=True):
        alone = policy.with_settings(reuse_kv=False).generate([conv])[0]
        assert alone.response_ids == gen.response_ids
        assert alone.logprobs == pytest.approx(gen.logprobs, abs=1e-4)


def test_sampling_is_seeded_and_logprobs_match_a_forward_pass(policy: LMPolicy,
                                                              conversations: list[list[Message]]) -> None:
    import torch

    before = torch.random.get_rng_state()
    first = policy.with_settings(do_sample=True, temperature=0.7, seed=11).generate(conversations)
    again = policy.with_settings(do_sample=True, temperature=0.7, seed=11).generate(conversations)
    other = policy.with_settings(do_sample=True, temperature=0.7, seed=12).generate(conversations)
    assert torch.equal(before, torch.random.get_rng_state())  # a seeded policy leaves the global RNG alone
    assert [g.response_ids for g in first] == [g.response_ids for g in again]
    assert [g.response_ids for g in first] != [g.response_ids for g in other]
    for gen in first:  # what PPO recomputes: log-softmax(logits / temperature) of the chosen tokens
        expected = recomputed_logprobs(policy, gen.prompt_ids, gen.response_ids, 0.7)
        assert gen.logprobs == pytest.approx(expected, abs=1e-4)


def test_long_conversations_are_truncated_keeping_the_system_prompt(policy: LMPolicy,
                                                                     conversations: list[list[Message]]) -> None:
    long = conversations[2] + [{"role": "user", "content": "please hurry " * 40},
                               {"role": "assistant", "content": "One moment. " * 30},
                               {"role": "user", "content": "Where is my refund?"}]
    gen = policy.generate([long])[0]
    assert gen.truncated_prompt
    budget = policy.context - policy.generation.max_new_tokens
    assert len(gen.prompt_ids) == budget
    text = policy.tokenizer.decode(gen.prompt_ids)
    assert text.startswith("<|system|>" + long[0]["content"] + "<|end|>")
    assert text.endswith("Where is my refund?<|end|><|assistant|>")


def test_lora_adapter_loads_with_peft_and_with_lm_policy(tiny_model_dir: Path, tmp_path: Path,
                                                          conversations: list[list[Message]]) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)  # random B: the adapter changes the outputs
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    settings = GenerationSettings(max_new_tokens=12)
    direct = LMPolicy(peft_model, LMPolicy.from_pretrained(tiny_model_dir).tokenizer, settings).generate(conversations)
    loaded = LMPolicy.from_pretrained(tiny_model_dir, adapter_path=tmp_path / "adapter", generation=settings)
    assert loaded.name == "adapter"
    merged = loaded.generate(conversations)
    plain = LMPolicy.from_pretrained(tiny_model_dir, generation=settings).generate(conversations)
    assert [g.response_ids for g in merged] == [g.response_ids for g in direct]
    for a, b in zip(merged, direct, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert [g.logprobs[0] for g in merged] != pytest.approx([g.logprobs[0] for g in plain], abs=1e-3)

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "adapter").rename(run / "adapter")
    (run / "run.json").write_text(json.dumps({"method": "sft", "base_model": str(tiny_model_dir),
                                              "adapter": "adapter", "config": {"temperature": 0.5}}))
    from_run = LMPolicy.from_run_dir(run, decoding="sampled")
    assert from_run.name == "run" and from_run.generation.do_sample and from_run.generation.temperature == 0.5
    greedy = LMPolicy.from_run_dir(run, decoding="greedy").with_settings(max_new_tokens=12)
    assert [g.response_ids for g in greedy.generate(conversations)] == [g.response_ids for g in merged]


def test_saved_adapters_list_their_targets_in_a_stable_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from dialogrl.agents.lora import lora_config, save_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    save_adapter(get_peft_model(base, lora_config(base, "all-linear", r=2, alpha=4)), tmp_path / "adapter")
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) >= 5 and targets == sorted(targets)  # PEFT wrote its set in hash order
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert isinstance(PeftModel.from_pretrained(fresh, tmp_path / "adapter"), PeftModel)


def test_corrupt_weights_fail_in_one_line_naming_the_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\xff" * 64)  # was a SafetensorError traceback
    with pytest.raises(DialogRLError, match=f"^cannot load a model from '{tmp_path / 'adapter'}': ") as err:
        LMPolicy.from_pretrained(tiny_model_dir, adapter_path=tmp_path / "adapter")
    assert "\n" not in str(err.value)


def test_model_mode_is_restored(policy: LMPolicy, conversations: list[list[Message]]) -> None:
    policy.model.train()
    try:
        policy.generate(conversations[:1])
        assert policy.model.training
    finally:
        policy.model.eval()


def test_missing_paths_raise_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(DialogRLError, match="no such local directory.*never downloaded"):
        LMPolicy.from_pretrained(tmp_path / "nope")
    with pytest.raises(DialogRLError, match="no such local directory"):
        LMPolicy.from_pretrained("gpt2")  # a hub id: not fetched
    with pytest.raises(DialogRLError, match="adapter .*no such local directory"):
        LMPolicy.from_pretrained(tiny_model_dir, adapter_path=tmp_path / "missing")
    with pytest.raises(DialogRLError, match="no config.json"):
        LMPolicy.from_pretrained(tmp_path)
    with pytest.raises(DialogRLError, match="not a run directory"):
        LMPolicy.from_run_dir(tmp_path)
    with pytest.raises(DialogRLError, match="temperature"):
        GenerationSettings(temperature=0)
    with pytest.raises(DialogRLError, match="temperature=nan"):
        GenerationSettings(temperature=float("nan"))
    with pytest.raises(DialogRLError, match="^max_batch=0: must be at least 1$"):
        GenerationSettings(max_batch=0)
    run = tmp_path / "run"
    run.mkdir()
    for config, needle in (({"temperature": "hot"}, "config.temperature must be a number, got 'hot'"),
                           ({"max_new_tokens": 2.5}, "config.max_new_tokens must be a whole number, got 2.5")):
        (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "config": config}))
        with pytest.raises(DialogRLError, match=needle):  # before anything loads
            LMPolicy.from_run_dir(run, decoding="sampled")
