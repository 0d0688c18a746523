"""Take a training run to a served model: merge the adapter, serve it behind an OpenAI-compatible API,
test the endpoint, and stress it with EvalScope.

Reads  outputs/<run>/adapter/ (PEFT adapter + tokenizer) and outputs/<run>/config.json (from train.py),
       the 16-bit base model (config model.name), dataset/perf_prompts.jsonl (perf prompts).
Writes outputs/<run>/merged/ (safetensors, tokenizer + chat template, generation_config.json,
       merge_check.json), outputs/<run>/serve.log, reports/<run>/deploy_test.json,
       reports/<run>/perf.json + perf.md + perf.png (+ the raw EvalScope output under reports/<run>/evalscope/).

    python deploy.py all                       # merge, serve, test, perf, stop: the newest run in outputs/
    python deploy.py merge --run outputs/RUN   # just the merge (+ GGUF when llama.cpp is on PATH)
    python deploy.py merge --adapter outputs/RUN/checkpoints/checkpoint-100   # merge an earlier step instead
    python deploy.py serve                     # serve until Ctrl-C (which stops the whole process group)
    python deploy.py serve --lora              # base + adapter without merging (vLLM --enable-lora)
    python deploy.py test                      # against a running server (deploy.host/port)
    python deploy.py perf --set deploy.perf_concurrency=[1,8,32,128]
    python deploy.py all --profile demo        # CPU: `transformers serve` instead of vLLM
    python deploy.py serve --tensor-parallel-size 2

Engines: `vllm` (its OpenAI server; the default wherever CUDA and vLLM exist) or `transformers`
(`transformers serve`, a real OpenAI-compatible server that runs on a CPU). Clients send
deploy.served_model_name as `model` with either engine.
"""

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import common
import config

ENGINES = ("auto", "vllm", "transformers")
VLLM_INSTALL_HINT = "pip install vllm==0.25.0 (the tested version; it needs a CUDA GPU)"
LOG_TAIL_LINES = 40


class DeployError(common.UserError):
    """A deploy step cannot go on; the message says why and what to do next."""


# ---------------------------------------------------------------- engines, checks

def resolve_engine(cfg, engine=None):
    """auto -> vllm where CUDA and vLLM exist, else transformers. An explicit vllm must be runnable."""
    engine = engine or cfg["deploy"]["engine"]
    if engine not in ENGINES:
        raise DeployError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "auto":
        return "vllm" if common.has_cuda() and common.package_installed("vllm") else "transformers"
    if engine == "vllm" and not common.package_installed("vllm"):
        raise DeployError(f"deploy.engine is vllm but vLLM is not installed: {VLLM_INSTALL_HINT}; "
                          f"or use --engine transformers to serve on a CPU")
    if engine == "vllm" and not common.has_cuda():
        raise DeployError("deploy.engine is vllm but no CUDA GPU is visible; use --engine transformers on a CPU")
    return engine


def check_model_dir(path):
    """A servable model folder: config, tokenizer and every weight shard. Raises DeployError naming what is missing."""
    if not os.path.isdir(path):
        raise DeployError(f"model directory {path} does not exist; run `python deploy.py merge` first "
                          f"(or point --model at a folder with config.json, tokenizer and safetensors)")
    names = set(os.listdir(path))
    missing = [n for n in ("config.json",) if n not in names]
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        missing.append("tokenizer.json (or tokenizer.model / vocab.json)")
    index = next((n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if n in names), None)
    if index:
        with open(os.path.join(path, index), encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing += [s for s in shards if s not in names]
    elif not any(n.endswith((".safetensors", ".bin")) for n in names):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise DeployError(f"model directory {path} is incomplete: missing {', '.join(missing)}; "
                          f"re-run `python deploy.py merge`")
    return path


def check_adapter_dir(path):
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if n not in names]
    if missing:
        raise DeployError(f"adapter directory {path} is missing {', '.join(missing)}; "
                          f"train first (python train.py) or pass --run outputs/<run>")
    return path


def check_port_free(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn and vLLM bind: a port left in TIME_WAIT by a stopped server counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise DeployError(f"port {port} on {host} is in use ({err.strerror}): another server is running there "
                              f"(see `ss -ltnp 'sport = :{port}'`); stop it or pick another port with "
                              f"--set deploy.port=N") from None


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def endpoint_url(cfg):
    return f"http://{cfg['deploy']['host']}:{cfg['deploy']['port']}/v1"


def health_url(cfg):
    return common.server_root(endpoint_url(cfg)) + "/health"


def server_env(cfg):
    """The servers' environment: vLLM reads deploy.api_key from VLLM_API_KEY (kept out of its command line)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # both folders are local: never wait on a hub
    if cfg["deploy"]["api_key"]:
        env["VLLM_API_KEY"] = cfg["deploy"]["api_key"]
    return env


def check_host(cfg, engine):
    """`transformers serve` checks no API key: it may listen on loopback only, where only this machine reaches it."""
    host = cfg["deploy"]["host"]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if engine == "transformers" and not loopback:
        raise DeployError(f"deploy.host {host!r}: the transformers engine checks no API key (deploy.api_key is "
                          f"ignored), so it serves on loopback only (127.0.0.1; reach it from elsewhere through an "
                          f"SSH tunnel), or use deploy.engine=vllm, which requires the key")


def check_served_name(name):
    # `transformers serve` reads "name@revision" and "repo:file.gguf"; the name is also a folder link (below).
    if not name or any(c in name for c in "@: ") or name.startswith(("/", ".")):
        raise DeployError(f"deploy.served_model_name {name!r} must be a plain name without '@', ':', spaces "
                          f"or a leading '/' or '.'")
    return name


# ---------------------------------------------------------------- vLLM flags

def gpu_memory_gb():
    import torch
    return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3


def vllm_settings(cfg, memory_gb=None, tensor_parallel_size=None):
    """The deploy section's vLLM settings, scaled to the GPUs' memory.

    The defaults fit a 16 GB card (Qwen3-4B bf16 = 8 GB of weights, ~5 GB KV cache at 0.82). With more memory
    (per GPU × tensor-parallel size) the keys nobody set take the values of the largest deploy.tiers entry that
    fits, so an 80 GB card is not throttled to 4 sequences; a key set by --set or the profile is kept as given."""
    d = dict(cfg["deploy"])
    if d["quantization"] not in (None, "fp8"):
        raise DeployError(f"deploy.quantization must be None or 'fp8', got {d['quantization']!r}")
    tp = int(tensor_parallel_size or d["tensor_parallel_size"])
    d["tensor_parallel_size"] = tp
    total = (memory_gb if memory_gb is not None else 0.0) * tp
    fitting = [t for t in d["tiers"].values() if total >= t["min_memory_gb"]]
    scaled = {}
    if d["scale_to_gpu"] and fitting:
        tier = max(fitting, key=lambda t: t["min_memory_gb"])
        user_set = set(cfg.get("set_keys", ()))
        scaled = {k: v for k, v in tier.items() if k != "min_memory_gb" and f"deploy.{k}" not in user_set}
        unknown = sorted(set(scaled) - set(config.CONFIG["deploy"]))
        if unknown:
            raise DeployError(f"deploy.tiers names keys that are not deploy keys: {', '.join(unknown)}")
    d.update(scaled)
    d["scaled_keys"] = sorted(scaled)
    d["memory_gb_total"] = round(total, 1)
    return d


def vllm_command(cfg, model_dir, adapters=None, settings=None):
    """The vLLM serve command. adapters ({served name: adapter folder}) serves model_dir as the base with each
    adapter unmerged under its own name (LoRA mode)."""
    s = settings or vllm_settings(cfg)
    # The CLI's module, run by this interpreter: works where vLLM has no `vllm` script on PATH (pip --target).
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir, "--host", s["host"], "--port", str(s["port"]),
           "--max-model-len", str(s["max_model_len"]),
           "--gpu-memory-utilization", str(s["gpu_memory_utilization"]),
           "--max-num-seqs", str(s["max_num_seqs"]),
           "--max-num-batched-tokens", str(s["max_num_batched_tokens"]),
           "--tensor-parallel-size", str(s["tensor_parallel_size"]),
           "--generation-config", "auto",  # the model folder's generation_config.json: Qwen3-2507 sampling
           "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           "--seed", str(cfg["training"]["seed"])]
    if s["enforce_eager"]:
        cmd.append("--enforce-eager")
    if s["kv_cache_dtype"]:
        cmd += ["--kv-cache-dtype", s["kv_cache_dtype"]]
    if s["quantization"]:
        cmd += ["--quantization", s["quantization"]]
    if s["async_scheduling"] is not None:
        cmd.append("--async-scheduling" if s["async_scheduling"] else "--no-async-scheduling")
    if s["compilation_config"]:
        cmd += ["--compilation-config", json.dumps(s["compilation_config"])]
    if adapters:
        # Base + adapters unmerged: a request naming an adapter gets it; the base keeps its path as its name.
        ranks = []
        for path in adapters.values():
            with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
                ranks.append(json.load(f)["r"])
        # vLLM accepts only these ranks as --max-lora-rank: take the smallest that holds every adapter's.
        max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks)), max(ranks))
        cmd += ["--enable-lora", "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()],
                "--max-loras", str(len(adapters)),  # all of them in one batch (vLLM's default is 1)
                "--max-lora-rank", str(max_rank)]
        template = lora_chat_template(adapters)
        if template:  # the base's own template may differ from the one training rendered with
            cmd += ["--chat-template", template]
        # The merged folder ships generation_config.json with the deploy sampling; the base folder may not.
        cmd += ["--override-generation-config", json.dumps(served_sampling(s))]
    else:
        cmd += ["--served-model-name", s["served_model_name"]]
    # The API key goes through the environment (server_env), never argv: `ps` shows argv to all users.
    return cmd + list(s["vllm_args"])


def lora_chat_template(adapters):
    """The chat template the adapters were trained with (one server has one): the path of the first adapter's, when
    every adapter ships the same; None when none ships one."""
    texts = {}
    for name, path in adapters.items():
        template = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                texts[name] = (template, f.read())
    if len({text for _, text in texts.values()}) > 1 or (texts and len(texts) != len(adapters)):
        raise DeployError(f"the adapters were trained with different chat templates ({', '.join(adapters)}); one vLLM "
                          f"server applies one template: serve them from separate servers (--set deploy.port=N)")
    return next(iter(texts.values()))[0] if texts else None


CB_BLOCK_SIZE = 256  # tokens per KV-cache block of `transformers serve --continuous-batching` (its default)


def transformers_command(cfg, link_name):
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which("transformers")
    if exe is None:
        raise DeployError("the `transformers` CLI was not found; pip install 'transformers[serving]'")
    d, cuda = cfg["deploy"], common.has_cuda()
    cmd = [exe, "serve", link_name, "--host", d["host"], "--port", str(d["port"]),
           "--device", "cuda" if cuda else "cpu", "--dtype", "auto", "--default-seed", str(cfg["training"]["seed"]),
           "--log-level", "info",
           # Without it concurrent requests run one after another: 64 x 32 tokens took 212 s, with it 14.6 s.
           "--continuous-batching"]
    if cuda:  # its KV cache takes 80% of the GPU memory left after the weights, as vLLM's takes its share
        return cmd
    # On a CPU the same rule takes 80% of the machine's RAM: 20 GB resident for a 2-layer test model on a 24 GB
    # machine, and the next process there was killed for memory. So the cache holds max_num_seqs sequences of
    # max_model_len, as vLLM reserves; more requests wait for room.
    blocks = -(-d["max_num_seqs"] * d["max_model_len"] // CB_BLOCK_SIZE)
    return cmd + ["--cb-block-size", str(CB_BLOCK_SIZE), "--cb-num-blocks", str(blocks),
                  "--cb-max-batch-tokens", str(d["max_num_batched_tokens"])]


def listed_cache(link_dir, name, model_dir):
    """`transformers serve` answers /v1/models from the hub cache alone (HTTP 500 offline when there is none, and
    never the local folder it serves): its own cache, one entry named `name` whose snapshot links to the served
    config.json, makes it list the served name as vLLM does. Returns the cache folder."""
    cache = os.path.join(link_dir, "hub-cache")
    repo = os.path.join(cache, f"models--{name}")
    os.makedirs(os.path.join(repo, "snapshots", "local"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w", encoding="utf-8") as f:
        f.write("local")
    os.symlink(os.path.join(model_dir, "config.json"), os.path.join(repo, "snapshots", "local", "config.json"))
    return cache


# ---------------------------------------------------------------- server lifecycle

def log_tail(path, lines=LOG_TAIL_LINES):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def wait_healthy(proc, cfg, log_path, timeout_s):
    url, start = health_url(cfg), time.time()
    last_note = start
    while True:
        if proc.poll() is not None:
            raise DeployError(f"the {proc.engine} server exited during start-up (exit code {proc.returncode}); "
                              f"last lines of {log_path}:\n{log_tail(log_path)}")
        if common.http_ok(url, 5):
            print(f"server healthy after {time.time() - start:.0f} s: {endpoint_url(cfg)}", flush=True)
            return
        elapsed = time.time() - start
        if elapsed > timeout_s:
            raise DeployError(f"the {proc.engine} server was not healthy after {timeout_s} s "
                              f"(deploy.startup_timeout_s); last lines of {log_path}:\n{log_tail(log_path)}")
        if time.time() - last_note >= 10:
            print(f"  waiting for {url} ({elapsed:.0f}/{timeout_s} s, log: {log_path})", flush=True)
            last_note = time.time()
        time.sleep(1)


def start_server(cfg, model_dir, log_path, adapters=None):
    """Start the configured engine on deploy.host:port in its own process group and wait for /health.

    With adapters ({served name: adapter folder}), model_dir is the base and each adapter is served unmerged under
    its name (vLLM LoRA mode only). Returns the Popen, carrying .engine, .url (…/v1), .names (what clients send as
    `model`) and .log_path. Raises DeployError (with the log's last lines when the server itself failed)."""
    engine = resolve_engine(cfg)
    check_host(cfg, engine)
    name = check_served_name(cfg["deploy"]["served_model_name"])
    model_dir = os.path.abspath(check_model_dir(model_dir))
    adapters = {check_served_name(n): os.path.abspath(check_adapter_dir(p)) for n, p in (adapters or {}).items()}
    if adapters and engine != "vllm":
        raise DeployError("serving an unmerged adapter (LoRA mode) needs vLLM (--enable-lora); on the transformers "
                          "engine run `python deploy.py merge` and serve the merged folder instead")
    check_port_free(cfg["deploy"]["host"], cfg["deploy"]["port"])
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    env = server_env(cfg)
    cwd, link_dir = None, None
    if engine == "vllm":
        settings = vllm_settings(cfg, gpu_memory_gb())
        print_vllm_settings(settings)
        cmd = vllm_command(cfg, model_dir, adapters, settings)
    else:
        # `transformers serve FOLDER` answers only requests whose `model` equals FOLDER as typed: a link
        # named served_model_name, in a folder used as the server's cwd, gives clients the same name as vLLM.
        link_dir = tempfile.mkdtemp(prefix="deploy-serve-")
        os.makedirs(os.path.dirname(os.path.join(link_dir, name)), exist_ok=True)
        os.symlink(model_dir, os.path.join(link_dir, name))
        env["HF_HUB_CACHE"] = listed_cache(link_dir, name, model_dir)
        cmd, cwd = transformers_command(cfg, name), link_dir
        if cfg["deploy"]["api_key"]:
            print("note: the transformers engine does not check API keys; deploy.api_key is only sent by clients")
    print(f"starting {engine} server: {' '.join(cmd)}\n  log: {log_path}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env, start_new_session=True)
    proc.engine, proc.url, proc.names = engine, endpoint_url(cfg), list(adapters) or [name]
    proc.log_path, proc.link_dir = log_path, link_dir
    try:
        wait_healthy(proc, cfg, log_path, cfg["deploy"]["startup_timeout_s"])
    except BaseException:  # also Ctrl-C while waiting: never leave a half-started server behind
        stop_server(proc)
        raise
    return proc


def group_pids(pgid):
    """Live processes of a process group, read from /proc (field 5 of /proc/PID/stat is the pgid)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def stop_server(proc, timeout_s=30):
    """Stop the server's whole process group (SIGTERM, then SIGKILL after timeout_s) and check none is left."""
    pgid = proc.pid  # start_new_session=True: the server leads its own group
    if proc.poll() is None or group_pids(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + timeout_s
        while time.time() < deadline and (proc.poll() is None or group_pids(pgid)):
            time.sleep(0.2)
        if group_pids(pgid):
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(1)
    proc.wait(timeout=10)
    if getattr(proc, "link_dir", None):
        shutil.rmtree(proc.link_dir, ignore_errors=True)
    left = group_pids(pgid)
    if left:
        raise DeployError(f"server processes {left} of group {pgid} are still alive after SIGKILL")
    print(f"server stopped (process group {pgid}, exit code {proc.returncode})", flush=True)


def print_vllm_settings(s):
    keys = ("max_model_len", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
            "kv_cache_dtype", "tensor_parallel_size")
    print(f"vLLM settings for {s['memory_gb_total']} GB of GPU memory "
          f"(scaled from the 16 GB defaults: {', '.join(s['scaled_keys']) or 'none'}):")
    for key in keys:
        print(f"  {key} = {s[key]!r}")


# ---------------------------------------------------------------- runs

def resolve_run(cfg, run=None, adapter=None):
    """(run folder, the training config saved in it). --run, else --adapter's run, else the newest outputs/<run>/
    with an adapter."""
    if adapter:
        run = common.run_of_adapter(adapter)[0]
    path = common.run_folder(cfg, run) if run else common.latest_run(cfg)
    if path is None:
        raise DeployError(f"no training run with an adapter under {common.path_in_repo(cfg['output']['dir'])}; "
                          f"train first (python train.py) or pass --run outputs/<run>")
    check_adapter_dir(adapter or os.path.join(path, "adapter"))
    saved = os.path.join(path, "config.json")
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as f:
            train_cfg = json.load(f)["config"]
    else:
        print(f"note: {saved} is missing; using the current config's model and LoRA settings")
        train_cfg = cfg
    return path, train_cfg


def reports_dir(cfg, run_path):
    return common.report_dir(cfg, os.path.basename(run_path.rstrip("/")))


# ---------------------------------------------------------------- merge

# Merge check tolerances. fp32 weights: merged = W + s·B·A exactly up to summation order, so logits agree to
# ~1e-5; 1e-3 leaves room for other BLAS paths. 16-bit weights: the merged W is rounded once more (bf16 keeps
# 8 mantissa bits, ~0.4% per weight), so logits are compared as distributions instead.
MERGE_MAX_ABS_FP32 = 1e-3
MERGE_MAX_KL_16BIT = 1e-2  # mean KL(base+adapter || merged) per position, nats
MERGE_MIN_TOP1_16BIT = 0.97  # share of positions with the same argmax token
MERGE_TOP1_MARGIN = 1.5  # logits: the leader must beat the runner-up by this for top-1 to count
MERGE_CHECK_PROMPTS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name two primary colours."}],
    [{"role": "user", "content": "把这句话翻译成英文：今天天气很好。"}],
]


def base_model_path(name):
    """A local folder for the 16-bit base: the folder itself, the demo model, or a hub id's cached snapshot
    (so a base that is only cached works offline). Refuses pre-quantized 4-bit bases."""
    path = common.resolve_model_path(name)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        try:
            path = snapshot_download(name, local_files_only=True)
        except LocalEntryNotFoundError:
            print(f"{name} is not cached locally; downloading it from the hub", flush=True)
            try:
                path = snapshot_download(name)
            except (OSError, HfHubHTTPError) as err:  # offline mode, no network, unknown repo
                reason = str(err).partition("\n")[0]
                raise DeployError(f"the merge base {name} is neither a local folder nor in the hub cache, and the "
                                  f"download failed ({type(err).__name__}: {reason}); download it once where the "
                                  f"hub is reachable, or set model.name to a local folder") from None
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        quant = json.load(f).get("quantization_config")
    if quant or "bnb-4bit" in name.lower():
        kind = (quant or {}).get("quant_method", "4-bit")
        raise DeployError(f"the merge base {name} is a quantized checkpoint ({kind}); "
                          f"set model.name to the original 16-bit model: merging onto dequantized 4-bit weights "
                          f"bakes the quantization error into the merged model")
    return path


def check_prompt_ids(tokenizer):
    return [common.prompt_ids(tokenizer, messages) for messages in MERGE_CHECK_PROMPTS]


def prompt_logits(model, ids_list):
    import torch
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in ids_list]


def compare_logits(reference, merged, dtype_name):
    import torch
    ref, out = torch.cat(reference), torch.cat(merged)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().clamp(min=0).item()  # float noise can dip below 0
    # Top-1 agreement only where the reference's leader is clear: 16-bit merges move logits by up to ~0.7
    # (a random-weight Qwen3-4B on an H100), so a leader by less than MERGE_TOP1_MARGIN is a tie, not a signal.
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > MERGE_TOP1_MARGIN
    agree = ref.argmax(-1) == out.argmax(-1)
    result = {"positions": ref.shape[0], "max_abs_diff": (ref - out).abs().max().item(), "mean_kl": kl,
              "top1_agreement": agree[clear].float().mean().item() if clear.any() else 1.0,
              "top1_positions": int(clear.sum()), "dtype": dtype_name}
    if dtype_name == "float32":
        result["tolerance"] = f"max_abs_diff <= {MERGE_MAX_ABS_FP32}"
        result["passed"] = result["max_abs_diff"] <= MERGE_MAX_ABS_FP32
    else:
        result["tolerance"] = f"mean_kl <= {MERGE_MAX_KL_16BIT} and top1_agreement >= {MERGE_MIN_TOP1_16BIT}"
        result["passed"] = kl <= MERGE_MAX_KL_16BIT and result["top1_agreement"] >= MERGE_MIN_TOP1_16BIT
    return result


def served_sampling(deploy_cfg):
    """The served model's default sampling (Qwen3-2507's), as generation-config keys."""
    return {k: deploy_cfg[k] for k in ("temperature", "top_p", "top_k")}


def generation_config_for(cfg, model_dir, tokenizer):
    """The base's generation config with Qwen3-2507's sampling and both ChatML stop tokens."""
    from transformers import GenerationConfig
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig()
    stops = common.token_ids(tokenizer, (common.IM_END, "<|endoftext|>"))
    gen.update(do_sample=True, **served_sampling(cfg["deploy"]), eos_token_id=stops,
               pad_token_id=tokenizer.pad_token_id)
    return gen


def merge_peft(base_dir, adapter_dir, out_dir):
    """PEFT merge_and_unload onto the 16-bit base on the CPU, saved in the base's own dtype (returned)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    saved_dtype = model.dtype
    model = PeftModel.from_pretrained(model.float(), adapter_dir)  # merge in fp32, round once when saving
    model.eval()
    merged = model.merge_and_unload()
    merged.to(saved_dtype).save_pretrained(out_dir, max_shard_size="5GB")
    del model, merged
    return str(saved_dtype).replace("torch.", "")


def merge_unsloth(train_cfg, base_dir, adapter_dir, out_dir, tokenizer):
    """Unsloth's merged_16bit: the LoRA is merged into the base's original 16-bit shards, not into
    dequantized 4-bit weights, so the adapter is loaded the way it was trained (on base_dir, whatever path the
    adapter recorded where it was trained)."""
    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(common.adapter_on_base(adapter_dir, base_dir),
                                                 max_seq_length=train_cfg["model"]["max_seq_length"],
                                                 dtype=None, load_in_4bit=train_cfg["model"]["load_in_4bit"])
    model.save_pretrained_merged(out_dir, tokenizer, save_method="merged_16bit")
    del model
    import torch
    torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    return saved.get("dtype") or saved.get("torch_dtype") or "bfloat16"


def verify_merge(base_dir, adapter_dir, out_dir, tokenizer, dtype_name):
    """Logits of the saved merged folder against base + adapter (unmerged) on MERGE_CHECK_PROMPTS."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    # fp32 on a CPU (exact reference); the saved 16-bit dtype on a GPU, where fp32 may not fit beside it.
    dtype = torch.float32 if not common.has_cuda() else getattr(torch, dtype_name)
    device = "cuda" if common.has_cuda() else "cpu"
    ids = check_prompt_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    base_logits = prompt_logits(base, ids)
    reference = prompt_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)
    del base
    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).to(device).eval()
    result = compare_logits(reference, prompt_logits(merged, ids), dtype_name)
    result["adapter_effect_max_abs"] = max((a - b).abs().max().item() for a, b in zip(reference, base_logits))
    return result


def gguf_tools():
    """llama.cpp's converter script and quantizer, from PATH or $LLAMA_CPP_DIR; (None, None) when absent."""
    folder = os.environ.get("LLAMA_CPP_DIR", "")
    convert = (shutil.which("convert_hf_to_gguf.py") or shutil.which("convert-hf-to-gguf")
               or next((p for p in [os.path.join(folder, "convert_hf_to_gguf.py")] if folder and os.path.isfile(p)),
                       None))
    quantize = shutil.which("llama-quantize") or next(
        (p for p in [os.path.join(folder, "build", "bin", "llama-quantize")] if folder and os.path.isfile(p)), None)
    return convert, quantize


def export_gguf(cfg, out_dir):
    convert, quantize = gguf_tools()
    if convert is None:
        print("GGUF export skipped: llama.cpp's convert_hf_to_gguf.py is not on PATH (or set LLAMA_CPP_DIR to a "
              "llama.cpp checkout); the merged safetensors are complete without it")
        return None
    outtype = cfg["deploy"]["gguf_outtype"]
    gguf = os.path.join(out_dir, f"model-{outtype}.gguf")
    cmd = ([convert] if os.access(convert, os.X_OK) and not convert.endswith(".py") else [sys.executable, convert])
    subprocess.run(cmd + [out_dir, "--outfile", gguf, "--outtype", outtype], check=True)
    quant = cfg["deploy"]["gguf_quant"]
    if quant and quantize:
        quantized = os.path.join(out_dir, f"model-{quant}.gguf")
        subprocess.run([quantize, gguf, quantized, quant], check=True)
        gguf = quantized
    elif quant:
        print(f"GGUF quantization to {quant} skipped: llama-quantize is not on PATH")
    print(f"GGUF written: {gguf}")
    return gguf


def add_tool_call_parser(tokenizer):
    """`transformers serve` parses tool calls only for model types it knows (Qwen's among them): a ChatML model of
    another type (the demo SmolLM2, a llama) trained under the Qwen3 template gets Qwen's parser through the saved
    tokenizer's response_template, else its <tool_call> text reaches clients as plain content. vLLM ignores it."""
    if getattr(tokenizer, "response_template", None) is not None or "<tool_call>" not in (tokenizer.chat_template or ""):
        return
    try:  # transformers 5.17's table; a transformers without `serve` (GPU stack) has no use for it
        from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    except ImportError:
        return
    tokenizer.response_template = next(v for types, v in _RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen3" in types)


def merge(cfg, run_path, train_cfg, gguf=True, adapter_dir=None):
    """outputs/<run>/merged/: merged weights, tokenizer + chat template, generation_config.json, merge_check.json
    (which names the adapter: outputs/<run>/adapter, or the --adapter given, e.g. a checkpoint)."""
    adapter_dir = adapter_dir or os.path.join(run_path, "adapter")
    out_dir = os.path.join(run_path, "merged")
    use_unsloth = common.import_unsloth_first()  # True on a GPU with Unsloth; before transformers is imported
    base_dir = base_model_path(train_cfg["model"]["name"])
    tokenizer = common.load_tokenizer(train_cfg, adapter_dir)  # the tokenizer and template training used
    add_tool_call_parser(tokenizer)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    print(f"merging {adapter_dir} onto the 16-bit base {base_dir} with "
          f"{'Unsloth save_pretrained_merged(merged_16bit)' if use_unsloth else 'PEFT merge_and_unload (CPU)'}",
          flush=True)
    if use_unsloth:
        dtype_name = merge_unsloth(train_cfg, base_dir, adapter_dir, tmp, tokenizer)
    else:
        dtype_name = merge_peft(base_dir, adapter_dir, tmp)
    tokenizer.save_pretrained(tmp)  # writes chat_template.jinja: vLLM and transformers serve both read it
    generation_config_for(cfg, base_dir, tokenizer).save_pretrained(tmp)
    check = verify_merge(base_dir, adapter_dir, tmp, tokenizer, dtype_name)
    check.update(base=base_dir, adapter=adapter_dir, engine="unsloth" if use_unsloth else "peft")
    with open(os.path.join(tmp, "merge_check.json"), "w", encoding="utf-8") as f:
        json.dump(check, f, indent=2)
    print(f"merge check ({check['positions']} positions, {check['dtype']}): max |Δlogit| = "
          f"{check['max_abs_diff']:.2e}, mean KL = {check['mean_kl']:.2e}, top-1 agreement = "
          f"{check['top1_agreement']:.3f}; adapter effect max |Δlogit| = {check['adapter_effect_max_abs']:.3f}")
    if check["adapter_effect_max_abs"] == 0:
        print("warning: the adapter does not change the base's logits (an untrained adapter?)")
    if not check["passed"]:
        raise DeployError(f"the merged model does not match base + adapter ({check['tolerance']} failed); "
                          f"the unverified merge is left in {tmp}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"merged model written: {out_dir}")
    if gguf:
        export_gguf(cfg, out_dir)
    return out_dir


# ---------------------------------------------------------------- test

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
PARITY_CONVERSATIONS = [  # (messages ending with the answer training learns, tools)
    ([{"role": "user", "content": "What is 15 + 27?"}, {"role": "assistant", "content": "15 + 27 = 42."}], None),
    ([{"role": "system", "content": "You are a helpful math tutor."},
      {"role": "user", "content": "一个数的 3 倍是 36，这个数是多少？"},
      {"role": "assistant", "content": "这个数是 12。"},
      {"role": "user", "content": "And half of it?"},
      {"role": "assistant", "content": "Half of 12 is 6."}], None),
    ([{"role": "user", "content": "What's the weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
          "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18, \"sky\": \"cloudy\"}"},
      {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."}], [WEATHER_TOOL]),
]


def detect_engine(cfg):
    """vllm answers GET /version; `transformers serve` does not."""
    root = common.server_root(endpoint_url(cfg))
    try:
        with urllib.request.urlopen(root + "/version", timeout=10) as r:
            return "vllm" if "version" in json.loads(r.read()) else "transformers"
    except (urllib.error.URLError, ValueError):
        return "transformers"


def openai_client(cfg):
    from openai import OpenAI
    return OpenAI(base_url=endpoint_url(cfg), api_key=cfg["deploy"]["api_key"] or "EMPTY", timeout=300,
                  max_retries=0)


def timed_chat(client, **kwargs):
    start = time.time()
    r = client.chat.completions.create(**kwargs)
    seconds = time.time() - start
    tokens = r.usage.completion_tokens if r.usage else None
    stats = {"latency_s": round(seconds, 3), "prompt_tokens": r.usage.prompt_tokens if r.usage else None,
             "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if tokens else None}
    return r, stats


def print_stats(name, stats, extra=""):
    print(f"  {name:<10} {stats['latency_s']:7.2f} s  prompt {stats['prompt_tokens']} tok  completion "
          f"{stats['completion_tokens']} tok  {stats['tokens_per_s']} tok/s  {extra}", flush=True)


def check_models(cfg, name):
    # Its own client: uvicorn closes the connection after an error, which a shared pool would reuse.
    with openai_client(cfg) as client:
        ids = [m.id for m in client.models.list().data]
    print(f"  models     {ids}")
    if name not in ids:
        raise DeployError(f"the server does not list the served model {name!r} (it lists {ids})")
    return {"listed": ids}


def check_stream(client, name, max_tokens, engine):
    start, first, chunks, text, usage = time.time(), None, 0, [], None
    extra = {"stream_options": {"include_usage": True}} if engine == "vllm" else {}
    stream = client.chat.completions.create(model=name, max_tokens=max_tokens, stream=True, messages=[
        {"role": "user", "content": "Count from 1 to 10, separated by spaces."}], **extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.time()
            chunks += 1
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    seconds = time.time() - start
    if chunks == 0:
        raise DeployError("the streamed completion returned no content chunks")
    tokens = usage.completion_tokens if usage else chunks
    stats = {"latency_s": round(seconds, 3), "ttft_s": round(first - start, 3), "chunks": chunks,
             "prompt_tokens": usage.prompt_tokens if usage else None, "completion_tokens": tokens,
             "tokens_per_s": round(tokens / seconds, 1), "text": "".join(text)}
    print_stats("stream", stats, f"TTFT {stats['ttft_s']:.2f} s, {chunks} chunks")
    return stats


def check_json(client, name, max_tokens, engine):
    """vLLM constrains the answer (response_format json_object), so it must parse; `transformers serve`
    ignores response_format, so there the result is the model's own JSON validity, reported, not enforced."""
    greedy = {"temperature": 0.0} if engine == "vllm" else {}
    messages = [{"role": "system", "content": "Reply with a JSON object only."},
                {"role": "user", "content": 'Give {"name": <string>, "age": <integer>} for Alice, who is 30.'}]
    r, stats = timed_chat(client, model=name, max_tokens=max_tokens, messages=messages,
                          response_format={"type": "json_object"}, **greedy)
    text = r.choices[0].message.content or ""
    try:
        parsed = json.loads(text.strip().removeprefix("```json").removesuffix("```").strip())
        stats["valid_json"] = isinstance(parsed, dict)
    except ValueError:
        stats["valid_json"] = False
    stats["enforced"], stats["text"] = engine == "vllm", text
    print_stats("json", stats, f"valid JSON: {stats['valid_json']}"
                + ("" if stats["enforced"] else " (reported only: this engine cannot constrain the output)"))
    stats["finish_reason"] = r.choices[0].finish_reason
    if stats["enforced"] and not stats["valid_json"]:
        cut = (f" (cut at max_tokens={max_tokens} before the object closed: finish_reason 'length')"
               if stats["finish_reason"] == "length" else "")
        raise DeployError(f"the JSON-constrained answer does not parse{cut}: {text[:200]!r}")
    return stats


def weather_call(message):
    """The message's first tool call if it calls get_weather with JSON arguments: (call, None), else (None, why)."""
    if not message.tool_calls:
        return None, "no tool call"
    call = message.tool_calls[0]
    if call.function.name != "get_weather":
        return None, f"called {call.function.name!r}, not get_weather"
    try:
        json.loads(call.function.arguments)
    except ValueError:
        return None, f"arguments are not JSON: {call.function.arguments!r}"
    return call, None


def check_tool_round_trip(client, name, max_tokens, engine):
    """Ask with tools; answer the call with a tool result; the model must then reply. When the model's own call
    is missing or unusable (a small model may name the city as the tool), vLLM is made to call get_weather
    (named tool_choice, grammar-constrained); on the transformers engine (no tool parser for every model,
    tool_choice ignored) the call is written by hand, so the second leg still runs through the server."""
    from openai import APIConnectionError, InternalServerError, OpenAI
    messages = [{"role": "user", "content": "What's the weather in Paris right now? Use the tool."}]
    try:
        r, stats = timed_chat(client, model=name, max_tokens=max_tokens, messages=messages, tools=[WEATHER_TOOL])
        call, model_call = weather_call(r.choices[0].message)
    except (InternalServerError, APIConnectionError) as err:
        if engine != "transformers":
            raise
        # `transformers serve` fails the request when its tool parser meets a <tool_call> whose JSON is broken (an
        # undertrained model's; the README demo's): HTTP 500, or the connection dropped mid-answer. That is the
        # model's own try failing, so the call is constructed as below, on a client of its own (not the pooled
        # connection the server dropped).
        why = f"HTTP {err.status_code}" if isinstance(err, InternalServerError) else "connection dropped"
        call, model_call, stats = None, f"the server could not parse it ({why})", {}
        client = OpenAI(base_url=str(client.base_url), api_key=client.api_key, timeout=300, max_retries=0)
    source = "model (tool_choice=auto)"
    if call is None and engine == "vllm":
        r, stats = timed_chat(client, model=name, max_tokens=max_tokens, messages=messages, tools=[WEATHER_TOOL],
                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call, problem = weather_call(r.choices[0].message)
        if call is None:
            raise DeployError(f"vLLM's call with a named tool_choice is unusable: {problem} "
                              f"(finish_reason {r.choices[0].finish_reason!r}; is --enable-auto-tool-choice on?)")
        source = f"forced (named tool_choice; the model's own try: {model_call})"
    if call is not None:
        call_id, arguments, args = call.id, call.function.arguments, json.loads(call.function.arguments)
    else:
        source, call_id, args = f"constructed (the model's own try: {model_call})", "call_0", {"city": "Paris"}
        arguments = json.dumps(args)
    if stats:
        print_stats("tool call", stats, f"{source}: get_weather({arguments})")
    else:
        print(f"  tool call  {source}: get_weather({arguments})", flush=True)
    messages += [{"role": "assistant", "content": "", "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temp_c": 18, "sky": "cloudy"})}]
    r2, stats2 = timed_chat(client, model=name, max_tokens=max_tokens, messages=messages, tools=[WEATHER_TOOL])
    answer = r2.choices[0].message.content or ""
    print_stats("tool reply", stats2, repr(answer[:60]))
    if not answer.strip() and not r2.choices[0].message.tool_calls:
        raise DeployError("the reply after the tool result is empty")
    return {"call_source": source, "model_call": model_call or "valid", "arguments": args, "call": stats,
            "reply": stats2, "answer": answer}


def training_prompt_ids(tokenizer, messages, tools):
    """The ids training rendered for the conversation, cut where the last answer's loss starts."""
    out = common.tokenize_conversation(tokenizer, messages, tools=tools, train_on_turns="last")
    start = next(i for i, label in enumerate(out["labels"]) if label != -100)
    return out["input_ids"][:start]


def served_prompt_ids(cfg, engine, name, messages, tools, served_dir):
    """The ids the server builds for a conversation: vLLM's /tokenize; for `transformers serve`, the same
    call it makes per request (AutoProcessor of the served folder, apply_chat_template with tools)."""
    if engine == "vllm":
        body = {"model": name, "messages": messages, "add_generation_prompt": True}
        if tools:
            body["tools"] = tools
        root = common.server_root(endpoint_url(cfg))
        req = urllib.request.Request(root + "/tokenize", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {cfg['deploy']['api_key'] or 'EMPTY'}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]
    from transformers import AutoProcessor
    from transformers.cli.serving.utils import BaseHandler, Modality
    processor = AutoProcessor.from_pretrained(served_dir)
    inputs = BaseHandler.get_processor_inputs_from_messages(messages, Modality.LLM)
    return processor.apply_chat_template(inputs, add_generation_prompt=True, tools=tools, tokenize=True,
                                         return_dict=True)["input_ids"]


def check_template_parity(cfg, client, engine, name, tokenizer, served_dir):
    """Server-side prompt ids == the training renderer's ids (minus the answer), for each conversation.
    On the transformers engine the server's own prompt_tokens count is checked against them too."""
    results = []
    for messages, tools in PARITY_CONVERSATIONS:
        want = training_prompt_ids(tokenizer, messages, tools)
        if want != common.prompt_ids(tokenizer, messages[:-1], tools):
            raise DeployError("the training render of a conversation does not start with its generation prompt; "
                              "the chat template puts something between the prompt and the answer")
        got = served_prompt_ids(cfg, engine, name, messages[:-1], tools, served_dir)
        entry = {"turns": len(messages) - 1, "tools": bool(tools), "tokens": len(want), "equal": got == want}
        if engine == "transformers":
            _, stats = timed_chat(client, model=name, messages=messages[:-1], max_tokens=1,
                                  **({"tools": tools} if tools else {}))
            entry["server_prompt_tokens"] = stats["prompt_tokens"]
            entry["equal"] = entry["equal"] and stats["prompt_tokens"] == len(want)
        if not entry["equal"]:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise DeployError(
                f"template parity FAILED ({entry}): the server builds {len(got)} ids, training {len(want)}; first "
                f"difference at {first}: server {tokenizer.decode(got[first:first + 12])!r} vs training "
                f"{tokenizer.decode(want[first:first + 12])!r}. The served model would see a format it did not "
                f"learn: re-run merge (it saves the training chat template) or fix model.chat_template")
        results.append(entry)
    method = ("vLLM /tokenize with messages" if engine == "vllm" else
              "served folder's AutoProcessor.apply_chat_template (what transformers serve calls) "
              "+ the server's reported prompt_tokens")
    print(f"  parity     {len(results)} conversations identical to the training render ({method})")
    return {"method": method, "conversations": results}


# ---------------------------------------------------------------- parity gate: the served model is the trained one

PARITY_PROMPTS = [  # used when the run has fewer validation rows than deploy.parity_prompts (no build, --model alone)
    *MERGE_CHECK_PROMPTS,
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "List three fruits, separated by commas."}],
    [{"role": "user", "content": "小明有 5 个苹果，吃了 2 个，还剩几个？"}],
    [{"role": "user", "content": "Explain briefly what a Python list is."}],
    [{"role": "system", "content": "Reply with a JSON object only."},
     {"role": "user", "content": 'Give {"city": <string>} for Rome.'}],
]


def parity_prompts(cfg, train_cfg):
    """deploy.parity_prompts conversations, each cut before its last answer: the run's validation rows without tools
    (tool calls are covered by template parity and the tool round trip), topped up with PARITY_PROMPTS.
    Returns (prompts, where they came from)."""
    k = cfg["deploy"]["parity_prompts"]
    path = common.path_in_repo(os.path.join(train_cfg["data"]["processed_dir"], "val.jsonl"))
    prompts = []
    if os.path.isfile(path):
        for _, row in common.read_jsonl(path):
            messages, tools = common.row_to_chat(row)
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
            plain = not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
            if last and plain and len(prompts) < k:
                prompts.append(messages[:last])
    extra = PARITY_PROMPTS[:k - len(prompts)]
    source = f"{len(prompts)} validation rows from {path}" if prompts else f"no validation rows ({path} not found)"
    return prompts + extra, source + (f" + {len(extra)} built-in prompts" if extra else "")


def parity_device(cfg, folders):
    """(device, dtype) of the in-process models, loaded one at a time: the GPU in 16-bit when it has 1.5× the largest
    folder's weights free beside the server (deploy.parity_device auto), else the CPU in fp32."""
    import glob

    import torch
    choice = cfg["deploy"]["parity_device"]
    if choice not in ("auto", "cuda", "cpu"):
        raise DeployError(f"deploy.parity_device must be 'auto', 'cuda' or 'cpu', got {choice!r}")
    if choice == "cuda" and not common.has_cuda():
        raise DeployError("deploy.parity_device is 'cuda' but no CUDA GPU is visible")
    if choice == "cpu" or not common.has_cuda():
        return "cpu", torch.float32
    weights = max(sum(os.path.getsize(p) for p in glob.glob(os.path.join(f, "*.safetensors"))) for f in folders)
    free = torch.cuda.mem_get_info()[0]
    if choice == "auto" and free < 1.5 * weights:
        print(f"  parity     note: {free / 1024 ** 3:.1f} GiB free on the GPU beside the server, "
              f"{weights / 1024 ** 3:.1f} GiB of weights: the reference runs on the CPU in fp32", flush=True)
        return "cpu", torch.float32
    return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_causal_lm(folder, device, dtype, adapter=None):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def score(model, prompt, tokens):
    """One forward pass over prompt + tokens: for each continuation token its log-probability, the model's own
    choice at that position and the choice's lead over the runner-up (logits)."""
    import torch
    if not tokens:
        return {"logprobs": [], "argmax": [], "lead": []}
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens], device=device)).logits[0, len(prompt) - 1:-1]
    logp = logits.float().log_softmax(-1)
    top2 = logp.topk(2, dim=-1)
    picked = logp.gather(-1, torch.tensor(tokens, device=device)[:, None])[:, 0]
    return {"logprobs": picked.tolist(), "argmax": top2.indices[:, 0].tolist(),
            "lead": (top2.values[:, 0] - top2.values[:, 1]).tolist()}


def greedy_ids(model, tokenizer, prompt, max_tokens):
    """The model's greedy continuation of prompt ids, through its stop token."""
    import torch
    gen = common.generation_config(model, tokenizer, {"max_new_tokens": max_tokens, "temperature": 0.0,
                                                      "repetition_penalty": 1.0, "top_p": 1.0, "top_k": 0})
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = common.run_generate(model, tokenizer, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                 "generation_config": gen})[0, len(prompt):].tolist()
    end = next((i for i, t in enumerate(out) if t in set(gen.eos_token_id)), None)
    return out if end is None else out[:end + 1]


def served_greedy(client, engine, name, messages, max_tokens, tokenizer):
    """The endpoint's greedy continuation (the server applies its own chat template) as (token ids, log-probabilities
    or None). vLLM returns both (logprobs with return_tokens_as_token_ids); `transformers serve` 5.17 ignores
    `logprobs`, so there the text is tokenized again and only the tokens are compared."""
    if engine == "vllm":
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0,
                                           logprobs=True, extra_body={"return_tokens_as_token_ids": True,
                                                                      "repetition_penalty": 1.0})
        content = r.choices[0].logprobs.content or []
        return [int(t.token.removeprefix("token_id:")) for t in content], [t.logprob for t in content]
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0)
    ids = tokenizer(r.choices[0].message.content or "", add_special_tokens=False)["input_ids"]
    if r.choices[0].finish_reason == "stop":  # the text leaves out the stop token that ended it
        im_end = tokenizer.convert_tokens_to_ids(common.IM_END)
        ids.append(im_end if im_end not in (None, tokenizer.unk_token_id) else tokenizer.eos_token_id)
    return ids, None


def compare(tokens, logprobs, ref):
    """A candidate's greedy tokens (and its log-probabilities of them) against a reference's scores of the same
    tokens: top-1 agreement where the reference leads clearly, and |Δ log p| per token."""
    clear = [i for i, lead in enumerate(ref["lead"]) if lead > MERGE_TOP1_MARGIN]
    return {"tokens": len(tokens), "clear": len(clear), "agree": sum(ref["argmax"][i] == tokens[i] for i in clear),
            "changed": sum(a != t for a, t in zip(ref["argmax"], tokens)),
            "deltas": None if logprobs is None else [abs(a - b) for a, b in zip(logprobs, ref["logprobs"])]}


def summarize(rows):
    """One pair over every prompt, plus its worst prompt (fewest agreeing clear positions, then largest |Δ|)."""
    clear, agree = sum(r["clear"] for r in rows), sum(r["agree"] for r in rows)
    deltas = None if any(r["deltas"] is None for r in rows) else [d for r in rows for d in r["deltas"]]

    def badness(i):
        r = rows[i]
        return (r["agree"] / r["clear"] if r["clear"] else 1.0, -max(r["deltas"] or [0]) if deltas is not None else 0)
    tokens = sum(r["tokens"] for r in rows)
    return {"top1_agreement": agree / clear if clear else 1.0, "clear_positions": clear, "tokens": tokens,
            "changed_share": sum(r["changed"] for r in rows) / tokens if tokens else 0.0,
            "clear_disagree_share": (clear - agree) / tokens if tokens else 0.0,
            "mean_abs_dlogprob": sum(deltas) / len(deltas) if deltas else None,
            "max_abs_dlogprob": max(deltas) if deltas else None, "worst_prompt": min(range(len(rows)), key=badness),
            "per_prompt": [{k: r[k] for k in ("tokens", "clear", "agree")} for r in rows]}


def parity_failures(cfg, pairs, effect, prompts):
    """Messages naming each failed pair and its worst prompt."""
    d, failed = cfg["deploy"], []
    for pair, s in pairs.items():
        if pair.endswith("_vs_base"):
            continue
        why = []
        if s["top1_agreement"] < d["parity_min_top1"]:
            why.append(f"top-1 agreement {s['top1_agreement']:.3f} < {d['parity_min_top1']}")
        if s["mean_abs_dlogprob"] is not None and s["mean_abs_dlogprob"] > d["parity_max_mean_abs_logprob"]:
            why.append(f"mean |Δlogprob| {s['mean_abs_dlogprob']:.4f} > {d['parity_max_mean_abs_logprob']}")
        if why:
            w = s["worst_prompt"]
            failed.append(f"{pair}: {', '.join(why)}; worst prompt {w} "
                          f"{prompts[w][-1]['content'][:80]!r} ({s['per_prompt'][w]['agree']}/"
                          f"{s['per_prompt'][w]['clear']} clear positions agree)")
    if effect and not effect["passed"]:
        failed.append(f"adapter effect: {effect['why']}")
    return failed


def adapter_effect(cfg, pairs):
    """Served vs base must differ more than served vs adapter (by deploy.parity_min_adapter_effect): a no-op adapter,
    or a served model without the adapter, fails. In mean |Δlogprob| where the engine returns logprobs, else in the
    share of positions (all of them: an adapter moves the base where it was unsure) whose greedy token the scoring
    model would not pick. Against base + adapter only clear positions count as noise there: the merge's rounding
    can flip near-ties (the README demo's 2-step adapter on the CPU: 0.234 of all positions differed from base +
    adapter while every clear position agreed)."""
    factor = cfg["deploy"]["parity_min_adapter_effect"]
    base, adapter = pairs["served_vs_base"], pairs["served_vs_adapter"]
    if base["mean_abs_dlogprob"] is not None:
        unit, effect, noise = "mean |Δlogprob|", base["mean_abs_dlogprob"], adapter["mean_abs_dlogprob"]
    else:
        unit, effect, noise = ("share of changed greedy tokens (against base + adapter: clear positions only)",
                               base["changed_share"], adapter["clear_disagree_share"])
    passed = effect >= factor * noise and (effect > 0 or factor == 0)
    why = (f"served vs base {unit} {effect:.4f}, served vs adapter {noise:.4f}: the served model is not further from "
           f"the base than {factor}× its distance from base + adapter (an adapter that changes nothing, or a served "
           f"model without the adapter; for a deliberately subtle adapter raise deploy.parity_prompts or lower "
           f"deploy.parity_min_adapter_effect)")
    return {"unit": unit, "served_vs_base": effect, "served_vs_adapter": noise, "min_factor": factor,
            "passed": passed, **({} if passed else {"why": why})}


def check_parity(cfg, client, engine, name, target, tokenizer):
    """The gate: greedy continuations of the endpoint and of the full-weights folder (merged, or --model alone),
    each scored by the references in process (base + adapter with PEFT, the folder, the base alone)."""
    d = cfg["deploy"]
    prompts, source = parity_prompts(cfg, target["train_cfg"])
    ids = [common.prompt_ids(tokenizer, p) for p in prompts]
    served = [served_greedy(client, engine, name, p, d["parity_max_tokens"], tokenizer) for p in prompts]
    adapter = target["adapter"]
    folder = target["merged"] if os.path.isdir(target["merged"]) else None  # LoRA mode before any merge: none
    label = "merged" if target["run"] else "model"
    base = base_model_path(target["train_cfg"]["model"]["name"]) if adapter else None
    device, dtype = parity_device(cfg, [f for f in (folder, base) if f])
    rows, same = {}, None
    if folder:  # one model in memory at a time: a 4B reference in bf16 fits beside vLLM on an 80 GB card
        model = load_causal_lm(folder, device, dtype)
        own = [greedy_ids(model, tokenizer, p, d["parity_max_tokens"]) for p in ids]
        own = [(t, score(model, p, t)["logprobs"]) for p, t in zip(ids, own)]
        rows[f"served_vs_{label}"] = [compare(t, lp, score(model, p, t)) for p, (t, lp) in zip(ids, served)]
        stops = set(common.stop_token_ids(model, tokenizer))  # an engine may leave the stop token out

        def text_ids(tokens):
            return tokens[:-1] if tokens and tokens[-1] in stops else tokens
        same = sum(text_ids(s[0]) == text_ids(o[0]) for s, o in zip(served, own))
        del model
    if adapter:
        model = load_causal_lm(base, device, dtype, adapter=adapter)
        rows["served_vs_adapter"] = [compare(t, lp, score(model, p, t)) for p, (t, lp) in zip(ids, served)]
        if folder:
            rows[f"{label}_vs_adapter"] = [compare(t, lp, score(model, p, t)) for p, (t, lp) in zip(ids, own)]
        with model.disable_adapter():
            rows["served_vs_base"] = [compare(t, lp, score(model, p, t)) for p, (t, lp) in zip(ids, served)]
        del model
    pairs = {pair: summarize(r) for pair, r in rows.items()}
    effect = adapter_effect(cfg, pairs) if adapter else None
    result = {"prompts": len(prompts), "source": source, "max_tokens": d["parity_max_tokens"],
              "reference": f"{device}, {str(dtype).replace('torch.', '')}",
              "logprobs": ("returned by the engine" if served[0][1] is not None else
                           f"not returned by the {engine} engine: top-1 agreement only"),
              "greedy_identical": None if same is None else f"{same}/{len(prompts)} served vs {label}",
              "pairs": pairs, "adapter_effect": effect,
              "served_text": [tokenizer.decode(t) for t, _ in served]}
    if not adapter:
        result["skipped"] = "no adapter (--model alone): compared with the folder itself; adapter pairs skipped"
    line = "; ".join(f"{p} top-1 {s['top1_agreement']:.3f}" + (f" |Δlogp| {s['mean_abs_dlogprob']:.4f}"
                                                                if s["mean_abs_dlogprob"] is not None else "")
                     for p, s in pairs.items())
    print(f"  parity     {len(prompts)} prompts ({source}); {line}" + (
        f"; adapter effect {effect['served_vs_base']:.4f} vs {effect['served_vs_adapter']:.4f}" if effect else "")
        + ("" if served[0][1] is not None else f" (the {engine} engine returns no logprobs: top-1 only)")
        + (f"; {result['skipped']}" if not adapter else ""), flush=True)
    failed = parity_failures(cfg, pairs, effect, prompts)
    if failed:
        raise ParityError("parity FAILED: " + " | ".join(failed), result)
    return result


class ParityError(DeployError):
    """The gate failed; carries its numbers, so deploy_test.json keeps them beside the error."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def check_chat(client, name, max_tokens):
    r, stats = timed_chat(client, model=name, max_tokens=max_tokens, messages=[
        {"role": "user", "content": "In one sentence, what is fine-tuning?"}])
    stats["text"] = r.choices[0].message.content
    if not (stats["text"] or "").strip():
        choice = r.choices[0]
        raise DeployError(
            f"the chat completion returned no text (finish_reason {choice.finish_reason!r}, "
            f"{stats['completion_tokens']} completion tokens, tool_calls {bool(choice.message.tool_calls)}): the model "
            f"emitted only special tokens or whitespace, or the tool-call parser took the whole answer; "
            f"a model with random or broken weights does this")
    print_stats("chat", stats, repr(stats["text"][:60]))
    return stats


def check_endpoint(cfg, target, out_path=None, server_log=None):
    """Every check against the running server for one served name (see deploy_targets), all of them even after a
    failure (written to out_path); raises DeployError naming the failed ones, else returns the results. Only an
    unlisted model stops it at once (every other check would fail the same way)."""
    from openai import APIError
    engine, name = detect_engine(cfg), target["name"]
    client, max_tokens = openai_client(cfg), cfg["deploy"]["test_max_tokens"]
    print(f"testing {endpoint_url(cfg)} (engine: {engine}, model: {name})", flush=True)
    results = {"endpoint": endpoint_url(cfg), "engine": engine, "model": name}
    results["models"] = check_models(cfg, name)
    tokenizer = target_tokenizer(target)
    failed = []
    # The parity gate does not depend on the model answering well: a model that stops at once (an H200 run of a
    # random-weight Qwen3-4B shape after 4 steps) still gets its served-vs-trained numbers.
    checks = {"chat": lambda: check_chat(client, name, max_tokens),
              "template_parity": lambda: check_template_parity(cfg, client, engine, name, tokenizer,
                                                               target["served_dir"]),
              "stream": lambda: check_stream(client, name, max_tokens, engine),
              "json": lambda: check_json(client, name, max_tokens, engine),
              "tool_round_trip": lambda: check_tool_round_trip(client, name, max_tokens, engine)}
    if cfg["deploy"]["parity_prompts"]:
        checks["parity"] = lambda: check_parity(cfg, client, engine, name, target, tokenizer)
    for key, check in checks.items():  # every check runs: one failure must not hide the others
        try:
            results[key] = check()
        except (DeployError, APIError) as err:  # APIError: the server answered an error (e.g. HTTP 500)
            where = ""
            if isinstance(err, APIError) and server_log and os.path.exists(server_log):
                where = f" (if deploy.py started the server, its log: {server_log})"
            print(f"  {key:<10} FAILED: {err}{where}", flush=True)
            results[key] = {**getattr(err, "result", {}), "error": f"{err}{where}"}
            failed.append(key)
    if out_path:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=2)
        print(f"test results written: {out_path}")
    if failed:
        total = len(checks) + 1  # + the model listing above
        raise DeployError(f"{len(failed)} of {total} endpoint checks failed: {', '.join(failed)}")
    return results


# ---------------------------------------------------------------- perf

def perf_prompts(path):
    """Check the prompts file (EvalScope's openqa format: one {"question": ...} per line); returns the count."""
    path = common.path_in_repo(path)
    if not os.path.isfile(path):
        raise DeployError(f"perf prompts file {path} not found (deploy.perf_prompts_file)")
    count = 0
    for line_no, row in common.read_jsonl(path):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise common.DataError(f"{path}:{line_no}: expected {{\"question\": <non-empty string>}}")
        count += 1
    if count == 0:
        raise DeployError(f"perf prompts file {path} has no prompts")
    return path, count


# `evalscope perf` with --api-key taken from the environment, so the key is in no process's argv.
EVALSCOPE_WITH_KEY = ("import os, sys; sys.argv += ['--api-key', os.environ['VLLM_API_KEY']]; "
                      "from evalscope.cli.cli import run_cmd; sys.exit(run_cmd())")


def evalscope_command(cfg, engine, served_dir, out_dir, name=None):
    d = cfg["deploy"]
    levels = [int(c) for c in d["perf_concurrency"]]
    numbers = [max(d["perf_min_requests"], c * d["perf_requests_per_level"]) for c in levels]
    exe = shutil.which("evalscope", path=os.path.dirname(sys.executable)) or shutil.which("evalscope")
    if exe is None:
        raise DeployError("the `evalscope` CLI was not found; pip install 'evalscope[perf]'")
    cmd = [exe, "perf", "--url", endpoint_url(cfg) + "/chat/completions", "--api", "openai",
           "--model", name or d["served_model_name"], "--parallel", *map(str, levels), "--number", *map(str, numbers),
           "--max-tokens", str(d["perf_max_tokens"]), "--stream", "--temperature", "0",
           "--outputs-dir", out_dir, "--no-timestamp", "--name", "perf", "--sleep-interval", "1",
           "--seed", str(cfg["training"]["seed"])]
    if d["perf_dataset"] == "random":  # fixed-length synthetic prompts, as in the GPU anchor (~400 tokens)
        n = str(d["perf_prompt_tokens"])
        cmd += ["--dataset", "random", "--min-prompt-length", n, "--max-prompt-length", n, "--prefix-length", "0"]
    elif d["perf_dataset"] == "file":
        path, _ = perf_prompts(d["perf_prompts_file"])
        cmd += ["--dataset", "openqa", "--dataset-path", path]
    else:
        raise DeployError(f"deploy.perf_dataset must be 'file' or 'random', got {d['perf_dataset']!r}")
    if served_dir:
        cmd += ["--tokenizer-path", served_dir]
    if engine == "vllm":
        # Every answer exactly perf_max_tokens long, so levels compare like for like (transformers serve
        # rejects min_tokens with HTTP 422).
        cmd += ["--min-tokens", str(d["perf_max_tokens"]), "--extra-args", json.dumps({"ignore_eos": True})]
    if d["api_key"]:  # evalscope reads it from argv only: a wrapper adds it from the environment (run_perf)
        cmd = [sys.executable, "-c", EVALSCOPE_WITH_KEY, *cmd[1:]]
    return cmd, levels, numbers


def percentile(rows, label, key):
    row = next((r for r in rows if r.get("Percentiles") == label), {})
    return row.get(key)


def read_level(folder, level, number):
    with open(os.path.join(folder, "benchmark_summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    rows = []
    if os.path.isfile(os.path.join(folder, "benchmark_percentile.json")):
        with open(os.path.join(folder, "benchmark_percentile.json"), encoding="utf-8") as f:
            rows = json.load(f)
    return {"concurrency": level, "requests": number, "succeeded": s.get("Success Requests"),
            "failed": s.get("Failed Requests"), "req_throughput": s.get("Req Throughput (req/s)"),
            "output_tok_s": s.get("Output Throughput (tok/s)"), "total_tok_s": s.get("Total Throughput (tok/s)"),
            "avg_latency_s": s.get("Avg Latency (s)"), "p50_latency_s": percentile(rows, "50%", "Latency (s)"),
            "p99_latency_s": percentile(rows, "99%", "Latency (s)"), "avg_ttft_ms": s.get("Avg TTFT (ms)"),
            "p50_ttft_ms": percentile(rows, "50%", "TTFT (ms)"), "p99_ttft_ms": percentile(rows, "99%", "TTFT (ms)"),
            "avg_tpot_ms": s.get("Avg TPOT (ms)"), "p50_tpot_ms": percentile(rows, "50%", "TPOT (ms)"),
            "p99_tpot_ms": percentile(rows, "99%", "TPOT (ms)"), "avg_input_tokens": s.get("Avg Input Tokens"),
            "avg_output_tokens": s.get("Avg Output Tokens")}


def perf_text(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_perf_report(result, out_dir):
    with open(os.path.join(out_dir, "perf.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Serving performance: {result['model']} ({result['engine']})", "",
             f"Endpoint {result['endpoint']}, prompts: {result['dataset']}, max {result['max_tokens']} output tokens, "
             f"EvalScope {result['evalscope_version']}.", "",
             "| concurrency | requests (ok/failed) | req/s | output tok/s | total tok/s | latency avg / p50 / p99 (s) "
             "| TTFT avg / p99 (ms) | TPOT avg / p99 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["levels"]:
        lines.append(f"| {r['concurrency']} | {r['succeeded']}/{r['failed']} | {perf_text(r['req_throughput'], 2)} "
                     f"| {perf_text(r['output_tok_s'])} | {perf_text(r['total_tok_s'])} "
                     f"| {perf_text(r['avg_latency_s'], 2)} / {perf_text(r['p50_latency_s'], 2)} / "
                     f"{perf_text(r['p99_latency_s'], 2)} | {perf_text(r['avg_ttft_ms'])} / {perf_text(r['p99_ttft_ms'])} "
                     f"| {perf_text(r['avg_tpot_ms'])} / {perf_text(r['p99_tpot_ms'])} |")
    lines += ["", "![throughput and latency](perf.png)", ""]
    with open(os.path.join(out_dir, "perf.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    plot_perf(result, os.path.join(out_dir, "perf.png"))


def plot_perf(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = [r["concurrency"] for r in result["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(levels, [r["output_tok_s"] or 0 for r in result["levels"]], "o-", label="output tok/s")
    ax1.plot(levels, [r["total_tok_s"] or 0 for r in result["levels"]], "s--", label="total tok/s")
    ax1.set(xlabel="concurrency", ylabel="tokens/s", title="Throughput", xscale="log")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax2.plot(levels, [r["p50_latency_s"] or 0 for r in result["levels"]], "o-", label="p50 latency (s)")
    ax2.plot(levels, [r["p99_latency_s"] or 0 for r in result["levels"]], "s--", label="p99 latency (s)")
    ax2.plot(levels, [(r["avg_ttft_ms"] or 0) / 1000 for r in result["levels"]], "^:", label="avg TTFT (s)")
    ax2.set(xlabel="concurrency", ylabel="seconds", title="Latency", xscale="log")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    for ax in (ax1, ax2):  # ticks at the measured levels only, as plain numbers
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
    fig.suptitle(f"{result['model']} on {result['engine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_perf(cfg, served_dir, out_dir, name=None):
    """EvalScope perf of one served name (default deploy.served_model_name) at each deploy.perf_concurrency level
    -> out_dir/perf.json, perf.md, perf.png."""
    engine = detect_engine(cfg)
    raw_dir = os.path.join(out_dir, "evalscope")
    shutil.rmtree(raw_dir, ignore_errors=True)
    cmd, levels, numbers = evalscope_command(cfg, engine, served_dir, raw_dir, name)
    os.makedirs(raw_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "perf.log")
    print(f"EvalScope perf against {endpoint_url(cfg)}: concurrency {levels}, requests {numbers}\n  log: {log_path}",
          flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(server_env(cfg), HF_HUB_OFFLINE="1"),
                            cwd=out_dir).returncode
    if rc != 0:
        raise DeployError(f"evalscope perf failed (exit code {rc}); last lines of {log_path}:\n{log_tail(log_path)}")
    result = {"endpoint": endpoint_url(cfg), "engine": engine, "model": name or cfg["deploy"]["served_model_name"],
              "dataset": (cfg["deploy"]["perf_prompts_file"] if cfg["deploy"]["perf_dataset"] == "file"
                          else f"random, {cfg['deploy']['perf_prompt_tokens']} prompt tokens"),
              "max_tokens": cfg["deploy"]["perf_max_tokens"],
              "evalscope_version": common.package_versions(("evalscope",)).get("evalscope"),
              "command": cmd, "levels": []}
    for level, number in zip(levels, numbers):
        folder = os.path.join(raw_dir, "perf", f"parallel_{level}_number_{number}")
        if not os.path.isfile(os.path.join(folder, "benchmark_summary.json")):
            raise DeployError(f"evalscope wrote no summary for concurrency {level} ({folder}); see {log_path}")
        result["levels"].append(read_level(folder, level, number))
    for r in result["levels"]:
        print(f"  concurrency {r['concurrency']:>4}: {r['succeeded']}/{r['requests']} ok, "
              f"{perf_text(r['output_tok_s'])} output tok/s, p50 latency {perf_text(r['p50_latency_s'], 2)} s, "
              f"TTFT {perf_text(r['avg_ttft_ms'])} ms, TPOT {perf_text(r['avg_tpot_ms'])} ms", flush=True)
    if not any(r["succeeded"] for r in result["levels"]):
        raise DeployError(f"every perf request failed; see {log_path}")
    write_perf_report(result, out_dir)
    print(f"perf report written: {os.path.join(out_dir, 'perf.md')} (+ perf.json, perf.png)")
    return result


# ---------------------------------------------------------------- main

def server_up(cfg):
    return common.http_ok(health_url(cfg), 5)


def deploy_targets(cfg, args):
    """One entry per served name, for serve / test / perf: name (the `model` clients send), run (outputs/<run>, None
    for --model alone), train_cfg, adapter (folder or None), merged (the full-weights folder: outputs/<run>/merged or
    --model; may not exist yet), reports (reports/<run or folder name>/), log (the server's log).
    --model DIR without --run stands alone: DIR under deploy.served_model_name, no adapter, no training run.
    --lora with several --run serves each adapter under its run's folder name."""
    runs = args.run or []
    if args.model and not runs:
        folder = check_model_dir(common.path_in_repo(args.model))
        reports = reports_dir(cfg, folder)
        return [{"name": cfg["deploy"]["served_model_name"], "run": None, "train_cfg": cfg, "adapter": None,
                 "merged": folder, "reports": reports, "log": os.path.join(reports, "serve.log")}]
    if len(runs) > 1 and not args.lora:
        raise DeployError("several --run are served together only as unmerged adapters: add --lora (vLLM), "
                          "or deploy one run at a time")
    if len(runs) > 1 and args.adapter:
        raise DeployError("--adapter picks the adapter of one run: give one --run (or none) with it")
    adapter = common.resolve_adapter(cfg, args.adapter) if args.adapter else None
    targets = []
    for run in runs or [None]:
        run_path, train_cfg = resolve_run(cfg, run, adapter)
        name = os.path.basename(run_path.rstrip("/")) if len(runs) > 1 else cfg["deploy"]["served_model_name"]
        targets.append({"name": check_served_name(name), "run": run_path, "train_cfg": train_cfg,
                        "adapter": adapter or os.path.join(run_path, "adapter"),
                        "merged": common.path_in_repo(args.model) if args.model else os.path.join(run_path, "merged"),
                        "reports": reports_dir(cfg, run_path), "log": os.path.join(run_path, "serve.log")})
    names = [t["name"] for t in targets]
    if len(set(names)) < len(names):
        raise DeployError(f"two runs share a folder name ({', '.join(names)}): each adapter is served under its "
                          f"run's name, so rename one run folder")
    return targets


def serve_plan(args, targets):
    """(model folder, {name: adapter folder} or None) to serve: --model, the LoRA base + adapters, or the merged
    folder."""
    if args.lora and not args.model:
        bases = {base_model_path(t["train_cfg"]["model"]["name"]) for t in targets}
        if len(bases) > 1:
            raise DeployError(f"the runs were trained on different bases ({', '.join(sorted(bases))}); one server "
                              f"serves the adapters of one base")
        return bases.pop(), {t["name"]: t["adapter"] for t in targets}
    merged = targets[0]["merged"]
    if not os.path.isdir(merged):
        raise DeployError(f"{merged} does not exist; run `python deploy.py merge --run {targets[0]['run']}` first "
                          f"(or serve the adapter unmerged with --lora on vLLM)")
    return check_model_dir(merged), None


def running_server_folder(cfg, target, lora):
    """The folder whose tokenizer and chat template the server applies: the merged folder (or --model); a vLLM server
    in LoRA mode (--lora, or no merged folder yet) serves the base with training's tokenizer and template, which
    the adapter folder holds."""
    merged = target["merged"]
    if target["run"] is None or (os.path.isdir(merged) and not lora):
        return check_model_dir(merged)
    if detect_engine(cfg) == "vllm":
        return target["adapter"]
    why = "--lora was given" if lora else f"{merged} does not exist"
    raise DeployError(f"the server at {endpoint_url(cfg)} is not vLLM, so it cannot be serving the adapter unmerged "
                      f"({why}); pass --model with the folder it serves, or run "
                      f"`python deploy.py merge --run {target['run']}` and serve the merged folder")


def target_tokenizer(target):
    """The tokenizer and chat template the model learned with: training's (saved with the adapter), or, for --model
    alone, the folder's own."""
    if target["adapter"]:
        return common.load_tokenizer(target["train_cfg"], target["adapter"])
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(target["served_dir"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_forever(proc):
    """Wait on the server until Ctrl-C / SIGTERM (main installed `interrupt` for both), then stop its group."""
    print(f"serving {', '.join(proc.names)} at {proc.url}; Ctrl-C stops it", flush=True)
    try:
        code = proc.wait()
        raise DeployError(f"the server exited with code {code}; last lines of {proc.log_path}:\n"
                          f"{log_tail(proc.log_path)}")
    except KeyboardInterrupt:
        print("\nstopping the server...", flush=True)
    finally:
        stop_for_good(proc)


def stop_for_good(proc):
    """stop_server with Ctrl-C and SIGTERM ignored: stopping takes at most its 30 s + SIGKILL, and a second Ctrl-C or
    kill must not cut it short (a traceback, the group possibly left)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_server(proc)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["merge", "serve", "test", "perf", "all"])
    parser.add_argument("--run", action="append",
                        help="outputs/<run> folder (default: the newest with an adapter); repeat with --lora to serve "
                             "several adapters, each under its run's name")
    parser.add_argument("--adapter", help="the adapter of one run to merge / serve: outputs/<run>[/adapter | "
                                          "/adapter_last | /checkpoints/checkpoint-N] (default: the run's adapter/)")
    parser.add_argument("--engine", choices=ENGINES, help="overrides deploy.engine")
    parser.add_argument("--lora", action="store_true", help="serve base + adapter unmerged (vLLM --enable-lora)")
    parser.add_argument("--model", help="serve/test/perf this model folder instead of outputs/<run>/merged; "
                                        "without --run no training run is needed")
    parser.add_argument("--tensor-parallel-size", type=int,
                        help="GPUs per vLLM server (overrides deploy.tensor_parallel_size)")
    parser.add_argument("--no-gguf", action="store_true", help="skip the GGUF export even when llama.cpp is present")
    config.add_config_args(parser)
    args = parser.parse_args()
    cfg = config.resolve(args, parser)
    if args.engine:
        cfg["deploy"]["engine"] = args.engine
    if args.tensor_parallel_size:
        cfg["deploy"]["tensor_parallel_size"] = args.tensor_parallel_size
    return args, cfg


def merge_command(args, targets):
    """`deploy.py merge` for exactly these targets' runs and adapter, with this process's profile and --set."""
    cmd = [sys.executable, os.path.abspath(__file__), "merge"]
    cmd += [x for t in targets for x in ("--run", t["run"])] + (["--adapter", args.adapter] if args.adapter else [])
    cmd += ["--no-gguf"] * args.no_gguf + (["--profile", args.profile] if args.profile else [])
    return cmd + [x for o in args.overrides for x in ("--set", o)]


def merge_step(cfg, args, targets):
    if args.step == "all" and common.has_cuda():
        # A merge process of its own: Unsloth keeps references to the models it loaded, and vLLM refuses to start
        # while ~12 GB of this process's GPU memory is still held (seen on an H100).
        subprocess.run(merge_command(args, targets), check=True)
        return
    for t in targets:
        merge(cfg, t["run"], t["train_cfg"], gguf=not args.no_gguf, adapter_dir=t["adapter"])


def test_and_perf(cfg, args, targets):
    """`test` and/or `perf` of every served name against the running server; every name is tested even after one
    fails."""
    failed = []
    for t in targets:
        t["served_dir"] = running_server_folder(cfg, t, args.lora)
        try:
            if args.step in ("test", "all"):
                check_endpoint(cfg, t, os.path.join(t["reports"], "deploy_test.json"), t["log"])
        except DeployError as err:
            failed.append(f"{t['name']}: {err}")
    if failed:
        raise DeployError("; ".join(failed))
    if args.step in ("perf", "all"):
        for t in targets:
            run_perf(cfg, t["served_dir"], t["reports"], t["name"])


@common.exits_on_user_error  # DeployError, DataError, a bad --run: `error: ...`, no traceback
def main():
    args, cfg = parse_args()
    # Fail before any heavy work (vLLM missing, no GPU); test/perf ask the running server instead.
    engine = resolve_engine(cfg) if args.step in ("serve", "all") else None
    check_host(cfg, engine)
    if engine == "transformers" and cfg["deploy"]["tensor_parallel_size"] > 1:
        print("note: tensor_parallel_size applies to vLLM only; the transformers engine uses one device")
    targets = deploy_targets(cfg, args)
    for t in targets:
        config.save_config(cfg, os.path.join(t["reports"], "deploy_config.json"),
                           extra={"step": args.step, "engine": engine, "run": t["run"], "git_sha": common.git_sha(),
                                  "versions": common.package_versions()})
    if args.step == "merge" and targets[0]["run"] is None:
        raise DeployError("--model names a folder to serve as it is; merge takes a training run (--run)")
    if args.step in ("merge", "all") and not (args.model or args.lora):  # those serve what is there
        merge_step(cfg, args, targets)
    if args.step == "merge":
        return
    proc = None
    if args.step in ("serve", "all"):
        model_dir, adapters = serve_plan(args, targets)
        # Ctrl-C, and `kill PID`, from here on stop the server group too: while vLLM starts (minutes) and after
        # (also when a launcher started us with SIGINT ignored). A plain SIGTERM would leave it running, orphaned.
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
        try:
            proc = start_server(cfg, model_dir, targets[0]["log"], adapters)
        except KeyboardInterrupt:  # start_server stopped what it had started
            raise DeployError("interrupted while the server was starting; it was stopped") from None
    if args.step == "serve":
        serve_forever(proc)
        return
    if proc is None and not server_up(cfg):
        raise DeployError(f"no server answers at {endpoint_url(cfg)}; start one with `python deploy.py serve` "
                          f"(or `all` to serve, test and perf in one go)")
    try:
        test_and_perf(cfg, args, targets)
    except KeyboardInterrupt:
        raise DeployError("interrupted" + ("; the server deploy.py started was stopped" if proc else "")) from None
    finally:
        if proc is not None:
            stop_for_good(proc)


if __name__ == "__main__":
    main()
