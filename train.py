"""QLoRA SFT of the configured model on the built dataset; leaves a LoRA adapter and a complete run record.

Reads   dataset/processed/{train,validation}/ (from `python build_datasets.py`) and the model (config model.name).
Writes  outputs/<run_name>/: adapter/ (LoRA + tokenizer with the model's original chat template; its base
        field names the 16-bit base; with eval on, the weights of the step with the lowest eval loss),
        adapter_last/ (the final step's, when that is not the best), checkpoints/checkpoint-N/, config.json
        (effective config, data and template hashes, package versions, git SHA), metrics.jsonl, summary.json,
        loss.png, tensorboard/ (training.report_to), rejects.jsonl (rows dropped or truncated for length, when
        there are any).

    python train.py                                  # GPU: Unsloth 4-bit QLoRA; no CUDA: transformers + PEFT, fp32
    python train.py --profile demo                   # bundled SmolLM2-135M, small sizes: minutes on a CPU
    python train.py --set training.max_steps=200 --set sft.packing=False
    python train.py --resume                         # newest complete checkpoint (of training.run_name if set)
    python train.py --resume outputs/<run>/checkpoints/checkpoint-100
    python train.py --check-packing                  # only prove that packed samples cannot see each other
    accelerate launch --num_processes 2 train.py     # DDP on 2 GPUs (or: torchrun --nproc_per_node 2 train.py)

The loss mask is ours (common.tokenize_conversation): loss on assistant content and its <|im_end|> only.
TRL gets pre-tokenized input_ids + labels and keeps them as they are (checked at start). Packing is used only
after a check shows that a packed sample gets the same loss as alone. Ctrl-C saves a checkpoint at the end of
the current step and exits; `--resume` continues with the same data order and step count, and logs the same
losses step for step (tests/test_train.py). Every checkpoint-N is an adapter folder the other scripts take:
`python obj_test_model.py --adapter outputs/<run>/checkpoints/checkpoint-N`.
"""

import argparse
import atexit
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time

import common
import config

RANK, WORLD_SIZE, LOCAL_RANK = (int(os.environ.get(k, d)) for k, d in
                                (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
IS_MAIN = RANK == 0  # only rank 0 prints and writes outputs
GIB = 1024 ** 3
# Memory-profile presets, smallest card first: GiB the card must have (what torch reports for it), then the
# settings; accumulation is recomputed so batch × accumulation stays what the config says.
# H200 under a per-card memory cap, Qwen3-4B shape, seq 2048, LoRA dropout 0 (2026-12-02, docs/BENCHMARKS.md):
# 16gb 8 x 2 with Unsloth's offloaded checkpointing 16.3k tokens/s at 7.4 GiB reserved; 8 x 2 with checkpointing
# kept on the GPU 16.6k at 9.8 GiB (the 24gb preset); no checkpointing needs 4 rows (40gb: 20.1k at 29.4 GiB) or
# 8 (80gb: 22.4k at 53.8 GiB with expandable segments); smaller micro-batches without it are slower (2 x 8
# 11.7k, 1 x 16 6.4k): the GEMMs get too thin.
PRESETS = {"16gb": (0, {}),
           "24gb": (22, {"per_device_train_batch_size": 8, "gradient_checkpointing": True}),
           "40gb": (36, {"per_device_train_batch_size": 4, "gradient_checkpointing": False}),
           "80gb": (70, {"per_device_train_batch_size": 8, "gradient_checkpointing": False})}
# training.checkpoint_skip_layers="auto" fills the memory estimate up to this share of the card.
SKIP_FILL = 0.75
# Three chats of different shapes (system prompt, multi-turn) for the packing-isolation check.
PROBE_CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "17 + 25 = 42."}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue on a clear day?"},
     {"role": "assistant", "content": "Air scatters short blue wavelengths of sunlight far more than red ones."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "Now in French."}, {"role": "assistant", "content": "Salut !"}],
]


def say(*args):
    if IS_MAIN:
        print(*args, flush=True)


# ---------------------------------------------------------------- backend and device plan

def validate(cfg):
    """What config.py cannot check alone (allowed values are checked there): generation eval sizes and the
    trackers' packages, before anything is loaded."""
    t = cfg["training"]
    if t["generation_eval_every"] < 0 or t["generation_eval_samples"] < 1:
        raise common.UserError("training.generation_eval_every must be >= 0 (0 = off) and "
                               "training.generation_eval_samples >= 1")
    check_trackers(t["report_to"])


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # training.report_to name -> the package it needs


def check_trackers(report_to):
    """Every tracker asked for is known and installed: a clear error before any weight is loaded."""
    for name in report_to:
        if name not in TRACKERS:
            raise common.UserError(f"training.report_to: unknown tracker {name!r}; choose from "
                                   f"{', '.join(TRACKERS)} ([] = none)")
        if not common.package_installed(TRACKERS[name]):
            raise common.UserError(f"training.report_to asks for {name}, but the {TRACKERS[name]} package is "
                                   f"not installed: pip install {TRACKERS[name]}, or drop it, e.g. --set "
                                   f"training.report_to=[]")


def check_extra(cfg):
    """training.extra holds SFTConfig fields handed over as is: unknown names fail (with the closest fields), and
    so do fields this config already has a key for (one name for one thing)."""
    import dataclasses
    import difflib

    from trl import SFTConfig
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    # SFTConfig fields that other config keys feed (sft_args): set those keys, so one name means one thing.
    own = {**{name: f"training.{name}" for name in cfg["training"]}, "max_length": "model.max_seq_length",
           "packing": "sft.packing", "assistant_only_loss": "sft.assistant_only_loss",
           "warmup_steps": "training.warmup_ratio", "output_dir": "output.dir and training.run_name",
           "run_name": "training.run_name", "data_seed": "training.seed"}
    for name in cfg["training"]["extra"]:
        if name in own:
            raise common.UserError(f"training.extra.{name}: set {own[name]} instead")
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see TRL's SFTConfig and TrainingArguments)"
            raise common.UserError(f"training.extra.{name} is not an SFTConfig field{hint}")


def pick_backend(cfg):
    """("unsloth" | "transformers", why). Decided before transformers/trl/peft are imported."""
    want, cuda, unsloth = cfg["training"]["backend"], common.has_cuda(), common.package_installed("unsloth")
    if want == "unsloth" and not (cuda and unsloth):
        raise common.UserError("training.backend=unsloth needs a CUDA GPU and the unsloth package "
                               "(pip install -r requirements.txt)")
    if want == "unsloth" or (want == "auto" and cuda and unsloth):
        return "unsloth", "Unsloth (CUDA)"
    if not cuda:
        return "transformers", "no CUDA GPU: transformers + PEFT LoRA in fp32, no 4-bit, adamw_torch"
    why = "requested" if want == "transformers" else "Unsloth is not installed"
    return "transformers", f"transformers + PEFT on CUDA ({why})"


def use_expandable_segments(cfg):
    """training.expandable_segments: set the allocator option before CUDA allocates anything; the user's own
    PYTORCH_CUDA_ALLOC_CONF is left as it is. Returns what the allocator will use, for the plan line."""
    if not cfg["training"]["expandable_segments"]:
        return os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return os.environ["PYTORCH_CUDA_ALLOC_CONF"]


def gpu_memory_bytes():
    import torch
    return torch.cuda.get_device_properties(LOCAL_RANK).total_memory if torch.cuda.is_available() else None


def count_params(mc, lora):
    """(base params, of which in linear layers, LoRA params) from a text config's shapes."""
    h, layers, inter, vocab = mc.hidden_size, mc.num_hidden_layers, mc.intermediate_size, mc.vocab_size
    heads = mc.num_attention_heads
    kv, hd = getattr(mc, "num_key_value_heads", None) or heads, getattr(mc, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    linear = layers * sum(a * b for a, b in shapes.values())
    embed = vocab * h * (1 if getattr(mc, "tie_word_embeddings", False) else 2)
    lora_params = layers * sum(lora["r"] * (a + b) for name, (a, b) in shapes.items() if name in lora["target_modules"])
    return linear + embed, linear, lora_params


def estimate_memory(mc, cfg, plan):
    """GiB for training and for evaluation, before any weight is loaded. Coefficients: NF4 = 0.5 B/param + 1/64
    for double-quantized block scales; embeddings/lm_head stay 16-bit; activations ≈ 2 B × (6·hidden + 3·inter)
    per token per layer in 16-bit, which matches the ~60 GiB measured for bare Unsloth at 8×2048 without
    checkpointing on Qwen3-4B (issue 3); the LM-head loss is fused (Unsloth / TRL), so logits are never whole."""
    total, linear, lora_params = count_params(mc, cfg["lora"])
    act_bytes = {"float32": 4}.get(plan["dtype_name"], 2)
    weights = (linear * (0.5 + 1 / 64) + (total - linear) * 2) if plan["load_in_4bit"] else total * act_bytes
    optim_bytes = 2 if "8bit" in plan["optim"] else 8
    lora_mem = lora_params * (4 + 4 + optim_bytes)  # fp32 weights + grads + Adam states
    per_token_layer = act_bytes * (6 * mc.hidden_size + 3 * mc.intermediate_size)
    if cfg["lora"]["lora_dropout"] > 0:
        # LoRA dropout keeps a dropped copy of every projection's input and turns off Unsloth's fused LoRA
        # kernels: 8×2048 without checkpointing ran out of 79 GiB on an H100 (2026-11-23), ~1.6× the above.
        per_token_layer *= 1.6
    tokens = plan["batch"] * cfg["model"]["max_seq_length"]
    one_layer = tokens * per_token_layer
    layers = mc.num_hidden_layers
    skipped = plan["skip_layers"]  # checkpointing on: layers that keep their activations, input included
    saved_inputs = tokens * (layers - skipped) * mc.hidden_size * act_bytes
    if plan["gradient_checkpointing"] is False:
        activations = one_layer * layers
    elif plan["gradient_checkpointing"] == "unsloth":
        activations = one_layer * (1 + skipped) + saved_inputs / layers * 2  # layer inputs live in CPU RAM
    else:
        activations = one_layer * (1 + skipped) + saved_inputs
    fixed = 0.5 * GIB + 0.5 * GIB  # fused loss chunks + CUDA context
    # +5% allocator overhead: with expandable segments (training.expandable_segments) reserved memory stayed
    # within 1% of allocated on the H200 (80gb profile: 53.6 allocated, 53.8 reserved GiB)
    train = 1.05 * (weights + lora_mem + activations + fixed)
    eval_tokens = cfg["training"]["per_device_eval_batch_size"] * cfg["model"]["max_seq_length"]
    evaluation = 1.05 * (weights + lora_params * 4 + eval_tokens * per_token_layer + fixed)
    return {"params_b": total / 1e9, "lora_params_m": lora_params / 1e6, "weights": weights / GIB,
            "lora_and_optimizer": lora_mem / GIB, "activations": activations / GIB, "train": train / GIB,
            "eval": evaluation / GIB}


def base_plan(cfg, backend, cuda):
    """Precision, quantization and optimizer for this device; batch settings as configured."""
    import torch
    t = cfg["training"]
    plan = {"batch": t["per_device_train_batch_size"], "accum": t["gradient_accumulation_steps"],
            "gradient_checkpointing": t["gradient_checkpointing"], "optim": t["optim"], "profile": "config",
            "load_in_4bit": bool(cfg["model"]["load_in_4bit"] and cuda), "notes": [], "skip_layers": 0}
    dtype = common.torch_dtype(cfg) if cuda else torch.float32
    if not cuda and cfg["model"]["dtype"] not in ("auto", "float32"):
        plan["notes"].append(f"model.dtype={cfg['model']['dtype']} ignored on CPU: fp32")
    plan["dtype_name"] = str(dtype).replace("torch.", "")
    if plan["gradient_checkpointing"] == "unsloth" and backend != "unsloth":
        plan["gradient_checkpointing"] = True  # Unsloth's offloaded variant exists only under Unsloth
    if "8bit" in plan["optim"] and not (cuda and common.package_installed("bitsandbytes")):
        plan["notes"].append(f"optim {plan['optim']} needs bitsandbytes on CUDA: adamw_torch")
        plan["optim"] = "adamw_torch"
    if plan["load_in_4bit"] and backend == "transformers" and not common.package_installed("bitsandbytes"):
        plan["notes"].append("no bitsandbytes: 16-bit LoRA instead of 4-bit")
        plan["load_in_4bit"] = False
    return plan


def apply_memory_profile(cfg, plan, mc, gpu_bytes):
    """Pick batch/checkpointing from the GPU's memory (training.memory_profile) and check the estimate fits."""
    profile = cfg["training"]["memory_profile"]
    if gpu_bytes is None or profile == "config":
        return plan
    gib = gpu_bytes / GIB
    names = list(PRESETS)
    start = profile if profile != "auto" else [name for name in names if gib >= PRESETS[name][0]][-1]
    effective = plan["batch"] * plan["accum"]
    for name in reversed(names[:names.index(start) + 1]):  # the chosen preset, then smaller ones
        preset = PRESETS[name][1]
        trial = dict(plan, profile=name, **{"batch": preset.get("per_device_train_batch_size", plan["batch"]),
                                             "gradient_checkpointing": preset.get(
                                                 "gradient_checkpointing", plan["gradient_checkpointing"])})
        trial["accum"] = max(1, round(effective / trial["batch"]))
        if estimate_memory(mc, cfg, trial)["train"] <= 0.9 * gib or name == "16gb" or profile != "auto":
            return trial
        say(f"memory profile {name}: the estimate does not fit {gib:.0f} GiB, trying a smaller one")
    return plan


def plan_skip_layers(cfg, plan, backend, mc, gpu_bytes):
    """training.checkpoint_skip_layers for this plan: a number as given (at most the model's layers), "auto" as many
    as keep the memory estimate within SKIP_FILL of the card. Only Unsloth skips layers, and only with
    checkpointing on: otherwise 0, with a note when the user asked for some."""
    asked = cfg["training"]["checkpoint_skip_layers"]
    if not asked:
        return plan
    if backend != "unsloth" or plan["gradient_checkpointing"] is False:
        why = "Unsloth" if backend != "unsloth" else "checkpointing on"
        return dict(plan, notes=plan["notes"] + [f"training.checkpoint_skip_layers={asked!r} ignored: it needs {why}"])
    if asked != "auto":
        if asked > mc.num_hidden_layers:
            raise common.UserError(f"training.checkpoint_skip_layers={asked}: the model has {mc.num_hidden_layers} "
                                   f"decoder layers (\"auto\" fills the card)")
        return dict(plan, skip_layers=asked)
    budget = SKIP_FILL * gpu_bytes / GIB
    skip = 0
    while skip < mc.num_hidden_layers and estimate_memory(mc, cfg, dict(plan, skip_layers=skip + 1))["train"] <= budget:
        skip += 1
    return dict(plan, skip_layers=skip)


def checkpointing_text(plan, layers):
    """How the plan checkpoints, for the plan line (train.py) and doctor.py's memory line."""
    if not plan["skip_layers"]:
        return str(plan["gradient_checkpointing"])
    return f"{plan['gradient_checkpointing']} ({plan['skip_layers']} of {layers} layers keep their activations)"


def remedies(cfg, plan):
    """The seed's order of out-of-memory remedies, with the current values."""
    seq, b, a = cfg["model"]["max_seq_length"], plan["batch"], plan["accum"]
    r, alpha, eb = cfg["lora"]["r"], cfg["lora"]["lora_alpha"], cfg["training"]["per_device_eval_batch_size"]
    lines = [f"  1. shorter rows: --set model.max_seq_length={max(256, seq // 2)}   (now {seq})",
             f"  2. smaller batch, more accumulation (same effective batch): --set "
             f"training.per_device_train_batch_size={max(1, b // 2)} --set "
             f"training.gradient_accumulation_steps={a * 2}   (now {b} x {a})",
             f"  3. smaller LoRA: --set lora.r={max(4, r // 2)} --set lora.lora_alpha={max(4, alpha // 2)}   "
             f"(now r={r}, alpha={alpha})",
             f"  4. batch 1, eval batch 1, fewer evals: --set training.per_device_train_batch_size=1 --set "
             f"training.gradient_accumulation_steps={b * a} --set training.per_device_eval_batch_size=1 "
             f"--set training.eval_steps={cfg['training']['eval_steps'] * 2}   (now eval batch {eb})"]
    if plan["gradient_checkpointing"] is False:
        lines.insert(0, "  0. turn checkpointing on: --set training.gradient_checkpointing=unsloth")
    if plan["skip_layers"]:
        lines.insert(0, f"  0. recompute every layer: --set training.checkpoint_skip_layers=0   "
                        f"(now {plan['skip_layers']} keep their activations)")
    if plan["profile"] != "config":
        lines.insert(0, f"  (memory profile {plan['profile']} set batch/checkpointing: add "
                        f"--set training.memory_profile=config so the values below apply as given)")
    return "\n".join(lines)


# ---------------------------------------------------------------- data

def split_path(cfg, split):
    return common.path_in_repo(os.path.join(cfg["data"]["processed_dir"], split))


def empty_arrow_split(path):
    """datasets saves an empty split with no data file, then cannot load it back: read its state.json."""
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        return False
    with open(state, encoding="utf-8") as f:
        return not json.load(f).get("_data_files")


def load_built_split(cfg, split):
    """A built split (train or validation) as a Dataset; UserError when it is missing or empty."""
    ds = None
    if not empty_arrow_split(split_path(cfg, split)):
        try:
            ds = common.load_split(cfg, split)
        except FileNotFoundError as err:
            raise common.UserError(str(err)) from None
    if ds is None or len(ds) == 0:
        raise common.UserError(f"the {split} split at {split_path(cfg, split)} is empty: rebuild the data with "
                               f"`python build_datasets.py` (check data.sources and data.valid_ratio)")
    return ds


def split_md5(path):
    """One md5 over every file of a split folder (or the file itself)."""
    files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)) if os.path.isdir(path) else [path]
    h = hashlib.md5()
    for f in files:
        if os.path.isfile(f):
            h.update(f"{os.path.relpath(f, path)}:{common.file_md5(f)}\n".encode())
    return h.hexdigest()


def tokenize_rows(ds, tokenizer, cfg, split):
    """Our chat rendering + loss mask for every row, under sft.overlong_policy. A row over max_seq_length is
    dropped, cut after its last trained turn that fits (so its <|im_end|> stays), or stops the run.
    Returns ({"input_ids", "labels"} columns, counts, rejects)."""
    from tqdm import tqdm
    sft, max_len = cfg["sft"], cfg["model"]["max_seq_length"]
    policy = sft["overlong_policy"]
    out = {"input_ids": [], "labels": []}
    counts = {"rows": len(ds), "kept": 0, "truncated": 0, "dropped_overlong": 0, "dropped_no_target": 0,
              "tokens": 0, "trained_tokens": 0}
    rejects = []
    for i, row in enumerate(tqdm(ds, desc=f"Tokenizing {split}", disable=not IS_MAIN, mininterval=2)):
        where = f"{split} row {i} (source {row.get('source') or '?'})"
        messages, tools = common.row_to_chat(row)
        try:
            enc = common.tokenize_for_training(tokenizer, messages, tools, sft)
        except common.DataError as err:
            raise common.UserError(f"{split_path(cfg, split)}: {where}: {err}") from None
        ids, labels, reason = enc["input_ids"], enc["labels"], None
        if len(ids) > max_len:
            if policy == "fail":
                raise common.UserError(f"{where}: {len(ids)} tokens > model.max_seq_length={max_len}. Set "
                                       f"sft.overlong_policy=drop or truncate, or raise model.max_seq_length")
            fits = [end for end in enc["turn_ends"] if end is not None and end <= max_len]
            if policy == "truncate" and fits:
                ids, labels, reason = ids[:max(fits)], labels[:max(fits)], "truncated"
            else:
                reason = "dropped_overlong"
        if reason != "dropped_overlong" and all(label == -100 for label in labels):
            reason = "dropped_no_target"  # e.g. train_on_turns=last on a tool-call turn with train_tool_calls off
        if reason:
            counts[reason] += 1
            rejects.append({"split": split, "row": i, "source": row.get("source"), "reason": reason,
                            "tokens": len(enc["input_ids"]), "max_seq_length": max_len})
        if reason and reason.startswith("dropped"):
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        counts["kept"] += 1
        counts["tokens"] += len(ids)
        counts["trained_tokens"] += sum(label != -100 for label in labels)
    say(f"  {split}: {counts['rows']} rows -> {counts['kept']} kept ({counts['tokens']:,} tokens, "
        f"{counts['trained_tokens']:,} with loss); over {max_len} tokens: {counts['truncated']} truncated to whole "
        f"turns, {counts['dropped_overlong']} dropped; {counts['dropped_no_target']} dropped with no trained token")
    if counts["kept"] == 0:
        raise common.UserError(f"no {split} row is left after the length policy: raise model.max_seq_length "
                               f"or set sft.overlong_policy=truncate")
    import datasets
    return datasets.Dataset.from_dict(out), counts, rejects


def trained_token_count(ds):
    """Label positions that carry loss in a prepared dataset (Arrow compute, no Python loop)."""
    import pyarrow.compute as pc
    if ds._indices is not None:
        ds = ds.flatten_indices()
    return int(pc.sum(pc.not_equal(pc.list_flatten(ds.data.column("labels")), -100)).as_py() or 0)


# ---------------------------------------------------------------- model, trainer

def read_model_config(cfg):
    """The model's text config, with clear errors when it cannot be had or cannot fit the config."""
    name = cfg["model"]["name"]
    reason = common.model_unavailable_reason(name)
    if reason:
        raise common.UserError(f"model {name!r} cannot be loaded: {reason}. Download it where the hub is reachable "
                               f"(hf download {name}) or set model.name to a local folder")
    from transformers import AutoConfig
    path = common.resolve_model_path(name)
    mc = AutoConfig.from_pretrained(path).get_text_config()
    limit = getattr(mc, "max_position_embeddings", None)
    if limit and cfg["model"]["max_seq_length"] > limit:
        raise common.UserError(f"model.max_seq_length={cfg['model']['max_seq_length']} is over {name}'s maximum of "
                               f"{limit} positions (max_position_embeddings): lower it, e.g. --set "
                               f"model.max_seq_length={min(limit, 2048)}")
    return path, mc


def use_torch_varlen_attention():
    """Let Unsloth run packed rows through torch's varlen flash kernel: one call per layer, not one SDPA call
    per packed segment (H100, docs/BENCHMARKS.md: 9.1k -> 12.4k tokens/s). Unsloth takes the
    kernel only where `varlen_attn` has `enable_gqa` (torch 2.12); torch 2.11's flash kernel takes fewer K/V
    heads than query heads as they are. The packing-isolation check still runs on whatever this picks."""
    import inspect

    import torch
    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError:
        return "Unsloth's own (this version has no unsloth.utils.attention_dispatch)"
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
        return "torch varlen flash kernel (Unsloth's own choice)"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"one SDPA call per packed segment (torch {torch.__version__} has no varlen_attn)"
    if ("window_size" not in inspect.signature(varlen_attn).parameters
            or not torch.backends.cuda.is_flash_attention_available()):
        return "one SDPA call per packed segment (this torch's varlen_attn lacks window_size or flash)"

    def varlen_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    dispatch._TORCH_VARLEN_ATTN = varlen_gqa
    return "torch varlen flash kernel (training.varlen_attention)"


def load_for_training(cfg, backend, path, plan):
    """The base model with LoRA adapters (Unsloth or transformers + PEFT) and the configured tokenizer."""
    import torch
    lora, seed = cfg["lora"], cfg["training"]["seed"]
    tokenizer = common.load_tokenizer(cfg, path)
    if torch.cuda.is_available():
        # H100 (docs/BENCHMARKS.md): SDPA on cuDNN builds a plan per packed-segment length; off: 3.4k -> 9.1k tokens/s.
        torch.backends.cuda.enable_cudnn_sdp(bool(cfg["training"]["cudnn_attention"]))
    if backend == "unsloth":
        from unsloth import FastLanguageModel
        if cfg["training"]["varlen_attention"]:
            say(f"Packed attention: {use_torch_varlen_attention()}")
        dtype = None if cfg["model"]["dtype"] in (None, "auto") else getattr(torch, plan["dtype_name"])
        model, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=cfg["model"]["max_seq_length"],
                                                     dtype=dtype, load_in_4bit=plan["load_in_4bit"])
        model = FastLanguageModel.get_peft_model(
            model, r=lora["r"], target_modules=lora["target_modules"], lora_alpha=lora["lora_alpha"],
            lora_dropout=lora["lora_dropout"], bias=lora["bias"], use_rslora=lora["use_rslora"],
            use_gradient_checkpointing=plan["gradient_checkpointing"], random_state=seed,
            checkpoint_skip_layers=plan["skip_layers"])
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype = getattr(torch, plan["dtype_name"])
    kwargs = {"dtype": dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": LOCAL_RANK}  # one whole copy per DDP rank
    if plan["load_in_4bit"]:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if plan["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(plan["gradient_checkpointing"]))
    torch.manual_seed(seed)  # LoRA A init
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"],
                                             lora_dropout=lora["lora_dropout"], target_modules=lora["target_modules"],
                                             bias=lora["bias"], use_rslora=lora["use_rslora"],
                                             task_type="CAUSAL_LM"))
    return model, tokenizer


def sft_args(cfg, plan, output_dir, packing, has_eval=True, resuming=False):
    """SFTConfig from the config's training section and the device plan; training.extra goes in as is."""
    import torch
    from trl import SFTConfig
    t = cfg["training"]
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=plan["batch"], gradient_accumulation_steps=plan["accum"],
        per_device_eval_batch_size=t["per_device_eval_batch_size"], learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"], warmup_steps=t["warmup_ratio"],  # < 1: a share of the steps
        weight_decay=t["weight_decay"], num_train_epochs=t["num_train_epochs"], max_steps=t["max_steps"],
        optim=plan["optim"], max_grad_norm=t["max_grad_norm"], seed=t["seed"], data_seed=t["seed"],
        gradient_checkpointing=bool(plan["gradient_checkpointing"]),
        bf16=cuda and plan["dtype_name"] == "bfloat16", fp16=cuda and plan["dtype_name"] == "float16",
        use_cpu=not cuda, logging_steps=t["logging_steps"], logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=t["eval_steps"],
        eval_on_start=bool(has_eval and t["eval_on_start"] and not resuming),
        prediction_loss_only=True,  # eval keeps no logits: it cannot run out of memory where training fits
        save_strategy="steps", save_steps=t["save_steps"], save_total_limit=t["save_total_limit"],
        # The Trainer tracks the best eval loss and keeps its checkpoint from save_total_limit's pruning.
        metric_for_best_model="eval_loss" if has_eval else None, greater_is_better=False if has_eval else None,
        # Trackers are attached as callbacks after ours (tracker_callbacks), so they see the metrics we add.
        report_to="none", run_name=os.path.basename(os.path.dirname(output_dir)),
        neftune_noise_alpha=t["neftune_noise_alpha"], ddp_find_unused_parameters=False if WORLD_SIZE > 1 else None,
        include_num_input_tokens_seen="all" if packing else "non_padding",  # packed rows hold no padding
        max_length=cfg["model"]["max_seq_length"],
        # The assistant-only mask is already in our labels (common.tokenize_conversation); TRL keeps a given
        # labels column as is, and its own assistant_only_loss would re-render with a {% generation %} template.
        assistant_only_loss=False, packing=packing, packing_strategy="bfd",
        # Explicit False: Unsloth otherwise turns padding-free batching on by itself; packing implies it anyway.
        padding_free=False,
        dataloader_pin_memory=cuda, **t["extra"])


def trained_targets(batch):
    """Positions that carry loss in one collated micro-batch (labels shift by one: position 0 is never a target)."""
    labels = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][..., 1:]
    return (labels != -100).sum()


def drop_uncounted_note(record):
    """Logging filter: Unsloth warns that "`num_items_in_batch` could not be counted ... each micro-batch loss is a
    mean" whenever the trainer passes no count, which ours never does: it normalises by its own count instead."""
    return "could not be counted" not in str(record.msg)


def build_trainer(model, tokenizer, args, train_ds, eval_ds=None, callbacks=()):
    """SFTTrainer whose optimizer-step loss is the mean over every trained token of the step.

    Micro-batches of packed rows with assistant-only labels hold different numbers of trained tokens, so the mean
    of per-micro-batch means weights a token of a sparse micro-batch more (CPU test, 1 x 4 vs 4 x 1: gradients
    15% apart). transformers fixes this only when the model's forward takes `num_items_in_batch`, which Unsloth's
    Qwen3 forward does not ("num_items_in_batch could not be counted ... each micro-batch loss is a mean"). So
    the count is ours: every micro-batch loss (a mean over its n_i targets) is scaled by n_i x k / N, N the
    step's targets over all k micro-batches (and ranks); the trainer then divides by k, and the step sums to
    sum(loss) / N, the same on every backend."""
    import logging

    from trl import SFTTrainer
    logging.getLogger("unsloth_zoo.log").addFilter(drop_uncounted_note)  # skips one already there

    class TokenMeanTrainer(SFTTrainer):
        step_targets = None

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            if batches:
                total = sum(trained_targets(b) for b in batches)
                if WORLD_SIZE > 1:  # DDP averages gradients over ranks: count every rank's targets
                    total = self.accelerator.gather(total.to(device).reshape(1)).sum() / WORLD_SIZE
                self.step_targets = total.to(device).clamp_min(1)
            return batches, None  # None: the loss stays a per-micro-batch mean, which compute_loss rescales

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs)
            if not model.training or self.step_targets is None:
                return out  # evaluation: a plain mean per batch
            scale = trained_targets(inputs) * self.current_gradient_accumulation_steps / self.step_targets
            return (out[0] * scale, *out[1:]) if return_outputs else out * scale

    return TokenMeanTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=list(callbacks))


def _loss_sum(trainer, model, batch):
    """Summed token loss of one collated batch through the trainer's own compute_loss (mean × tokens)."""
    import torch
    batch = trainer._prepare_inputs(dict(batch))
    n = int(trained_targets(batch))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    return float(loss) * n


def check_packing_isolation(model, tokenizer, args=None):
    """Can a packed sample see the others? Runs what training runs: an SFTTrainer built with `args` (packing on:
    TRL's BFD packing + padding-free collator, and Unsloth's patches where loaded), its compute_loss, on 3 chats
    packed into one row. Two probes per sample:
    - packed vs alone: its loss inside the row (loss restricted to it) against its loss alone. Tolerance:
      relative 1e-4 in fp32, 5e-3 in bf16/fp16 (kernels reorder sums).
    - neighbours changed: its loss inside the row against its loss in the same row with every earlier sample's
      tokens reversed (same lengths, same positions, so the same kernels on the same shapes). Isolated attention
      cannot tell the two rows apart; a leak reads the changed tokens. Tolerance: a tenth of the above.
    Packed vs alone within tolerance passes. Beyond it, the row passes only when changing the neighbours changes
    nothing while the same change does move a leaking row: then the gap is the kernels rounding a long row
    differently from a short one, not attention across samples (4-bit SmolLM2-135M on an H100: 5.7e-2 packed vs
    alone). Returns (ok, message). On a GPU: check_packing_isolation(model, tokenizer), or train.py --check-packing."""
    import datasets
    import torch
    from trl import SFTConfig
    if args is None:
        cuda = torch.cuda.is_available()
        bf16 = cuda and torch.cuda.is_bf16_supported()
        with tempfile.TemporaryDirectory(prefix="packing-check-") as tmp:  # nothing is saved there
            args = SFTConfig(output_dir=tmp, packing=True, max_length=1024, report_to="none", use_cpu=not cuda,
                             bf16=bf16, fp16=cuda and not bf16, assistant_only_loss=False, padding_free=False)
            return check_packing_isolation(model, tokenizer, args)
    if not args.packing:
        raise ValueError("check_packing_isolation needs an SFTConfig with packing=True")
    rows = [common.tokenize_conversation(tokenizer, chat) for chat in PROBE_CHATS]
    probe = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    trainer = build_trainer(model, tokenizer, args, probe)
    packed = list(trainer.train_dataset)
    was_training = model.training
    try:
        if len(packed) != 1 or not trainer.args.packing:
            return False, f"the trainer did not pack the probe ({len(packed)} rows, packing={trainer.args.packing})"
        batch = trainer.data_collator(packed)
        if "position_ids" not in batch:
            return False, "the packed batch has no position_ids: nothing tells the model where samples start"
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        model.eval()  # no dropout: both sides must be deterministic
        gaps = packing_gaps(trainer, model, batch, rows, starts)
    finally:
        model.train(was_training)
        del trainer
    return packing_verdict(gaps, 5e-3 if (args.bf16 or args.fp16) else 1e-4)


def relative_gap(a, b):
    return abs(a - b) / max(abs(b), 1e-9)


def packing_gaps(trainer, model, batch, rows, starts):
    """The largest relative loss gaps over the packed samples (see check_packing_isolation): "alone" (packed vs
    alone), "leak" (a leaking batch vs alone), "neighbours" (earlier samples reversed, packed) and
    "leak_neighbours" (the same in a leaking batch)."""
    import torch
    ids = batch["input_ids"][0].tolist()
    gaps = {"alone": 0.0, "leak": 0.0, "neighbours": 0.0, "leak_neighbours": 0.0}
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        row = next(r for r in rows if r["input_ids"] == ids[a:b])
        labels = torch.full_like(batch["labels"], -100)
        labels[:, a:b] = batch["labels"][:, a:b]
        inside = _loss_sum(trainer, model, {**batch, "labels": labels})
        alone = _loss_sum(trainer, model, trainer.data_collator([{"input_ids": row["input_ids"],
                                                                   "labels": row["labels"]}]))
        # What a leaking batch gives: the whole packed row as one sequence, loss on this sample only.
        leak = _loss_sum(trainer, model, trainer.data_collator([{"input_ids": ids, "labels": labels[0].tolist()}]))
        gaps["alone"] = max(gaps["alone"], relative_gap(inside, alone))
        gaps["leak"] = max(gaps["leak"], relative_gap(leak, alone))
        if i == 0:
            continue  # causal: nothing comes before the first sample, in a leaking row either
        changed = ids[:starts[0]] + [t for c, d in zip(starts, starts[1:i + 1]) for t in ids[c:d][::-1]] + ids[a:]
        swapped = _loss_sum(trainer, model, {**batch, "labels": labels,
                                             "input_ids": torch.tensor([changed], device=batch["input_ids"].device)})
        leak_swapped = _loss_sum(trainer, model, trainer.data_collator([{"input_ids": changed,
                                                                         "labels": labels[0].tolist()}]))
        gaps["neighbours"] = max(gaps["neighbours"], relative_gap(swapped, inside))
        gaps["leak_neighbours"] = max(gaps["leak_neighbours"], relative_gap(leak_swapped, leak))
    return gaps


def packing_verdict(gaps, tol):
    """(ok, message) from packing_gaps' answer at relative tolerance tol (a tenth of it for the neighbours)."""
    detail = (f"packed vs alone: max relative difference {gaps['alone']:.1e} (tolerance {tol:.0e}), a leaking "
              f"batch {gaps['leak']:.1e}; earlier samples changed: {gaps['neighbours']:.1e} (tolerance "
              f"{tol / 10:.0e}), in a leaking batch {gaps['leak_neighbours']:.1e}")
    neighbours_blind = gaps["neighbours"] <= tol / 10 < gaps["leak_neighbours"]
    if gaps["alone"] > tol and not neighbours_blind:
        return False, "packed samples see each other: " + detail
    if gaps["alone"] > tol:
        return True, ("isolated (changing the other samples does not change a sample's loss; packed vs alone "
                      "differs by rounding on other shapes): " + detail)
    if gaps["leak"] <= tol:
        return True, "isolated within tolerance, but the probe cannot tell a leak at this precision: " + detail
    return True, "isolated: " + detail


# ---------------------------------------------------------------- run folders, resume

def complete_checkpoint(path):
    """None if `path` is a checkpoint the Trainer finished writing (trainer_state.json is written last), else
    what is missing."""
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"no {name}"
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)["global_step"]
    except (ValueError, KeyError) as err:
        return f"unreadable trainer_state.json ({err})"
    return None


def latest_checkpoint(run_dir):
    """The newest complete checkpoint-N of a run; incomplete newer ones are renamed aside (rank 0)."""
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "checkpoint-*")),
                   key=lambda p: int(p.rsplit("-", 1)[1]) if p.rsplit("-", 1)[1].isdigit() else -1, reverse=True)
    for path in found:
        missing = complete_checkpoint(path)
        if missing is None:
            return path
        say(f"skipping incomplete {os.path.basename(path)} ({missing}): moved to incomplete-{os.path.basename(path)}")
        if IS_MAIN:
            os.replace(path, os.path.join(os.path.dirname(path), "incomplete-" + os.path.basename(path)))
    return None


def run_and_checkpoint(cfg, resume):
    """(run folder, checkpoint to resume from or None): a new run's folder (common.new_run_name), or the one
    --resume points at or picks."""
    out = common.path_in_repo(cfg["output"]["dir"])
    name = cfg["training"]["run_name"]
    if resume is None:
        # rank 0's name on every rank: the name holds a timestamp, and ranks start seconds apart
        return os.path.join(out, shared_value(common.new_run_name(cfg))), None
    if resume == "latest":
        runs = [os.path.join(out, name)] if name else sorted(
            glob.glob(os.path.join(out, "*")), key=os.path.getmtime, reverse=True)
        for run in runs:
            ckpt = latest_checkpoint(run)
            if ckpt:
                return run, ckpt
        raise common.UserError(f"--resume: no complete checkpoint under {runs[0] if name else out}/*/checkpoints: "
                               f"start without --resume, or pass a checkpoint folder")
    path = os.path.abspath(resume)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt = latest_checkpoint(path)
        if ckpt:
            return path, ckpt
        raise common.UserError(f"--resume {resume}: no complete checkpoint in {path}/checkpoints")
    missing = complete_checkpoint(path) if os.path.isdir(path) else "no such folder"
    if missing:
        raise common.UserError(f"--resume {resume}: not a complete checkpoint ({missing}); pass a run folder to pick "
                               f"its newest one")
    return os.path.dirname(os.path.dirname(path)), path


def shared_value(value):
    """Rank 0's value on every rank (the run name holds a timestamp, which ranks would not agree on)."""
    if WORLD_SIZE == 1:
        return value
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    # Without cpu=True a CPU run (torchrun + gloo) is DistributedType.NO to accelerate: the broadcast then does
    # nothing and each rank keeps its own timestamp (two run folders when the ranks start a second apart).
    state = PartialState(cpu=not torch.cuda.is_available())
    # A rank that exits with its process group alive can abort in C++ ("terminate called without an active
    # exception", SIGABRT; seen under CPU load), and torchrun then calls the whole run failed.
    atexit.register(state.destroy_process_group)  # a no-op once the group is gone
    return broadcast_object_list([value])[0]


def warn_config_changes(run_dir, cfg):
    """On resume: settings that differ from the run's config.json (batch or data changes alter the data order)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        before = config.flatten(json.load(f)["config"])
    now = {k: v for k, v in config.masked(cfg, None).items() if k != "set_keys"}  # secrets: None, as saved
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in config.flatten(now).items()
               if json.loads(json.dumps(v, default=str)) != before.get(k)]
    if changed:
        say("warning: resuming with settings that differ from the run's config.json:\n  " + "\n  ".join(changed))


def trim_metrics(path, step):
    """On resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def fix_adapter_base(adapter_dir, cfg, quiet=False):
    """adapter_config.json must name the 16-bit base (the merge target), never a pre-quantized 4-bit repo."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    name = cfg["model"]["name"]
    local = common.path_in_repo(name)
    base = local if os.path.isdir(local) else re.sub(r"(-unsloth)?-bnb-4bit$", "", name)
    if data.get("base_model_name_or_path") != base:
        if not quiet:
            say(f"adapter base: {data.get('base_model_name_or_path')} -> {base}")
        data["base_model_name_or_path"] = base
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)


def save_adapter(trainer, tokenizer, cfg, adapter_dir):
    """LoRA weights + tokenizer with the configured (original) chat template; the base field names the 16-bit base."""
    trainer.save_model(adapter_dir)  # every rank calls it; only rank 0 writes
    if not IS_MAIN:
        return
    fix_adapter_base(adapter_dir, cfg)
    if cfg["model"]["chat_template"]:
        tokenizer.chat_template = common.chat_template(cfg["model"]["chat_template"])
    if re.search(r"\{%-?\s*generation", tokenizer.chat_template or ""):
        raise common.UserError("the tokenizer carries a training chat template ({% generation %}); refusing to save "
                               "it with the adapter")
    tokenizer.save_pretrained(adapter_dir)


def save_adapters(trainer, tokenizer, cfg, run_dir):
    """adapter/ = the weights of the lowest eval loss (its checkpoint), adapter_last/ = the final step's when
    that is not the best; without evals adapter/ is the final step's. Returns what was written, for the summary."""
    adapter, last = os.path.join(run_dir, "adapter"), os.path.join(run_dir, "adapter_last")
    save_adapter(trainer, tokenizer, cfg, adapter)
    step, best = trainer.state.global_step, best_eval(trainer.state.log_history)
    out = {"best_step": best and best["step"], "best_eval_loss": best and best["eval_loss"], "adapter_step": step,
           "adapter_last": None}
    if not IS_MAIN:
        return out
    shutil.rmtree(last, ignore_errors=True)  # from an earlier session of this run
    if best is None or best["step"] == step:
        return out
    ckpt = os.path.join(run_dir, "checkpoints", f"checkpoint-{best['step']}")
    if complete_checkpoint(ckpt) is not None:
        say(f"warning: the best eval loss was at step {best['step']}, but {ckpt} is gone: adapter/ holds step {step}")
        return out
    os.replace(adapter, last)
    shutil.copytree(last, adapter)  # tokenizer, template and config as saved; the weights from the best step
    shutil.copy2(os.path.join(ckpt, "adapter_model.safetensors"), os.path.join(adapter, "adapter_model.safetensors"))
    return dict(out, adapter_step=best["step"], adapter_last=last)


def plot_losses(metrics_path, png_path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    generation = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("eval_usability", "eval_json_validity")}
    if any(generation.values()):  # a second panel: training.generation_eval_every
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 8), dpi=120, sharex=True, height_ratios=(3, 2))
        for (_key, points), label in zip(generation.items(), ("usability rate", "JSON validity (json-only rows)")):
            if points:
                ax2.plot(*zip(*points), "s-", lw=2, label=label)
        ax2.set(xlabel="optimizer step", ylabel="share of answers (greedy)", ylim=(-0.05, 1.05))
        ax2.grid(alpha=0.3)
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1.5, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", lw=2, label="eval loss (validation)")
        best = best_eval(rows)
        if best:
            ax.axvline(best["step"], ls=":", color="gray", label=f"lowest eval loss: adapter/ (step {best['step']})")
    ax.set(xlabel=None if any(generation.values()) else "optimizer step",
           ylabel="loss per trained token (assistant turns)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# ---------------------------------------------------------------- logging, Ctrl-C, early stop

def run_callback(run, cfg):
    """One TrainerCallback: metrics.jsonl, tokens/s, peak VRAM, perplexity, generation metrics, the overfitting
    warning, a checkpoint at every new best eval loss, Ctrl-C."""
    import torch
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def __init__(self):
            self.last = (time.time(), 0)
            self.evals = []  # (eval loss, mean train loss since the previous eval)
            self.train_losses = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.time(), state.num_input_tokens_seen)  # after a resume: the checkpoint's count
            run["tokens_at_start"] = state.num_input_tokens_seen
            self.best = best_eval(state.log_history)  # after a resume: the best before the checkpoint

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs if logs is not None else {}
            record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
            if "loss" in logs:
                now, seen = time.time(), state.num_input_tokens_seen
                logs["tokens_per_s"] = round((seen - self.last[1]) / max(now - self.last[0], 1e-9), 1)
                self.last = (now, seen)
                self.train_losses.append(logs["loss"])
                if torch.cuda.is_available():
                    logs["peak_vram_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
            if "eval_loss" in logs:
                logs["eval_ppl"] = round(math.exp(min(logs["eval_loss"], 50)), 4)
                warn_overfitting(run, self.evals, self.train_losses, args, state, logs)
                if generation_eval_due(state, cfg["training"]["generation_eval_every"]):
                    logs.update(generation_metrics(kwargs["model"], kwargs["processing_class"], run["gen_rows"], cfg))
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if state.is_world_process_zero:
                with open(run["metrics"], "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            # A new best eval loss is saved at once, whatever save_steps says: adapter/ is built from it at the end.
            loss = (metrics or {}).get("eval_loss")
            if loss is not None and state.global_step > 0 and (self.best is None or loss < self.best["eval_loss"]):
                self.best = {"step": state.global_step, "eval_loss": loss}
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # every checkpoint is an adapter the other scripts can load
                fix_adapter_base(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), cfg, quiet=True)

        def on_step_end(self, args, state, control, **kwargs):
            stop_for_test(state.global_step, "step")
            if any_rank(run["interrupted"], args.device):
                run["interrupted"] = True
                control.should_save = True
                control.should_training_stop = True
            return control

    return RunCallback()


def warn_overfitting(run, evals, train_losses, args, state, logs):
    """Add this eval to `evals` with the mean of the train losses logged since the previous one (then cleared);
    mark the log and warn once the eval loss rose training.overfit_patience evals in a row as train loss fell."""
    evals.append((logs["eval_loss"], sum(train_losses) / len(train_losses) if train_losses else None))
    train_losses.clear()
    streak = overfitting_streak(evals)
    if streak >= run["overfit_patience"] > 0:
        logs["overfitting"] = 1
        run["overfit_steps"].append(state.global_step)
        hint = "" if args.metric_for_best_model else ", or --set training.early_stopping_patience=2"
        say(f"\nwarning: eval loss rose {streak} evals in a row (now {logs['eval_loss']:.4f}) while train loss "
            f"fell: overfitting. Consider fewer epochs, a lower learning rate or more data{hint}")


def generation_eval_due(state, every):
    """Generation metrics at every `every`-th eval, the start eval counting as the 0th; rank 0 only (0 = off)."""
    evals_before = sum("eval_loss" in r for r in state.log_history) - 1  # the Trainer logged the current one
    return bool(every) and evals_before % every == 0 and state.is_world_process_zero


def overfitting_streak(evals):
    """How many evals in a row, up to the last, had the eval loss rise while the mean train loss since the
    previous eval fell. evals: [(eval loss, mean train loss or None)]."""
    streak = 0
    for (e0, t0), (e1, t1) in zip(evals, evals[1:]):
        rising = e1 > e0 and t0 is not None and t1 is not None and t1 < t0
        streak = streak + 1 if rising else 0
    return streak


def any_rank(flag, device):
    """True on every rank when it is True on any: all ranks must stop at the same step, or DDP hangs."""
    if WORLD_SIZE == 1:
        return flag
    import torch
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def stop_for_test(step, where):
    """For tests: stop at a known point instead of racing a timer. SFT_TEST_STOP_AT_STEP=N sends
    SFT_TEST_STOP_SIGNAL (INT, the default, or KILL) to this process at the end of step N
    (SFT_TEST_STOP_IN=step, the default) or in the middle of step N's checkpoint save (=save: weights and
    optimizer written, trainer_state.json not yet)."""
    if os.environ.get("SFT_TEST_STOP_AT_STEP") != str(step) or os.environ.get("SFT_TEST_STOP_IN", "step") != where:
        return
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("SFT_TEST_STOP_SIGNAL", "INT")))


def add_save_test_hook(trainer):
    """SFT_TEST_STOP_IN=save: stop_for_test between the optimizer and trainer_state.json of a checkpoint."""
    if os.environ.get("SFT_TEST_STOP_IN") != "save":
        return
    save = trainer._save_optimizer_and_scheduler

    def save_then_signal(output_dir):
        save(output_dir)
        stop_for_test(trainer.state.global_step, "save")
    trainer._save_optimizer_and_scheduler = save_then_signal


def best_eval(history):
    """{"step", "eval_loss"} of the lowest eval loss after step 0 (the start eval has no checkpoint), or None."""
    evals = [(r["eval_loss"], r["step"]) for r in history if "eval_loss" in r and r["step"] > 0]
    return dict(zip(("eval_loss", "step"), min(evals))) if evals else None


def generation_sample(cfg, rows):
    """The first training.generation_eval_samples validation rows that end in an assistant turn, fixed for the
    run: (prompt messages, tools, tags, reference) each."""
    sample = []
    for row in rows:
        messages, tools = common.row_to_chat(row)
        prompt, reference = common.split_for_generation(messages)
        if prompt:
            sample.append({"prompt": prompt, "tools": tools, "tags": list(row.get("tags") or []),
                           "reference": reference})
        if len(sample) == cfg["training"]["generation_eval_samples"]:
            break
    return sample


def generation_metrics(model, tokenizer, rows, cfg):
    """eval_usability and eval_json_validity (json-only rows) of greedy answers, scored by obj_test_model.py's
    rules (common.score_answer). Batches of per_device_eval_batch_size, no grad (common.run_generate runs
    under inference_mode): no more memory than eval itself."""
    was_training = model.training
    model.eval()
    try:
        answers = common.generate_local(model, tokenizer, [(r["prompt"], r["tools"]) for r in rows],
                                        common.sampling_settings(cfg, greedy=True),
                                        batch_size=cfg["training"]["per_device_eval_batch_size"])
    finally:
        model.train(was_training)
    verdicts = [common.score_answer(a["text"], a["finish_reason"], r["tags"], r["reference"], cfg,
                                    has_tools=bool(r["tools"])) for r, a in zip(rows, answers)]
    out = {"eval_usability": round(sum(not reasons for reasons, _, _ in verdicts) / len(verdicts), 4)}
    json_rows = [valid for _, valid, _ in verdicts if valid is not None]
    if json_rows:
        out["eval_json_validity"] = round(sum(json_rows) / len(json_rows), 4)
    return out


def tracker_callbacks(cfg, run_dir, resume_step):
    """Callbacks for training.report_to, placed after ours so they see eval_ppl and the generation metrics.
    TensorBoard writes outputs/<run>/tensorboard/ (on resume, events after the checkpoint are purged); W&B
    logs offline into the run folder when its server cannot be reached."""
    from transformers.integrations import TensorBoardCallback, WandbCallback
    out = []
    for name in cfg["training"]["report_to"]:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            folder = os.path.join(run_dir, "tensorboard")
            if not resume_step:
                shutil.rmtree(folder, ignore_errors=True)  # a new run of the same name starts a new record
            callback = TensorBoardCallback(tb_writer=SummaryWriter(folder, purge_step=resume_step + 1 if resume_step
                                                                   else None))
            callback.logging_dir = folder  # where it reopens after train() for the final eval
            out.append(callback)
        elif name == "wandb":
            os.environ.setdefault("WANDB_DIR", run_dir)
            if "WANDB_MODE" not in os.environ and not common.tcp_reachable("api.wandb.ai", 443):
                os.environ["WANDB_MODE"] = "offline"
                say(f"W&B: no connection to its server, logging offline under {run_dir}/wandb "
                    f"(upload later with `wandb sync`)")
            out.append(WandbCallback())
    return out


def on_sigint(run):
    def handler(signum, frame):
        if run["interrupted"]:
            # torchrun forwards the terminal's SIGINT that the workers already got: a repeat within 3 s is that
            # echo; a later Ctrl-C stops at once, without saving.
            if time.time() - run["sigint_at"] > 3:
                raise KeyboardInterrupt
            return
        run["interrupted"], run["sigint_at"] = True, time.time()
        say("\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, handler)


# ---------------------------------------------------------------- steps of main()

def make_plan(cfg, backend, mc):
    """Device plan (memory profile applied) and its memory estimate, printed; a warning when it will not fit."""
    gpu_bytes = gpu_memory_bytes()
    plan = apply_memory_profile(cfg, base_plan(cfg, backend, gpu_bytes is not None), mc, gpu_bytes)
    plan = plan_skip_layers(cfg, plan, backend, mc, gpu_bytes)
    mem = estimate_memory(mc, cfg, plan)
    say(f"Plan: profile {plan['profile']}; batch {plan['batch']} x accumulation {plan['accum']} x {WORLD_SIZE} "
        f"process(es) = {plan['batch'] * plan['accum'] * WORLD_SIZE} sequences per optimizer step; checkpointing "
        f"{checkpointing_text(plan, mc.num_hidden_layers)}; "
        f"{plan['dtype_name']}{', 4-bit NF4' if plan['load_in_4bit'] else ''}; "
        f"optim {plan['optim']}" + "".join(f"; {note}" for note in plan["notes"]))
    say(f"Memory estimate: {mem['params_b']:.2f} B params, LoRA {mem['lora_params_m']:.1f} M; weights "
        f"{mem['weights']:.1f} + LoRA/optimizer {mem['lora_and_optimizer']:.2f} + activations {mem['activations']:.1f}"
        f" -> training {mem['train']:.1f} GiB, eval {mem['eval']:.1f} GiB"
        + (f" (GPU: {gpu_bytes / GIB:.0f} GiB)" if gpu_bytes else " (no GPU: host RAM)"))
    if gpu_bytes and mem["train"] > gpu_bytes / GIB:
        say(f"warning: the estimate is over the GPU's {gpu_bytes / GIB:.0f} GiB; expect out-of-memory. "
            f"Remedies, in order:\n{remedies(cfg, plan)}")
    return plan, mem, gpu_bytes


def decide_packing(model, tokenizer, cfg, plan):
    """(packing on?, why): on only when configured and the isolation check passes on this backend."""
    if not cfg["sft"]["packing"]:
        return False, "off (sft.packing=False)"
    with tempfile.TemporaryDirectory(prefix="packing-check-") as tmp:  # nothing is saved there; never shared
        ok, message = check_packing_isolation(model, tokenizer, sft_args(cfg, plan, tmp, True, has_eval=False))
    ok = bool(shared_value(ok))  # every rank follows rank 0
    return ok, ("on, " if ok else "off: ") + message


def check_trainer_labels(trainer, counts):
    """TRL must keep our labels: same number of trained tokens after its dataset preparation (and packing)."""
    for split, ds in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        got = trained_token_count(ds)
        if got != counts[split]["trained_tokens"]:
            raise common.UserError(f"the trainer changed the {split} loss mask ({got:,} trained tokens after its "
                                   f"preparation, {counts[split]['trained_tokens']:,} in ours): refusing to train "
                                   f"on it")


def write_run_record(run, cfg, extra, rejects, resume_from):
    """config.json (+ hashes, versions, SHA), rejects.jsonl, and metrics.jsonl trimmed to the checkpoint."""
    os.makedirs(run["dir"], exist_ok=True)
    if resume_from:
        warn_config_changes(run["dir"], cfg)
        trim_metrics(run["metrics"], int(resume_from.rsplit("-", 1)[1]))
    elif os.path.exists(run["metrics"]):
        os.remove(run["metrics"])
    if rejects:
        common.write_jsonl(os.path.join(run["dir"], "rejects.jsonl"), rejects)
    config.save_config(cfg, os.path.join(run["dir"], "config.json"), extra={
        **extra, "packages": common.package_versions(), "git_sha": common.git_sha(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": resume_from})


def train_or_explain(trainer, run, resume_from, cfg, plan, mem):
    """trainer.train() with Ctrl-C saving a checkpoint and out-of-memory answered with the remedies."""
    import torch
    on_sigint(run)
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        raise common.UserError(f"out of GPU memory (estimate {mem['train']:.1f} GiB). Remedies, in order:\n"
                               f"{remedies(cfg, plan)}") from None
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def write_summary(run, trainer, result, extra, gpu_bytes):
    import torch
    state, runtime = trainer.state, result.metrics["train_runtime"]
    history = state.log_history
    last_train = next((r for r in reversed(history) if "loss" in r), {})
    evals = [r for r in history if "eval_loss" in r]
    summary = {
        "run_dir": run["dir"], "interrupted": run["interrupted"], "global_step": state.global_step,
        "max_steps": state.max_steps, "epoch": state.epoch, "runtime_s": round(runtime, 1),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_s": round((state.num_input_tokens_seen - run["tokens_at_start"]) / max(runtime, 1e-9), 1),
        "peak_vram_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if gpu_bytes else None,
        "peak_vram_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if gpu_bytes else None,
        "final_train_loss": last_train.get("loss"), "train_loss_avg_this_session": result.metrics.get("train_loss"),
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_eval_ppl": round(math.exp(min(evals[-1]["eval_loss"], 50)), 4) if evals else None,
        "stopped_early": not run["interrupted"] and state.global_step < state.max_steps,
        "overfitting_warnings_at": run["overfit_steps"], **extra}
    with open(os.path.join(run["dir"], "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the newest complete checkpoint, or from PATH (a checkpoint or run folder)")
    parser.add_argument("--check-packing", action="store_true",
                        help="load the model as for training, run the packing-isolation check, print it, exit")
    args = parser.parse_args()
    return args, config.resolve(args, parser, quiet=not IS_MAIN)


def load_checked_model(cfg, backend):
    """Config checks that need TRL or the model's config.json, the device plan, then the model and tokenizer:
    (model, tokenizer, plan, memory estimate, GPU bytes)."""
    if backend == "unsloth":
        common.import_unsloth_first()
    import torch
    torch.manual_seed(cfg["training"]["seed"])
    check_extra(cfg)
    model_path, mc = read_model_config(cfg)
    plan, mem, gpu_bytes = make_plan(cfg, backend, mc)
    model, tokenizer = load_for_training(cfg, backend, model_path, plan)
    return model, tokenizer, plan, mem, gpu_bytes


def check_packing_only(cfg, backend):
    """--check-packing: the isolation check on the model as training loads it; the exit code is its verdict."""
    model, tokenizer, plan, _, _ = load_checked_model(cfg, backend)
    ok, message = decide_packing(model, tokenizer, dict(cfg, sft={**cfg["sft"], "packing": True}), plan)
    say(f"Packing check ({backend}): {'PASS' if ok else 'FAIL'}: {message}")
    return 0 if ok else 1


def tokenize_splits(raw, tokenizer, cfg):
    """(tokenized splits, their counts, every rejected row) with our chat template and loss mask."""
    say("Tokenizing with the chat template and the assistant-only loss mask:")
    data, counts, rejects = {}, {}, []
    for split, ds in raw.items():
        data[split], counts[split], split_rejects = tokenize_rows(ds, tokenizer, cfg, split)
        rejects += split_rejects
    return data, counts, rejects


def new_run_state(run_dir, cfg, validation):
    """What the callbacks share with main(): the metrics file, Ctrl-C, overfitting warnings, generation rows."""
    t = cfg["training"]
    return {"dir": run_dir, "metrics": os.path.join(run_dir, "metrics.jsonl"), "interrupted": False,
            "sigint_at": 0, "overfit_steps": [], "overfit_patience": t["overfit_patience"], "tokens_at_start": 0,
            "gen_rows": generation_sample(cfg, validation) if t["generation_eval_every"] else []}


def make_callbacks(run, cfg, resume_from):
    """Ours (metrics, Ctrl-C, best checkpoints), the trackers', and early stopping when configured."""
    resume_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
    callbacks = [run_callback(run, cfg)] + (tracker_callbacks(cfg, run["dir"], resume_step) if IS_MAIN else [])
    if cfg["training"]["early_stopping_patience"]:
        import logging

        from transformers import EarlyStoppingCallback
        # Its "without load_best_model_at_end ... the best model will not be loaded" is not so here: save_adapters
        # writes the best step's weights as adapter/.
        logging.getLogger("transformers.trainer_callback").addFilter(
            lambda record: "load_best_model_at_end" not in str(record.msg))
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg["training"]["early_stopping_patience"]))
    return callbacks


def run_extra(cfg, backend, plan, mem, packing_note, model, tokenizer, counts):
    """What config.json and summary.json record beside the config: backend, plan, sizes, data and template."""
    trainable, total = model.get_nb_trainable_parameters()
    say(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    extra = {"backend": backend, "plan": plan, "packing": packing_note, "world_size": WORLD_SIZE,
             "effective_batch": plan["batch"] * plan["accum"] * WORLD_SIZE, "memory_estimate_gib": mem,
             "trainable_params": trainable, "total_params": total,
             "chat_template_md5": hashlib.md5((tokenizer.chat_template or "").encode()).hexdigest(),
             "data": {split: {"path": split_path(cfg, split), **counts[split]} for split in counts}}
    if IS_MAIN:
        for split in counts:
            extra["data"][split]["md5"] = split_md5(split_path(cfg, split))
    return extra


def finish_training(trainer, run, tokenizer, cfg, extra):
    """A final eval at the final step (the summary's eval loss is there), then the adapters unless interrupted."""
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if not run["interrupted"] and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
    if not run["interrupted"]:
        extra["adapters"] = save_adapters(trainer, tokenizer, cfg, run["dir"])


def print_outcome(run, summary, extra, rejects, cfg):
    """How it went, where each output is, and the --resume command after Ctrl-C (exit code 130)."""
    run_dir, ckpt = run["dir"], latest_checkpoint(run["dir"])
    say(f"\nDone in {summary['runtime_s']:.0f} s, step {summary['global_step']}/{summary['max_steps']}"
        f"{' (early stopping: no better eval loss)' if summary['stopped_early'] else ''}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s; final train loss {summary['final_train_loss']}, "
        f"eval loss {summary['final_eval_loss']} (ppl {summary['final_eval_ppl']})")
    adapters = extra.get("adapters")
    if adapters and adapters["best_step"] is not None:
        say(f"Best eval loss {adapters['best_eval_loss']:.4f} at step {adapters['best_step']}: adapter/ holds step "
            f"{adapters['adapter_step']}" + (f"; adapter_last/ holds the final step {summary['global_step']}"
                                              if adapters["adapter_last"] else " (the final step)"))
    for label, path in [("adapter", None if run["interrupted"] else "adapter"),
                        ("adapter_last", adapters and adapters["adapter_last"]), ("checkpoint", ckpt),
                        ("config", "config.json"), ("metrics", "metrics.jsonl"), ("summary", "summary.json"),
                        ("loss plot", "loss.png"), ("rejects", "rejects.jsonl" if rejects else None),
                        ("tensorboard", "tensorboard" if "tensorboard" in cfg["training"]["report_to"] else None)]:
        if path:
            say(f"  {label:<12} {os.path.join(run_dir, path)}")
    if run["interrupted"]:
        where = ckpt or run_dir
        if where.startswith(common.ROOT + os.sep):
            where = os.path.relpath(where, common.ROOT)
        say(f"Interrupted: checkpoint saved at step {summary['global_step']}. Continue with: python train.py "
            f"--resume {where} (same launcher, --profile and --set)")
        sys.exit(130)


@common.exits_on_user_error
def main():
    args, cfg = parse_args()
    random.seed(cfg["training"]["seed"])
    validate(cfg)

    # ---- backend first: Unsloth must be imported before transformers / trl / peft
    allocator = use_expandable_segments(cfg)  # before anything touches CUDA
    backend, why = pick_backend(cfg)
    say(f"Backend: {backend} ({why}); processes: {WORLD_SIZE}; CUDA allocator: {allocator}")
    if args.check_packing:  # a mode of its own: no data, no run folder
        sys.exit(check_packing_only(cfg, backend))

    # ---- data and model checks, before any weight is loaded; then model, tokenizer, our loss mask
    run_dir, resume_from = run_and_checkpoint(cfg, args.resume)
    raw = {split: load_built_split(cfg, split) for split in ("train", "validation")}
    model, tokenizer, plan, mem, gpu_bytes = load_checked_model(cfg, backend)
    data, counts, rejects = tokenize_splits(raw, tokenizer, cfg)

    # ---- trainer: packing only where a packed sample provably gets the loss it gets alone
    packing, packing_note = decide_packing(model, tokenizer, cfg, plan)
    say(f"Packing: {packing_note}")
    run = new_run_state(run_dir, cfg, raw["validation"])
    args_ = sft_args(cfg, plan, os.path.join(run_dir, "checkpoints"), packing, resuming=resume_from is not None)
    trainer = build_trainer(model, tokenizer, args_, data["train"], data["validation"],
                            make_callbacks(run, cfg, resume_from))
    add_save_test_hook(trainer)
    check_trainer_labels(trainer, counts)
    extra = run_extra(cfg, backend, plan, mem, packing_note, model, tokenizer, counts)
    if IS_MAIN:
        write_run_record(run, cfg, extra, rejects, resume_from)
    say(f"Run folder: {run_dir}" + (f" (resuming from {resume_from})" if resume_from else ""))

    # ---- train, final eval, adapter
    result = train_or_explain(trainer, run, resume_from, cfg, plan, mem)
    finish_training(trainer, run, tokenizer, cfg, extra)
    if not IS_MAIN:
        return

    # ---- summary, plot, where everything is
    summary = write_summary(run, trainer, result, extra, gpu_bytes)
    plot_losses(run["metrics"], os.path.join(run_dir, "loss.png"), f"{os.path.basename(run_dir)} ({backend})")
    print_outcome(run, summary, extra, rejects, cfg)


if __name__ == "__main__":
    main()
