"""Conversation and preference-pair loading: normalisation, real corpora, and errors naming file and row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dialogrl.data import (
    DEFAULT_SYSTEM_PROMPT,
    filter_success,
    format_inline_action,
    load_conversations,
    load_preference_pairs,
    write_logs,
)
from dialogrl.envs.actions import parse_reply
from dialogrl.types import DialogRLError

REALDATA = Path(__file__).parents[1].parent / "shared" / "realdata"
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="shared/realdata is absent")


def write_jsonl(path: Path, rows: list[Any], blank_after: int | None = None) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def conv(*turns: tuple[str, str], **meta: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **meta}


GOOD = conv(("user", "where is my order?"), ("assistant", "Let me check. [lookup_order order=A1]"), success=True)


def test_normalisation(tmp_path: Path) -> None:
    call = {"type": "function", "id": "c1",
            "function": {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}}
    row = {
        "messages": [
            {"role": "assistant", "content": "Hi!"},
            {"role": "assistant", "content": "How can I help?"},
            {"role": "user", "content": "refund please"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"name": "Mia"}', "name": "get_user_details", "tool_call_id": "c1"},
            {"role": "assistant", "content": "   "},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "refund", "arguments": '{"reason": "two words"}'}}]},
            {"role": "tool", "content": "done"},
            {"role": "tool", "content": "second action done"},
            {"role": "assistant", "content": "Done!"},
        ],
        "intent": "refund", "persona": "angry", "success": False,
    }
    (out,) = load_conversations(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert out["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "assistant", "content": "Hi!\nHow can I help?"},
        {"role": "user", "content": "refund please"},
        {"role": "assistant", "content": "[get_user_details user_id=mia_li_3668]"},
        {"role": "tool", "content": '{"name": "Mia"}'},
        {"role": "assistant", "content": '[refund reason="two words"]'},
        {"role": "tool", "content": "done"},
        {"role": "tool", "content": "second action done"},  # one tool message per action, as the env writes them
        {"role": "assistant", "content": "Done!"},
    ]
    assert (out["intent"], out["persona"], out["success"]) == ("refund", "angry", False)
    (kept,) = load_conversations(tmp_path / "a.jsonl", system_prompt=None)
    assert kept["messages"][0]["role"] == "assistant"
    own = conv(("system", "Policy."), ("user", "hi"), ("assistant", "hello"))
    (same,) = load_conversations(write_jsonl(tmp_path / "b.jsonl", [own]))
    assert same["messages"][0] == {"role": "system", "content": "Policy."}


def test_text_before_a_tool_call_is_kept() -> None:
    from dialogrl.data import normalize_messages

    messages = normalize_messages([{"role": "user", "content": "x"}, {
        "role": "assistant", "content": "Checking.",
        "tool_calls": [{"function": {"name": "Pull-Up Account", "arguments": {"values": ["crystal minh"]}}}]}])
    assert messages[-1]["content"] == "Checking. [pull_up_account values='[\"crystal minh\"]']"


def test_format_inline_action_values() -> None:
    text = format_inline_action("lookup", {
        "order": "A10420", "address": "12 Main St", "n": 3, "ok": True, "none": None,
        "quote": 'say "hi"', "items": [{"id": 1, "name": "O'Brien"}], "empty": "",
    })
    assert text == (
        '[lookup order=A10420 address="12 Main St" n=3 ok=true none=null quote="say \\"hi\\"" '
        "items='[{\"id\":1,\"name\":\"O\\u0027Brien\"}]' empty=\"\"]"
    )
    # values the env's parser understands come back unchanged
    (action,), text_left = parse_reply("Sure. " + format_inline_action("update_address", {
        "order": "A1", "address": "12 Main St"}))
    assert action.args == {"order": "A1", "address": "12 Main St"} and text_left == "Sure."


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"conversation": []}, "no 'messages' field"),
        ({"messages": "hello"}, "'messages' must be a list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
        ({"messages": [{"role": "user"}]}, "'content' must be a string"),
        ({"messages": ["hi"]}, "expected an object"),
        (conv(("user", "hello"), ("assistant", "  ")), "no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]},
         "without a function name"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{bad"}}]}]}, "not valid JSON"),
        (conv(("user", "hi"), ("assistant", "yo"), success="yes"), "'success' must be true or false"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path: Path, line: Any, needle: str) -> None:
    # row 1 good, a blank line (skipped, still counted), then the bad row at line 3
    path = write_jsonl(tmp_path / "logs.jsonl", [GOOD, line], blank_after=1)
    with pytest.raises(DialogRLError) as info:
        load_conversations(path)
    message = str(info.value)
    assert "logs.jsonl row 3" in message and needle in message and "\n" not in message


def test_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DialogRLError, match="not found"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DialogRLError, match="no conversations"):
        load_conversations(tmp_path / "empty.jsonl")


def test_success_field_and_filter(tmp_path: Path) -> None:
    rows = [GOOD, conv(("user", "a"), ("assistant", "b"), success=False), conv(("user", "c"), ("assistant", "d"))]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    loaded = load_conversations(path)
    assert [r["messages"][-1]["content"] for r in filter_success(loaded)] == [GOOD["messages"][1]["content"]]
    with pytest.raises(DialogRLError, match="s.jsonl row 3: no 'success' field"):
        load_conversations(path, require_success_field=True)
    with pytest.raises(DialogRLError, match="no row has that field"):
        filter_success([conv(("user", "a"), ("assistant", "b"))])
    assert filter_success([{"reward": 1.0}, {"reward": 0.0}], key="reward") == [{"reward": 1.0}]


@needs_realdata
@pytest.mark.parametrize(
    ("name", "rows"),
    [("multiwoz21/train_sample.jsonl", 300), ("taskmaster4/train_sample.jsonl", 300),
     ("tau_bench/trajectories_train.jsonl", 160), ("abcd/sample.jsonl", 3)],
)
def test_real_corpora_load(name: str, rows: int) -> None:
    loaded = load_conversations(REALDATA / name)
    assert len(loaded) == rows
    for row in loaded:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and "assistant" in roles
        assert all(a != b or a == "tool" for a, b in zip(roles, roles[1:], strict=False))  # merged
        assert all(m["content"].strip() for m in row["messages"] if m["role"] == "assistant")
        assert all(set(m) == {"role", "content"} for m in row["messages"])
    if name.startswith("tau_bench"):
        first = loaded[0]["messages"]
        assert {"role": "assistant", "content": "[get_user_details user_id=mia_li_3668]"} in first
        assert "task_id" in loaded[0] and 0 < len(filter_success(loaded, key="reward")) < rows
    if name.startswith("abcd"):
        text = "\n".join(m["content"] for m in loaded[0]["messages"])
        assert "[pull_up_account values='[\"crystal minh\"]']" in text


def pair(**over: Any) -> dict[str, Any]:
    row = {"prompt": [{"role": "user", "content": "Refund A1?"}],
           "chosen": [{"role": "assistant", "content": "[lookup_order order=A1]"}],
           "rejected": {"role": "assistant", "content": "No."}, "source": "test"}
    row.update(over)
    return {k: v for k, v in row.items() if v is not None}


def test_preference_pairs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [pair(), pair(rejected="Sure, done.")])
    first, second = load_preference_pairs(path)
    assert first["prompt"] == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                               {"role": "user", "content": "Refund A1?"}]
    assert first["chosen"] == [{"role": "assistant", "content": "[lookup_order order=A1]"}]
    assert first["rejected"] == [{"role": "assistant", "content": "No."}]
    assert second["rejected"] == [{"role": "assistant", "content": "Sure, done."}]
    assert first["source"] == "test"


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        (pair(chosen=None), "no 'chosen' field"),
        (pair(rejected=None), "no 'rejected' field"),
        (pair(prompt=[]), "'prompt' must be a non-empty list"),
        (pair(prompt="hi"), "'prompt' must be a non-empty list"),
        (pair(rejected=[{"role": "assistant", "content": "[lookup_order order=A1]"}]), "identical"),
        (pair(chosen=[{"role": "user", "content": "x"}]), "'chosen' has no non-empty assistant"),
        (pair(rejected=[{"role": "robot", "content": "x"}]), "unknown role 'robot'"),
        (pair(chosen=3), "'chosen' must be a list of messages, a message or a string, got int"),  # said 'messages'
    ],
)
def test_bad_pairs(tmp_path: Path, row: dict[str, Any], needle: str) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(), row])
    with pytest.raises(DialogRLError) as info:
        load_preference_pairs(path)
    assert "pairs.jsonl row 2" in str(info.value) and needle in str(info.value)


@needs_realdata
def test_taskmaster_pairs_load() -> None:
    pairs = load_preference_pairs(REALDATA / "taskmaster4" / "reward_pairs_dpo.jsonl")
    assert len(pairs) == 220
    assert all(p["chosen"] != p["rejected"] and p["prompt"][0]["role"] == "system" for p in pairs)
    assert all(p["chosen"][0]["role"] == "assistant" for p in pairs)


def test_own_environment_logs_load_unchanged(tmp_path: Path) -> None:
    import dialogrl.policies.scripted as scripted
    from dialogrl.evaluation import make_env, run_episodes, scenario_seeds, text_policy_act

    records = run_episodes(lambda: make_env("dialogrl/CustomerService-v0", split="train"),
                           text_policy_act(scripted.make_scripted("historical", seed=0)),
                           scenario_seeds(1, 12), keep_messages=True)
    path = tmp_path / "historical.jsonl"
    write_logs(records, path)
    rows = load_conversations(path, require_success_field=True)
    assert [r["messages"] for r in rows] == [r["messages"] for r in records]
    assert len(filter_success(rows)) == sum(r["success"] for r in records)
