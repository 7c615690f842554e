"""The PPO policy module: a LoRA-adapted causal LM with a value head, its token-level forward, and saving."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dialogrl.agents.lora import lora_config, save_adapter
from dialogrl.rewards.reward_model import ENV_PATHS
from dialogrl.types import DialogRLError

if TYPE_CHECKING:
    from dialogrl.agents.ppo_config import PPOConfig
    from dialogrl.agents.rollouts import TurnSample

FORWARD_CHUNK = 16
"""Sequences per no-grad forward pass, and episodes per backward part (bounds the memory of the logits)."""


class PolicyWithValue(nn.Module):
    """The LoRA policy and a linear value head on its last hidden state (one module, so DDP sees both)."""

    def __init__(self, policy: nn.Module, hidden_size: int, pad_id: int, detach_values: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.pad_id = pad_id
        self.detach_values = detach_values  # the value loss then trains the value head only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_values)
        values = None
        if with_values:
            hidden = out.hidden_states[-1]
            values = self.value_head(hidden.detach() if self.detach_values else hidden).squeeze(-1)
        return out.logits, values

    def sampler(self, tokenizer: Any, cfg: PPOConfig) -> Any:
        """An LMPolicy view of the current weights, sampling as configured, for rollouts."""
        from dialogrl.policies.lm import GenerationSettings, LMPolicy

        settings = GenerationSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, do_sample=True)
        return LMPolicy(self.policy, tokenizer, settings, name="ppo")


def shared_sequences(samples: list[TurnSample]) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """The token sequences to run and, per sample, (sequence, begin, end): its reply tokens are predicted at
    positions ``begin:end`` of that sequence.

    A turn's prompt starts with the previous turn's prompt and reply, so one forward pass over an episode's last
    turn yields the log-probs of every earlier turn too (a causal model's outputs at a position do not depend on
    later tokens). Turns whose tokens are not a prefix of a later turn's (a truncated prompt, a reply that
    re-tokenized differently) get their own sequence. Hand-written: no library groups multi-turn samples so.
    """
    order = sorted(range(len(samples)), key=lambda i: (samples[i].episode, -samples[i].turn))
    sequences: list[list[int]] = []
    where: list[tuple[int, int, int]] = [(0, 0, 0)] * len(samples)
    episode = None
    for i in order:
        s = samples[i]
        seq = s.prompt_ids + s.response_ids
        if s.episode != episode or sequences[-1][:len(seq)] != seq:
            sequences.append(seq)
        episode = s.episode
        where[i] = (len(sequences) - 1, len(s.prompt_ids) - 1, len(seq) - 1)
    return sequences, where


def forward_samples(module: nn.Module, samples: list[TurnSample], temperature: float, with_values: bool = True,
                    grad: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Log-probs (at ``temperature``) and values of each sample's reply tokens; also the mean token entropy.

    Sequences are right-padded, so positions match the unpadded sequences. The value of reply token j is read at
    the position just before it (the state in which it was chosen). Without ``grad`` the sequences run
    ``FORWARD_CHUNK`` at a time, shortest first (less padding); with it, in one pass.
    """
    pad_id = getattr(module, "pad_id", None) or getattr(getattr(module, "module", None), "pad_id", 0)
    sequences, where = shared_sequences(samples)
    slices: list[list[tuple[int, int]]] = [[] for _ in sequences]  # per sequence, its samples' reply positions
    for k, begin, end in where:
        slices[k].append((begin, end))
    by_length = sorted(range(len(sequences)), key=lambda k: len(sequences[k]))
    chunk = len(sequences) if grad else FORWARD_CHUNK
    token_logp: list[torch.Tensor] = [torch.zeros(0)] * len(sequences)
    seq_values: list[torch.Tensor | None] = [None] * len(sequences)
    entropy_sum, tokens = 0.0, 0
    for start in range(0, len(by_length), chunk):
        part = by_length[start:start + chunk]
        width = max(len(sequences[k]) for k in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, k in enumerate(part):
            ids[row, :len(sequences[k])] = torch.tensor(sequences[k])
            mask[row, :len(sequences[k])] = 1
        with torch.set_grad_enabled(grad):
            logits, vals = module(ids, mask, with_values)
            logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
            chosen = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, k in enumerate(part):
            token_logp[k] = chosen[row]
            seq_values[k] = vals[row] if vals is not None else None
            if not grad:
                for begin, end in slices[k]:
                    rows = logp_all[row, begin:end]
                    entropy_sum += float(-(rows.exp() * rows).sum())
                    tokens += end - begin
    logps: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for k, begin, end in where:
        logps.append(token_logp[k][begin:end])
        v = seq_values[k]
        values.append(v[begin:end] if v is not None else torch.zeros(end - begin))
    if not grad:
        logps = [x.detach() for x in logps]
        values = [x.detach() for x in values]
    return logps, values, entropy_sum / max(tokens, 1)


def resolve_start(cfg: PPOConfig) -> tuple[Path, Path | None]:
    """(base model dir, SFT adapter dir or None) from ``model`` / ``init_adapter`` (a run dir or adapter dir)."""
    adapter: Path | None = None
    base = cfg.model
    if cfg.init_adapter:
        start = Path(cfg.init_adapter)
        if (start / "run.json").is_file():
            run = json.loads((start / "run.json").read_text())
            adapter = start / run.get("adapter", "adapter")
            base = base or str(_resolve(start, run["base_model"]))
        elif (start / "adapter_config.json").is_file():
            adapter = start
        else:
            raise DialogRLError(f"init_adapter '{start}': not a run directory (run.json) nor an adapter directory")
    if not base:
        from dialogrl.policies.bootstrap import default_base_model

        base = str(default_base_model())
    if not Path(base).is_dir():
        raise DialogRLError(f"model '{base}': not a local directory (nothing is downloaded; pass a local path)")
    return Path(base), adapter


def check_start(cfg: Any) -> None:
    """What can be wrong with PPO's or DPO's start weights, found before a run writes anything: ``init_adapter``
    (read as ``dialogrl eval`` reads a run directory), ``model``, the adapter on it, ``lora_target_modules`` and
    ``max_new_tokens`` against the context. Loads the start model once, leaving torch's random state as it was."""
    from dialogrl.policies.lm import LMPolicy, check_adapter_dir, run_dir_parts

    if cfg.init_adapter:
        try:
            _, _, adapter, _ = run_dir_parts(cfg.init_adapter)
            if adapter is None:
                raise DialogRLError("a model directory, not a run directory (run.json) nor an adapter directory")
            check_adapter_dir(adapter)
        except DialogRLError as exc:
            raise DialogRLError(f"init_adapter={cfg.init_adapter}: {exc}") from None
    if cfg.model and (Path(cfg.model) / "run.json").is_file() and not (Path(cfg.model) / "config.json").is_file():
        raise DialogRLError(f"model={cfg.model}: a run directory, not a base model; start from it with "
                            f"init_adapter={cfg.model}")
    base_dir, adapter = resolve_start(cfg)
    with torch.random.fork_rng(devices=[]):
        policy = LMPolicy.from_pretrained(base_dir, adapter)
    lora_config(policy.model, cfg.lora_target_modules, r=cfg.lora_r, alpha=cfg.lora_alpha)
    if cfg.max_new_tokens >= policy.context:
        raise DialogRLError(f"max_new_tokens={cfg.max_new_tokens}: leaves no room for the prompt in the model's "
                            f"{policy.context}-token context")


def _resolve(run_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else run_dir / p


def prepare_start(cfg: PPOConfig, out: Path) -> Path:
    """The directory of the start weights: the base, or the base with the SFT adapter merged, saved once to
    ``out/base`` so the run is self-contained and a resumed run starts from the very same weights."""
    base_dir, sft_adapter = resolve_start(cfg)
    if sft_adapter is None:
        return base_dir.resolve()
    merged_dir = out / "base"
    if not (merged_dir / "config.json").is_file():
        import shutil

        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
        model = PeftModel.from_pretrained(model, sft_adapter).merge_and_unload()
        tmp = out / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir, local_files_only=True).save_pretrained(tmp)
        tmp.rename(merged_dir)
    return merged_dir


def build_policy(cfg: PPOConfig, start_dir: Path, checkpoint: Path | None) -> tuple[PolicyWithValue, Any]:
    """The start weights (the KL reference) with a fresh or checkpointed LoRA adapter and a value head."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(start_dir, local_files_only=True)
    for layer in model.modules():  # no dropout in RL: the PPO ratio must be exactly 1 before the first update
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    if checkpoint is not None:
        policy = PeftModel.from_pretrained(model, checkpoint / "adapter", is_trainable=True)
    else:
        lora = lora_config(model, cfg.lora_target_modules, r=cfg.lora_r, alpha=cfg.lora_alpha)
        policy = get_peft_model(model, lora)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    module = PolicyWithValue(policy, model.config.hidden_size, pad_id, detach_values=cfg.value_detach)
    if checkpoint is not None:
        module.value_head.load_state_dict(torch.load(checkpoint / "value_head.pt", weights_only=True))
    return module, tokenizer


def save_run(inner: PolicyWithValue, start_dir: Path, cfg: PPOConfig, state: dict[str, Any], out: Path,
             num_processes: int = 1) -> None:
    """``adapter/``, ``value_head.pt`` and ``run.json`` (whose ``base_model`` is the start weights and
    ``num_processes`` the size of the data-parallel group that trained it). ``adapter/`` holds the weights
    ``keep`` chose: ``averaged`` lists the iterations whose mean it is (0-based), or ``kept_iterate`` names the
    validated iterate (by iterations done; ``validations`` has every validation's success).

    ``LMPolicy.from_run_dir`` and plain ``PeftModel.from_pretrained(AutoModelForCausalLM(base), adapter)`` load it.
    """
    from dialogrl.agents.versions import package_versions

    save_adapter(inner.policy, out / "adapter")
    torch.save(inner.value_head.state_dict(), out / "value_head.pt")
    base_ref = "base" if start_dir.resolve() == (out / "base").resolve() else str(start_dir)
    run = {"method": cfg.method, "base_model": base_ref, "adapter": "adapter", "seed": cfg.seed,
           "config": dataclasses.asdict(cfg), "history": state["history"], "num_processes": num_processes,
           "averaged": state.get("averaged", []), "validations": state.get("validations", []),
           "kept_iterate": state.get("best"),
           "versions": package_versions()}
    if os.environ.get(ENV_PATHS) and any("reward_model" in str(r) for r in cfg.rewards or []):
        run["reward_model_dirs"] = os.environ[ENV_PATHS]  # what the learned-reward spec resolved to
    (out / "run.json").write_text(json.dumps(run, indent=1))


RESUME_MAY_CHANGE = frozenset({"iterations", "checkpoint_every", "eval_episodes", "eval_seed", "method", "output_dir",
                               "keep", "average_last"})
"""PPOConfig fields a resumed run may set differently from the run that wrote the checkpoint."""
ADDED_LATER = {"kl_estimator": "k1", "keep": "last", "average_last": 10, "validation_episodes": 128, "validate_every": 2,
               "validation_seed": 1_000_000, "max_update_kl": None, "scenario_files": None,
               "value_detach": False, "opening_word_dropout": 0.0,
               "group_size": 1}
"""PPOConfig fields added after checkpoints were written, with the value those runs had."""
RUN_FILES = frozenset({"base", "base.tmp", "checkpoint", "checkpoint.tmp", "checkpoint.old", "adapter", "value_head.pt",
                       "run.json", "config.yaml", "eval.json", "eval_sampled.json", "tensorboard"})
"""What a PPO run directory holds: anything else in ``output_dir`` means it is not one."""


def comparable_config(cfg: PPOConfig) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples as lists), to compare with a checkpoint's."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_output(cfg: PPOConfig, out: Path) -> None:
    """``output_dir`` must be new, or a PPO run to resume with the same settings (else one error, nothing written).
    An SFT or DPO run holds only names a PPO run holds too, so its ``run.json`` tells them apart."""
    if cfg.init_adapter and out.resolve() == Path(cfg.init_adapter).resolve():
        raise DialogRLError(f"output_dir {out} is init_adapter, the run PPO starts from: choose another output_dir")
    if not out.exists():
        return
    if not out.is_dir():
        raise DialogRLError(f"output_dir {out} is not a directory")
    strangers = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if strangers:
        raise DialogRLError(f"output_dir {out} is not a PPO run directory (it holds {strangers[0]}); PPO writes "
                            "into, and resumes, only its own runs: choose another output_dir")
    state_file = out / "checkpoint" / "state.json"
    if not state_file.is_file() and ((out / "run.json").exists() or (out / "adapter").exists()):
        try:
            what = f"a '{json.loads((out / 'run.json').read_text())['method']}' run"
        except (OSError, ValueError, KeyError, TypeError):
            what = "a run"
        raise DialogRLError(f"output_dir {out} holds {what} but no PPO checkpoint: PPO writes into, and resumes, "
                            "only its own runs; choose another output_dir")
    saved = json.loads(state_file.read_text()).get("config") if state_file.is_file() else None
    if saved is None:  # no checkpoint, or one written before checkpoints kept their config
        return
    now = comparable_config(cfg)
    for key in sorted(set(saved) | set(now)):
        then = saved.get(key, ADDED_LATER.get(key))
        if key not in RESUME_MAY_CHANGE and then != now.get(key):
            raise DialogRLError(f"output_dir {out} holds a checkpoint trained with {key}={json.dumps(then)}, "
                                f"not {json.dumps(now.get(key))}: resume with that run's settings, or choose another "
                                "output_dir")
