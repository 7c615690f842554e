"""The command line: eval JSON, plug-in rewards and scenarios, conversation logs, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dialogrl.cli import format_metrics, main
from dialogrl.envs import ENV_IDS
from dialogrl.envs.scenario import split_of_id
from dialogrl.evaluation import scenario_seeds
from dialogrl.rewards import list_rewards

FIXTURES = Path(__file__).parent / "fixtures"
CUSTOM_SCENARIO = FIXTURES / "damaged_item.yaml"
METRICS = {"success_rate", "mean_return", "mean_turns", "violation_rate", "invalid_action_rate",
           "mean_reply_chars", "reward_components"}
RECORD = {"scenario_seed", "repeat", "intent", "persona", "success", "return", "turns", "violations",
          "invalid_actions", "reply_chars", "reward_components"}


def run_eval(tmp_path: Path, *args: str, name: str = "eval.json") -> dict[str, Any]:
    out = tmp_path / name
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


# --- eval JSON ------------------------------------------------------------------------------------------------


def test_eval_json_has_the_documented_keys_and_consistent_metrics(tmp_path: Path) -> None:
    result = run_eval(tmp_path, "--policy", "historical", "--episodes", "30", "--seed", "2")
    assert {"policy", "method", "env_id", "split", "seed", "episodes", "decoding", "training_seed", "metrics",
            "by_persona", "by_intent", "records"} <= set(result)
    assert (result["policy"], result["split"], result["seed"], result["episodes"]) == ("historical", "test", 2, 30)
    assert result["decoding"] == "scripted"
    metrics, records = result["metrics"], result["records"]
    assert METRICS <= set(metrics)
    assert len(records) == 30 and all(RECORD <= set(r) for r in records)
    # The summary is computed from the records, not made up.
    assert metrics["success_rate"] == pytest.approx(np.mean([r["success"] for r in records]))
    assert metrics["mean_return"] == pytest.approx(np.mean([r["return"] for r in records]))
    assert metrics["mean_turns"] == pytest.approx(np.mean([r["turns"] for r in records]))
    assert metrics["violation_rate"] == pytest.approx(np.mean([r["violations"] > 0 for r in records]))
    assert metrics["invalid_action_rate"] == pytest.approx(
        sum(r["invalid_actions"] for r in records) / sum(r["turns"] for r in records))
    assert set(metrics["reward_components"]) == {"success", "violation", "invalid_action", "turn_cost", "politeness"}
    assert sum(metrics["reward_components"].values()) == pytest.approx(metrics["mean_return"])
    for r in records:
        assert sum(r["reward_components"].values()) == pytest.approx(r["return"])
    for group, key in (("by_persona", "persona"), ("by_intent", "intent")):
        assert set(result[group]) == {r[key] for r in records}
        assert sum(g["episodes"] for g in result[group].values()) == 30
        for name, g in result[group].items():
            assert {"episodes", "success_rate", "mean_return"} <= set(g)
            mine = [r for r in records if r[key] == name]
            assert g["success_rate"] == pytest.approx(np.mean([r["success"] for r in mine]))


def test_eval_of_a_run_directory_records_its_method_seed_and_decoding(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "sft-s3"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "sft", "seed": 3, "base_model": str(tiny_model_dir),
                                              "config": {"max_new_tokens": 8}}))
    (run / "adapter").mkdir()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])).save_pretrained(
        run / "adapter")
    args = ("--policy", str(run), "--episodes", "3", "--max-turns", "2")
    greedy = run_eval(tmp_path, *args, name="greedy.json")
    sampled = run_eval(tmp_path, *args, "--decoding", "sampled", name="sampled.json")
    named = run_eval(tmp_path, *args, "--method", "mine", name="named.json")
    assert (greedy["method"], greedy["training_seed"], greedy["decoding"]) == ("sft", 3, "greedy")
    assert (sampled["method"], sampled["decoding"]) == ("sft", "sampled")
    assert named["method"] == "mine"
    with_transcripts = run_eval(tmp_path, *args, "--transcripts", str(tmp_path / "t.jsonl"), name="t.json")
    assert with_transcripts["metrics"] == greedy["metrics"]  # KL included: transcripts change nothing measured
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 3
    # The run's own sampled evaluation is what `dialogrl eval --decoding sampled` gives, past one batch of 32
    # (the command's batch was 32 and the run's 64: 7 of 10 sampled conversations differed).
    from dialogrl.evaluation import evaluate_run

    own = evaluate_run(run, 70, 0, method="sft", training_seed=3, env_kwargs={"max_turns": 2})["sampled"]
    again = run_eval(tmp_path, "--policy", str(run), "--episodes", "70", "--max-turns", "2", "--decoding", "sampled",
                     name="again.json")
    assert again["records"] == own["records"]
    # A fresh LoRA adapter (B = 0) has not moved the model: KL to the reference (adapter disabled) is 0.
    assert greedy["metrics"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert "kl_to_reference" in format_metrics({"sft": greedy})


def test_eval_transcripts_are_the_evaluated_conversations_as_logs(tmp_path: Path) -> None:
    from dialogrl.data import load_conversations

    transcripts = tmp_path / "transcripts.jsonl"
    result = run_eval(tmp_path, "--policy", "historical", "--episodes", "12", "--seed", "4",
                      "--transcripts", str(transcripts))
    plain = run_eval(tmp_path, "--policy", "historical", "--episodes", "12", "--seed", "4", name="plain.json")
    assert result["records"] == plain["records"]  # no conversations in the evaluation JSON
    rows = load_conversations(transcripts, require_success_field=True)
    assert [(r["seed"], r["success"], r["intent"]) for r in rows] == [
        (r["scenario_seed"], r["success"], r["intent"]) for r in result["records"]]
    assert all(r["messages"][0]["role"] == "system" and any(m["role"] == "assistant" for m in r["messages"])
               for r in rows)
    assert main(["eval", "--policy", "expert", "--out", str(tmp_path / "x.json"),
                 "--transcripts", str(tmp_path / "x.json")]) == 2


def test_same_seed_pairs_policies_on_the_same_scenarios(tmp_path: Path) -> None:
    expert = run_eval(tmp_path, "--policy", "expert", "--episodes", "25", "--seed", "7", name="a.json")
    rand = run_eval(tmp_path, "--policy", "random", "--episodes", "25", "--seed", "7", name="b.json")
    other = run_eval(tmp_path, "--policy", "expert", "--episodes", "25", "--seed", "8", name="c.json")

    def keys(result: dict[str, Any]) -> list[tuple[int, int, str, str]]:
        return [(r["scenario_seed"], r["repeat"], r["intent"], r["persona"]) for r in result["records"]]

    assert keys(expert) == keys(rand)  # same customers, same order
    assert [k[0] for k in keys(expert)] == scenario_seeds(7, 25)
    assert not {k[0] for k in keys(expert)} & {k[0] for k in keys(other)}
    assert expert["metrics"]["success_rate"] > rand["metrics"]["success_rate"]


# --- plug-ins -------------------------------------------------------------------------------------------------


def test_custom_reward_by_import_path_is_its_own_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    result = run_eval(tmp_path, "--policy", "expert", "--episodes", "5", "--reward", "success",
                      "--reward", "custom_rewards:brevity=0.1")
    components = result["metrics"]["reward_components"]
    assert set(components) == {"success", "custom_rewards:brevity"}
    for r in result["records"]:
        # brevity = -0.1 * characters / 100, summed over the episode's replies.
        assert r["reward_components"]["custom_rewards:brevity"] == pytest.approx(
            -0.1 * r["reply_chars"] * r["turns"] / 100)
        assert r["reward_components"]["success"] == float(r["success"])
    assert components["custom_rewards:brevity"] < 0
    assert "expert" in capsys.readouterr().out


def test_user_scenario_file_through_the_cli(tmp_path: Path) -> None:
    result = run_eval(tmp_path, "--policy", "expert", "--episodes", "12", "--scenario", str(CUSTOM_SCENARIO),
                      "--intent", "damaged_item")
    assert set(result["by_intent"]) == {"damaged_item"}
    assert result["metrics"]["success_rate"] >= 0.9


# --- conversation logs ----------------------------------------------------------------------------------------


def test_logs_write_jsonl_that_datasets_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "logs.jsonl"
    argv = ["logs", "--policy", "historical", "--episodes", "20", "--split", "train", "--seed", "3", "--out"]
    # Reproducible from the seed alone: also in other processes with other string-hash seeds.
    procs = [subprocess.Popen([sys.executable, "-m", "dialogrl.cli", *argv, str(tmp_path / f"p{h}.jsonl")],
                              env={**os.environ, "PYTHONHASHSEED": str(h)}, stdout=subprocess.DEVNULL)
             for h in (1, 2)]
    assert main([*argv, str(out)]) == 0
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert out.read_bytes() == (tmp_path / "p1.jsonl").read_bytes() == (tmp_path / "p2.jsonl").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 20
    assert {"messages", "intent", "persona", "seed", "success", "return", "reward_components"} <= set(ds.column_names)
    assert ds["seed"] == scenario_seeds(3, 20)
    for row in ds:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and roles[1] == "user" and "assistant" in roles
        assert set(roles) <= {"system", "user", "assistant", "tool"}
        assert all(isinstance(m["content"], str) for m in row["messages"])
        ids = [i for m in row["messages"] for i in re.findall(r"\bA\d{5}\b", m["content"])]
        assert all(split_of_id(i) == "train" for i in ids)  # train-split orders only
        components = {k: v for k, v in row["reward_components"].items() if v is not None}
        assert sum(components.values()) == pytest.approx(row["return"])
    rates = np.mean(ds["success"])
    assert 0.0 < rates < 1.0  # historical logs are of mixed quality


def test_logs_of_a_historical_agent_with_other_error_rates(tmp_path: Path) -> None:
    argv = ["logs", "--episodes", "30", "--seed", "3", "--out"]
    assert main([*argv, str(tmp_path / "default.jsonl")]) == 0
    assert main([*argv, str(tmp_path / "never.jsonl"), "--error", "skip_verification=1", "--error", "ramble=0"]) == 0
    default, never = ((tmp_path / f"{n}.jsonl").read_text() for n in ("default", "never"))
    assert "[verify" in default and "[verify" not in never


def test_envs_and_rewards_commands_list_what_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs"]) == 0
    listed = capsys.readouterr().out
    assert all(env_id in listed for env_id in ENV_IDS)
    assert main(["rewards"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in list_rewards())


# --- bad input: one line, exit code 2, no traceback -----------------------------------------------------------

EVAL = ["eval", "--policy", "expert", "--episodes", "2"]
BAD_INPUT: dict[str, tuple[list[str], list[str]]] = {
    # case: (arguments, what the line must name)
    "unknown_env": ([*EVAL, "--env", "dialogrl/Nope-v0"], ["unknown env id", "dialogrl/Nope-v0"]),
    "unknown_reward": ([*EVAL, "--reward", "nosuch_reward"], ["unknown reward", "nosuch_reward"]),
    "unimportable_reward": ([*EVAL, "--reward", "no_such_module:fn"], ["no_such_module:fn"]),
    "raising_reward": ([*EVAL, "--reward", "custom_rewards:exploding"], ["custom_rewards:exploding", "boom"]),
    "malformed_yaml": ([*EVAL, "--scenario", str(FIXTURES / "malformed.yaml")], ["malformed.yaml", "YAML"]),
    "missing_key": ([*EVAL, "--scenario", str(FIXTURES / "missing_key.yaml")], ["missing_key.yaml", "resolution"]),
    "negative_episodes": (["eval", "--policy", "expert", "--episodes", "-3"], ["episodes", "-3"]),
    "unknown_policy": (["eval", "--policy", "nosuch_policy", "--episodes", "2"],
                       ["nosuch_policy", "neither a scripted policy (expert, historical"]),
    "unknown_intent": ([*EVAL, "--intent", "no_such_intent"], ["no_such_intent"]),
    "negative_seed": ([*EVAL, "--seed", "-1"], ["--seed", "must be zero or positive, got -1"]),
    "text_policy_on_acts_env": ([*EVAL, "--env", "dialogrl/CustomerServiceActs-v0"], ["CustomerServiceActs-v0"]),
    "scenario_wrong_type": ([*EVAL, "--scenario", "wrong_type.yaml"], ["wrong_type.yaml", "order"]),
    "scenario_bad_placeholder": ([*EVAL, "--scenario", "bad_placeholder.yaml", "--intent", "refund"],
                                 ["bad_placeholder.yaml", "nokey"]),
    "unknown_error_rate": (["eval", "--policy", "historical", "--episodes", "2", "--error", "skip_verify=0.5"],
                           ["skip_verify", "skip_verification"]),
    "error_rate_not_a_number": (["eval", "--policy", "historical", "--episodes", "2", "--error", "ramble=lots"],
                                ["ramble=lots"]),
    "error_rate_out_of_range": (["eval", "--policy", "historical", "--episodes", "2", "--error", "ramble=2"],
                                ["ramble", "[0, 1]"]),
    "error_rate_for_the_expert": ([*EVAL, "--error", "ramble=0.5"], ["historical", "expert"]),
    "decoding_for_the_expert": ([*EVAL, "--decoding", "sampled"], ["--decoding", "expert"]),
    "empty_method_name": ([*EVAL, "--method", ""], ["--method", "empty"]),
}
EVAL_WRITES = {k for k, (argv, _) in BAD_INPUT.items() if argv[0] == "eval"}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every bad-input command at once, each in its own folder (the processes only import and fail)."""
    refund = Path(__file__).parents[1] / "envs" / "scenarios" / "refund.yaml"
    text = refund.read_text()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for case, (argv, _) in BAD_INPUT.items():
        cwd = tmp_path_factory.mktemp(case)
        (cwd / "wrong_type.yaml").write_text(re.sub(r"order:\n(  .*\n)+", "order: 5\n", text))
        (cwd / "bad_placeholder.yaml").write_text(text.replace('"{total}"', '"{nokey}"'))
        extra = ["--out", str(cwd / "eval.json")] if case in EVAL_WRITES else []
        procs[case] = (subprocess.Popen([sys.executable, "-m", "dialogrl.cli", *argv, *extra], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cwd)
    runs = {}
    for case, (proc, cwd) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        runs[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), cwd)
    return runs


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_code_2(
    bad_input_runs: dict[str, tuple[subprocess.CompletedProcess, Path]], case: str
) -> None:
    result, cwd = bad_input_runs[case]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("dialogrl: error: ")
    for word in BAD_INPUT[case][1]:
        assert word.lower() in line.lower(), (word, line)
    assert sorted(p.name for p in cwd.iterdir() if not p.name.endswith(".yaml")) == []  # nothing half-written



# --- bad input checked before any work, in process: one line naming the problem, nothing written -------------


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dialogrl: error: "), err
    return err.strip()


@pytest.mark.parametrize("command", ["eval", "logs"])
def test_foreign_gymnasium_id_is_refused_listing_the_dialogrl_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 command: str) -> None:
    argv = [command, "--policy", "expert", "--episodes", "2", "--env", "CartPole-v1", "--out", str(tmp_path / "o")]
    line = one_line_error(argv, capsys)
    assert "'CartPole-v1' is not a dialogrl environment" in line
    assert all(env_id in line for env_id in ENV_IDS)
    assert list(tmp_path.iterdir()) == []


def test_per_intent_env_and_a_conflicting_intent_are_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    for command in ("eval", "logs"):
        line = one_line_error([command, "--policy", "expert", "--episodes", "2", "--env", "dialogrl/Refund-v0",
                               "--intent", "order_status", "--out", str(out)], capsys)
        assert "intent 'order_status' conflicts with env 'dialogrl/Refund-v0'" in line
        assert "'refund' only" in line and "dialogrl/CustomerService-v0" in line
    assert list(tmp_path.iterdir()) == []
    # The env's own intent is no conflict, and what is recorded is what ran.
    result = run_eval(tmp_path, "--policy", "expert", "--episodes", "3", "--env", "dialogrl/Refund-v0",
                      "--intent", "refund")
    assert result["env_id"] == "dialogrl/Refund-v0" and set(result["by_intent"]) == {"refund"}


@pytest.mark.parametrize("run,key", [({"method": 7, "seed": 0}, "method"), ({"method": "sft", "seed": "3"}, "seed"),
                                     ({"method": "", "seed": 1}, "method"), ({"method": "sft", "seed": 1.5}, "seed")])
def test_run_json_fields_are_checked_before_a_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          run: dict[str, Any], key: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({**run, "base_model": str(tmp_path / "no_model")}))
    out = tmp_path / "eval.json"
    line = one_line_error(["eval", "--policy", str(run_dir), "--episodes", "2", "--out", str(out)], capsys)
    assert f"{run_dir / 'run.json'}: key '{key}'" in line and f"got {run[key]!r}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("command", ["eval", "logs"])
def test_out_path_is_checked_before_the_episodes_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import dialogrl.evaluation

    def never(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("episodes ran before --out was checked")

    monkeypatch.setattr(dialogrl.evaluation, "run_episodes", never)
    folder, blocker = tmp_path / "adir", tmp_path / "afile"
    folder.mkdir()
    blocker.write_text("x")
    argv = [command, "--policy", "expert", "--episodes", "2", "--out"]
    line = one_line_error([*argv, str(folder)], capsys)
    example = folder / ("eval.json" if command == "eval" else "logs.jsonl")  # logs suggested eval.json
    assert f"--out {folder}: is a directory; give a file path, e.g. {example}" in line and ".tmp" not in line
    if command == "eval":  # named --out, not the flag it was
        line = one_line_error([*argv, str(tmp_path / "e.json"), "--transcripts", str(folder)], capsys)
        assert f"--transcripts {folder}: is a directory; give a file path, e.g. {folder / 'transcripts.jsonl'}" in line
        line = one_line_error(["eval", "--policy", str(blocker), "--episodes", "2"], capsys)
        assert f"--policy {blocker}: a file; give a run directory" in line  # said "no such local directory"
    assert "empty path ''" in one_line_error([*argv, ""], capsys)
    line = one_line_error([*argv, str(blocker / "sub" / "x.json")], capsys)
    assert f"--out {blocker / 'sub' / 'x.json'}: {blocker} is not a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not any(folder.iterdir())


def test_write_errors_name_the_target_not_the_temp_file(tmp_path: Path) -> None:
    from dialogrl.data import write_logs
    from dialogrl.evaluation import write_json

    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_text("")
    with pytest.raises(OSError) as err:
        write_json({"a": 1}, target)
    assert err.value.filename == str(target)
    with pytest.raises(OSError) as err:
        write_logs([], target)
    assert err.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["keep"]


def test_main_restores_the_callers_sigterm_handler(capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(["envs"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
