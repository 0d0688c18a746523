"""train.py with real parts: the real tokenizer + Qwen3-2507 template, a tiny random Qwen3, the bundled SmolLM2,
TRL's SFTTrainer, and the real CLI in subprocesses (a real SIGINT for the interrupted run)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

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
def test_packed_samples_get_the_loss_they_get_alone(which, tiny_qwen3_dir, demo_model_dir, qwen_tokenizer):
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
    args = SFTConfig(output_dir="/tmp/unused", packing=True, max_length=512, report_to="none", use_cpu=True,
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
def test_trainer_keeps_our_labels(packing, tiny_qwen3_dir, data_dir):
    cfg = tiny_cfg(tiny_qwen3_dir, data_dir)
    model, tokenizer, plan = load_lora(cfg, tiny_qwen3_dir)
    ds, counts, _ = train.tokenize_rows(train.load_rows(cfg, "train"), tokenizer, cfg, "train")
    args = train.sft_args(cfg, plan, "/tmp/unused", packing, has_eval=False)
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
    with pytest.raises(SystemExit, match=r"train row 0 \(source long\).*tokens > model.max_seq_length"):
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
            "load_in_4bit": True, "dtype_name": "bfloat16", "notes": []}
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


# ---------------------------------------------------------------- save -> reload, the CLI

def test_saved_adapter_reloads_to_the_same_logits(tiny_qwen3_dir, data_dir, tmp_path):
    import torch
    cfg = tiny_cfg(tiny_qwen3_dir, data_dir, **{"training.max_steps": 3, "training.learning_rate": 1e-2})
    model, tokenizer, plan = load_lora(cfg, tiny_qwen3_dir)
    ds, _, _ = train.tokenize_rows(train.load_rows(cfg, "train"), tokenizer, cfg, "train")
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


def test_cli_run_interrupt_and_resume(tiny_qwen3_dir, data_dir, tmp_path):
    """A full run lowers the eval loss; a second run gets a real SIGINT after step 3, saves, exits 130;
    --resume skips an incomplete newer checkpoint and ends at the same step with the same adapter weights."""
    import torch
    from safetensors.torch import load_file
    out = str(tmp_path / "out")
    full = cli(*tiny_args(tiny_qwen3_dir, data_dir, out, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "full", "summary.json")))
    assert summary["global_step"] == 12 and summary["final_eval_loss"] < summary["first_eval_loss"]
    for name in ("adapter/adapter_model.safetensors", "config.json", "metrics.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(out, "full", name)), name
    record = json.load(open(os.path.join(out, "full", "config.json")))
    assert record["data"]["train"]["md5"] and record["chat_template_md5"] and record["packages"]["trl"]
    assert "adapter" in full.stdout and "loss.png" in full.stdout

    log = open(tmp_path / "cut.log", "w+")  # a file, not a pipe: nobody reads a pipe while we poll
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(tiny_qwen3_dir, data_dir, out, "cut")],
                            cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "cut", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and any("loss" in r and r["step"] >= 3 for r in read_metrics(metrics)):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    proc.wait(timeout=300)
    output = (tmp_path / "cut.log").read_text()
    assert proc.returncode == 130, output[-3000:]
    stopped = json.load(open(os.path.join(out, "cut", "summary.json")))["global_step"]
    assert 3 <= stopped < 12 and f"checkpoint saved at step {stopped}" in output
    assert not os.path.exists(os.path.join(out, "cut", "adapter"))
    # A crash in the middle of the next save leaves a folder without trainer_state.json: never resumed from.
    ckpts = os.path.join(out, "cut", "checkpoints")
    good = os.path.join(ckpts, f"checkpoint-{stopped}")
    assert train.complete_checkpoint(good) is None
    os.makedirs(os.path.join(ckpts, "checkpoint-999"))
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        os.link(os.path.join(good, name), os.path.join(ckpts, "checkpoint-999", name))

    resumed = cli(*tiny_args(tiny_qwen3_dir, data_dir, out, "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping incomplete checkpoint-999" in resumed.stdout and f"checkpoint-{stopped}" in resumed.stdout
    assert json.load(open(os.path.join(out, "cut", "summary.json")))["global_step"] == 12
    steps = [r["step"] for r in read_metrics(metrics) if "loss" in r]
    assert steps == list(range(1, 13))  # each step logged once across both processes
    a = load_file(os.path.join(out, "full", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "cut", "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


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
    ]
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
