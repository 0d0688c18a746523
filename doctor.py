"""One screen that says whether this machine can run the suite, and what to do where it cannot.

    ./run.sh doctor                      # with .venv's Python when it exists; installs nothing
    python doctor.py                     # any Python 3.8+, standard library only
    python doctor.py --set model.name=/data/qwen3-4b --set output.dir=/data/outputs

Each line is ✅ (fine), ⚠️ (works, with a limit or a step still to do) or ❌ (will fail as configured), with
the fix under it: OS, Python, GPUs and their memory, the NVIDIA driver and the CUDA version it supports (and
whether the pinned CUDA 13 wheels can run on it), the installed versions of the pinned packages, free disk
where the model, datasets and outputs go, the hubs (Hugging Face, ModelScope), and the memory profile that
`training.memory_profile=auto` picks with train.py's and vLLM's memory estimates.
Exit code: 1 when any line is ❌, else 0. Without a GPU it judges the CPU demo profile, as ./run.sh runs it.

run.sh also calls `python3 doctor.py --driver-gate` before it installs the GPU stack, and
`python3 doctor.py --explain-pip-log FILE` when that install fails.
"""

import argparse
import contextlib
import glob
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import types
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import common
import config
import deploy
import train

OK, WARN, FAIL = "✅", "⚠️", "❌"
GB, GIB = 1e9, 1024 ** 3
PACKAGES = ("torch", "unsloth", "unsloth_zoo", "trl", "transformers", "peft", "bitsandbytes", "vllm", "evalscope",
            "datasets")
# NVIDIA's minimum Linux driver per CUDA major version (CUDA minor-version compatibility table):
# CUDA 13.x needs R580+, CUDA 12.x runs on R525+.
MIN_DRIVER = {13: 580, 12: 525}
PINNED_CUDA = 13  # requirements.txt's torch 2.11.0 wheels are CUDA 13.0 builds (they pull cuda-toolkit 13.0.2)
# The same versions built for CUDA 12, for a driver older than R580. PyTorch 2.11 publishes CUDA 12.8 wheels on
# its own index; vLLM 0.25.0's CUDA 12 build is its +cu129 release wheel (it publishes no cu128 build), which
# runs on the CUDA 12.8 torch and, like it, on any R525+ driver. tests/test_doctor.py ties these to the pins.
CUDA12_COMMANDS = """\
python3 -m venv --clear .venv    # emptied: pip would keep a CUDA 13 torch 2.11.0 already there
.venv/bin/python -m pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 --index-url https://download.pytorch.org/whl/cu128
.venv/bin/python -m pip install xformers==0.0.35 --index-url https://download.pytorch.org/whl/cu128
.venv/bin/python -m pip install https://github.com/vllm-project/vllm/releases/download/v0.25.0/vllm-0.25.0+cu129-cp38-abi3-manylinux_2_28_x86_64.whl --extra-index-url https://download.pytorch.org/whl/cu128
./run.sh    # finds torch's CUDA 12.8 build in .venv (driver R525+ is enough); the other pins install as usual"""
# Shapes from each model's config.json, for estimates before the model is downloaded.
KNOWN_SHAPES = {
    "unsloth/Qwen3-4B-Instruct-2507": {"hidden_size": 2560, "num_hidden_layers": 36, "intermediate_size": 9728,
                                       "vocab_size": 151936, "num_attention_heads": 32, "num_key_value_heads": 8,
                                       "head_dim": 128, "tie_word_embeddings": True},
    config.DEMO_MODEL_DIR: {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                            "vocab_size": 49152, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                            "tie_word_embeddings": True},
}
KNOWN_SHAPES["Qwen/Qwen3-4B-Instruct-2507"] = KNOWN_SHAPES["unsloth/Qwen3-4B-Instruct-2507"]
# Disk beyond the model-sized items: a round reserve for dataset pools + processed splits (the shipped sources
# build to under 1 MB; pools and processed splits keep about three copies of a user's own data), and a rough
# figure for the GPU stack in .venv (torch's CUDA 13 wheels and their nvidia-* libraries are most of it).
DATASETS_BYTES = 1 * GB
GPU_STACK_BYTES = 12 * GB
HUB_PORT = 443


def line(status, name, text, fix=None):
    return {"status": status, "name": name, "text": text, "fix": fix}


# ---------------------------------------------------------------- OS, Python

def check_os(system, release, machine):
    text = f"{system} {release} {machine}"
    if system == "Linux":
        return line(OK, "OS", text)
    if system == "Windows":
        return line(WARN, "OS", text, "the GPU stack (Unsloth, bitsandbytes, vLLM) needs Linux: use WSL2 with the "
                                      "NVIDIA driver for WSL; here only the CPU demo profile runs")
    return line(WARN, "OS", text, "no CUDA on this OS: only the CPU demo profile runs; train on a Linux GPU machine")


def check_python(version, executable):
    text = f"{'.'.join(map(str, version[:3]))} ({executable})"
    if version[:2] in ((3, 11), (3, 12)):
        return line(OK, "Python", text)
    if version[:2] in ((3, 10), (3, 13)):
        return line(WARN, "Python", text, "the pinned stacks are tested on Python 3.11 and 3.12; if an install "
                                          "fails for want of a wheel, create .venv with python3.12")
    return line(FAIL, "Python", text, "transformers 5 needs Python 3.10 or newer: install python3.12 and run "
                                      "`python3.12 -m venv .venv` before ./run.sh")


# ---------------------------------------------------------------- GPUs, driver

def run_nvidia_smi(*args):
    """nvidia-smi's output, or None when it is missing or fails (no GPU, no driver)."""
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def parse_gpus(query):
    """GPUs from `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader`:
    [{"name", "mib" (None when not reported), "driver"}]."""
    gpus = []
    for row in (query or "").strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) < 3:
            continue
        mem = re.match(r"(\d+)", parts[1])
        gpus.append({"name": parts[0], "mib": int(mem.group(1)) if mem else None, "driver": parts[2]})
    return gpus


def parse_header(header):
    """(driver, CUDA version the driver supports) from plain `nvidia-smi`'s header, each None when absent."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", header or "")
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header or "")
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def gpu_info(query, header):
    gpus = parse_gpus(query)
    driver, cuda = parse_header(header)
    return {"gpus": gpus, "driver": driver or (gpus[0]["driver"] if gpus else None), "cuda": cuda}


def read_gpu_info():
    return gpu_info(run_nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
                    run_nvidia_smi())


def check_gpus(info):
    if not info["gpus"]:
        return line(WARN, "GPU", "no GPU: CPU demo profile (./run.sh runs the bundled SmolLM2-135M on the CPU)",
                    "for Qwen3-4B: a CUDA GPU with 16 GB or more, the NVIDIA driver R580+ and its nvidia-smi")
    listing = "; ".join(f"{i}: {g['name']}, " + (f"{g['mib'] / 1024:.0f} GiB" if g["mib"] else "memory not reported")
                        for i, g in enumerate(info["gpus"]))
    return line(OK, "GPU", listing)  # whether the model fits is the memory lines' call


def torch_cuda_build(paths):
    """The CUDA version the installed torch was built for ("13.0", "12.8"), None for a CPU build or no torch.
    Read from torch/version.py without importing torch (seconds, and a broken install raises)."""
    for path in paths:
        try:
            with open(os.path.join(path, "torch", "version.py"), encoding="utf-8") as f:
                found = re.search(r"^cuda\b[^=\n]*=\s*['\"]([\d.]+)['\"]", f.read(), re.M)
        except OSError:
            continue
        return found.group(1) if found else None
    return None


def required_driver(torch_cuda):
    """(CUDA major the stack needs, minimum driver major): the installed torch's, else the pinned wheels'."""
    major = int(torch_cuda.split(".")[0]) if torch_cuda else PINNED_CUDA
    return major, MIN_DRIVER.get(major, MIN_DRIVER[PINNED_CUDA])


def check_driver(info, torch_cuda):
    """Whether the driver can run the CUDA build that is installed (or, before the install, the pinned one)."""
    if not info["gpus"]:
        return line(OK, "Driver", "not needed for the CPU demo profile")
    driver, supports = info["driver"], info["cuda"]
    text = f"{driver} (supports CUDA {supports or 'version not reported'})"
    major, need = required_driver(torch_cuda)
    what = f"torch's CUDA {torch_cuda} build in this Python" if torch_cuda else f"the pinned CUDA {major} wheels"
    try:
        have = int(driver.split(".")[0])
    except (AttributeError, ValueError):
        return line(WARN, "Driver", f"{driver}: version not understood", f"{what} need driver R{need} or newer")
    if have >= need:
        return line(OK, "Driver", f"{text}: runs {what} (R{need}+)")
    if major == PINNED_CUDA and have >= MIN_DRIVER[12]:
        return line(FAIL, "Driver", f"{text}: too old for {what} (R{need}+)",
                    f"install NVIDIA driver {need} or newer (Ubuntu: sudo apt install nvidia-driver-{need}, reboot), "
                    f"or keep this driver and install the CUDA 12 builds of the same versions:\n{CUDA12_COMMANDS}")
    return line(FAIL, "Driver", f"{text}: too old for {what} (R{need}+)",
                f"install NVIDIA driver {MIN_DRIVER[PINNED_CUDA]} or newer (Ubuntu: sudo apt install "
                f"nvidia-driver-{MIN_DRIVER[PINNED_CUDA]}), then reboot")


def driver_gate(info, torch_cuda):
    """run.sh's check before it installs the GPU stack: (exit code, message for the user)."""
    if not info["gpus"]:
        return 0, ""
    result = check_driver(info, torch_cuda)
    if result["status"] != FAIL:
        return 0, ""
    return 1, (render_line(result) + "\nNothing was installed. (`./run.sh doctor` checks the rest of this machine.)")


# ---------------------------------------------------------------- packages

def read_pins(path):
    """{package: version} from a requirements file's `name[extras]==version` lines."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            found = re.match(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", raw)
            if found:
                pins[found.group(1).lower().replace("-", "_")] = found.group(2)
    return pins


def installed_versions(names):
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_packages(pins, installed, stack):
    """One line per package: installed version against the stack's pin (one line when none is installed yet)."""
    if not any(installed.get(name) for name in PACKAGES if name in pins):
        return [line(WARN, "Packages", f"none of {stack}'s pins installed in this Python yet",
                     f"./run.sh installs {stack} into .venv on its first run (./run.sh doctor then uses .venv)")]
    lines = []
    for name in PACKAGES:
        pin, have = pins.get(name), installed.get(name)
        if pin is None:
            text = f"{have} installed, not pinned by {stack}" if have else f"not part of {stack}"
            lines.append(line(OK, name, text))
        elif have is None:
            lines.append(line(WARN, name, f"not installed (pin {pin}, {stack})",
                              f"./run.sh installs {stack} into .venv on its first run"))
        elif have.split("+")[0] == pin:  # a local build tag (+cpu, +cu128) is the same release
            lines.append(line(OK, name, f"{have} (pin {pin})"))
        else:
            lines.append(line(WARN, name, f"{have}, but {stack} pins {pin}",
                              f".venv/bin/python -m pip install '{name}=={pin}' (the pins are tested together)"))
    return lines


# ---------------------------------------------------------------- model shape, disk

def hub_cache_dir():
    """Where huggingface_hub keeps downloaded models (its own order of environment variables)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def model_files(name, cache_dir):
    """(config.json path or None, whether the weights are already on this machine)."""
    local = common.path_in_repo(name)
    if os.path.isdir(local):
        path = os.path.join(local, "config.json")
        return (path if os.path.isfile(path) else None), True
    if os.path.normpath(name) == os.path.normpath(config.DEMO_MODEL_DIR):
        return None, True  # converted from the bundled GGUF on first use
    snapshots = glob.glob(os.path.join(cache_dir, "models--" + name.replace("/", "--"), "snapshots", "*"))
    configs = [os.path.join(s, "config.json") for s in snapshots if os.path.isfile(os.path.join(s, "config.json"))]
    cached = any(glob.glob(os.path.join(s, "*.safetensors")) for s in snapshots)
    return (configs[0] if configs else None), cached


def model_shape(name, config_path):
    """The model's text config as attributes (what train.count_params reads); None when unknown."""
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            shape = json.load(f)
        return types.SimpleNamespace(**shape.get("text_config", shape))
    return types.SimpleNamespace(**KNOWN_SHAPES[name]) if name in KNOWN_SHAPES else None


def disk_needs(cfg, mc, model_cached, venv_path, stack_ready):
    """[(what, path, bytes)] a run of this config writes. The hub's checkpoint and the merged copy are 16-bit
    (2 B/param; 4 under model.dtype=float32); a training checkpoint holds the fp32 LoRA weights plus the
    optimizer's two moments (1 B each for adamw_8bit, 4 B each otherwise), save_total_limit of them."""
    total, _, lora = train.count_params(mc, cfg["lora"])
    width = 4 if cfg["model"]["dtype"] == "float32" else 2
    moments = 2 if "8bit" in cfg["training"]["optim"] else 8
    outputs = common.path_in_repo(cfg["output"]["dir"])
    needs = [("base weights", hub_cache_dir(), 0 if model_cached else total * 2),
             ("merged copy", outputs, total * width),
             ("checkpoints", outputs, cfg["training"]["save_total_limit"] * lora * (4 + moments) + lora * 4),
             ("datasets", common.path_in_repo(os.path.dirname(cfg["data"]["processed_dir"]) or "."), DATASETS_BYTES)]
    if venv_path and not stack_ready:
        needs.append(("GPU stack in .venv", venv_path, GPU_STACK_BYTES))
    return needs


def short_path(path):
    """A path as a user reads it: relative to the repo when inside it, ~ for the home folder."""
    rel = os.path.relpath(path, common.ROOT)
    if not rel.startswith(".."):
        return rel + "/"
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path


def existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_space(path):
    """(filesystem id, free bytes) of the nearest existing folder of path."""
    found = existing_parent(path)
    return os.stat(found).st_dev, shutil.disk_usage(found).free


def check_disk(needs, free_of=free_space):
    """One line per filesystem: what lands there against its free space."""
    by_fs = {}
    for what, path, size in needs:
        fs, free = free_of(path)
        by_fs.setdefault(fs, {"free": free, "items": [], "paths": []})
        by_fs[fs]["items"].append((what, size))
        by_fs[fs]["paths"].append(path)
    lines = []
    for fs in by_fs.values():
        need = sum(size for _, size in fs["items"])
        items = ", ".join(f"{what} {size / GB:.1f} GB" if size else f"{what} already here"
                          for what, size in fs["items"])
        places = ", ".join(dict.fromkeys(short_path(p) for p in fs["paths"]))
        text = f"{fs['free'] / GB:.1f} GB free where {places} go; a run needs {need / GB:.1f} GB ({items})"
        if fs["free"] >= need:
            lines.append(line(OK, "Disk", text))
        else:
            lines.append(line(FAIL, "Disk", text,
                              f"free {(need - fs['free']) / GB:.1f} GB there, or move the big items to a bigger "
                              f"disk: HF_HOME=/big/hf (models), --set output.dir=/big/outputs (merged copy, "
                              f"checkpoints)"))
    return lines


# ---------------------------------------------------------------- hubs

def hub_targets():
    """(name, host, port): Hugging Face as HF_ENDPOINT sets it, and ModelScope (EvalScope's public benchmarks)."""
    hf = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return [("Hugging Face", hf.hostname, hf.port or (80 if hf.scheme == "http" else HUB_PORT)),
            ("ModelScope", "www.modelscope.cn", HUB_PORT)]


def check_hubs(targets, timeout_s, offline, model_cached, model="MODEL", probe=common.tcp_reachable):
    """One line per hub, probed at once (a TCP connection within timeout_s); HF_HUB_OFFLINE=1 skips them."""
    if offline:
        return [line(OK if model_cached else FAIL, "Hubs", "skipped: HF_HUB_OFFLINE=1",
                     None if model_cached else "the base model is neither a local folder nor cached: unset "
                                               "HF_HUB_OFFLINE, or --set model.name=/path/to/model")]
    with ThreadPoolExecutor(len(targets)) as pool:
        answers = list(pool.map(lambda t: probe(t[1], t[2], timeout_s), targets))
    lines = []
    for (name, host, port), reachable in zip(targets, answers):
        where = f"{host}:{port}"
        if reachable:
            lines.append(line(OK, name, f"{where} answered within {timeout_s:g} s"))
        elif name == "Hugging Face" and not model_cached:
            lines.append(line(FAIL, name, f"{where} not reachable within {timeout_s:g} s, and the base model is "
                                          f"neither a local folder nor cached",
                              f"download it where the hub answers (hf download {model}) and --set model.name=/path, "
                              f"or set HF_ENDPOINT to a mirror"))
        elif name == "Hugging Face":
            lines.append(line(WARN, name, f"{where} not reachable within {timeout_s:g} s",
                              "fine offline: the model is local or cached; build_datasets.py uses dataset/raw/"))
        else:
            lines.append(line(WARN, name, f"{where} not reachable within {timeout_s:g} s",
                              "EvalScope scores only the shipped benchmarks, not gsm8k / cmmlu"))
    return lines


# ---------------------------------------------------------------- memory

def device_plan(cfg, cuda):
    """train.base_plan's answer without importing torch: on a GPU as the GPU stack runs (Unsloth, bitsandbytes,
    bf16 on Ampere or newer), on a CPU as the fallback runs (fp32, no 4-bit, adamw_torch)."""
    t, dtype = cfg["training"], cfg["model"]["dtype"]
    checkpointing = t["gradient_checkpointing"]
    return {"batch": t["per_device_train_batch_size"], "accum": t["gradient_accumulation_steps"], "profile": "config",
            "gradient_checkpointing": checkpointing if cuda or checkpointing != "unsloth" else True,
            "optim": t["optim"] if cuda or "8bit" not in t["optim"] else "adamw_torch",
            "load_in_4bit": bool(cfg["model"]["load_in_4bit"] and cuda), "notes": [], "skip_layers": 0,
            "dtype_name": ("bfloat16" if dtype in (None, "auto") else dtype) if cuda else "float32"}


def vllm_memory(mc, settings, gpu_gib):
    """(weights GiB, KV-cache room GiB, GiB per max_model_len sequence) for vLLM serving the 16-bit merged model:
    room = gpu_memory_utilization × memory × tensor-parallel GPUs − weights (vLLM also keeps a little for
    activations); KV per token = 2 (K, V) × layers × KV heads × head_dim × 2 B (1 B with kv_cache_dtype fp8)."""
    total, _, _ = train.count_params(mc, {"r": 0, "target_modules": []})
    weights = total * 2 / GIB
    heads = mc.num_attention_heads
    kv_heads = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
    per_token = 2 * mc.num_hidden_layers * kv_heads * head_dim * (1 if settings["kv_cache_dtype"] == "fp8" else 2)
    room = settings["gpu_memory_utilization"] * gpu_gib * settings["tensor_parallel_size"] - weights
    return weights, room, per_token * settings["max_model_len"] / GIB


def check_memory(cfg, mc, gpus):
    """The plan train.py makes (memory_profile applied) with its estimate, and vLLM's settings and KV room."""
    if mc is None:
        return [line(WARN, "Memory", f"no shape known for {cfg['model']['name']}: no estimate",
                     "train.py prints its estimate once it reads the model's config.json")]
    if not gpus:
        mem = train.estimate_memory(mc, cfg, device_plan(cfg, cuda=False))
        return [line(OK, "Memory", f"no GPU: CPU demo profile; train.py's estimate {mem['train']:.1f} GiB of host "
                                   f"RAM for training; serving uses `transformers serve`, not vLLM")]
    sizes = [g["mib"] for g in gpus if g["mib"]]
    if not sizes:
        return [line(WARN, "Memory", "nvidia-smi reports no GPU memory size: no estimate",
                     "train.py prints its estimate from torch's view of the GPU at start")]
    gib = min(sizes) / 1024  # each process trains on one GPU: the smallest one bounds the plan
    plan = device_plan(cfg, cuda=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its "trying a smaller one" notes; the result says it all
        plan = train.apply_memory_profile(cfg, plan, mc, gib * GIB)
    backend = "transformers" if cfg["training"]["backend"] == "transformers" else "unsloth"  # the GPU stack's
    plan = train.plan_skip_layers(cfg, plan, backend, mc, gib * GIB)
    mem = train.estimate_memory(mc, cfg, plan)
    text = (f"training.memory_profile={cfg['training']['memory_profile']} -> {plan['profile']}: batch {plan['batch']}"
            f" x accumulation {plan['accum']}, checkpointing {train.checkpointing_text(plan, mc.num_hidden_layers)}; "
            f"train.py's estimate {mem['train']:.1f} GiB training, {mem['eval']:.1f} GiB eval, of {gib:.0f} GiB")
    lines = [line(OK, "Train memory", text) if mem["train"] <= gib else
             line(FAIL, "Train memory", text, "out of memory expected; remedies, in order:\n"
                                              + train.remedies(cfg, plan))]
    settings = deploy.vllm_settings(cfg, gib)
    weights, room, per_seq = vllm_memory(mc, settings, gib)
    text = (f"gpu_memory_utilization {settings['gpu_memory_utilization']} x {gib:.0f} GiB x "
            f"{settings['tensor_parallel_size']} GPU: weights {weights:.1f} GiB, KV cache ~{room:.1f} GiB "
            f"= {max(room, 0) / per_seq:.1f} sequences of max_model_len {settings['max_model_len']} "
            f"(max_num_seqs {settings['max_num_seqs']})")
    if room >= per_seq:
        lines.append(line(OK, "vLLM memory", text))
    elif room > 0:
        shorter = max(2048, settings["max_model_len"] // 4)
        lines.append(line(FAIL, "vLLM memory", text, f"vLLM will refuse to start: --set deploy.max_model_len={shorter}"
                                                     f" or --set deploy.kv_cache_dtype=fp8"))
    else:
        lines.append(line(FAIL, "vLLM memory", text,
                          "vLLM will refuse to start: the 16-bit weights alone do not fit; serve on a bigger GPU or "
                          "on two (--set deploy.tensor_parallel_size=2), or deploy.engine=transformers"))
    return lines


# ---------------------------------------------------------------- pip failures (run.sh)

PIP_CAUSES = [  # (pattern in pip's output, likely cause); the first that matches wins
    (r"No space left on device", "the disk is full: free space (the GPU stack takes ~{stack:.0f} GB in .venv, "
                                 "plus pip's cache) or set TMPDIR and PIP_CACHE_DIR to a bigger disk"),
    (r"(?:Could not find a version that satisfies the requirement|No matching distribution found for) ([^\s(]+)",
     "no wheel of it for Python {py} on {plat}: the GPU stack needs Linux x86_64 with Python 3.11 or 3.12 "
     "(`python3.12 -m venv .venv`), or the package index is not reachable"),
    (r"CUDA_HOME|nvcc", "it compiles CUDA code and found no CUDA toolkit: use Python 3.11/3.12, for which it "
                        "has prebuilt wheels, or install the CUDA toolkit"),
    (r"Failed (?:building wheel for|to build) ([^\s]+)",
     "it has no prebuilt wheel for Python {py} and compiling it failed: use Python 3.11 or 3.12"),
    (r"ResolutionImpossible|conflicting dependencies",
     "the pins conflict with packages already in .venv: delete .venv and run ./run.sh again"),
    (r"Read timed out|ConnectTimeout|Connection(?:Error| refused)|Temporary failure in name resolution|"
     r"Network is unreachable|ProxyError|SSLError", "the package index is not reachable: check the network, proxy "
                                                    "or PIP_INDEX_URL"),
    (r"do not match the hashes|HashMismatch", "a download was corrupted: `.venv/bin/python -m pip cache purge`, "
                                              "then ./run.sh again"),
    (r"Permission denied", "no write permission where pip installs: run ./run.sh as the owner of this folder"),
    (r"\bKilled\b|MemoryError", "the install ran out of host memory"),
]


def explain_pip_failure(log, python=None, plat=None):
    """One line for a failed `pip install`: the package (from the error, else the last one pip collected)
    and the likely cause."""
    python = python or ".".join(map(str, sys.version_info[:2]))
    plat = plat or f"{platform.system()} {platform.machine()}"
    collected = re.findall(r"^\s*(?:Collecting|Building wheel for) ([A-Za-z0-9_.\-]+)", log, re.M)
    for pattern, cause in PIP_CAUSES:
        found = re.search(pattern, log)
        if found:
            named = found.group(1) if found.groups() else (collected[-1] if collected else None)
            package = re.split(r"[=<>!~;\[]", named)[0] if named else "unknown (see the log)"
            return (f"error: pip install failed at package {package}: "
                    + cause.format(py=python, plat=plat, stack=GPU_STACK_BYTES / GB))
    package = collected[-1] if collected else "unknown"
    return f"error: pip install failed at package {package}: cause not recognized; the log's last lines say why"


# ---------------------------------------------------------------- main

def stack_for(info):
    """The requirements file ./run.sh installs here: the GPU stack where nvidia-smi finds a GPU."""
    return "requirements.txt" if info["gpus"] else "requirements-cpu.txt"


def gpu_stack_installed(venv):
    """run.sh's stamp for the current requirements.txt in .venv."""
    digest = common.file_md5(common.path_in_repo("requirements.txt"))[:12]
    return os.path.isfile(os.path.join(venv, f".installed-{digest}"))


def collect(cfg, info):
    stack = stack_for(info)
    name = cfg["model"]["name"]
    config_path, cached = model_files(name, hub_cache_dir())
    mc = model_shape(name, config_path)
    venv = common.path_in_repo(".venv")
    lines = [check_os(platform.system(), platform.release(), platform.machine()),
             check_python(sys.version_info, sys.executable),
             check_gpus(info),
             check_driver(info, torch_cuda_build(sys.path))]
    lines += check_packages(read_pins(common.path_in_repo(stack)), installed_versions(PACKAGES), stack)
    if mc is not None:
        lines += check_disk(disk_needs(cfg, mc, cached, venv if info["gpus"] else None, gpu_stack_installed(venv)))
    else:
        lines.append(line(WARN, "Disk", f"the size of {name} is unknown until its config.json is here",
                          "a model of N billion parameters takes about 2N GB as weights and 2N GB as the merged copy"))
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    lines += check_hubs(hub_targets(), cfg["data"]["hub_timeout_s"], offline, cached, name)
    lines += check_memory(cfg, mc, info["gpus"])
    return lines


def render_line(item):
    out = [f"{item['status']} {item['name']:<13} {item['text']}"]
    if item["fix"]:
        fix = item["fix"].splitlines()
        out.append(f"   fix: {fix[0]}")
        out += [f"        {more}" for more in fix[1:]]
    return "\n".join(out)


def render(lines, cfg):
    out = [f"Doctor (profile: {cfg.get('profile') or 'default (GPU)'}, model: {cfg['model']['name']})"]
    out += [render_line(item) for item in lines]
    failed = sum(item["status"] == FAIL for item in lines)
    warned = sum(item["status"] == WARN for item in lines)
    out.append(f"{failed} {FAIL}, {warned} {WARN}, {len(lines) - failed - warned} {OK}: "
               + ("fix the ❌ lines before ./run.sh" if failed else "ready for ./run.sh"))
    return "\n".join(out)


@common.exits_on_user_error
def main():
    parser = config.add_config_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--driver-gate", action="store_true",
                        help="only check the driver against .venv's torch (else the pinned CUDA 13 wheels); "
                             "exit 1 if too old")
    parser.add_argument("--explain-pip-log", metavar="FILE", help="print one line saying why this pip log failed")
    args = parser.parse_args()
    if args.explain_pip_log:
        with open(args.explain_pip_log, encoding="utf-8", errors="replace") as f:
            print(explain_pip_failure(f.read()))
        return
    info = read_gpu_info()
    if args.driver_gate:
        code, message = driver_gate(info, torch_cuda_build(glob.glob(
            common.path_in_repo(".venv/lib/python*/site-packages"))))
        if message:
            print(message, file=sys.stderr)
        sys.exit(code)
    if args.profile is None and not info["gpus"]:
        args.profile = "demo"  # what ./run.sh runs without a GPU
    cfg = config.resolve(args, parser, quiet=True)
    lines = collect(cfg, info)
    print(render(lines, cfg))
    sys.exit(1 if any(item["status"] == FAIL for item in lines) else 0)


if __name__ == "__main__":
    main()
