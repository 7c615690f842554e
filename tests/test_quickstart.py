"""The main job end to end on a tiny base model and tiny budgets: every stage runs and the report has every method."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from dialogrl.types import DialogRLError

pytestmark = pytest.mark.slow


def _tiny_job(tmp_path: Path, **overrides: object):
    from dialogrl.policies.bootstrap import BootstrapConfig
    from dialogrl.quickstart import QuickstartConfig

    cfg = QuickstartConfig(
        out=str(tmp_path / "qs"), log_episodes=40, eval_episodes=6,
        base={k: v for k, v in asdict(BootstrapConfig.tiny()).items()},
        sft=["max_steps=4", "eval_steps=2", "logging_steps=2"],
        ppo=["iterations=1", "episodes_per_iteration=8", "minibatch_episodes=8", "env_batch=8", "max_turns=3",
             "max_new_tokens=12"],
        dpo=["rounds=1", "scenarios_per_round=8", "states_per_episode=2", "candidates=4", "max_turns=3",
             "max_new_tokens=12", "margin=0.01"],  # tied candidates make no pair: enough of them to differ
        reward_model=["collect_episodes=8", "states_per_episode=1", "max_turns=3", "epochs=1", "eval_fraction=0.25"],
        methods=["sft", "sft-filtered", "ppo", "dpo", "ppo-rm", "sft-expert"], log_errors={"skip_verification": 1.0})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_quickstart_runs_every_stage_and_reports_every_method(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from dialogrl.quickstart import run_quickstart

    monkeypatch.setenv("DIALOGRL_CACHE", str(tmp_path / "cache"))
    cfg = _tiny_job(tmp_path)
    report = run_quickstart(cfg)
    out = Path(cfg.out)
    assert set(report["methods"]) == {"sft", "sft-filtered", "ppo", "dpo", "ppo-rm", "sft-expert", "expert",
                                      "historical"}
    for method in ("sft-filtered", "ppo", "dpo", "ppo-rm", "sft-expert"):
        vs = report["methods"][method]["vs_baseline"]
        diff = report["methods"][method]["success_rate"] - report["methods"]["sft"]["success_rate"]
        assert vs["shared_scenarios"] == 6 and vs["success_rate"]["mean_diff"] == pytest.approx(diff)
        assert vs["success_rate"]["low"] <= vs["success_rate"]["mean_diff"] <= vs["success_rate"]["high"]
    for name in ("report.md", "report.json", "report.png"):
        assert (out / "report" / name).is_file() and (out / "report_sampled" / name).is_file()
    timings = json.loads((out / "timings.json").read_text())
    assert {"base", "logs", "sft-s0", "ppo-s0", "dpo-s0", "total"} <= set(timings)
    assert timings["peak_rss_mb"]["report"] >= timings["peak_rss_mb"]["base"] > 0
    assert len(list((tmp_path / "cache").glob("base-*"))) == 1  # the base model went to the cache
    # ppo-rm trained on the learned reward alone; its evaluation still judges true success from the database.
    run = json.loads((out / "ppo-rm-s0" / "run.json").read_text())
    assert run["config"]["rewards"] == ["dialogrl.rewards.reward_model:from_env"] and run["method"] == "ppo-rm"
    assert (run["config"]["kl_coef"], run["config"]["kl_estimator"]) == (1.0, "k1")  # scaled to the learned reward
    ppo_config = json.loads((out / "ppo-s0" / "run.json").read_text())["config"]
    assert (ppo_config["kl_coef"], ppo_config["kl_estimator"]) == (0.05, "k1")
    assert Path(run["reward_model_dirs"]) == (out / "rm-s0").resolve() and (out / "rm-s0" / "run.json").is_file()
    assert os.environ.get("DIALOGRL_REWARD_MODEL") is None  # set for that run only
    # The logs' author had the configured habit: it never verified anyone.
    logs = (out / "logs" / "historical.jsonl").read_text()
    assert "[lookup_order" in logs and "[verify" not in logs
    # sft-expert learned from the expert's conversations with the same customers, under its own name.
    expert = [json.loads(line) for line in (out / "logs" / "expert.jsonl").read_text().splitlines()]
    historical = [json.loads(line) for line in logs.splitlines()]
    assert [r["seed"] for r in expert] == [r["seed"] for r in historical] and all(r["success"] for r in expert)
    run = json.loads((out / "sft-expert-s0" / "run.json").read_text())
    assert run["method"] == "sft-expert" and run["train_files"] == [str((out / "logs" / "expert.jsonl").resolve())]

    # A second run finds every output and skips the work (resume after an interruption).
    again = run_quickstart(cfg)
    assert again["methods"]["ppo"]["success_rate"] == report["methods"]["ppo"]["success_rate"]
    resumed = json.loads((out / "timings.json").read_text())  # the skipped steps keep their first-run numbers
    assert resumed["ppo-s0"] == timings["ppo-s0"] and resumed["peak_rss_mb"]["ppo-s0"] == timings["peak_rss_mb"]["ppo-s0"]
    assert resumed["base"] == timings["base"]  # the cached base keeps the seconds its build took
    assert len(resumed["invocations"]) == 2 and resumed["untimed"] == []
    # A trained run that lost an evaluation gets it back, without training again.
    adapter = (out / "ppo-s0" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    sampled_before = json.loads((out / "ppo-s0" / "eval_sampled.json").read_text())["records"]
    (out / "ppo-s0" / "eval_sampled.json").unlink()
    run_quickstart(cfg)
    assert json.loads((out / "ppo-s0" / "eval_sampled.json").read_text())["records"] == sampled_before
    assert (out / "ppo-s0" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter
    # Outputs this folder never timed (copied in from elsewhere) are listed as untimed, not timed as zero.
    (out / "timings.json").unlink()
    run_quickstart(cfg)
    copied = json.loads((out / "timings.json").read_text())
    assert "ppo-s0" in copied["untimed"] and "ppo-s0" not in copied and "report" in copied
    assert "base" in copied["untimed"] and "base" not in copied  # cached before this folder timed anything
    # ... but not with settings that shaped those outputs.
    with pytest.raises(DialogRLError, match=r"log_errors=\{\"skip_verification\": 1.0\}, not \{\}"):
        run_quickstart(_tiny_job(tmp_path, log_errors={}))


def test_bad_log_error_rates_fail_before_anything_is_written(tmp_path: Path) -> None:
    from dialogrl.quickstart import run_quickstart

    with pytest.raises(DialogRLError, match="unknown historical error rate 'skip_verify'"):
        run_quickstart(_tiny_job(tmp_path, log_errors={"skip_verify": 0.5}))
    with pytest.raises(DialogRLError, match=r"'ramble' must be a number in \[0, 1\], got 1.5"):
        run_quickstart(_tiny_job(tmp_path, log_errors={"ramble": 1.5}))
    with pytest.raises(DialogRLError, match="n_layers"):
        run_quickstart(_tiny_job(tmp_path, base={"n_layers": 2}))  # BootstrapConfig calls it n_layer
    with pytest.raises(DialogRLError, match="unknown key 'iteration'"):
        run_quickstart(_tiny_job(tmp_path, ppo=["iteration=1"]))
    assert not (tmp_path / "qs").exists()


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"seeds": 0}, "seeds=0: must be at least 1"),
    ({"log_episodes": 0}, "log_episodes=0: must be at least 1"),
    ({"eval_episodes": 0}, "eval_episodes=0: must be at least 1"),
    ({"eval_episodes": -1, "scripted_only": True}, "eval_episodes=-1: must be at least 1"),
    ({"baseline": "bogus"}, "baseline=bogus: neither one of the methods (sft, sft-filtered, ppo, dpo, ppo-rm, "
                            "sft-expert) nor a scripted reference (expert, historical)"),  # failed after all training
    ({"baseline": "ppo", "methods": ["sft", "dpo"]}, "baseline=ppo: neither one of the methods (sft, dpo)"),
    ({"ppo": ["minibatch_episodes=0"]}, "minibatch_episodes=0: must be at least 1"),
    ({"sft": ["lr_scheduler_type=bogus"]}, "lr_scheduler_type=bogus: not a transformers SchedulerType"),
    ({"dpo": ["loss_type=bogus"]}, "loss_type=bogus: not a TRL DPO loss"),
    # Each of these was found only after a step had written into the folder (and its quickstart.json then
    # refused the corrected rerun), or trained into a path outside it.
    ({"eval_seed": -1}, "eval_seed=-1: must be a seed in [0, 4294967295]"),
    ({"base": {"steps": 0}}, "steps=0: must be at least 1"),
    ({"base": {"lr": -1}}, "lr=-1.0: must be a finite number > 0"),
    ({"ppo": ["seed=-1"]}, "ppo=[seed=-1]: the quickstart sets seed for every ppo run itself"),
    ({"sft": ["output_dir=x"]}, "sft=[output_dir=x]: the quickstart sets output_dir"),
    ({"sft": ["train_file=x.jsonl"]}, "sft=[train_file=x.jsonl]: the quickstart sets train_file"),
    ({"dpo": ["init_adapter=elsewhere"]}, "dpo=[init_adapter=elsewhere]: the quickstart sets init_adapter"),
    ({"reward_model": ["output_dir=rm"]}, "reward_model=[output_dir=rm]: the quickstart sets output_dir"),
    ({"methods": ["sft", "sft"]}, 'methods=["sft", "sft"]: name each method to train once'),
    ({"methods": []}, "methods=[]: name each method to train once, at least one"),  # blamed the baseline
])
def test_bad_settings_fail_before_anything_is_written(tmp_path: Path, overrides: dict, needle: str) -> None:
    from dialogrl.quickstart import run_quickstart

    with pytest.raises(DialogRLError) as err:
        run_quickstart(_tiny_job(tmp_path, **overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "qs").exists()


def test_out_is_new_or_a_quickstart_folder(tmp_path: Path) -> None:
    from dialogrl.quickstart import _check_out_folder, run_quickstart

    mine = tmp_path / "qs"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DialogRLError, match=r"^out=.*qs: holds notes.txt, which is not a quickstart output"):
        run_quickstart(_tiny_job(tmp_path))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (mine / "notes.txt").unlink()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DialogRLError, match=r"^out=.*afile: is a file"):
        run_quickstart(_tiny_job(tmp_path, out=str(afile)))
    for name in ("logs", "sft-s0", "ppo-rm-s2", "rm-s1", "report", "report_sampled", "expert.eval.json",
                 "timings.json", ".sft-s0.tmp-abc"):
        (mine / name).mkdir()
    _check_out_folder(mine)  # an earlier job's folder (from before quickstart.json): adopted


def test_a_scripted_reference_can_be_the_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dialogrl.quickstart as quickstart

    def stop(cfg: object, out: Path) -> None:
        raise DialogRLError("validation passed")

    monkeypatch.setattr(quickstart, "_check_same_job", stop)  # the first step after the up-front checks
    for baseline in ("expert", "historical", "dpo"):
        with pytest.raises(DialogRLError, match="validation passed"):
            quickstart.run_quickstart(_tiny_job(tmp_path, baseline=baseline, isolate_steps=False))


def test_rl_methods_need_sft_first(tmp_path: Path) -> None:
    from dialogrl.quickstart import run_quickstart

    with pytest.raises(DialogRLError, match="put 'sft' before 'dpo'"):
        run_quickstart(_tiny_job(tmp_path, methods=["dpo", "sft"]))
    with pytest.raises(DialogRLError, match="unknown method 'grpo'"):
        run_quickstart(_tiny_job(tmp_path, methods=["sft", "grpo"]))


def test_a_job_killed_half_way_keeps_the_seconds_of_the_steps_it_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dialogrl.agents.ppo as ppo
    from dialogrl.quickstart import run_quickstart

    monkeypatch.setenv("DIALOGRL_CACHE", str(tmp_path / "cache"))
    cfg = _tiny_job(tmp_path, methods=["sft", "ppo"], isolate_steps=False)  # so the patched PPO is the one run
    real_train_ppo = ppo.train_ppo

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ppo, "train_ppo", killed)
    with pytest.raises(KeyboardInterrupt):
        run_quickstart(cfg)
    timings = json.loads((Path(cfg.out) / "timings.json").read_text())
    assert {"base", "logs", "sft-s0"} <= set(timings) and "ppo-s0" not in timings and timings["sft-s0"] > 0
    assert timings["total"] == pytest.approx(timings["base"] + timings["logs"] + timings["sft-s0"])
    assert timings["untimed"] == [] and len(timings["invocations"]) == 1

    monkeypatch.setattr(ppo, "train_ppo", real_train_ppo)
    run_quickstart(cfg)  # resumed: SFT is not trained again and keeps the seconds it took
    resumed = json.loads((Path(cfg.out) / "timings.json").read_text())
    assert resumed["sft-s0"] == timings["sft-s0"] and resumed["ppo-s0"] > 0 and resumed["untimed"] == []
    assert len(resumed["invocations"]) == 2

    # With every step in a process of its own (the default), a step trains the same whether or not the steps
    # before it ran in this job: PPO retrained after a resume (SFT skipped) has the same conversations.
    isolated = _tiny_job(tmp_path, methods=["sft", "ppo"], out=str(tmp_path / "isolated"))
    run_quickstart(isolated)
    first = json.loads((Path(isolated.out) / "ppo-s0" / "eval_sampled.json").read_text())["records"]
    shutil.rmtree(Path(isolated.out) / "ppo-s0")
    run_quickstart(isolated)
    assert json.loads((Path(isolated.out) / "ppo-s0" / "eval_sampled.json").read_text())["records"] == first


def test_a_folder_from_before_isolated_steps_is_not_resumed_with_them(tmp_path: Path) -> None:
    from dialogrl.config import config_to_dict
    from dialogrl.quickstart import RESUMABLE, _check_same_job

    cfg = _tiny_job(tmp_path)
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUMABLE and k != "isolate_steps"}
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "quickstart.json").write_text(json.dumps(settings))  # written before the setting existed
    with pytest.raises(DialogRLError, match=r"holds a quickstart run with isolate_steps=false, not true"):
        _check_same_job(cfg, tmp_path / "qs")
    cfg.isolate_steps = False
    _check_same_job(cfg, tmp_path / "qs")  # the same job, resumed as it ran


def _hold_memory(mib: int) -> int:
    block = b"\x01" * (mib * 2**20)  # every byte written, so every page is resident
    return len(block)


def test_an_isolated_step_counts_its_own_memory_in_the_jobs_peak() -> None:
    from dialogrl.step_process import StepRunner

    runner = StepRunner(isolate=True)
    assert runner(_hold_memory, 300) == 300 * 2**20  # the result comes back from the step's process
    assert runner.peak_mb() >= runner.isolated_peak_mb >= 300  # 300 MiB held there, counted here


def _freed_mib_still_resident() -> float:
    """Resident MiB left behind by freeing every other one of 60 blocks of 5 MiB (150 MiB freed): holes between
    blocks still in use, which a heap cannot hand back."""
    from dialogrl.step_process import own_rss_mb

    warm = b"\x01" * (8 * 2**20)  # freeing an 8 MiB mapping lifts glibc's default threshold above 5 MiB
    del warm
    blocks = [b"\x01" * (5 * 2**20) for _ in range(60)]  # every page written, so resident
    before = own_rss_mb()
    del blocks[::2]
    return 150 - (before - own_rss_mb())


def _freed_mib_still_resident_bounded() -> float:
    from dialogrl.step_process import limit_heap_growth

    assert limit_heap_growth()
    return _freed_mib_still_resident()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_bounded_heap_hands_freed_memory_back() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for task, check in ((_freed_mib_still_resident, lambda mib: mib > 120),  # glibc's default keeps it
                        (_freed_mib_still_resident_bounded, lambda mib: mib < 30)):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as process:
            assert check(process.submit(task).result())


def test_only_the_rollout_trainers_bound_their_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    from dialogrl import step_process

    monkeypatch.setattr(step_process, "limit_heap_growth", lambda: True)  # not in this test's own process
    bounded = [name for name in ("ppo", "ppo-rm", "dpo", "sft", "sft-filtered", "sft-expert", "reward-model",
                                 "eval", "quickstart", "") if step_process.limit_heap_growth_for(name)]
    assert bounded == ["ppo", "ppo-rm", "dpo"]


def test_a_users_malloc_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from dialogrl.step_process import limit_heap_growth

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not limit_heap_growth()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert not limit_heap_growth()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_job_takes_its_step_process_with_it(tmp_path: Path) -> None:
    script = ("import time\nfrom dialogrl.step_process import StepRunner\n"
              "if __name__ == '__main__':\n    StepRunner(isolate=True)(time.sleep, 120)\n")
    (tmp_path / "job.py").write_text(script)
    job = subprocess.Popen([sys.executable, str(tmp_path / "job.py")])
    children: list[int] = []
    deadline = time.time() + 60
    while time.time() < deadline and not children:  # the step's process, once started (skipping the
        time.sleep(0.2)  # multiprocessing resource tracker, which is not a step)
        children = [pid for pid in _children(job.pid) if "resource_tracker" not in _cmdline(pid)]
    assert children, "the step process never started"
    job.send_signal(signal.SIGKILL)  # no chance for the job to stop its step
    job.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children), "the step outlived its job"


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits for a reaper
