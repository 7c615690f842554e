"""Evaluating LM policies: KL to the reference (adapter disabled) in eval JSON and reports; seeded sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from dialogrl.policies.lm import GenerationSettings, LMPolicy
from dialogrl.types import Message


def _adapter(tiny_model_dir: Path, out: Path, random_b: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=not random_b)
    get_peft_model(base, lora).save_pretrained(out)
    return out


def _token_by_token(policy: LMPolicy, reference: LMPolicy, conversation: list[Message]) -> float:
    """The KL summed over reply tokens, one forward pass per token (the slow, obvious way), mean per reply."""
    import torch

    enc = policy.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    total = 0.0
    for pos in range(1, len(ids)):
        if mask[pos]:
            with torch.no_grad():
                p = torch.log_softmax(policy.model(torch.tensor([ids[:pos]])).logits[0, -1], -1)
                q = torch.log_softmax(reference.model(torch.tensor([ids[:pos]])).logits[0, -1], -1)
            total += float((p.exp() * (p - q)).sum())
    replies = sum(1 for m in conversation if m["role"] == "assistant")
    return total / replies


def test_kl_to_reference(tiny_model_dir: Path, tmp_path: Path, make_corpus) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    conversations = [conv[:5] for conv in make_corpus(4, seed=3)]
    assert all(sum(m["role"] == "assistant" for m in c) >= 2 for c in conversations)
    plain = LMPolicy.from_pretrained(tiny_model_dir)
    assert plain.kl_to_reference(conversations) is None  # no adapter, no reference

    # A freshly initialised LoRA adapter (B = 0) leaves the model unchanged: KL 0.
    fresh = LMPolicy.from_pretrained(tiny_model_dir, adapter_path=_adapter(tiny_model_dir, tmp_path / "zero", False))
    assert fresh.kl_to_reference(conversations) == pytest.approx(0.0, abs=1e-6)

    # A random adapter: merged (reference loaded from the base directory) and unmerged (adapter disabled) agree,
    # and both equal the token-by-token computation.
    random_dir = _adapter(tiny_model_dir, tmp_path / "random", True)
    merged = LMPolicy.from_pretrained(tiny_model_dir, adapter_path=random_dir)
    kl = merged.kl_to_reference(conversations)
    assert kl is not None and kl > 1e-3
    unmerged = LMPolicy(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), random_dir),
                        plain.tokenizer)
    assert unmerged.kl_to_reference(conversations) == pytest.approx(kl, rel=1e-4)
    one_each = [_token_by_token(merged, plain, c) for c in conversations]
    replies = [sum(m["role"] == "assistant" for m in c) for c in conversations]
    assert kl == pytest.approx(sum(k * n for k, n in zip(one_each, replies, strict=True)) / sum(replies), rel=1e-4)

    # Conversations longer than the context: each reply is scored with the part of its past that fits.
    short = LMPolicy(merged.model, merged.tokenizer, GenerationSettings(), reference_dir=tiny_model_dir)
    short.context = 40
    clipped = short.kl_to_reference(conversations)
    assert clipped is not None and clipped > 0 and clipped != pytest.approx(kl, rel=1e-3)


def test_evaluation_and_report_show_kl(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialogrl.evaluation import evaluate, write_json
    from dialogrl.report import compare

    settings = GenerationSettings(max_new_tokens=8)
    policy = LMPolicy.from_pretrained(tiny_model_dir, adapter_path=_adapter(tiny_model_dir, tmp_path / "a", True),
                                      generation=settings)
    with_kl = evaluate(policy, episodes=4, seed=1, method="tuned", env_kwargs={"max_turns": 2})
    assert with_kl["metrics"]["kl_to_reference"] > 0 and all("messages" not in r for r in with_kl["records"])
    without = evaluate(LMPolicy.from_pretrained(tiny_model_dir, generation=settings), episodes=4, seed=1,
                       method="base", env_kwargs={"max_turns": 2})
    assert "kl_to_reference" not in without["metrics"]
    files = [write_json(with_kl, tmp_path / "tuned.json"), write_json(without, tmp_path / "base.json")]
    report = compare(files, "base", tmp_path / "report")
    assert report["methods"]["tuned"]["kl_to_reference"] == pytest.approx(with_kl["metrics"]["kl_to_reference"])
    table = (tmp_path / "report" / "report.md").read_text()
    assert f"{with_kl['metrics']['kl_to_reference']:.3f}" in table and "| turns |" in table


def test_sampled_evaluation_repeats_from_its_seed(tiny_model_dir: Path) -> None:
    import torch

    from dialogrl.evaluation import evaluate

    def sampled() -> list[tuple[bool, int, float]]:
        policy = LMPolicy.from_pretrained(tiny_model_dir, generation=GenerationSettings(do_sample=True,
                                                                                        max_new_tokens=8))
        torch.manual_seed(int(torch.randint(0, 10**6, ())))  # whatever the process did before
        result = evaluate(policy, episodes=4, seed=2, env_kwargs={"max_turns": 2})
        return [(r["success"], r["turns"], r["reply_chars"]) for r in result["records"]]

    assert sampled() == sampled()
