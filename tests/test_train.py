"""train.py with real parts: the real tokenizer + Qwen3-2507 template, a tiny random Qwen3, the bundled SmolLM2,
TRL's SFTTrainer, and the real CLI in subprocesses (a real SIGINT for the interrupted run)."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys

import pytest

import common
import config
import train

ROOT = common.ROOT
# One thread per subprocess: on 2 shared cores, OpenMP spin-waiting under load made steps up to 10x slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process tests too: 1 torch thread (restored after this module), for the reason above."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chats(n, seed):
    """Small arithmetic chats in every shape the template renders: plain, system prompt, multi-turn, tool call."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        tools = None
        if i % 4 == 1:
            messages.insert(0, {"role": "system", "content": "You are a careful calculator."})
        if i % 4 == 2:
            messages += [{"role": "user", "content": "And doubled?"},
                         {"role": "assistant", "content": f"Doubled, {a + b} is {2 * (a + b)}."}]
        if i % 4 == 3:
            tools = TOOLS
            messages = [messages[0],
                        {"role": "assistant", "content": "",
                         "tool_calls": [{"type": "function",
                                         "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
                        {"role": "tool", "content": str(a + b)},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        out.append(common.chat_to_row(messages, tools, source="arith"))
    return out


def write_split(folder, rows):
    import datasets
    features = common.row_features()
    ds = datasets.Dataset.from_list(rows, features=features) if rows else \
        datasets.Dataset.from_dict({key: [] for key in features}, features=features)
    ds.save_to_disk(folder)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processed")
    write_split(str(folder / "train"), chats(40, 1))
    write_split(str(folder / "validation"), chats(8, 2))
    return str(folder)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def tiny_args(model_dir, data, out, run_name, *extra):
    sets = [f"model.name={model_dir}", f"data.processed_dir={data}", f"output.dir={out}",
            f"training.run_name={run_name}", "model.max_seq_length=128", "training.per_device_train_batch_size=2",
            "training.learning_rate=3e-3", "training.max_steps=12", "training.save_steps=2", "training.eval_steps=6",
            "training.logging_steps=1", "training.save_total_limit=2", *extra]
    return ["--profile", "demo", *[x for s in sets for x in ("--set", s)]]


def tiny_cfg(model_dir, data, **sets):
    cfg = config.build_config("demo", [f"model.name={model_dir}", f"data.processed_dir={data}",
                                       "model.max_seq_length=128", *[f"{k}={v}" for k, v in sets.items()]])
    return cfg


def load_lora(cfg, model_dir):
    plan = train.base_plan(cfg, "transformers", cuda=False)
    return train.load_for_training(cfg, "transformers", model_dir, plan) + (plan,)


# ---------------------------------------------------------------- packing isolation

@pytest.mark.parametrize("which", ["tiny_qwen3", "smollm2"])
def test_packed_samples_get_the_loss_they_get_alone(which, tiny_qwen3_dir, demo_model_dir, qwen_tokenizer,
                                                    tmp_path):
    """Through TRL's packing, collator and compute_loss (SDPA, no flash-attn): each sample's summed loss inside a
    packed row equals its loss alone within 1e-4 relative (fp32), while a leaking row differs by far more."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir if which == "tiny_qwen3" else demo_model_dir)
    ok, message = train.check_packing_isolation(model, qwen_tokenizer)
    assert ok and message.startswith("isolated:"), message
    # The same batch without the varlen metadata TRL 1.16 adds (TRL 1.15's collator sends none): position_ids
    # alone must isolate, through transformers' masking_utils.find_packed_sequence_indices.
    import datasets
    from trl import SFTConfig
    rows = [common.tokenize_conversation(qwen_tokenizer, chat) for chat in train.PROBE_CHATS]
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=512, report_to="none", use_cpu=True,
                     bf16=False, assistant_only_loss=False, padding_free=False)
    trainer = train.build_trainer(model, qwen_tokenizer, args, datasets.Dataset.from_list(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]))
    batch = trainer.data_collator(list(trainer.train_dataset))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    model.eval()
    packed = train._loss_sum(trainer, model, batch)
    alone = sum(train._loss_sum(trainer, model, trainer.data_collator([{"input_ids": r["input_ids"],
                                                                         "labels": r["labels"]}])) for r in rows)
    assert abs(packed - alone) / alone < 1e-4


def test_the_check_fails_when_samples_leak(tiny_qwen3_dir, qwen_tokenizer):
    """Drop position_ids before the model sees them: the packed row is then one causal sequence, and the check
    must refuse packing."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir)
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {k: v for k, v in kwargs.items()
                                                                         if k != "position_ids"}), with_kwargs=True)
    ok, message = train.check_packing_isolation(model, qwen_tokenizer)
    assert not ok and "see each other" in message, message


# ---------------------------------------------------------------- our labels through the trainer

def collated_samples(trainer):
    """(input_ids, labels) of every sample the trainer's dataloader yields, packed rows split at position 0."""
    out = []
    for batch in trainer.get_train_dataloader():
        ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
        if "attention_mask" in batch:
            for row_ids, row_labels, mask in zip(ids, labels, batch["attention_mask"].tolist()):
                out.append((tuple(row_ids[:sum(mask)]), tuple(row_labels[:sum(mask)])))
            continue
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [(tuple(ids[0][a:b]), tuple(labels[0][a:b])) for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_trainer_keeps_our_labels(packing, tiny_qwen3_dir, data_dir, tmp_path):
    cfg = tiny_cfg(tiny_qwen3_dir, data_dir)
    model, tokenizer, plan = load_lora(cfg, tiny_qwen3_dir)
    ds, counts, _ = train.tokenize_rows(train.load_built_split(cfg, "train"), tokenizer, cfg, "train")
    args = train.sft_args(cfg, plan, str(tmp_path), packing, has_eval=False)
    trainer = train.build_trainer(model, tokenizer, args, ds)
    assert train.trained_token_count(trainer.train_dataset) == counts["trained_tokens"] > 0
    got = collated_samples(trainer)
    # The padding-free collator also masks each sample's first label (no target across a boundary); ours is
    # already -100 there (<|im_start|>), so nothing changes.
    want = [(tuple(ids), tuple(labels)) for ids, labels in zip(ds["input_ids"], ds["labels"])]
    assert all(labels[0] == -100 for _, labels in want)
    assert sorted(got) == sorted(want)


def test_overlong_rows_keep_whole_turns(qwen_tokenizer, data_dir, tiny_qwen3_dir):
    import datasets
    long_chat = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three"},
                 {"role": "user", "content": "More " * 60}, {"role": "assistant", "content": "four " * 60}]
    rows = datasets.Dataset.from_list([common.chat_to_row(long_chat, source="long")] + chats(3, 5),
                                      features=common.row_features())
    full = common.tokenize_conversation(qwen_tokenizer, long_chat)
    short = [len(common.tokenize_conversation(qwen_tokenizer, *common.row_to_chat(r))["input_ids"]) for r in rows][1:]
    limit = max(short + [full["turn_ends"][0]]) + 5  # room for the short chats and the long one's first turn
    assert len(full["input_ids"]) > limit
    im_end = qwen_tokenizer.convert_tokens_to_ids(common.IM_END)

    cfg = tiny_cfg(tiny_qwen3_dir, data_dir, **{"model.max_seq_length": limit, "sft.overlong_policy": "truncate"})
    ds, counts, rejects = train.tokenize_rows(rows, qwen_tokenizer, cfg, "train")
    assert counts["truncated"] == 1 and counts["kept"] == 4 and rejects[0]["reason"] == "truncated"
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert len(ids) == full["turn_ends"][0] < limit < len(full["input_ids"])
    assert ids[-1] == im_end and labels[-1] == im_end  # the kept turn still ends in a trained <|im_end|>

    cfg["sft"]["overlong_policy"] = "drop"
    ds, counts, rejects = train.tokenize_rows(rows, qwen_tokenizer, cfg, "train")
    assert counts["dropped_overlong"] == 1 and len(ds) == 3 and rejects[0]["row"] == 0

    cfg["sft"]["overlong_policy"] = "fail"
    with pytest.raises(common.UserError, match=r"train row 0 \(source long\).*tokens > model.max_seq_length"):
        train.tokenize_rows(rows, qwen_tokenizer, cfg, "train")


# ---------------------------------------------------------------- memory estimate and profiles

def test_param_count_matches_real_models(tiny_qwen3_dir, demo_model_dir):
    from transformers import AutoModelForCausalLM
    lora = config.CONFIG["lora"]
    for path in (tiny_qwen3_dir, demo_model_dir):
        model = AutoModelForCausalLM.from_pretrained(path)
        total, _, _ = train.count_params(model.config, lora)
        real = sum(p.numel() for p in model.parameters())
        assert abs(total - real) / real < 1e-3  # norms are the only parameters left out


def test_memory_estimate_and_profiles_for_qwen3_4b():
    """Against issue 3's H100 measurements of bare Unsloth at 8×2048: 5.5 GiB reserved with its checkpointing,
    60 GiB without."""
    from transformers import Qwen3Config
    mc = Qwen3Config(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True)
    cfg = config.build_config(overrides=["lora.lora_dropout=0.0"])  # bare Unsloth: dropout 0, fused LoRA kernels
    plan = {"batch": 8, "accum": 2, "gradient_checkpointing": "unsloth", "optim": "adamw_8bit", "profile": "config",
            "load_in_4bit": True, "dtype_name": "bfloat16", "notes": [], "skip_layers": 0}
    with_ckpt = train.estimate_memory(mc, cfg, plan)
    without = train.estimate_memory(mc, cfg, dict(plan, gradient_checkpointing=False))
    assert 4.0 < with_ckpt["train"] < 8.0 and with_ckpt["eval"] < with_ckpt["train"]
    assert 45 < without["train"] < 75
    # The default dropout 0.05, measured through train.py on an H100 (2026-11-23): 8.9 GiB reserved with
    # Unsloth checkpointing; out of memory (> 78 GiB) without. The 80 GiB preset must then step down.
    dropout = config.build_config(overrides=["lora.lora_dropout=0.05"])
    assert 6.0 < train.estimate_memory(mc, dropout, plan)["train"] < 11.0
    assert train.estimate_memory(mc, dropout, dict(plan, gradient_checkpointing=False))["train"] > 78
    assert train.apply_memory_profile(dropout, plan, mc, 80 * train.GIB)["profile"] == "40gb"
    assert 3.9e9 < with_ckpt["params_b"] * 1e9 < 4.1e9  # Qwen3-4B: 4.0 B parameters
    picked = {gib: train.apply_memory_profile(cfg, plan, mc, gib * train.GIB) for gib in (16, 24, 40, 80)}
    assert [picked[g]["profile"] for g in (16, 24, 40, 80)] == ["16gb", "24gb", "40gb", "80gb"]
    assert picked[80]["gradient_checkpointing"] is False and picked[16]["gradient_checkpointing"] == "unsloth"
    assert all(p["batch"] * p["accum"] == 16 for p in picked.values())  # same effective batch
    assert "model.max_seq_length=1024" in train.remedies(cfg, plan)
    assert config.CHOICES["training.memory_profile"] == ("auto", "config", *train.PRESETS)


def qwen3_4b_config():
    from transformers import Qwen3Config
    return Qwen3Config(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True)


def test_checkpoint_skip_layers_fill_the_card_and_count_in_the_estimate():
    mc = qwen3_4b_config()
    plan = {"batch": 8, "accum": 2, "gradient_checkpointing": "unsloth", "optim": "adamw_8bit", "profile": "config",
            "load_in_4bit": True, "dtype_name": "bfloat16", "notes": [], "skip_layers": 0}
    auto = config.build_config(overrides=["training.checkpoint_skip_layers=auto"])
    fills = {}
    for gib in (15.6, 23.6):  # what torch reports for 16 and 24 GB cards: the 16gb and 24gb presets
        profiled = train.apply_memory_profile(auto, plan, mc, gib * train.GIB)
        picked = train.plan_skip_layers(auto, profiled, "unsloth", mc, gib * train.GIB)
        skip = picked["skip_layers"]
        estimate = train.estimate_memory(mc, auto, picked)["train"]
        one_more = train.estimate_memory(mc, auto, dict(picked, skip_layers=skip + 1))["train"]
        assert 0 < skip < 36 and estimate <= train.SKIP_FILL * gib < one_more, (gib, skip, estimate, one_more)
        # Each kept layer: its activations at 8 x 2048 tokens (measured on the H200: (53.64 - 7.63) / 35 = 1.31 GiB
        # allocated per layer between no checkpointing and checkpointing on the GPU).
        assert 1.2 < one_more - estimate < 1.6
        fills[gib] = skip
    assert fills[23.6] > fills[15.6]
    # A number is taken as given; more than the model has is an error, not a silent cut.
    three = config.build_config(overrides=["training.checkpoint_skip_layers=3"])
    assert train.plan_skip_layers(three, plan, "unsloth", mc, 80 * train.GIB)["skip_layers"] == 3
    with pytest.raises(common.UserError, match="checkpoint_skip_layers=40: the model has 36 decoder layers"):
        train.plan_skip_layers(config.build_config(overrides=["training.checkpoint_skip_layers=40"]), plan,
                               "unsloth", mc, 80 * train.GIB)
    assert "training.checkpoint_skip_layers=0" in train.remedies(three, dict(plan, skip_layers=3))
    # Without Unsloth or without checkpointing there is nothing to skip: 0, and the plan says why.
    for backend, ckpt, why in (("transformers", True, "needs Unsloth"), ("unsloth", False, "needs checkpointing on")):
        got = train.plan_skip_layers(three, dict(plan, gradient_checkpointing=ckpt), backend, mc, 80 * train.GIB)
        assert got["skip_layers"] == 0 and any(why in note for note in got["notes"]), got
    # The default (0) leaves the plan and the estimate as they were.
    default = config.build_config()
    assert train.plan_skip_layers(default, plan, "unsloth", mc, 80 * train.GIB) == plan


def test_the_plan_line_says_why_skip_layers_are_ignored(tiny_qwen3_dir, capsys):
    from transformers import AutoConfig
    cfg = config.build_config(overrides=[f"model.name={tiny_qwen3_dir}", "training.checkpoint_skip_layers=1"])
    plan, _, _ = train.make_plan(cfg, "transformers", AutoConfig.from_pretrained(tiny_qwen3_dir))
    assert plan["skip_layers"] == 0
    assert "training.checkpoint_skip_layers=1 ignored: it needs Unsloth" in capsys.readouterr().out


# ---------------------------------------------------------------- save -> reload, the CLI

def test_saved_adapter_reloads_to_the_same_logits(tiny_qwen3_dir, data_dir, tmp_path):
    import torch
    cfg = tiny_cfg(tiny_qwen3_dir, data_dir, **{"training.max_steps": 3, "training.learning_rate": 1e-2})
    model, tokenizer, plan = load_lora(cfg, tiny_qwen3_dir)
    ds, _, _ = train.tokenize_rows(train.load_built_split(cfg, "train"), tokenizer, cfg, "train")
    trainer = train.build_trainer(model, tokenizer, train.sft_args(cfg, plan, str(tmp_path / "ck"), True, False), ds)
    trainer.train()
    prompt = torch.tensor([common.prompt_ids(tokenizer, [{"role": "user", "content": "What is 2 plus 2?"}])])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=prompt).logits
    adapter = str(tmp_path / "adapter")
    train.save_adapter(trainer, tokenizer, cfg, adapter)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_qwen3_dir
    from transformers import AutoTokenizer
    saved_template = AutoTokenizer.from_pretrained(adapter).chat_template
    assert saved_template == common.chat_template("qwen3_instruct_2507") and "generation %}" not in saved_template
    reloaded, _ = common.load_model(cfg, adapter=adapter)
    with torch.no_grad():
        after = reloaded(input_ids=prompt).logits
    assert torch.allclose(before, after, atol=1e-5)
    base = common.load_model(cfg)[0]
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=prompt).logits, after, atol=1e-3)  # the adapter did change it


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(path):
    """[(step, train loss)] of a metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics(path) if "loss" in r]


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(folder)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def full_run(tiny_qwen3_dir, data_dir, tmp_path_factory):
    """One uninterrupted 12-step run (eval at 0, 6, 12; checkpoints every 2 steps, the last 2 kept)."""
    out = str(tmp_path_factory.mktemp("full"))
    run = cli(*tiny_args(tiny_qwen3_dir, data_dir, out, "full"))
    assert run.returncode == 0, run.stderr[-3000:]
    return os.path.join(out, "full"), run.stdout


def test_cli_run_record_tensorboard_and_pruning(full_run):
    """The run record, TensorBoard's own reader finding every train and eval loss of metrics.jsonl, and
    save_total_limit=2 leaving the last two checkpoints (the best, step 12, is the last)."""
    run_dir, stdout = full_run
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["global_step"] == 12 and summary["final_eval_loss"] < summary["first_eval_loss"]
    for name in ("adapter/adapter_model.safetensors", "config.json", "metrics.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    record = json.load(open(os.path.join(run_dir, "config.json")))
    assert record["data"]["train"]["md5"] and record["chat_template_md5"] and record["packages"]["trl"]
    assert "adapter" in stdout and "loss.png" in stdout and os.path.join(run_dir, "tensorboard") in stdout

    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train_tb = tensorboard_scalars(os.path.join(run_dir, "tensorboard"), "train/loss")
    eval_tb = tensorboard_scalars(os.path.join(run_dir, "tensorboard"), "eval/loss")
    assert [s for s, _ in train_tb] == list(range(1, 13)) and [s for s, _ in eval_tb] == [0, 6, 12]
    want_train = losses(os.path.join(run_dir, "metrics.jsonl"))
    want_eval = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    for got, want in ((train_tb, want_train), (eval_tb, want_eval)):  # TensorBoard keeps float32
        assert all(a == b and abs(x - y) < 1e-5 for (a, x), (b, y) in zip(got, want)), (got, want)

    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["README.md", "checkpoint-10", "checkpoint-12"]
    assert summary["adapters"]["best_step"] == 12 and summary["adapters"]["adapter_last"] is None
    assert not os.path.exists(os.path.join(run_dir, "adapter_last"))


def test_cli_interrupt_kill_and_resume_log_the_same_losses(full_run, tiny_qwen3_dir, data_dir, tmp_path):
    """The same run, stopped at known steps through the SFT_TEST_STOP_* hook: a real SIGINT at step 3 (saves
    checkpoint-3, exits 130); resumed from that checkpoint PATH and SIGKILLed at the end of step 5 (last
    checkpoint 4); resumed from the run folder and SIGKILLed in the middle of step 8's checkpoint save
    (checkpoint-8 without trainer_state.json; checkpoint-6 untouched); resumed with a bare --resume, which skips
    the broken checkpoint-8. The losses in metrics.jsonl equal the uninterrupted run's step for step (tolerance
    1e-6: the same fp32 computations in the same order on the CPU) and so do the adapter weights."""
    import torch
    from safetensors.torch import load_file
    full_dir, _ = full_run
    out = str(tmp_path / "out")
    args = tiny_args(tiny_qwen3_dir, data_dir, out, "cut")
    run_dir = os.path.join(out, "cut")
    ckpts = os.path.join(run_dir, "checkpoints")

    def stopped_run(*extra, **hook):
        env = {**ENV, **{f"SFT_TEST_STOP_{k.upper()}": str(v) for k, v in hook.items()}}
        return subprocess.run([sys.executable, "train.py", *args, *extra], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    first = stopped_run(at_step=3)
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-3000:]
    assert "checkpoint saved at step 3" in first.stdout and not os.path.exists(os.path.join(run_dir, "adapter"))
    assert json.load(open(os.path.join(run_dir, "summary.json")))["global_step"] == 3

    second = stopped_run("--resume", os.path.join(ckpts, "checkpoint-3"), at_step=5, signal="KILL")
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert "resuming from" in second.stdout and os.path.isdir(os.path.join(ckpts, "checkpoint-4"))

    third = stopped_run("--resume", run_dir, at_step=8, signal="KILL", **{"in": "save"})
    assert third.returncode == -signal.SIGKILL, third.stderr[-3000:]
    assert "checkpoint-4)" in third.stdout  # resumed from the newest complete checkpoint
    assert os.path.isfile(os.path.join(ckpts, "checkpoint-8", "optimizer.pt"))
    assert train.complete_checkpoint(os.path.join(ckpts, "checkpoint-8")) == "no trainer_state.json"
    assert train.complete_checkpoint(os.path.join(ckpts, "checkpoint-6")) is None

    last = cli(*args, "--resume")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "skipping incomplete checkpoint-8" in last.stdout and "checkpoint-6)" in last.stdout
    assert json.load(open(os.path.join(run_dir, "summary.json")))["global_step"] == 12
    want, got = losses(os.path.join(full_dir, "metrics.jsonl")), losses(os.path.join(run_dir, "metrics.jsonl"))
    assert [s for s, _ in got] == list(range(1, 13))  # each step logged once across the four processes
    assert all(a == b and abs(x - y) <= 1e-6 for (a, x), (b, y) in zip(got, want)), (got, want)
    a = load_file(os.path.join(full_dir, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # TensorBoard too holds each step once: events after a resumed checkpoint are purged.
    assert [s for s, _ in tensorboard_scalars(os.path.join(run_dir, "tensorboard"), "train/loss")] == list(range(1, 13))


def test_every_checkpoint_is_an_adapter_the_other_scripts_take(full_run, data_dir, tiny_qwen3_dir, tmp_path):
    """obj_test_model.py --adapter checkpoint-N (its report named <run>-checkpoint-N), subj_test_model.py
    --adapter <run folder>, deploy.py merge --adapter checkpoint-N (merge_check.json names that checkpoint)."""
    run_dir, _ = full_run
    ckpt = os.path.join(run_dir, "checkpoints", "checkpoint-10")
    sets = [f"model.name={tiny_qwen3_dir}", f"data.processed_dir={data_dir}", "model.max_seq_length=128",
            f"output.dir={os.path.dirname(run_dir)}", f"output.reports_dir={tmp_path / 'reports'}",
            "eval.max_samples=2", "eval.max_new_tokens=4"]
    flags = ["--profile", "demo", *[x for s in sets for x in ("--set", s)]]
    ev = subprocess.run([sys.executable, "obj_test_model.py", *flags, "--adapter", ckpt, "--tuned-only",
                         "--no-probes"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.load(open(tmp_path / "reports" / "full-checkpoint-10" / "eval.json"))
    assert report["adapter"] == ckpt and report["sides"]["tuned"]["ppl"] > 0

    subj = subprocess.run([sys.executable, "subj_test_model.py", *flags, "--adapter", run_dir], input="4\n",
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert subj.returncode == 0, subj.stderr[-3000:]
    assert f"+ adapter {os.path.join(run_dir, 'adapter')}" in subj.stdout

    merge = subprocess.run([sys.executable, "deploy.py", "merge", *flags, "--adapter", ckpt, "--no-gguf"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert merge.returncode == 0, merge.stderr[-3000:]
    check = json.load(open(os.path.join(run_dir, "merged", "merge_check.json")))
    assert check["adapter"] == ckpt and check["passed"] and check["adapter_effect_max_abs"] > 0


def test_cli_demo_smollm2_lowers_the_loss(demo_model_dir, data_dir, tmp_path):
    out = str(tmp_path / "out")
    sets = [f"data.processed_dir={data_dir}", f"output.dir={out}", "training.run_name=demo",
            "model.max_seq_length=192", "training.per_device_train_batch_size=1", "training.max_steps=4",
            "training.eval_steps=4", "training.save_steps=4", "training.per_device_eval_batch_size=2"]
    run = cli("--profile", "demo", *[x for s in sets for x in ("--set", s)])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "demo", "summary.json")))
    assert summary["final_eval_loss"] < summary["first_eval_loss"], summary
    assert summary["packing"].startswith("on, isolated")
    with open(os.path.join(out, "demo", "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def png_size(path):
    import struct
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_cli_best_adapter_early_stopping_overfitting_and_generation_metrics(demo_model_dir, data_dir, tmp_path):
    """SmolLM2 at a high learning rate (2e-3): eval loss at steps 0/2/4/6/8 goes 1.05, 0.35, 0.17, 0.29, 0.27
    while train loss keeps falling (measured on this CPU, fp32, 1 thread). So: the overfitting warning at step 6
    (overfit_patience=1); early stopping after two evals without a better one (patience 2) at step 8 of 10;
    adapter/ = step 4's weights (checkpoint-4, saved because it was a new best although save_steps=5),
    adapter_last/ = step 8's; save_total_limit=2 keeps the best and the newest checkpoint. Every 2nd eval
    (0, 4, 8) also scores 4 greedy answers: usability in metrics.jsonl, TensorBoard and loss.png's second panel."""
    import torch
    from safetensors.torch import load_file
    out = str(tmp_path / "out")
    sets = [f"data.processed_dir={data_dir}", f"output.dir={out}", "training.run_name=best",
            "model.max_seq_length=128", "training.per_device_train_batch_size=2", "training.learning_rate=2e-3",
            "training.max_steps=10", "training.eval_steps=2", "training.save_steps=5", "training.save_total_limit=2",
            "training.logging_steps=1", "training.early_stopping_patience=2", "training.overfit_patience=1",
            "training.generation_eval_every=2", "training.generation_eval_samples=4", "eval.max_new_tokens=24"]
    run = cli("--profile", "demo", *[x for s in sets for x in ("--set", s)])
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = os.path.join(out, "best")
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = {r["step"]: r for r in metrics if "eval_loss" in r}
    assert sorted(evals) == [0, 2, 4, 6, 8]
    assert min(evals, key=lambda s: evals[s]["eval_loss"]) == 4 and evals[6]["eval_loss"] > evals[4]["eval_loss"]

    assert "overfitting" in run.stdout and summary["overfitting_warnings_at"] == [6] and evals[6]["overfitting"] == 1
    assert summary["global_step"] == 8 and summary["stopped_early"] and "early stopping" in run.stdout

    assert summary["adapters"] == {"best_step": 4, "best_eval_loss": evals[4]["eval_loss"], "adapter_step": 4,
                                   "adapter_last": os.path.join(run_dir, "adapter_last")}
    assert "at step 4: adapter/ holds step 4; adapter_last/ holds the final step 8" in run.stdout
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["README.md", "checkpoint-4", "checkpoint-5"]
    best = load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    ckpt = load_file(os.path.join(run_dir, "checkpoints", "checkpoint-4", "adapter_model.safetensors"))
    last = load_file(os.path.join(run_dir, "adapter_last", "adapter_model.safetensors"))
    assert all(torch.equal(best[k], ckpt[k]) for k in best)
    assert any(not torch.allclose(best[k], last[k]) for k in best)
    for folder in ("adapter", "adapter_last"):  # both complete adapters with the tokenizer
        assert os.path.isfile(os.path.join(run_dir, folder, "tokenizer_config.json"))

    scored = sorted(s for s, r in evals.items() if "eval_usability" in r)
    assert scored == [0, 4, 8] and all("eval_json_validity" not in r for r in evals.values())  # no json-only rows
    assert evals[4]["eval_usability"] > evals[0]["eval_usability"]  # the tuned model ends its short answers
    usability_tb = tensorboard_scalars(os.path.join(run_dir, "tensorboard"), "eval/usability")
    assert [s for s, _ in usability_tb] == [0, 4, 8]
    assert png_size(os.path.join(run_dir, "loss.png")) == (1080, 960)  # two panels (one panel: 1080 x 600)


def test_generation_metrics_use_obj_test_models_rules(tiny_qwen3_dir):
    """One implementation: obj_test_model's functions are common's. The random tiny model never ends an answer
    within 6 tokens nor writes JSON: usability 0 of 2, JSON validity 0 of the 1 json-only row."""
    import obj_test_model
    assert obj_test_model.usability is common.usability and obj_test_model.json_validity is common.json_validity
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir), AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    cfg = tiny_cfg(tiny_qwen3_dir, "unused", **{"eval.max_new_tokens": 6, "training.generation_eval_samples": 2})
    rows = [common.chat_to_row([{"role": "user", "content": "Give a and b as JSON."},
                                {"role": "assistant", "content": '{"a": 1, "b": 2}'}], tags=["json-only"]),
            common.chat_to_row([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
            common.chat_to_row([{"role": "user", "content": "Not in the sample."},
                                {"role": "assistant", "content": "No."}])]
    sample = train.generation_sample(cfg, rows)
    assert [r["prompt"][-1]["content"] for r in sample] == ["Give a and b as JSON.", "Say hi."]
    model.train()
    assert train.generation_metrics(model, tokenizer, sample, cfg) == {"eval_usability": 0.0, "eval_json_validity": 0.0}
    assert model.training  # back in training mode


def test_knobs_reach_peft_and_sft_config(tiny_qwen3_dir, data_dir, tmp_path):
    """lora.use_rslora: scale alpha / sqrt(r) = 32 / 4 = 8 (not 32 / 16 = 2); training.neftune_noise_alpha and
    training.extra go into SFTConfig as they are."""
    cfg = tiny_cfg(tiny_qwen3_dir, data_dir, **{"lora.use_rslora": True, "training.neftune_noise_alpha": 5.0,
                                                "training.extra": {"adam_beta2": 0.95, "lr_scheduler_kwargs": {}}})
    model, _, plan = load_lora(cfg, tiny_qwen3_dir)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 8.0
    args = train.sft_args(cfg, plan, str(tmp_path), packing=False)
    assert args.neftune_noise_alpha == 5.0 and args.adam_beta2 == 0.95
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False  # the best is tracked


def test_padded_training_when_the_packing_check_fails(tiny_qwen3_dir, data_dir):
    """A model whose packed samples see each other (position_ids dropped): decide_packing turns packing off, and
    the trainer built from that decision pads rows (attention_mask, no packed position_ids)."""
    cfg = tiny_cfg(tiny_qwen3_dir, data_dir)
    model, tokenizer, plan = load_lora(cfg, tiny_qwen3_dir)
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {k: v for k, v in kwargs.items()
                                                                         if k != "position_ids"}), with_kwargs=True)
    packing, note = train.decide_packing(model, tokenizer, cfg, plan)
    assert packing is False and note.startswith("off: packed samples see each other"), note
    ds, _, _ = train.tokenize_rows(train.load_built_split(cfg, "train"), tokenizer, cfg, "train")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train.build_trainer(model, tokenizer, train.sft_args(cfg, plan, tmp, packing, has_eval=False), ds)
        batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == plan["batch"]


# ---------------------------------------------------------------- errors before any weight is loaded

def test_clear_errors(tiny_qwen3_dir, data_dir, tmp_path):
    empty = tmp_path / "empty"
    write_split(str(empty / "train"), [])
    write_split(str(empty / "validation"), chats(2, 3))
    base = ["--profile", "demo", "--set", f"output.dir={tmp_path / 'out'}"]
    cases = [
        (["--set", f"data.processed_dir={tmp_path / 'missing'}"], "build_datasets.py"),
        (["--set", f"data.processed_dir={empty}"], "split at"),
        (["--set", f"data.processed_dir={data_dir}", "--set", "model.name=nobody/no-such-model-xyz"],
         "cannot be loaded"),
        (["--set", f"data.processed_dir={data_dir}", "--set", f"model.name={tiny_qwen3_dir}",
          "--set", "model.max_seq_length=8192"], "max_position_embeddings"),
        (["--set", f"data.processed_dir={data_dir}", "--resume"], "no complete checkpoint"),
        (["--set", f"data.processed_dir={data_dir}", "--set", "training.report_to=['comet']"],
         "unknown tracker 'comet'"),
        (["--set", f"data.processed_dir={data_dir}", "--set", "training.extra.adam_beta3=0.9"],
         "training.extra.adam_beta3 is not an SFTConfig field; did you mean adam_beta2, adam_beta1?"),
        (["--set", f"data.processed_dir={data_dir}", "--set", "training.extra.learning_rate=0.1"],
         "set training.learning_rate instead"),
    ]
    if importlib.util.find_spec("wandb") is None:  # asked for and not installed: say so before loading anything
        cases.append((["--set", f"data.processed_dir={data_dir}", "--set", "training.report_to=['wandb']"],
                      "the wandb package is not installed"))
    procs = [subprocess.Popen([sys.executable, "train.py", *base, *args], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, _ in cases]
    for proc, (args, expected) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0 and expected in stderr, (args, stderr[-2000:])
        assert "Loading weights" not in stdout + stderr  # failed before any weight was loaded


def test_torchrun_two_processes_share_one_run(tiny_qwen3_dir, data_dir, tmp_path):
    """DDP on the CPU (gloo): one run folder for both ranks (rank 0's timestamped name), the effective batch
    counts both processes, only rank 0 writes the record."""
    out = str(tmp_path / "out")
    sets = [f"model.name={tiny_qwen3_dir}", f"data.processed_dir={data_dir}", f"output.dir={out}",
            "model.max_seq_length=128", "training.per_device_train_batch_size=1", "training.max_steps=3",
            "training.save_steps=3", "training.eval_steps=3"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
                          "--profile", "demo", *[x for s in sets for x in ("--set", s)]],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "batch 1 x accumulation 1 x 2 process(es) = 2 sequences per optimizer step" in run.stdout
    runs = os.listdir(out)
    assert len(runs) == 1 and run.stdout.count("Run folder:") == 1
    summary = json.load(open(os.path.join(out, runs[0], "summary.json")))
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    assert os.path.isfile(os.path.join(out, runs[0], "adapter", "adapter_model.safetensors"))


def test_ranks_share_rank_0s_value_on_cpu(tmp_path):
    """train.shared_value under torchrun on the CPU: every rank gets rank 0's value (here its pid). accelerate took
    a CPU run for a single process, so the broadcast did nothing and each rank kept its own run name (its own
    timestamp): two run folders whenever the ranks started a second apart. Several rounds: a rank that exited with
    its process group alive aborted now and then ("terminate called without an active exception", SIGABRT; about
    one run in three with the CPUs busy), and torchrun called the run failed."""
    # one os.write per rank: print writes its pieces separately, and two ranks' pieces interleave
    code = ("import os, sys; sys.path.insert(0, os.getcwd()); import train; got = train.shared_value(os.getpid()); "
            "os.write(1, f'rank {train.RANK} pid {os.getpid()} got {got}\\n'.encode())")
    script = tmp_path / "shared_value_probe.py"
    script.write_text(code + "\n", encoding="utf-8")
    for _ in range(6):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        lines = sorted(line.split() for line in done.stdout.splitlines() if line.startswith("rank "))
        assert done.returncode == 0 and len(lines) == 2, done.stderr[:2000]  # the head: the rank's own last words
        (_, _, _, pid0, _, got0), (_, _, _, _, _, got1) = lines
        assert got0 == got1 == pid0
