"""PPO's parts and short runs: GAE, KL estimators, the losses and how two processes weigh tokens; bad configs and
starts fail in one line; it learns a rewarded behaviour, on our base model and on a GPT-2. Whole runs (resuming
after a kill, the kept weights, torchrun) are tested in ``test_ppo_runs.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dialogrl.agents.ppo import KL_ESTIMATORS, PPOConfig, gae, main_ppo, train_ppo
from dialogrl.config import dump_config
from dialogrl.types import DialogRLError

pytestmark = pytest.mark.slow


def test_gae_matches_hand_computation() -> None:
    rewards, values = np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.6, 0.7])
    adv = gae(rewards, values, gamma=1.0, lam=1.0)  # lam=1: advantage = return - value
    assert np.allclose(adv, [1.0 - 0.5, 1.0 - 0.6, 1.0 - 0.7])
    adv0 = gae(rewards, values, gamma=1.0, lam=0.0)  # lam=0: one-step TD errors
    assert np.allclose(adv0, [0.6 - 0.5, 0.7 - 0.6, 1.0 - 0.7])


def test_leave_one_out_is_the_mean_return_of_the_other_plays() -> None:
    from dialogrl.agents.ppo import leave_one_out

    returns = {0: 1.0, 1: 2.0, 2: 1.0,  # customer 0, played three times
               3: 0.0, 4: 3.0}  # customer 1 (episode 5 missing: not on this process)
    assert leave_one_out(returns, group_size=3) == {0: 1.5, 1: 1.0, 2: 1.5, 3: 3.0, 4: 0.0}
    assert leave_one_out({7: 2.0}, group_size=2) == {7: 0.0}  # alone in its group: no baseline


@pytest.mark.parametrize("processes", [1, 2])
def test_iteration_seeds_give_each_process_whole_groups(processes: int) -> None:
    from dialogrl.agents.ppo import iteration_seeds
    from dialogrl.evaluation import scenario_seeds

    plain = PPOConfig(seed=3, episodes_per_iteration=8, minibatch_episodes=4, group_size=1)
    assert [iteration_seeds(plain, 5, r, processes) for r in range(processes)] == [
        scenario_seeds(3 * 7919 + 5, 8)[r::processes] for r in range(processes)]  # as before groups existed
    grouped = replace(plain, group_size=4)
    shares = [iteration_seeds(grouped, 5, r, processes) for r in range(processes)]
    customers = scenario_seeds(3 * 7919 + 5, 2)
    assert sorted(s for share in shares for s in share) == sorted(customers * 4)
    for share in shares:
        assert all(len(set(share[g:g + 4])) == 1 for g in range(0, len(share), 4))


def test_kl_estimators_are_unbiased_and_k3_never_negative() -> None:
    p, ref = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
    tokens = np.random.default_rng(0).choice(3, 200_000, p=p)  # sampled from the policy, as in rollouts
    log_ratio = np.log(p[tokens]) - np.log(ref[tokens])
    exact = float((p * np.log(p / ref)).sum())
    for name, estimate in KL_ESTIMATORS.items():
        assert estimate(log_ratio).mean() == pytest.approx(exact, rel=0.02), name
    assert (KL_ESTIMATORS["k1"](log_ratio) < 0).any() and (KL_ESTIMATORS["k3"](log_ratio) >= 0).all()


@pytest.mark.parametrize(("overrides", "needle"), [
    (["minibatch_episodes=0"], "minibatch_episodes=0: must be at least 1"),  # was a ZeroDivisionError
    (["checkpoint_every=0"], "checkpoint_every=0: must be at least 1"),  # ZeroDivisionError after an iteration
    (["env_batch=0"], "env_batch=0: must be at least 1"),  # IndexError
    (["episodes_per_iteration=0"], "episodes_per_iteration=0: must be at least 1"),
    (["ppo_epochs=0"], "ppo_epochs=0: must be at least 1"),  # NaN losses, exit 0
    (["iterations=0"], "iterations=0: must be at least 1"),
    (["max_turns=0"], "max_turns=0: must be at least 1"),
    (["eval_episodes=-1"], "eval_episodes=-1: must be at least 0"),  # failed only after training
    (["max_new_tokens=0"], "max_new_tokens=0: must be at least 1"),  # named max_batch, after the model loaded
    (["temperature=0"], "temperature=0.0: must be a finite number > 0"),
    (["temperature=nan"], "temperature=nan"),
    (["learning_rate=nan"], "learning_rate=nan: must be a finite number > 0"),
    (["learning_rate=.inf"], "learning_rate=inf"),
    (["learning_rate=-1e-3"], "learning_rate=-0.001"),
    (["lora_r=0"], "lora_r=0: must be at least 1"),
    (["lora_alpha=0"], "lora_alpha=0: must be a finite number > 0"),
    (["kl_coef=-0.1"], "kl_coef=-0.1: must be a finite number >= 0"),
    (["kl_coef=nan"], "kl_coef=nan"),
    (["clip_range=-0.2"], "clip_range=-0.2"),
    (["value_clip=.inf"], "value_clip=inf"),
    (["value_clip=0"], "value_clip=0.0: must be a finite number > 0"),
    (["vf_coef=-1"], "vf_coef=-1.0"),
    (["adaptive_kl=true", "target_kl=0"], "target_kl=0.0: must be a finite number > 0"),
    (["kl_estimator=k2"], "kl_estimator=k2: use one of k1, k3"),
    (["max_update_kl=0"], "max_update_kl=0.0: must be a finite number > 0"),
    (["max_grad_norm=0"], "max_grad_norm=0.0"),
    (["gamma=1.5"], "gamma=1.5: must be a finite number in [0, 1]"),
    (["minibatch_episodes=5"], "minibatch_episodes=5: must divide episodes_per_iteration=64"),
    (["group_size=0"], "group_size=0: must be at least 1"),
    (["group_size=3"], "group_size=3: must divide episodes_per_iteration=64"),
    (["group_size=4", "gamma=0.9"], "gamma=0.9: group_size > 1 compares each token's return-to-go"),
    (["keep=first"], "keep=first: use one of last, average, best"),
    (["average_last=0"], "average_last=0: must be at least 1"),
    (["validation_episodes=0"], "validation_episodes=0: must be at least 1"),
    (["validate_every=0"], "validate_every=0: must be at least 1"),
    (["clip_range=0"], "clip_range=0.0: must be a finite number > 0"),
    (["seed=-1"], "seed=-1: must be a seed in [0, 4294967295]"),
    (["eval_seed=-1"], "eval_seed=-1: must be a seed"),  # was found only after training
    (["validation_seed=-1"], "validation_seed=-1: must be a seed"),
    (["env_id=dialogrl/CustomerServiceActs-v0"], "env_id=dialogrl/CustomerServiceActs-v0: takes dialogue acts, not "
                                                 "text replies"),  # was a traceback from inside the env
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    from dialogrl.agents.ppo import main_ppo

    out = tmp_path / "run"
    with pytest.raises(DialogRLError) as err:
        main_ppo(None, [f"output_dir={out}", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def _broken_start(tmp_path: Path, model: Path, case: str) -> dict[str, object]:
    """PPOConfig/DPOConfig fields that point the start weights at something broken."""
    bad = tmp_path / case
    bad.mkdir()
    if case == "empty_model":
        return {"model": str(bad)}
    if case == "config_without_model_type":
        (bad / "config.json").write_text("{}")
        return {"model": str(bad)}
    if case == "run_dir_as_model":
        (bad / "run.json").write_text(json.dumps({"method": "sft", "base_model": str(model)}))
        return {"model": str(bad)}
    if case == "bogus_targets":
        return {"model": str(model), "lora_target_modules": ["bogus"]}
    if case == "reply_longer_than_context":
        return {"model": str(model), "max_new_tokens": 10_000}
    run = {"run_json_not_json": "{oops", "run_json_without_base_model": "{}"}.get(
        case, json.dumps({"method": "sft", "base_model": str(model), "adapter": "adapter"}))
    (bad / "run.json").write_text(run)
    if case == "adapter_without_peft_type":
        (bad / "adapter").mkdir()
        (bad / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return {"model": str(model), "init_adapter": str(bad)}


BROKEN_STARTS = [
    ("empty_model", "no config.json"),
    ("config_without_model_type", "model_type"),
    ("run_dir_as_model", "a run directory, not a base model; start from it with init_adapter="),
    ("run_json_not_json", "run.json: unreadable"),
    ("run_json_without_base_model", "without 'base_model'"),
    ("no_adapter", "/adapter': no such local directory"),
    ("adapter_without_peft_type", "no peft_type"),
    ("bogus_targets", "lora_target_modules=[bogus]: matches no module of the model; its layers include q_proj"),
    ("reply_longer_than_context", "max_new_tokens=10000: leaves no room for the prompt"),
]


@pytest.mark.parametrize(("case", "needle"), BROKEN_STARTS)
def test_broken_start_fails_before_writing(tiny_model_dir: Path, tmp_path: Path, case: str, needle: str) -> None:
    out = tmp_path / "runs" / "ppo"
    cfg = PPOConfig(**{"output_dir": str(out), "eval_episodes": 0, **_broken_start(tmp_path, tiny_model_dir, case)})
    with pytest.raises(DialogRLError) as err:
        train_ppo(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)
    if case.startswith(("run_json", "no_adapter", "adapter")):
        assert str(err.value).startswith(f"init_adapter={cfg.init_adapter}: ")
    assert not out.parent.exists()


def test_start_check_leaves_the_random_state_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialogrl.agents.ppo_model import check_start

    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    check_start(PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run")))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("group_size", [1, 4])  # GAE on the value head; the leave-one-out baseline
def test_ppo_learns_a_rewarded_behaviour(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str,
        ppo_config: Callable[..., PPOConfig], group_size: int) -> None:
    run = train_ppo(ppo_config(tiny_model_dir, tmp_path / "run", brevity_reward, group_size=group_size))
    history = json.loads((run / "run.json").read_text())["history"]
    first = history[0]["reply_tokens"]
    last = float(np.mean([h["reply_tokens"] for h in history[-2:]]))
    # An untuned tiny model replies with ~12 tokens; the loss must shorten them markedly (no update: ~12 +- 1).
    assert last < 0.75 * first, [round(h["reply_tokens"], 1) for h in history]
    assert np.mean([h["return"] for h in history[-2:]]) > history[0]["return"]


def test_ppo_trains_a_gpt2_and_its_adapter_reloads(tiny_gpt2_dir: Path, tmp_path: Path, brevity_reward: str,
        ppo_config: Callable[..., PPOConfig]) -> None:
    """A user's GPT-2 (learned positions, Conv1D layers that LoRA must treat as fan-in-fan-out) as the start."""
    from dialogrl.policies.lm import LMPolicy

    run = train_ppo(ppo_config(tiny_gpt2_dir, tmp_path / "run", brevity_reward, iterations=2, max_new_tokens=8,
                            kl_coef=0.05))
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["updates"] for h in history] == [4, 4]
    assert history[1]["kl"] > 0  # the first update moved the policy off its start (the adapter-disabled reference)
    reply = LMPolicy.from_run_dir(run).generate([[{"role": "user", "content": "where is my order?"}]])[0]
    assert 0 < len(reply.response_ids) <= 8


def test_your_own_scenario_file_is_trained_and_evaluated_on(tiny_model_dir: Path, tmp_path: Path,
                                                             brevity_reward: str,
        ppo_config: Callable[..., PPOConfig]) -> None:
    """``scenario_files`` + ``intents``: PPO plays the user's intent in training, and the run's own held-out
    evaluation plays it on the test split (the training env's tasks, not the built-in mix)."""
    custom = Path(__file__).parent / "fixtures" / "damaged_item.yaml"
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", brevity_reward, iterations=1, scenario_files=[str(custom)],
                  intents=["damaged_item"])
    env = cfg.env_factory()()
    assert env.reset(seed=3)[1]["scenario"]["intent"] == "damaged_item"
    run = main_ppo(str(dump_config(cfg, tmp_path / "ppo.yaml")), ["eval_episodes=3"])
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["split"] == "test" and {r["intent"] for r in evaluation["records"]} == {"damaged_item"}
    assert yaml.safe_load((run / "config.yaml").read_text())["scenario_files"] == [str(custom)]
    with pytest.raises(DialogRLError, match="no-such.yaml"):
        ppo_config(tiny_model_dir, tmp_path / "bad", brevity_reward, scenario_files=["no-such.yaml"]).env_factory()


def test_max_update_kl_stops_an_iterations_updates(tiny_model_dir: Path, tmp_path: Path,
                                                    brevity_reward: str, ppo_config: Callable[..., PPOConfig]) -> None:
    free = train_ppo(ppo_config(tiny_model_dir, tmp_path / "free", brevity_reward, iterations=2, learning_rate=5e-2))
    free_rows = json.loads((free / "run.json").read_text())["history"]
    assert [r["updates"] for r in free_rows] == [4, 4]  # 2 epochs x 2 minibatches
    # The first minibatch of an iteration is scored by the policy that collected it (approximate KL ~0): it
    # steps; with this learning rate the next one is far from it, so the iteration stops there.
    capped = train_ppo(ppo_config(tiny_model_dir, tmp_path / "capped", brevity_reward, iterations=2,
                               learning_rate=5e-2, max_update_kl=1e-4))
    rows = json.loads((capped / "run.json").read_text())["history"]
    assert [r["updates"] for r in rows] == [1, 1], rows
    assert max(r["approx_kl"] for r in free_rows) > 1e-4  # the cap did bind
    assert rows[0]["return"] == free_rows[0]["return"]  # the same first collection: only the updates differ



def test_one_forward_per_episode_matches_one_per_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialogrl.agents.ppo_model import build_policy, forward_samples, shared_sequences
    from dialogrl.agents.rollouts import TurnSample

    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path))
    torch.manual_seed(0)
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)  # non-zero values, so their slicing is checked too
    module.eval()
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return rng.integers(10, 300, n).tolist()

    p0, r0 = ids(20), ids(5)
    p1, r1 = p0 + r0 + ids(7), ids(6)
    p2, r2 = ids(30), ids(4)  # a truncated prompt: not an extension of turn 1, so a pass of its own
    samples = [TurnSample(0, 0, p0, r0, 0.0, False), TurnSample(0, 1, p1, r1, 0.0, False),
               TurnSample(0, 2, p2, r2, 1.0, True), TurnSample(1, 0, ids(12), ids(3), 1.0, True)]
    sequences, where = shared_sequences(samples)
    assert len(sequences) == 3 and where[0][0] == where[1][0] != where[2][0]
    shared_logp, shared_v, shared_h = forward_samples(module, samples, 1.0)
    for i, sample in enumerate(samples):
        alone_logp, alone_v, _ = forward_samples(module, [sample], 1.0)
        assert len(shared_logp[i]) == len(sample.response_ids)
        assert torch.allclose(shared_logp[i], alone_logp[0], atol=1e-5)
        assert torch.allclose(shared_v[i], alone_v[0], atol=1e-5)
    grad_logp, _, _ = forward_samples(module, samples, 1.0, grad=True)
    assert all(torch.allclose(g.detach(), s, atol=1e-5) for g, s in zip(grad_logp, shared_logp, strict=True))
    assert shared_h > 0



class _Ranks:
    """Enough of an ``accelerate.Accelerator`` to play one of ``n`` data-parallel processes in one process: its
    reductions see ``others`` (the other processes' contributions) added, as an all-reduce would."""

    def __init__(self, n: int, others: float = 0.0) -> None:
        self.num_processes, self.others = n, others

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor + self.others

    def no_sync(self, module: torch.nn.Module) -> object:
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def test_two_processes_weigh_every_token_as_one_process_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """DDP averages the processes' gradients, so splitting a minibatch over two processes must give one
    process's gradient even when their shares hold different numbers of tokens."""
    from dialogrl.agents.ppo import Prepared, ppo_backward
    from dialogrl.agents.ppo_model import build_policy
    from dialogrl.agents.rollouts import TurnSample

    torch.manual_seed(0)
    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path))
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)
    rng = np.random.default_rng(0)
    lengths = [2, 3, 9, 14]  # reply tokens per episode: rank 0 gets 5, rank 1 gets 23
    samples = [TurnSample(e, 0, rng.integers(10, 300, 12).tolist(), rng.integers(10, 300, n).tolist(), 1.0, True)
               for e, n in enumerate(lengths)]

    def noise(n: int, scale: float) -> torch.Tensor:
        return torch.tensor(rng.normal(0, scale, n), dtype=torch.float32)

    data = Prepared(samples, [noise(n, 1.0) - 3 for n in lengths], [noise(n, 0.5) for n in lengths],
                    [noise(n, 1.0) for n in lengths], [noise(n, 1.0) for n in lengths], kl=0.0, entropy=0.0)

    def gradient(parts: list[tuple[list[int], _Ranks]]) -> torch.Tensor:
        module.zero_grad()
        for idx, ranks in parts:
            ppo_backward(module, data, idx, cfg, ranks)  # type: ignore[arg-type]
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        return torch.cat(grads) / parts[0][1].num_processes  # DDP's mean over the processes

    one = gradient([([0, 1, 2, 3], _Ranks(1))])
    two = gradient([([0, 1], _Ranks(2, others=23.0)), ([2, 3], _Ranks(2, others=5.0))])
    assert one.abs().sum() > 0
    assert torch.allclose(one, two, atol=1e-6, rtol=1e-4)


def test_value_clip_null_lets_the_value_head_follow_returns_far_away(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With returns far from the old values, the clipped value loss stops the value head once it has moved
    value_clip from them; value_clip=None never does."""
    from dialogrl.agents.ppo import Prepared, _chunk_losses
    from dialogrl.agents.ppo_model import build_policy, forward_samples
    from dialogrl.agents.rollouts import TurnSample

    torch.manual_seed(0)
    module, _ = build_policy(PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path)), tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)
    module.eval()
    rng = np.random.default_rng(0)
    samples = [TurnSample(0, 0, rng.integers(10, 300, 12).tolist(), rng.integers(10, 300, 6).tolist(), 1.0, True)]
    logp, values, _ = forward_samples(module, samples, 1.0)
    # the old values sit 1 above the current ones and the returns 5 below: past the clip, on the far side
    data = Prepared(samples, logp, [values[0] + 1.0], [torch.zeros(6)], [values[0] - 5.0], kl=0.0, entropy=0.0)
    grads = {}
    for clip in (0.2, None):
        module.zero_grad()
        cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), value_clip=clip)
        _chunk_losses(module, data, [0], cfg, 6.0)[1].backward()
        grads[clip] = module.value_head.weight.grad.abs().sum()
    assert grads[0.2] == 0 and grads[None] > 0


@pytest.mark.parametrize("detach", [False, True])
def test_value_detach_keeps_the_value_loss_out_of_the_policy(tiny_model_dir: Path, tmp_path: Path,
                                                             detach: bool) -> None:
    from dialogrl.agents.ppo import Prepared, _chunk_losses
    from dialogrl.agents.ppo_model import build_policy
    from dialogrl.agents.rollouts import TurnSample

    torch.manual_seed(0)
    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), value_detach=detach)
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)
    rng = np.random.default_rng(0)
    samples = [TurnSample(0, 0, rng.integers(10, 300, 12).tolist(), rng.integers(10, 300, 6).tolist(), 1.0, True)]
    data = Prepared(samples, [torch.zeros(6)], [torch.zeros(6)], [torch.zeros(6)], [torch.full((6,), 3.0)],
                    kl=0.0, entropy=0.0)
    _chunk_losses(module, data, [0], cfg, 6.0)[1].backward()  # the value loss alone
    lora = [p.grad for name, p in module.named_parameters() if "lora_" in name]
    assert module.value_head.weight.grad.abs().sum() > 0
    assert all(g is None or not g.any() for g in lora) == detach


def test_group_size_advantages_are_leave_one_out_and_the_value_head_is_not_trained(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from dialogrl.agents.ppo import ppo_backward, prepare
    from dialogrl.agents.ppo_model import build_policy
    from dialogrl.agents.rollouts import RolloutBatch, TurnSample

    torch.manual_seed(0)
    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), group_size=2)
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)  # values that vary per token: GAE's would vary with them
    rng = np.random.default_rng(0)
    # Two customers played twice each: returns 1 and 0, then 0.5 and 0.5; three reply tokens per episode.
    samples = [TurnSample(e, 0, rng.integers(10, 300, 8).tolist(), rng.integers(10, 300, 3).tolist(), r, True)
               for e, r in enumerate([1.0, 0.0, 0.5, 0.5])]
    data = prepare(module, RolloutBatch(samples, [{}] * 4), cfg, 0.0, _Ranks(1))
    adv = [a.numpy() for a in data.advantages]  # whitened: leave-one-out gives +1, -1, 0, 0 before
    assert np.allclose(adv[0], adv[0][0]) and adv[0][0] > 0 and np.allclose(adv[1], -adv[0])
    assert np.allclose(adv[2], 0, atol=1e-6) and np.allclose(adv[3], 0, atol=1e-6)
    gae_data = prepare(module, RolloutBatch(samples, [{}] * 4), replace(cfg, group_size=1), 0.0, _Ranks(1))
    assert not np.allclose(gae_data.advantages[0].numpy(), gae_data.advantages[0][0].item())  # the other path

    module.train()
    for group_size, trained in ((2, False), (1, True)):
        module.zero_grad()
        ppo_backward(module, data, [0, 1], replace(cfg, group_size=group_size), _Ranks(1))
        assert bool(module.value_head.weight.grad.abs().sum() > 0) == trained


def test_processes_take_whole_minibatches_and_groups() -> None:
    from dialogrl.agents.ppo import check_process_split

    check_process_split(PPOConfig(episodes_per_iteration=64, group_size=4), 2)  # 16 customers: 8 each
    with pytest.raises(DialogRLError, match="group_size=64: gives 1 customers per iteration, which do not split "
                                            "evenly over 2 processes"):
        check_process_split(PPOConfig(episodes_per_iteration=64, group_size=64), 2)
    with pytest.raises(DialogRLError, match="group_size=16: gives 3 customers"):  # 32 and 16 episodes: a hang
        check_process_split(PPOConfig(episodes_per_iteration=48, group_size=16), 2)
    with pytest.raises(DialogRLError, match="minibatch_episodes=3: must be a multiple of the process count 2"):
        check_process_split(PPOConfig(episodes_per_iteration=63, minibatch_episodes=3, group_size=1), 2)
