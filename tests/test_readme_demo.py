"""The README's first command, run for real at a reduced size in a copy of the repo, so the README cannot rot:
build -> check -> train -> evaluate base vs tuned -> merge, serve, test and perf, as a new user would see it.
Always the demo profile (SFT_PROFILE=demo), on a CPU or a GPU machine, with the interpreter running the tests."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import deploy
from conftest import ROOT

REDUCED = ["training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "training.run_name=readme-demo",
           "eval.max_samples=4", "eval.ppl_max_samples=16", "eval.max_new_tokens=16", "deploy.test_max_tokens=16",
           "deploy.perf_concurrency=[1, 2]", "deploy.perf_min_requests=2", "deploy.perf_max_tokens=8"]


def readme_commands():
    """The shell block right under the README's title: the two commands a new user types."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def repo_copy(dest):
    """The tracked files only (what a fresh clone holds), plus this interpreter's environment and the demo model."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
    venv_view(os.path.join(dest, ".venv"))
    os.makedirs(os.path.join(dest, "models"))
    os.symlink(os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"),
               os.path.join(dest, "models", "SmolLM2-135M-Instruct"))


def venv_view(dest):
    """dest as run.sh's .venv: the environment running these tests, linked (bin, lib; pyvenv.cfg copied so Python
    finds its packages through the link), marked installed for both requirement files: run.sh installs nothing."""
    os.makedirs(dest)
    if os.path.isfile(os.path.join(sys.prefix, "pyvenv.cfg")):
        for name in os.listdir(sys.prefix):
            if name == "pyvenv.cfg":
                shutil.copy2(os.path.join(sys.prefix, name), dest)
            elif not name.startswith(".installed-"):
                os.symlink(os.path.join(sys.prefix, name), os.path.join(dest, name))
    else:  # not a venv: its interpreter finds its packages from its real path
        os.makedirs(os.path.join(dest, "bin"))
        os.symlink(sys.executable, os.path.join(dest, "bin", "python"))
    for stack in ("requirements.txt", "requirements-cpu.txt"):  # run.sh's stamp: md5 of the file, 12 hex digits
        with open(os.path.join(ROOT, stack), "rb") as f:
            open(os.path.join(dest, f".installed-{hashlib.md5(f.read()).hexdigest()[:12]}"), "w").close()


def test_readme_demo_command_runs_end_to_end(tmp_path, demo_model_dir):
    commands = readme_commands()
    assert commands[:2] == ["./run.sh", "./run.sh test"], commands
    repo = tmp_path / "repo"
    repo_copy(str(repo))
    args = [a for kv in REDUCED + [f"deploy.port={deploy.free_port()}"] for a in ("--set", kv)]
    # The demo profile wherever this runs: on a GPU machine run.sh would otherwise pick the real model (the hub).
    env = {**{k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}, "SFT_PROFILE": "demo"}
    proc = subprocess.run(["./run.sh", "all", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "== Profile: demo" in out and "== Done." in out

    run = repo / "outputs" / "readme-demo"
    for path in ("adapter/adapter_config.json", "merged/config.json", "summary.json", "loss.png"):
        assert (run / path).is_file(), path
    reports = repo / "reports" / "readme-demo"
    evaluation = json.loads((reports / "eval.json").read_text())
    assert set(evaluation["sides"]) == {"base", "tuned"}  # base and tuned side by side
    assert (reports / "eval.md").is_file() and (reports / "deploy_test.json").is_file()
    perf = json.loads((reports / "perf.json").read_text())
    assert [level["concurrency"] for level in perf["levels"]] == [1, 2]
    assert all(level["succeeded"] for level in perf["levels"])
    assert os.path.isfile(repo / "dataset" / "processed" / "report.md")
