"""Secrets and paths: deploy.api_key never reaches output, files or a command line; the keyless CPU engine stays
on loopback; names and --run folders cannot point outside outputs/; the shipped eval sets share no prompt with
the shipped training data."""

import json
import os
import subprocess
import sys

import pytest

import common
import config
import deploy

ROOT = common.ROOT
KEY = "sk-test-5ecret-4242"


def run(script, *args, env=None):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SFT_PROFILE": "", **(env or {})})


# ---------------------------------------------------------------- the API key

def test_printed_config_masks_the_key():
    done = run("config.py", "--set", f"deploy.api_key={KEY}")
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout and "deploy.api_key = '***'" in done.stdout


def test_key_from_the_environment_is_used_and_masked(monkeypatch):
    done = run("config.py", env={"VLLM_API_KEY": KEY})
    assert KEY not in done.stdout and "deploy.api_key = '***'" in done.stdout
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    assert config.build_config()["deploy"]["api_key"] == KEY
    assert config.build_config(overrides=["deploy.api_key=mine"])["deploy"]["api_key"] == "mine"  # the user's wins
    monkeypatch.delenv("VLLM_API_KEY")
    assert config.build_config()["deploy"]["api_key"] is None


def test_saved_configs_leave_the_key_out(tmp_path):
    """save_config writes every config.json (run, processed data, deploy_config.json)."""
    cfg = config.build_config(overrides=[f"deploy.api_key={KEY}"])
    path = tmp_path / "config.json"
    config.save_config(cfg, str(path), extra={"step": "all"})
    text = path.read_text(encoding="utf-8")
    assert KEY not in text and json.loads(text)["config"]["deploy"]["api_key"] is None
    assert cfg["deploy"]["api_key"] == KEY  # the running config keeps it


def test_check_dataset_report_leaves_the_key_out(tmp_path, demo_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    report = tmp_path / "report.json"
    done = run("check_dataset.py", str(data), "--profile", "demo", "--set", f"deploy.api_key={KEY}",
               "--json-report", str(report))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert KEY not in done.stdout + done.stderr and KEY not in report.read_text(encoding="utf-8")


def test_vllm_gets_the_key_from_its_environment_not_argv(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    cfg = config.build_config(overrides=[f"deploy.api_key={KEY}"])
    cmd = deploy.vllm_command(cfg, "/models/merged", settings=deploy.vllm_settings(cfg, memory_gb=16))
    assert KEY not in " ".join(cmd) and "--api-key" not in cmd
    assert deploy.server_env(cfg)["VLLM_API_KEY"] == KEY  # vLLM reads VLLM_API_KEY when --api-key is absent
    assert "VLLM_API_KEY" not in deploy.server_env(config.build_config())


def test_evalscope_perf_gets_the_key_from_the_environment(tmp_path, monkeypatch):
    """perf.json stores the command: it must not hold the key. The wrapper appends it inside the process."""
    cfg = config.build_config(overrides=[f"deploy.api_key={KEY}", "deploy.perf_dataset=random"])
    cmd, _, _ = deploy.evalscope_command(cfg, "vllm", None, str(tmp_path))
    assert KEY not in " ".join(cmd) and cmd[:2] == [sys.executable, "-c"] and cmd[3] == "perf"
    import evalscope.cli.cli
    seen = []
    monkeypatch.setattr(evalscope.cli.cli, "run_cmd", lambda: seen.append(list(sys.argv)) or 0)
    monkeypatch.setattr(sys, "argv", ["-c", *cmd[3:]])
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    with pytest.raises(SystemExit) as stop:
        exec(cmd[2], {})
    assert stop.value.code == 0 and seen[0][1] == "perf" and seen[0][-2:] == ["--api-key", KEY]


# ---------------------------------------------------------------- the keyless CPU engine

def test_transformers_engine_refuses_a_non_loopback_host(tmp_path):
    cfg = config.build_config("demo", ["deploy.host=0.0.0.0"])
    with pytest.raises(deploy.DeployError, match="transformers engine checks no API key"):
        deploy.start_server(cfg, str(tmp_path), str(tmp_path / "serve.log"))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        deploy.check_host(config.build_config("demo", [f"deploy.host={host}"]), "transformers")
    deploy.check_host(cfg, "vllm")  # vLLM checks the key
    done = run("deploy.py", "serve", "--profile", "demo", "--set", "deploy.host=0.0.0.0")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "deploy.host '0.0.0.0': the transformers engine checks no API key" in done.stderr


# ---------------------------------------------------------------- names and run folders

@pytest.mark.parametrize("key,value", [
    ("training.run_name", "../x"), ("training.run_name", "/x"), ("training.run_name", ".."),
    ("training.run_name", "."), ("training.run_name", "a/b"), ("training.run_name", "my run"),
    ("deploy.served_model_name", "../evil"), ("deploy.served_model_name", "a/../../x"),
    ("deploy.served_model_name", ""),
])
def test_names_that_would_leave_outputs_are_refused(key, value):
    with pytest.raises(config.ConfigError, match=f"{key} .* must be a plain name"):
        config.build_config(overrides=[f"{key}='{value}'"])


def test_plain_names_are_accepted():
    cfg = config.build_config(overrides=["training.run_name=qwen3-sft_v1.2", "deploy.served_model_name=my.model-2"])
    assert cfg["training"]["run_name"] == "qwen3-sft_v1.2"


def test_name_errors_reach_the_user_without_traceback():
    done = run("train.py", "--set", "training.run_name=../x")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "training.run_name '../x' must be a plain name" in done.stderr


@pytest.mark.parametrize("given", ["outputs/..", "..", ".", "../x", "/tmp/x", "outputs/a/b"])
def test_run_folders_outside_outputs_are_refused(given):
    with pytest.raises(common.UserError, match="is not a run folder under"):
        common.run_folder(config.build_config(), given)


def test_run_folders_under_outputs_resolve():
    cfg = config.build_config()
    expected = os.path.join(ROOT, "outputs", "r1")
    assert common.run_folder(cfg, "outputs/r1") == common.run_folder(cfg, "r1") == expected
    assert common.run_folder(cfg, expected) == expected


def test_deploy_refuses_run_outside_outputs():
    done = run("deploy.py", "merge", "--profile", "demo", "--run", "outputs/..")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--run 'outputs/..' is not a run folder under" in done.stderr


# ---------------------------------------------------------------- decontamination

# Every eval set the suite ships, by hand. Not dataset/perf_prompts.jsonl: it measures speed, not answers.
SHIPPED_EVAL_SETS = ["dataset/eval/qa.jsonl", "dataset/evalscope/qa/math.jsonl", "dataset/evalscope/qa/knowledge.jsonl",
                     "dataset/evalscope/mcq/knowledge_dev.jsonl", "dataset/evalscope/mcq/knowledge_val.jsonl",
                     "dataset/forgetting_probes.json", "dataset/predefined_tests.json"]


def build(tmp_path, *overrides):
    import build_datasets
    return build_datasets.build(config.build_config(overrides=[
        f"data.processed_dir={tmp_path / 'processed'}", f"data.pools_dir={tmp_path / 'pools'}", *overrides]))


def test_every_shipped_eval_set_is_checked_and_none_repeats_training(tmp_path):
    assert config.CONFIG["data"]["eval_files"] == SHIPPED_EVAL_SETS
    rep = build(tmp_path)["decontamination"]
    assert rep["eval_files"] == SHIPPED_EVAL_SETS
    # Only the three rows dataset/eval/qa.jsonl repeats on purpose (tag "overlap-check", make_samples.py), so the
    # check has something to flag; no scored set shares a prompt with the shipped training data.
    assert sorted(f["eval"] for f in rep["examples"]) == [f"dataset/eval/qa.jsonl:{n}" for n in (13, 14, 15)]


def test_json_eval_sets_are_read(tmp_path):
    """A probe (a JSON file's list) sharing a training prompt is flagged, named by its list index."""
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps({"description": "x", "probes": [
        {"name": "a", "question": "Never in the training data, surely?"},
        {"name": "b", "question": "What is the capital of France?"}]}))
    rep = build(tmp_path, f"data.eval_files=['{probes}']")["decontamination"]
    assert [(f["source"], f["eval"]) for f in rep["examples"]] == [("alpaca", f"{probes}:probes[1]")]
