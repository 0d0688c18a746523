"""Exact gradient accumulation (train.build_trainer): an optimizer step's loss is the mean over every trained token
of the step, so batch 4 x accumulation 1 and batch 1 x accumulation 4 give the same gradients, packed or padded.

The micro-batches differ on purpose in how many tokens carry loss (answers of 2 to ~120 tokens). `accepts_loss_kwargs
= False` is how transformers meets a model whose forward does not take `num_items_in_batch` (Unsloth's Qwen3 forward,
which made Unsloth print "num_items_in_batch could not be counted ... each micro-batch loss is a mean"); there the
stock trainer averages the micro-batch means."""

import pytest

import common
import config
import train

# Tolerance: fp32 sums in a different order (one forward of 4 rows vs 4 of 1): seen 3e-7 relative; a mean of
# micro-batch means is off by 10-60% on these rows.
RTOL = 1e-4
ANSWERS = ["Yes.", " ".join(["word"] * 120) + ".", "No.", " ".join(["long answer text"] * 30) + ".",
           "Maybe later.", " ".join(["seven"] * 70) + ".", "Sure.", " ".join(["a b"] * 50) + "."]


def step_gradients(model_dir, ds, batch, accum, packing, out_dir, accepts_loss_kwargs=None, backend="transformers",
                   build=train.build_trainer):
    """LoRA gradients of the first optimizer step (no clipping, no dropout) through train.py's own trainer (or
    `build`). backend "unsloth": 4-bit bf16 on a GPU (bench/check_grad_accum.py)."""
    from transformers import TrainerCallback
    gpu = backend == "unsloth"
    cfg = config.build_config("demo", [f"model.name={model_dir}", "training.max_grad_norm=1e9", "training.max_steps=1",
                                       "training.warmup_ratio=0.0", "lora.lora_dropout=0.0",
                                       "model.max_seq_length=160", f"model.dtype={'bfloat16' if gpu else 'float32'}"])
    plan = {"batch": batch, "accum": accum, "gradient_checkpointing": False, "optim": "sgd", "profile": "config",
            "load_in_4bit": gpu, "notes": [], "skip_layers": 0, "dtype_name": "bfloat16" if gpu else "float32"}
    model, tokenizer = train.load_for_training(cfg, backend, model_dir, plan)
    if accepts_loss_kwargs is not None:
        model.base_model.model.accepts_loss_kwargs = accepts_loss_kwargs
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    args = train.sft_args(cfg, plan, str(out_dir), packing, has_eval=False)
    trainer = build(model, tokenizer, args, ds, callbacks=[Grab()])
    assert accepts_loss_kwargs is None or trainer.model_accepts_loss_kwargs is accepts_loss_kwargs
    trainer.train()
    assert grads, "no gradient captured"
    return grads


def uneven_rows(tokenizer, answers):
    """One chat per answer, tokenized with our renderer and loss mask: 4 to ~120 trained tokens each."""
    import datasets
    rows = {"input_ids": [], "labels": []}
    for answer in answers:
        enc = common.tokenize_conversation(tokenizer, [{"role": "user", "content": "Say something."},
                                                       {"role": "assistant", "content": answer}])
        rows["input_ids"].append(enc["input_ids"])
        rows["labels"].append(enc["labels"])
    return datasets.Dataset.from_dict(rows)


def max_relative_gap(one, four):
    """Largest |difference| of any LoRA gradient relative to that gradient's largest entry."""
    assert one.keys() == four.keys()
    return max(float((one[n] - four[n]).abs().max()) / max(float(one[n].abs().max()), 1e-30) for n in one
               if float(one[n].abs().max()) > 0)


@pytest.mark.parametrize("accepts_loss_kwargs", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_gives_the_gradients_of_one_big_batch(tiny_qwen3_dir, qwen_tokenizer, tmp_path, packing,
                                                           accepts_loss_kwargs):
    ds = uneven_rows(qwen_tokenizer, ANSWERS if packing else ANSWERS[:4])
    if packing:  # 8 rows of 16-135 tokens pack into 4 rows of <= 160: one step of 4 x 1, or 1 x 4
        from trl.data_utils import pack_dataset
        assert len(pack_dataset(ds, 160, strategy="bfd")) == 4
    one = step_gradients(tiny_qwen3_dir, ds, 4, 1, packing, tmp_path / "4x1", accepts_loss_kwargs)
    four = step_gradients(tiny_qwen3_dir, ds, 1, 4, packing, tmp_path / "1x4", accepts_loss_kwargs)
    assert one.keys() == four.keys()
    trained = [name for name in one if float(one[name].abs().max()) > 0]  # lora_A: 0 while lora_B is still 0
    assert len(trained) >= len(one) // 2
    for name in one:
        scale = float(one[name].abs().max())
        assert float((one[name] - four[name]).abs().max()) <= RTOL * scale, name
