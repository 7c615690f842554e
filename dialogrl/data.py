"""Conversation logs and preference pairs from JSONL files in Hugging Face messages format. Imports no torch.

Accepted rows: ``{"messages": [{"role": ..., "content": ...}, ...], ...metadata}`` — dialogrl's own logs, users'
logs, and public corpora converted to this shape (MultiWOZ, Taskmaster, τ-bench, ABCD). Loading normalises every
conversation to what dialogrl trains on:

- assistant ``tool_calls`` (HF/TRL form ``{"type": "function", "function": {"name", "arguments"}}``) become
  dialogrl's inline action syntax appended to the reply, e.g. ``[get_user_details user_id=mia_li_3668]``;
- tool results stay ``role: "tool"`` messages with their content;
- consecutive system, user or assistant turns are merged (joined with a newline); consecutive tool messages are
  kept apart, one per action, as the environment emits them (merging them would train on a layout the policy
  never sees at inference); empty assistant turns are dropped;
- a conversation without a system prompt gets ``system_prompt``.

Bad rows raise :class:`~dialogrl.types.DialogRLError` naming the file and the 1-based row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dialogrl.types import DialogRLError, Message

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_SYSTEM_PROMPT = (
    "You are a customer-service agent. Help the customer politely, follow the business policy, "
    "and act with inline actions in square brackets."
)
"""System prompt given to conversations that have none."""

_BARE_VALUE = re.compile(r"""[^\s"'\[\]\\]+""")


def write_logs(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Episode records (``run_episodes(..., keep_messages=True)``) as conversation logs that
    :func:`load_conversations` and ``datasets.load_dataset("json", ...)`` read: ``messages`` first, metadata beside
    it; written atomically."""
    from dialogrl.outputs import write_text_atomic

    return write_text_atomic(Path(path), "".join(json.dumps({
        "messages": r["messages"], "intent": r["intent"], "persona": r["persona"], "seed": r["scenario_seed"],
        "success": r["success"], "return": r["return"], "reward_components": r["reward_components"]}) + "\n"
        for r in records))


def load_conversations(
    path: str | Path,
    *,
    require_success_field: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> list[dict[str, Any]]:
    """Read and normalise a JSONL file of conversations; metadata fields are kept beside ``messages``.

    ``system_prompt=None`` leaves conversations without a system prompt as they are.
    """
    rows: list[dict[str, Any]] = []
    for where, row in _read_jsonl(path):
        if "messages" not in row:
            raise DialogRLError(f"{where}: no 'messages' field (keys: {', '.join(sorted(row)) or 'none'})")
        messages = normalize_messages(row["messages"], system_prompt=system_prompt, where=where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DialogRLError(f"{where}: conversation has no assistant turn")
        if "success" in row and not isinstance(row["success"], bool):
            raise DialogRLError(f"{where}: 'success' must be true or false, got {row['success']!r}")
        if require_success_field and "success" not in row:
            raise DialogRLError(f"{where}: no 'success' field")
        rows.append({"messages": messages, **{k: v for k, v in row.items() if k != "messages"}})
    if not rows:
        raise DialogRLError(f"{path}: no conversations")
    return rows


def filter_success(rows: Sequence[dict[str, Any]], key: str = "success") -> list[dict[str, Any]]:
    """Keep the rows whose ``key`` is true (or a positive number, e.g. τ-bench's 0/1 ``reward``).

    Rows without the field are dropped; a field missing from every row is an error.
    """
    if rows and not any(key in row for row in rows):
        raise DialogRLError(f"cannot filter on '{key}': no row has that field")
    kept = []
    for row in rows:
        value = row.get(key)
        if value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            kept.append(row)
    return kept


def load_preference_pairs(
    path: str | Path, *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """Read conversational preference pairs: ``prompt`` (messages), ``chosen`` and ``rejected``.

    ``chosen``/``rejected`` may be a list of messages, a single message, or a string (an assistant reply); all
    come back as normalised message lists, in TRL's conversational preference format. Metadata is kept.
    """
    rows: list[dict[str, Any]] = []
    for where, row in _read_jsonl(path):
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DialogRLError(f"{where}: no '{key}' field")
        if not isinstance(row["prompt"], list) or not row["prompt"]:
            raise DialogRLError(f"{where}: 'prompt' must be a non-empty list of messages")
        prompt = normalize_messages(row["prompt"], system_prompt=system_prompt, where=f"{where} prompt")
        if not any(m["role"] != "system" for m in prompt):
            raise DialogRLError(f"{where}: 'prompt' has no user or assistant turn")
        answers = {}
        for key in ("chosen", "rejected"):
            value = row[key]
            if isinstance(value, str):
                value = [{"role": "assistant", "content": value}]
            elif isinstance(value, dict):
                value = [value]
            elif not isinstance(value, list):
                raise DialogRLError(f"{where}: '{key}' must be a list of messages, a message or a string, got "
                                    f"{type(value).__name__}")
            answers[key] = normalize_messages(value, system_prompt=None, where=f"{where} {key}")
            if not any(m["role"] == "assistant" for m in answers[key]):
                raise DialogRLError(f"{where}: '{key}' has no non-empty assistant message")
        if answers["chosen"] == answers["rejected"]:
            raise DialogRLError(f"{where}: 'chosen' and 'rejected' are identical")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        rows.append({"prompt": prompt, **answers, **meta})
    if not rows:
        raise DialogRLError(f"{path}: no preference pairs")
    return rows


def normalize_messages(
    messages: Any, *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, where: str = "messages"
) -> list[Message]:
    """Check and normalise one messages list (see the module docstring); returns new ``{role, content}`` dicts."""
    if not isinstance(messages, list):
        raise DialogRLError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    out: list[Message] = []
    for index, message in enumerate(messages, start=1):
        at = f"{where} message {index}"
        if not isinstance(message, dict):
            raise DialogRLError(f"{at}: expected an object with 'role' and 'content', got {_short(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise DialogRLError(f"{where}: unknown role {_short(role)} in message {index} (roles: {', '.join(ROLES)})")
        content = message.get("content")
        tool_calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and tool_calls:
            content = ""  # OpenAI-style tool-call turns carry content null
        if not isinstance(content, str):
            raise DialogRLError(f"{at}: 'content' must be a string, got {_short(content)}")
        if tool_calls:
            actions = render_tool_calls(tool_calls, where=at)
            content = f"{content.strip()} {actions}" if content.strip() else actions
        if role == "assistant" and not content.strip():
            continue
        if out and out[-1]["role"] == role and role != "tool":
            out[-1]["content"] += "\n" + content
        else:
            out.append({"role": role, "content": content})
    if system_prompt is not None and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def render_tool_calls(tool_calls: Any, *, where: str = "tool_calls") -> str:
    """Render HF/TRL ``tool_calls`` as inline actions separated by spaces."""
    if not isinstance(tool_calls, list):
        raise DialogRLError(f"{where}: 'tool_calls' must be a list, got {_short(tool_calls)}")
    rendered = []
    for call in tool_calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise DialogRLError(f"{where}: tool call without a function name: {_short(call)}")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):  # OpenAI form: arguments as a JSON text
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise DialogRLError(f"{where}: arguments of '{name}' are not valid JSON: {_short(arguments)}") from None
        if not isinstance(arguments, dict):
            raise DialogRLError(f"{where}: arguments of '{name}' must be an object, got {_short(arguments)}")
        rendered.append(format_inline_action(name, arguments))
    return " ".join(rendered)


def format_inline_action(name: str, arguments: dict[str, Any]) -> str:
    """``[name key=value key="two words" items='[...]']`` in dialogrl's inline action syntax.

    The name is lower-cased with other characters than ``a-z0-9_`` turned into ``_`` (``pull-up-account`` ->
    ``pull_up_account``). Strings without spaces, quotes or brackets stay bare; other strings are quoted
    (``"two words"``, or a JSON string literal if they hold ``"``, a backslash or a control character);
    numbers, booleans and null are JSON; lists and objects are compact JSON in single quotes (a ``'`` inside is
    written ``\\u0027`` so the quoting stays unambiguous).
    """
    clean = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_") or "action"
    parts = [clean] + [f"{key}={_format_value(value)}" for key, value in arguments.items()]
    return "[" + " ".join(parts) + "]"


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        if _BARE_VALUE.fullmatch(value):
            return value
        if '"' in value or "\\" in value or any(ord(c) < 32 for c in value):
            return json.dumps(value, ensure_ascii=False)
        return f'"{value}"'
    if isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return "'" + text.replace("'", "\\u0027") + "'"
    return json.dumps(value, ensure_ascii=False)


def _read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file row N", object)`` for every non-blank line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DialogRLError(f"data file not found: {path}")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path} row {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DialogRLError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DialogRLError(f"{where}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DialogRLError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
