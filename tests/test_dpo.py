"""DPO from environment-ranked pairs: pair collection is valid and replayable, one round runs end to end with the
SFT policy as reference, and bad preference files fail with one line naming file and row."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from dialogrl.agents.dpo import DPOConfig, fit_prompt, main_dpo, train_dpo
from dialogrl.agents.preferences import Start, collect_pairs, play_from, reaches_margin, write_pairs
from dialogrl.data import load_preference_pairs
from dialogrl.evaluation import make_env, scenario_seeds
from dialogrl.policies.scripted import make_scripted
from dialogrl.types import DialogRLError


class Recording:
    """Wraps a policy and records the size of every act_batch call."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.name, self.calls = policy, "recording", []

    def act_batch(self, conversations: list, infos: list) -> list[str]:
        self.calls.append(len(conversations))
        return self.policy.act_batch(conversations, infos)


def test_collected_pairs_are_valid_replayable_and_load_back(tmp_path: Path) -> None:
    env_fn = lambda: make_env("dialogrl/CustomerService-v0", split="train", max_turns=8)  # noqa: E731
    proposers = [make_scripted("expert"), make_scripted("random", 1), make_scripted("random", 2),
                 make_scripted("noisy", 3)]
    sampler = Recording(make_scripted("random", 4))  # one object listed twice: its requests come in one call
    seeds = scenario_seeds(5, 16)
    pairs, stats = collect_pairs(env_fn, seeds, make_scripted("historical"), proposers + [sampler, sampler],
                                 make_scripted("expert"), states_per_episode=2, margin=0.2, seed=0)
    assert stats.episodes == 16 and stats.states > 16
    assert sampler.calls == [2 * stats.states]
    assert pairs and stats.pairs == len(pairs)
    for p in pairs:
        assert p["return_margin"] >= 0.2
        assert math.isclose(p["chosen_return"] - p["rejected_return"], p["return_margin"])
        assert p["chosen"] != p["rejected"]
        assert p["prompt"][-1]["role"] in ("user", "tool")  # the state ends where the agent must answer
        assert p["scenario_seed"] in seeds
    # The environment is deterministic: replaying the prefix and the chosen reply, then the same continuation,
    # earns exactly the recorded return.
    for p in pairs[:5]:
        prefix = [m["content"] for m in p["prompt"] if m["role"] == "assistant"]
        for key, expected in (("chosen", p["chosen_return"]), ("rejected", p["rejected_return"])):
            start = Start(p["scenario_seed"], prefix + [p[key][0]["content"]], len(prefix))
            (outcome,) = play_from(env_fn, [start], make_scripted("expert"))
            assert math.isclose(outcome.score, expected, abs_tol=1e-9)
    path = write_pairs(pairs, tmp_path / "pairs.jsonl")
    loaded = load_preference_pairs(path, system_prompt=None)
    assert len(loaded) == len(pairs)
    assert [r["prompt"] for r in loaded] == [p["prompt"] for p in pairs]
    assert [r["chosen"] for r in loaded] == [p["chosen"] for p in pairs]


def test_all_pairs_per_state_adds_every_pair_that_reaches_the_margin() -> None:
    env_fn = lambda: make_env("dialogrl/CustomerService-v0", split="train", max_turns=8)  # noqa: E731
    proposers = [make_scripted("expert"), make_scripted("random", 1), make_scripted("random", 2),
                 make_scripted("noisy", 3)]
    kwargs = dict(states_per_episode=2, margin=0.2, seed=0)
    one, _ = collect_pairs(env_fn, scenario_seeds(5, 16), make_scripted("historical"), proposers,
                           make_scripted("expert"), **kwargs)
    every, stats = collect_pairs(env_fn, scenario_seeds(5, 16), make_scripted("historical"), proposers,
                                 make_scripted("expert"), pairs_per_state="all", **kwargs)
    key = lambda p: (p["scenario_seed"], p["turn"], p["chosen"][0]["content"], p["rejected"][0]["content"])  # noqa: E731
    assert {key(p) for p in one} < {key(p) for p in every}  # the best/worst pairs, and more
    assert stats.pairs == len(every)
    by_state: dict[tuple, list[dict]] = {}
    for p in every:
        assert p["return_margin"] >= 0.2 and p["chosen_return"] > p["rejected_return"]
        by_state.setdefault((p["scenario_seed"], p["turn"]), []).append(p)
    assert max(len(v) for v in by_state.values()) > 1
    assert all(len(v) <= 6 for v in by_state.values())  # 4 candidates: at most 4 * 3 / 2 pairs
    with pytest.raises(DialogRLError, match="pairs_per_state=some: use one of best_worst, all"):
        collect_pairs(env_fn, [0], make_scripted("historical"), proposers, make_scripted("expert"),
                      pairs_per_state="some")


def test_fit_prompt_keeps_the_reply_and_drops_oldest_turns(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "system", "content": "short policy"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 4} for i in range(9)]
    answer = [[{"role": "assistant", "content": "ok [end]"}]]
    cut = fit_prompt(tok, prompt, answer, 120)
    assert cut is not None and cut[-1] == prompt[-1] and len(cut) < len(prompt)
    assert cut[0]["role"] == "system"
    text = tok.apply_chat_template(cut + answer[0], tokenize=False)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 120
    assert fit_prompt(tok, prompt, answer, 5) is None


@pytest.fixture()
def sft_adapter(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A stand-in SFT adapter with non-zero weights, so merging it changes the policy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    out = tmp_path / "sft_adapter"
    get_peft_model(model, lora).save_pretrained(out)
    return out


def test_one_dpo_round_end_to_end(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str,
                                  sft_adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dialogrl.policies.lm import LMPolicy

    out = tmp_path / "runs" / "dpo"
    overrides = [f"model={tiny_model_dir}", f"init_adapter={sft_adapter}", f"output_dir={out}", "rounds=1",
                 "scenarios_per_round=6", "states_per_episode=1", "candidates=3", "max_turns=2",
                 "max_new_tokens=16", f"rewards=[{brevity_reward}]", "intents=[order_status]", "margin=0.05",
                 "learning_rate=3e-3", "batch_size=4", "epochs=2", "eval_episodes=3", "method=dpo-brevity"]
    assert main_dpo(None, overrides) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["dpo"]  # no temp dir left behind
    run = json.loads((out / "run.json").read_text())
    assert json.loads((out / "eval.json").read_text())["method"] == "dpo-brevity"  # a variant keeps its own name
    assert run["method"] == "dpo-brevity" and run["base_model"] == "base" and run["adapter"] == "adapter"
    (row,) = run["history"]
    assert row["pairs_kept"] > 0 and row["pairs_trained"] > 0 and row["margin_min"] >= 0.05
    assert 0.0 <= row["on_policy_success"] <= 1.0
    # Before the first update the policy is the merged SFT model and so is the reference: loss = log 2.
    assert math.isclose(row["dpo_loss_first"], math.log(2), abs_tol=1e-4)
    assert row["dpo_loss_last"] < row["dpo_loss_first"]
    pairs = load_preference_pairs(out / "pairs" / "round_0.jsonl", system_prompt=None)
    assert len(pairs) == row["pairs_kept"] and run["pairs_files"] == ["pairs/round_0.jsonl"]
    assert (out / "config.yaml").is_file() and json.loads((out / "eval.json").read_text())["episodes"] == 3
    assert (out / "eval_sampled.json").is_file()

    # The adapter reloads on the saved merged base, and it changed the policy.
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert not torch.allclose(before, tuned)
    assert LMPolicy.from_run_dir(out).generate([pairs[0]["prompt"]])[0].response_ids


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": [{"role": "user", "content": "Where is my order A10001?"}],
        "chosen": [{"role": "assistant", "content": "[lookup_order order=A10001]"}],
        "rejected": [{"role": "assistant", "content": "No idea."}]}


@pytest.mark.parametrize("bad, message", [
    ({k: v for k, v in GOOD.items() if k != "chosen"}, "no 'chosen' field"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "'chosen' and 'rejected' are identical"),
    ({**GOOD, "prompt": []}, "'prompt' must be a non-empty list"),
])
def test_bad_preference_file_fails_naming_file_and_row(tiny_model_dir: Path, tmp_path: Path, bad: dict,
                                                       message: str) -> None:
    path = _write(tmp_path / "prefs.jsonl", [GOOD, bad])
    out = tmp_path / "runs" / "dpo"
    with pytest.raises(DialogRLError) as err:
        train_dpo(DPOConfig(model=str(tiny_model_dir), preference_file=str(path), rounds=0, output_dir=str(out)))
    text = str(err.value)
    assert f"{path} row 2" in text and message in text and "\n" not in text
    assert not out.parent.exists() or not os.listdir(out.parent)  # nothing half-written


@pytest.mark.parametrize(("overrides", "needle"), [
    (["loss_type=bogus"], "loss_type=bogus: not a TRL DPO loss; use one of sigmoid, hinge, ipo, "),
    (["loss_type=exo_pair"], "loss_type=exo_pair: needs label_smoothing > 0"),
    (["beta=nan"], "beta=nan: must be a finite number > 0"),
    (["beta=0"], "beta=0.0: must be a finite number > 0"),
    (["learning_rate=nan"], "learning_rate=nan: must be a finite number > 0"),
    (["learning_rate=.inf"], "learning_rate=inf"),
    (["lora_r=0"], "lora_r=0: must be at least 1"),
    (["lora_alpha=-8"], "lora_alpha=-8: must be a finite number > 0"),
    (["margin=nan"], "margin=nan: must be a finite number >= 0"),
    (["pairs_per_state=most"], "pairs_per_state=most: use one of best_worst, all"),
    (["eval_episodes=-1"], "eval_episodes=-1: must be at least 0"),
    (["eval_seed=-1"], "eval_seed=-1: must be a seed in [0, 4294967295]"),  # was found only after training
    (["seed=4294967296"], "seed=4294967296: must be a seed"),
    (["env_id=dialogrl/CustomerServiceActs-v0"], "env_id=dialogrl/CustomerServiceActs-v0: takes dialogue acts, not "
                                                 "text replies"),  # was a traceback from inside the env
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    out = tmp_path / "runs" / "dpo"
    with pytest.raises(DialogRLError) as err:
        main_dpo(None, [f"output_dir={out}", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists()


@pytest.mark.parametrize(("case", "needle"), [
    ("config_without_model_type", "model_type"),
    ("run_dir_as_model", "a run directory, not a base model; start from it with init_adapter="),
    ("run_json_not_json", "run.json: unreadable"),
    ("run_json_without_base_model", "without 'base_model'"),
    ("adapter_without_peft_type", "no peft_type"),
    ("bogus_targets", "lora_target_modules=[bogus]: matches no module of the model; its layers include q_proj"),
])
def test_broken_start_fails_before_writing(tiny_model_dir: Path, tmp_path: Path, case: str, needle: str) -> None:
    bad = tmp_path / case
    bad.mkdir()
    fields: dict[str, Any] = {"model": str(bad)}
    if case == "config_without_model_type":
        (bad / "config.json").write_text("{}")
    elif case == "bogus_targets":
        fields = {"model": str(tiny_model_dir), "lora_target_modules": ["bogus"]}
    else:
        run = {"run_json_not_json": "{oops", "run_json_without_base_model": "{}"}.get(
            case, json.dumps({"method": "sft", "base_model": str(tiny_model_dir)}))
        (bad / "run.json").write_text(run)
        (bad / "adapter").mkdir()
        (bad / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))  # no peft_type
        if case != "run_dir_as_model":
            fields = {"model": str(tiny_model_dir), "init_adapter": str(bad)}
    out = tmp_path / "runs" / "dpo"
    with pytest.raises(DialogRLError) as err:
        train_dpo(DPOConfig(output_dir=str(out), eval_episodes=0, **fields))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists()


def test_offline_dpo_from_a_preference_file(tiny_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import dialogrl.agents.dpo as dpo

    trained_prompts: list[list[dict]] = []
    train_round = dpo._train_round

    def spy(cfg: DPOConfig, start_dir: Path, tokenizer: object, rows: list[dict], *args: object, **kw: object):
        trained_prompts.extend(row["prompt"] for row in rows)
        return train_round(cfg, start_dir, tokenizer, rows, *args, **kw)

    monkeypatch.setattr(dpo, "_train_round", spy)
    rows = [{**GOOD, "prompt": [{"role": "user", "content": f"Where is my order A1000{i}?"}],
             "chosen": f"Let me check. [lookup_order order=A1000{i}]"} for i in range(6)]
    rows[0]["prompt"] = [{"role": "system", "content": "Mine."}, *rows[0]["prompt"]]
    out = train_dpo(DPOConfig(model=str(tiny_model_dir), preference_file=str(_write(tmp_path / "p.jsonl", rows)),
                              rounds=0, output_dir=str(tmp_path / "offline"), learning_rate=3e-3, batch_size=3,
                              eval_episodes=0, system_prompt="Act in square brackets."))
    # prompts without a system prompt get the configured one; a file's own is kept
    assert [p[0]["content"] for p in trained_prompts] == ["Mine."] + ["Act in square brackets."] * 5
    run = json.loads((out / "run.json").read_text())
    (row,) = run["history"]
    assert row["round"] == "file" and row["pairs_trained"] == 6
    assert run["base_model"] == str(tiny_model_dir.resolve())  # no SFT adapter: the base itself is the reference
    assert row["dpo_accuracy_last"] > 0.5


def test_a_gap_of_exactly_the_margin_makes_a_pair_and_a_tie_never_does() -> None:
    assert 0.7 - 0.45 < 0.25  # float rounding: one invalid action's penalty, a hair short
    assert reaches_margin(0.7, 0.45, 0.25)
    assert not reaches_margin(0.7, 0.46, 0.25)
    assert not reaches_margin(0.5, 0.5, 0.0)  # margin=0 still needs one reply to be better
    assert reaches_margin(0.5, 0.4, 0.0)
