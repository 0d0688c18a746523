"""Exact gradient accumulation under Unsloth on a GPU: the first step's LoRA gradients for batch 4 x accumulation 1
and 1 x 4 (packed rows with 4-123 trained tokens each), through train.py's trainer and through plain TRL SFTTrainer
(Unsloth patched, the mean of micro-batch means). The CPU twin is tests/test_grad_accum.py.

    python bench/check_grad_accum.py [--tokenizer DIR]       # builds a small random Qwen3 (hidden 1024, 4 layers)
    python bench/check_grad_accum.py --tiny --model-dir DIR  # CPU smoke test: tiny Qwen3, transformers backend, fp32
"""

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import common  # noqa: E402
import config  # noqa: E402

SMALL = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
             intermediate_size=2816, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True)


def plain_trl(model, tokenizer, args, ds, callbacks=()):
    from trl import SFTTrainer
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=list(callbacks))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=common.path_in_repo(config.DEMO_MODEL_DIR))
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: bench_train's tiny Qwen3 shapes, float32, the transformers backend")
    parser.add_argument("--model-dir", default=None,
                        help="where the random model is built (reused if present; default: a folder in the temp dir)")
    a = parser.parse_args()
    backend = "transformers" if a.tiny else "unsloth"
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers / trl / peft)
    import train
    from bench_train import TINY, build_model
    from test_grad_accum import ANSWERS, max_relative_gap, step_gradients, uneven_rows
    folder = a.model_dir or os.path.join(tempfile.gettempdir(), "grad-accum-qwen3" + "-tiny" * a.tiny)
    folder = build_model(folder, TINY if a.tiny else SMALL, "float32" if a.tiny else "bfloat16", a.tokenizer)
    from transformers import AutoTokenizer
    ds = uneven_rows(AutoTokenizer.from_pretrained(folder), ANSWERS)
    rows = []
    for name, build in (("train.py (token mean per step)", train.build_trainer),
                        ("plain TRL SFTTrainer", plain_trl)):
        grads = [step_gradients(folder, ds, batch, accum, True, tempfile.mkdtemp(), backend=backend, build=build)
                 for batch, accum in ((4, 1), (1, 4))]
        rows.append((name, max_relative_gap(*grads)))
    setting = "Unsloth, 4-bit, bf16" if backend == "unsloth" else "transformers, fp32"
    print(f"\n| trainer ({setting}, packed) | 4 x 1 vs 1 x 4: max relative gradient gap |\n|---|---|")
    for name, gap in rows:
        print(f"| {name} | {gap:.1e} |")


if __name__ == "__main__":
    main()
