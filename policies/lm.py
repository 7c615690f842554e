"""``LMPolicy``: any local Hugging Face causal LM (optionally with a PEFT LoRA adapter) as a dialogue policy.

Replies for many conversations come from one batched ``generate`` call (left padding, KV cache), stop at the
end-of-turn token, and carry what RL needs: the prompt and reply token ids and the reply tokens' log-probs.
Nothing is ever downloaded: model and adapter paths must be local directories.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dialogrl.policies.kv_reuse import (
    CachedPrefix,
    PrefixStore,
    build_batch,
    padded_width_alarm_silenced,
    split_cache,
)
from dialogrl.types import DialogRLError, Message


def model_context(config: Any) -> int:
    """A transformers model config's context length (``n_positions`` or ``max_position_embeddings``; 1024 if it
    states none)."""
    return int(getattr(config, "n_positions", 0) or getattr(config, "max_position_embeddings", 0) or 1024)


@dataclass
class GenerationSettings:
    """How replies are decoded."""

    do_sample: bool = False
    """Sample (True) or greedy decoding (False)."""
    temperature: float = 1.0
    """Softmax temperature for sampling; the returned log-probs are under this temperature in both modes."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off). The log-probs ignore it (they are the temperature-only distribution)."""
    max_new_tokens: int = 64
    """Longest reply in tokens; the prompt is truncated so prompt plus reply fit the context window."""
    seed: int | None = None
    """Sampling seed: each ``generate`` call n draws from ``(seed, n)`` without touching torch's global RNG
    (None: use and advance torch's global RNG, as a training loop that seeds torch expects)."""
    max_batch: int = 64
    """Conversations per ``generate`` call (longer lists are split, similar prompt lengths together)."""
    reuse_kv: bool = True
    """Keep each conversation's KV cache to the next turn and encode only the new tokens (``kv_reuse``)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DialogRLError(f"temperature={self.temperature}: must be a finite number > 0 (use do_sample=false "
                                "for greedy)")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise DialogRLError(f"top_p={self.top_p}: must be in (0, 1]")
        for name in ("max_new_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise DialogRLError(f"{name}={getattr(self, name)}: must be at least 1")


@dataclass
class Generation:
    """One reply and the tokens behind it."""

    text: str
    """The reply, special tokens removed and surrounding whitespace stripped."""
    prompt_ids: list[int]
    """The prompt tokens the model actually saw (after truncation)."""
    response_ids: list[int]
    """Generated tokens, the end-of-turn token included when the model emitted it."""
    logprobs: list[float] = field(default_factory=list)
    """Log-probability of each response token under softmax(logits / temperature)."""
    finished: bool = True
    """False when the reply hit ``max_new_tokens`` before the end-of-turn token."""
    truncated_prompt: bool = False
    """True when the conversation was cut to fit the context window."""


class LMPolicy:
    """A causal LM and its tokenizer's chat template as a policy (``name``, ``act_batch``) and a generator.

    Long conversations are truncated from the left: the rendered system prompt is kept when it fills at most
    half of the prompt budget, then as many of the most recent tokens as fit (else simply the last tokens).
    """

    def __init__(self, model: Any, tokenizer: Any, generation: GenerationSettings | None = None,
                 name: str = "lm", reference_dir: str | Path | None = None) -> None:
        self.model = model
        # The model a merged adapter was trained on: the KL reference (an unmerged PEFT model is its own reference,
        # adapter disabled). Loaded on first use.
        self.reference_dir = reference_dir
        self._reference: Any = None
        self.tokenizer = tokenizer
        self.generation = generation or GenerationSettings()
        self.name = name
        self._calls = 0
        self._prefixes = PrefixStore()
        if not getattr(tokenizer, "chat_template", None):
            raise DialogRLError(f"policy '{name}': the tokenizer has no chat template")
        self.end_id = _end_of_turn_id(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id
        self.context = model_context(model.config)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, adapter_path: str | Path | None = None,
                        generation: GenerationSettings | None = None, name: str | None = None,
                        merge_adapter: bool = True) -> LMPolicy:
        """Load a local model directory, and a LoRA adapter directory on top (merged for speed by default)."""
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model_dir = _local_dir(model_path, "model", "config.json")
        adapter_dir = check_adapter_dir(adapter_path) if adapter_path else None
        # An adapter directory that ships a tokenizer (SFT saves one) wins: it is what training used.
        tok_dir = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else model_dir
        where = model_dir  # what the error names: the directory being loaded when it came
        try:
            AutoConfig.from_pretrained(model_dir, local_files_only=True)  # a bad config.json, said plainly
            where = tok_dir
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            where = model_dir
            model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
            if adapter_dir is not None:
                from peft import PeftModel

                where = adapter_dir
                model = PeftModel.from_pretrained(model, adapter_dir)
                if merge_adapter:
                    model = model.merge_and_unload()
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: a corrupt weights file
            raise DialogRLError(f"cannot load a model from '{where}': {str(exc).splitlines()[0]}") from None
        model.eval()
        return cls(model, tokenizer, generation, name=name or (adapter_dir or model_dir).name,
                   reference_dir=model_dir if adapter_dir is not None and merge_adapter else None)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, decoding: str = "greedy",
                     generation: GenerationSettings | None = None) -> LMPolicy:
        """A run directory (``run.json`` naming ``base_model`` and ``adapter``), an adapter or a model directory.

        ``decoding``: ``greedy`` or ``sampled`` (at the run's training temperature if it recorded one, else 1).
        ``generation`` overrides both.
        """
        path, base, adapter, run = run_dir_parts(run_dir)
        if generation is None:
            if decoding not in ("greedy", "sampled"):
                raise DialogRLError(f"decoding '{decoding}': use greedy or sampled")
            trained = run.get("config") if isinstance(run.get("config"), dict) else {}
            temperature, max_new = trained.get("temperature", 1.0), trained.get("max_new_tokens", 64)
            if isinstance(temperature, bool) or not isinstance(temperature, int | float):
                raise DialogRLError(f"{path / 'run.json'}: config.temperature must be a number, got {temperature!r}")
            if isinstance(max_new, bool) or not isinstance(max_new, int):
                raise DialogRLError(f"{path / 'run.json'}: config.max_new_tokens must be a whole number, "
                                    f"got {max_new!r}")
            generation = GenerationSettings(do_sample=decoding == "sampled", temperature=float(temperature),
                                            max_new_tokens=max_new)
        return cls.from_pretrained(base, adapter, generation, name=path.name)

    def with_settings(self, **changes: Any) -> LMPolicy:
        """The same weights with other decoding settings (e.g. ``do_sample=True``)."""
        return LMPolicy(self.model, self.tokenizer, replace(self.generation, **changes), self.name, self.reference_dir)

    def kl_to_reference(self, conversations: list[list[Message]]) -> float | None:
        """Mean KL(policy || reference) per assistant reply of these conversations (``policies/kl.py``); None when
        the policy has no reference (a model without an adapter) or the conversations no replies."""
        from .kl import reply_kl

        model = self.model
        if self.reference_dir is not None:
            if self._reference is None:
                from transformers import AutoModelForCausalLM

                self._reference = AutoModelForCausalLM.from_pretrained(self.reference_dir,
                                                                       local_files_only=True).eval()
            reference = self._reference

            def reference_logits(ids: Any, attention: Any) -> Any:
                return reference(input_ids=ids, attention_mask=attention).logits
        elif hasattr(model, "disable_adapter"):  # an unmerged PEFT model: the same weights, adapter off
            def reference_logits(ids: Any, attention: Any) -> Any:
                with model.disable_adapter():
                    return model(input_ids=ids, attention_mask=attention).logits
        else:
            return None
        was_training = model.training
        model.eval()
        try:
            return reply_kl(lambda ids, attention: model(input_ids=ids, attention_mask=attention).logits,
                            reference_logits, self.tokenizer, conversations, self.context, self.pad_id)
        finally:
            model.train(was_training)

    def act_batch(self, conversations: list[list[Message]], infos: list[dict[str, Any]]) -> list[str]:
        """One reply per conversation (``infos`` are not used: the model reads only the conversation)."""
        return [g.text for g in self.generate(conversations)]

    def prompt_ids(self, conversations: list[list[Message]]) -> tuple[list[list[int]], list[bool]]:
        """Chat-template prompts (ending in the assistant header), truncated to the budget; and which were cut."""
        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        budget = self.context - self.generation.max_new_tokens
        if budget < 1:
            raise DialogRLError(f"max_new_tokens={self.generation.max_new_tokens} leaves no room for the prompt "
                                f"in a {self.context}-token context")
        out, cut = [], []
        for conv, seq in zip(conversations, ids, strict=True):
            cut.append(len(seq) > budget)
            if len(seq) > budget:
                keep = self._system_prefix(conv, seq, budget)
                seq = keep + seq[len(seq) - (budget - len(keep)):]
            out.append(list(seq))
        return out, cut

    def _system_prefix(self, conv: list[Message], seq: list[int], budget: int) -> list[int]:
        if not conv or conv[0].get("role") != "system":
            return []
        text = self.tokenizer.apply_chat_template(conv[:1], tokenize=False)
        head = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        # Keep it only if it tokenizes the same alone as in context, and leaves room for the recent turns.
        return head if len(head) <= budget // 2 and seq[:len(head)] == head else []

    def generate(self, conversations: list[list[Message]]) -> list[Generation]:
        """Replies for all conversations, batched (``max_batch`` at a time, similar lengths together)."""
        import torch

        if not conversations:
            return []
        prompts, cut = self.prompt_ids(conversations)
        settings = self.generation
        results: list[Generation | None] = [None] * len(prompts)
        call, self._calls = self._calls, self._calls + 1
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        self._prefixes.sync(self.model)
        reuse = [self._prefixes.match(p) if settings.reuse_kv else (0, None) for p in prompts]
        # Conversations resuming from a cache and fresh ones go in separate calls: mixed, every row would pay for
        # the longest new input. Within each, similar lengths go together.
        groups = [sorted((i for i in range(len(prompts)) if bool(reuse[i][0]) == resumed),
                         key=lambda i: len(prompts[i]) - reuse[i][0]) for resumed in (False, True)]
        chunks = [g[start:start + settings.max_batch] for g in groups for start in range(0, len(g), settings.max_batch)]
        kept: list[CachedPrefix] = []
        try:
            with (torch.random.fork_rng(devices=rng_devices, enabled=settings.seed is not None),
                  torch.inference_mode()):
                if settings.seed is not None:
                    torch.manual_seed(settings.seed * 1_000_003 + call)
                for chunk in chunks:
                    gens, entries = self._generate_chunk([prompts[i] for i in chunk], [reuse[i] for i in chunk])
                    kept += entries
                    for i, gen in zip(chunk, gens, strict=True):
                        gen.truncated_prompt = cut[i]
                        results[i] = gen
        finally:
            self.model.train(was_training)
        self._prefixes.replace(kept if settings.reuse_kv else [])
        return [r for r in results if r is not None]

    def _generate_chunk(self, prompts: list[list[int]], reuse: list[tuple[int, CachedPrefix | None]]
                        ) -> tuple[list[Generation], list[CachedPrefix]]:
        import torch
        from transformers import GenerationConfig

        s = self.generation
        device = next(self.model.parameters()).device
        # Left padding (every prompt ends where generation starts), reused prefixes already in ``cache``.
        input_ids, attention, cache = build_batch(prompts, reuse, self.pad_id, self.model.config)
        width = input_ids.shape[1]
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.do_sample else {}
        config = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, eos_token_id=self.end_id,
                                  pad_token_id=self.pad_id, use_cache=True, return_dict_in_generate=True,
                                  output_logits=True, **sampling)
        with padded_width_alarm_silenced():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                      generation_config=config, cache=cache)
        new = out.sequences[:, width:].cpu()
        # Raw logits (not the top-p-filtered scores): log-probs under the temperature alone, as PPO recomputes them.
        logits = torch.stack(out.logits, dim=1).float().cpu() / s.temperature
        logps = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        is_end = new == self.end_id
        ended = is_end.any(dim=1)
        lengths = torch.where(ended, is_end.int().argmax(dim=1) + 1, torch.full_like(ended, new.shape[1],
                                                                                     dtype=torch.long))
        gens = []
        for row, p in enumerate(prompts):
            n = int(lengths[row])
            ids = new[row, :n].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            gens.append(Generation(text, list(p), ids, logps[row, :n].tolist(), bool(ended[row])))
        entries = (split_cache(out.cache, attention, out.sequences.cpu(), lengths.tolist(), width)
                   if s.reuse_kv and out.cache is not None else [])
        return gens, entries


def _end_of_turn_id(tokenizer: Any) -> int:
    """``<|end|>`` if the vocabulary has it (the dialogrl chat format), else the tokenizer's eos token."""
    vocab = tokenizer.get_vocab()
    if "<|end|>" in vocab:
        return int(vocab["<|end|>"])
    if tokenizer.eos_token_id is None:
        raise DialogRLError("the tokenizer has neither an <|end|> token nor an eos token to stop replies at")
    return int(tokenizer.eos_token_id)


def run_dir_parts(run_dir: str | Path) -> tuple[Path, Path, Path | None, dict[str, Any]]:
    """(directory, base model, adapter or None, run.json data) of a run directory (``run.json`` naming
    ``base_model`` and ``adapter``), an adapter directory or a model directory; anything else is one clear error.
    Only ``run.json`` and ``adapter_config.json`` are read: nothing is loaded."""
    path = _local_dir(run_dir, "run", None)
    run: dict[str, Any] = {}
    if (path / "run.json").is_file():
        try:
            run = json.loads((path / "run.json").read_text())
            base = Path(run["base_model"])
            adapter: Path | None = path / run.get("adapter", "adapter")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DialogRLError(f"{path / 'run.json'}: unreadable or without 'base_model' ({exc})") from None
        base = base if base.is_absolute() else path / base
        method, seed = run.get("method"), run.get("seed")  # what evaluations record: checked before any load
        if method is not None and not (isinstance(method, str) and method.strip()):
            raise DialogRLError(f"{path / 'run.json'}: key 'method' must be a non-empty string, got {method!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise DialogRLError(f"{path / 'run.json'}: key 'seed' (the training seed) must be a whole number, "
                                f"got {seed!r}")
    elif (path / "adapter_config.json").is_file():
        base, adapter = Path(_adapter_config(path).get("base_model_name_or_path") or ""), path
    elif (path / "config.json").is_file():
        base, adapter = path, None
    else:
        raise DialogRLError(f"'{path}': not a run directory (run.json), an adapter or a model directory")
    return path, base, adapter, run


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as a saved PEFT adapter directory (``adapter_config.json`` naming its ``peft_type``), or one
    clear error."""
    adapter = _local_dir(path, "adapter", "adapter_config.json")
    if not _adapter_config(adapter).get("peft_type"):
        raise DialogRLError(f"adapter '{path}': adapter_config.json has no peft_type; it is not a saved PEFT adapter")
    return adapter


def _adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except ValueError as exc:  # UnicodeDecodeError included
        raise DialogRLError(f"{path / 'adapter_config.json'}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DialogRLError(f"{path / 'adapter_config.json'}: expected a JSON object")
    return config


def _local_dir(path: str | Path | None, what: str, marker: str | None) -> Path:
    """The path as an existing local directory (holding ``marker``), or one clear error."""
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise DialogRLError(f"{what} '{path}': no such local directory; pass the path of a local {what} directory "
                            "(Hugging Face Hub ids are never downloaded)")
    if marker and not (p / marker).is_file():
        raise DialogRLError(f"{what} '{path}': no {marker} in this directory; it is not a saved {what}")
    return p
