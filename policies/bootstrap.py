"""The offline base model: a small GPT (Llama layout) and a byte-level BPE tokenizer, pre-trained on domain text.

Users of dialogrl normally fine-tune a pre-trained model; with nothing downloaded, this module makes one from
conversations of the environment (the corpus is any iterable of HF message lists). The result is an ordinary
Hugging Face model directory (``config.json``, ``model.safetensors``, tokenizer files with a chat template), so
every later stage (SFT with TRL, LoRA with PEFT, :class:`~dialogrl.policies.lm.LMPolicy`) treats it like any
local model. :func:`cached_base_model` builds it once per config and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dialogrl.config import check_at_least, check_number, check_seeds
from dialogrl.outputs import temp_dir_beside
from dialogrl.types import DialogRLError, Message

BUILD_VERSION = "b3"
"""Part of the cache key: bump it when the tokenizer, chat format or training recipe here changes."""

ROLES = ("system", "user", "assistant", "tool")
END, PAD = "<|end|>", "<|pad|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = [PAD, END, *ROLE_TOKENS.values()]

# <|role|>content<|end|> per message, no extra whitespace (every token counts in a 512-token window). Assistant
# turns, their end-of-turn token included, sit in {% generation %} so TRL's assistant_only_loss can mask the rest,
# and the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ content + '<|end|>' }}{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user', 'tool'] -%}"
    "{{ '<|' + message['role'] + '|>' + content + '<|end|>' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


NOT_IN_KEY = ("num_threads",)
"""Config fields that do not change the built model."""
ADDED_LATER = {"bf16": False, "split_digits": False}
"""Config fields added after models were cached, with the value those builds had."""


@dataclass
class BootstrapConfig:
    """How the offline base model is built (every field is part of the cache key)."""

    vocab_size: int = 1000
    """BPE vocabulary size, the 256 byte symbols and the special tokens included."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Hidden width."""
    n_positions: int = 512
    """Context length in tokens (longer prompts are truncated by the policy)."""
    block_size: int = 512
    """Tokens per training sequence (at most ``n_positions``; keep them equal so every position is trained).
    Each sequence starts at a conversation start, as prompts do, and runs on into the next conversations."""
    dropout: float = 0.0
    """Attention dropout (0: a few hundred steps on a small corpus do not overfit)."""
    steps: int = 2000
    """Optimizer steps (default: ~8M tokens, one pass over the default corpus, 8-10 min on 2 cores). Copying ids
    from the context appears abruptly, between steps 600 and 1,000 in different builds here; at 300 it had not."""
    batch_size: int = 8
    """Sequences per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to a tenth after the warm-up)."""
    warmup: int = 40
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    bf16: bool = False
    """Run the training forward pass under bfloat16 autocast (weights and optimizer stay float32)."""
    seed: int = 0
    """Seeds the corpus (via the caller), the weight init and the batch order."""
    corpus_episodes: int = 30000
    """Conversations in the domain corpus (read by the corpus function the caller passes). The default is about
    one pass of ``steps``: every sequence brings ids the model has not seen, so only copying them lowers the
    loss; recalling memorised ids from earlier passes cannot."""
    split_digits: bool = False
    """Give every digit its own token (no BPE merges across digits). Not the default: at the default size and
    steps, copying had not appeared by step 2,000 (teacher-forced probability of the id digits in expert
    replies 0.15, against 0.97 with merged digits; final loss 0.35)."""
    tokenizer_conversations: int = 1000
    """Conversations the BPE tokenizer is trained on (spread evenly over the corpus; 0: all)."""
    num_threads: int = 0
    """Torch CPU threads during the build (0: torch's default). Not part of the cache key."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "n_layer", "n_head", "n_embd", "n_positions", "block_size", "batch_size", "steps",
                       "corpus_episodes")
        check_at_least(self, 0, "warmup", "tokenizer_conversations", "num_threads")
        check_number(self, "lr", above=0)
        check_number(self, "weight_decay", at_least=0)
        check_number(self, "dropout", at_least=0, below=1)
        check_seeds(self, "seed")
        minimum = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size <= minimum:
            raise DialogRLError(f"vocab_size={self.vocab_size}: must exceed {minimum} (256 bytes + special tokens)")
        if self.n_embd % self.n_head:
            raise DialogRLError(f"n_embd={self.n_embd}: must be a multiple of n_head={self.n_head}")
        if self.block_size > self.n_positions:
            raise DialogRLError(f"block_size={self.block_size}: exceeds the context length "
                                f"n_positions={self.n_positions}")

    @classmethod
    def tiny(cls) -> BootstrapConfig:
        """A model that builds in seconds, for tests: learns little, but has the real format and files."""
        # block_size < n_positions: positions past 128 stay untrained, a fair trade for a 3x faster test build.
        return cls(vocab_size=400, n_layer=2, n_head=2, n_embd=32, n_positions=512, block_size=128, steps=100,
                   batch_size=8, lr=5e-3, warmup=10, corpus_episodes=60, tokenizer_conversations=0,
                   num_threads=1)  # one thread: matrices this small lose more to thread hand-offs than they gain

    def cache_key(self, corpus_version: str = "") -> str:
        # A field added after models were cached enters the key only when it differs from the value every earlier
        # build had, so those builds keep their keys.
        fields = {k: v for k, v in asdict(self).items()
                  if k not in NOT_IN_KEY and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        payload = json.dumps({"config": fields, "corpus": corpus_version, "build": BUILD_VERSION},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$DIALOGRL_CACHE``, else ``$XDG_CACHE_HOME/dialogrl``, else ``~/.cache/dialogrl``."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("DIALOGRL_CACHE"):
        return Path(os.environ["DIALOGRL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dialogrl"


def cached_base_model(config: BootstrapConfig, corpus_fn: Callable[[], Iterable[list[Message]]],
                      cache_dir: str | Path | None = None, corpus_version: str = "",
                      progress: bool = True) -> Path:
    """The base model directory for ``config``: built once (``corpus_fn`` is only called then), reused after.

    The key hashes the config, ``corpus_version`` (bump it when the corpus changes) and this module's recipe.
    """
    path = cached_base_path(config, cache_dir, corpus_version)
    if (path / "config.json").is_file():
        return path
    return build_base_model(config, corpus_fn(), path, progress=progress, exist_ok=True)


def cached_base_path(config: BootstrapConfig, cache_dir: str | Path | None = None, corpus_version: str = "") -> Path:
    """Where :func:`cached_base_model` keeps the model of ``config`` (built there or not)."""
    return cache_root(cache_dir) / f"base-{config.cache_key(corpus_version)}"


def default_base_model(progress: bool = True) -> Path:
    """The cached base model of the default config and the domain corpus (built on first use, minutes)."""
    from .corpus import CORPUS_VERSION, domain_corpus

    cfg = BootstrapConfig()
    return cached_base_model(cfg, lambda: domain_corpus(cfg.corpus_episodes, cfg.seed),
                             corpus_version=CORPUS_VERSION, progress=progress)


def build_base_model(config: BootstrapConfig, corpus: Iterable[list[Message]], out_dir: str | Path,
                     progress: bool = True, exist_ok: bool = False) -> Path:
    """Train the tokenizer and the model on ``corpus`` and save both to ``out_dir`` (written whole or not at all).

    ``exist_ok``: if ``out_dir`` already holds a model (another process finished first), keep that one.
    """
    out = Path(out_dir)
    if exist_ok and (out / "config.json").is_file():
        return out
    if out.exists() and not exist_ok:
        raise DialogRLError(f"base model output '{out}' already exists; remove it or choose another directory")
    conversations = [_check_conversation(c, i) for i, c in enumerate(corpus)]
    if not conversations:
        raise DialogRLError("the base-model corpus is empty")
    tmp = temp_dir_beside(out)
    try:
        started = time.perf_counter()
        tokenizer = train_tokenizer(config, conversations)
        model, stats = _train_model(config, tokenizer, conversations, progress)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stats.update(seconds=round(time.perf_counter() - started, 1), conversations=len(conversations))
        info = {"config": asdict(config), "build_version": BUILD_VERSION, "stats": stats}
        (tmp / "bootstrap.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            tmp.rename(out)
        except OSError:
            if not (exist_ok and (out / "config.json").is_file()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def train_tokenizer(config: BootstrapConfig, conversations: list[list[Message]]) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``) wrapped as a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if config.split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    n = config.tokenizer_conversations or len(conversations)
    sample = conversations[::max(1, len(conversations) // n)][:n]  # spread over the corpus (it may be sorted)
    # Contents only: the role markers are special tokens, never split or merged.
    tok.train_from_iterator((str(m.get("content") or "") for conv in sample for m in conv), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token=PAD,
                                      model_max_length=config.n_positions)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def render_ids(tokenizer: Any, conversations: list[list[Message]]) -> list[list[int]]:
    """Token ids of whole conversations in the chat format."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _train_model(config: BootstrapConfig, tokenizer: Any, conversations: list[list[Message]],
                 progress: bool) -> tuple[Any, dict[str, Any]]:
    # A plain torch loop rather than HF Trainer: the model is tiny and the data is one packed tensor, so the
    # loop is a dozen lines, starts instantly and has no checkpoint/logging/accelerate machinery to switch off.
    import torch

    torch.manual_seed(config.seed)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _fit(config, tokenizer, conversations, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(config: BootstrapConfig, tokenizer: Any, conversations: list[list[Message]],
         progress: bool) -> tuple[Any, dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    end_id, pad_id = tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids(PAD)
    # A decoder-only GPT with rotary positions (Llama layout) rather than GPT-2's learned absolute positions:
    # relative positions make the "look at the previous token" heads that copying needs easy to learn. Here the
    # 1M-parameter model learned to copy ids between steps 600 and 1,000; GPT-2 of the same size had not by 1,500.
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
        max_position_embeddings=config.n_positions, attention_dropout=config.dropout, tie_word_embeddings=True,
        bos_token_id=end_id, eos_token_id=end_id, pad_token_id=pad_id)
    model = LlamaForCausalLM(model_config)
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = pad_id

    # Pack every conversation into one stream; a training sequence starts at a conversation start (as prompts
    # do at inference) and runs on into the next conversations, so no token is padding.
    # Tokenised a thousand conversations at a time into int32 arrays: Python lists of 8M ids (and the tokenizer's
    # attention masks) took over a gigabyte.
    parts = [np.asarray(seq, dtype=np.int32) for start in range(0, len(conversations), 1000)
             for seq in render_ids(tokenizer, conversations[start:start + 1000])]
    stream = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    block = min(config.block_size, config.n_positions, len(stream) - 1)
    offsets = torch.tensor([0, *np.cumsum([len(p) for p in parts])[:-1].tolist()])
    del parts
    starts = offsets[offsets + block <= len(stream)]
    if len(starts) == 0:
        starts = torch.tensor([0])
    window = torch.arange(block)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="pre-training base model", disable=not progress, mininterval=1.0)
    for _ in bar:
        pick = starts[torch.randint(len(starts), (config.batch_size,), generator=generator)]
        batch = stream[pick[:, None] + window[None, :]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"parameters": sum(p.numel() for p in model.parameters()), "corpus_tokens": len(stream),
             "first_loss": round(losses[0], 4) if losses else None,
             "final_loss": round(sum(tail) / len(tail), 4) if tail else None}
    return model, stats


def _check_conversation(conversation: list[Message], index: int) -> list[Message]:
    for message in conversation:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise DialogRLError(f"corpus conversation {index}: unknown message role {role!r}")
    return conversation
