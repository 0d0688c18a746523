"""Every bench in bench/ runs its smoke mode (`--tiny`) on a CPU through its command line, so a rename in train.py,
common.py, obj_test_model.py or deploy.py that breaks a bench fails here. Outputs go to tmp_path; the assertions are
on what each bench writes and prints (entries present, counts and rates positive), never on timings."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(tmp_path, script, *args, expect=0):
    """Run bench/<script> with this interpreter, its temporary folders under tmp_path; its combined output, or a
    failure showing the output's tail when it exits otherwise than `expect` (0; None: any non-zero)."""
    # One torch thread: these shapes gain nothing from two, and on a shared 2-core machine two threads spin against
    # each other (bench_train --tiny at load 5: 10.9 s per step with two, 2.5 s with one).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *map(str, args)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    ok = proc.returncode != 0 if expect is None else proc.returncode == expect
    assert ok, f"{script} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc.stdout


def table_row(output, first_cell):
    """The cells of the Markdown table row whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{output[-3000:]}")


def number(cell):
    return float(cell.replace(",", "").rstrip("×x%"))


def test_bench_train_tiny(tmp_path, demo_model_dir):
    out = tmp_path / "bench_train.json"
    # --baseline-packing auto: the baseline runs train.check_packing_isolation too. One timed step after one untimed,
    # then one profiled (train.py runs only).
    printed = bench(tmp_path, "bench_train.py", "--tiny", "--steps", 1, "--trace", 1, "--baseline-packing", "auto",
                    "--out", out, "--model-dir", tmp_path / "model")
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["seq"] == 128 and result["shapes"]["num_hidden_layers"] == 2
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"trainpy-16gb", "baseline"}
    for run in runs.values():
        assert "error" not in run, (run, printed[-3000:])  # a failed worker (a train.py helper gone...) leaves this
        assert run["steps_timed"] == 1 and run["tokens_timed"] > 0 and run["tokens_per_s"] > 0, run
        assert run["flops_per_token"] > 0 and run["device"] == "CPU"
        assert (run["batch"], run["accum"]) == (2, 2), run  # --tiny: 2 x 2 sequences per step in both
    assert runs["trainpy-16gb"]["backend"] == "transformers"
    assert runs["trainpy-16gb"]["traced_steps"] == 1 and "Self CPU time total" in printed  # the profile's table
    assert runs["baseline"]["packing"].startswith(("packed, ", "padded: "))  # the isolation check ran and said why
    assert number(table_row(printed, "trainpy-16gb")[7]) > 0  # tokens/s column


def test_busy_seconds_counts_overlapping_kernels_once():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_train
    # Two overlapping kernels (0-2, 1-3), a gap, one kernel containing another (5-6, 5.5-5.7), unsorted.
    assert bench_train.busy_seconds([(5.5, 5.7), (1, 3), (0, 2), (5, 6)]) == 4.0
    assert bench_train.busy_seconds([]) == 0.0


def test_bench_train_fails_loudly(tmp_path, demo_model_dir):
    """A bad --set stops the bench at once with one line (it gave a traceback in a worker after the model was
    built); a run that fails (bare Unsloth: not installed on this CPU) makes the bench exit non-zero after writing
    its table (it exited 0, so a script could take a failed sweep for a finished one)."""
    printed = bench(tmp_path, "bench_train.py", "--tiny", "--set", "model.load_in_4bit=false", "--out",
                    tmp_path / "a.json", expect=None)
    assert "error: --set: model.load_in_4bit expects True or False" in printed and "Traceback" not in printed
    assert not (tmp_path / "a.json").exists()
    out = tmp_path / "b.json"
    printed = bench(tmp_path, "bench_train.py", "--tiny", "--only", "unsloth-bare", "--out", out,
                    "--model-dir", tmp_path / "model", expect=None)
    assert "error: 1 of 1 runs failed: unsloth-bare" in printed
    assert "error" in json.loads(out.read_text(encoding="utf-8"))["runs"][0]  # written before the exit


def test_bench_build_tiny(tmp_path):
    printed = bench(tmp_path, "bench_build.py", "--tiny", "--keep", tmp_path)
    for which in ("baseline", "build"):
        _, wall, rows_per_s, cpu, peak, rows_out = table_row(printed, which)
        assert number(rows_per_s) > 0 and number(peak) > 0 and number(rows_out) > 0
    assert "2,000 input rows" in printed
    # build_datasets.build wrote its split where --keep points, not into the repo
    assert (tmp_path / "build" / "processed" / "train.jsonl").is_file()
    assert (tmp_path / "baseline" / "train.jsonl").is_file()


def test_bench_attention_tiny(tmp_path):
    printed = bench(tmp_path, "bench_attention.py", "--tiny")
    assert "6 segments" in printed and "float32; CPU" in printed
    for tensor in ("output", "dQ", "dK", "dV"):  # fp32, same maths: per-segment SDPA = one block-causal call
        _, gap, largest = table_row(printed, tensor)
        assert number(gap) <= 1e-4 * number(largest), (tensor, gap, largest)
    assert number(table_row(printed, "SDPA per segment")[2]) > 0
    assert number(table_row(printed, "one SDPA call, block-causal mask")[2]) > 0


def test_check_grad_accum_tiny(tmp_path, demo_model_dir):
    printed = bench(tmp_path, "check_grad_accum.py", "--tiny", "--model-dir", tmp_path / "model")
    for trainer in ("train.py (token mean per step)", "plain TRL SFTTrainer"):
        gap = number(table_row(printed, trainer)[1])
        # train.py's trainer: exact (fp32 summation order, as tests/test_grad_accum.py's RTOL); plain TRL on a
        # model whose forward takes num_items_in_batch is exact too on the transformers backend
        assert 0 <= gap <= 1e-4, (trainer, gap)


def test_bench_eval_tiny(tmp_path, demo_model_dir):
    out = tmp_path / "bench" / "bench_eval.json"
    # No split built and no run under tmp_path: synthetic rows and the demo base model, served by deploy.py's
    # transformers engine. The fewest rows that still run every pass.
    printed = bench(tmp_path, "bench_eval.py", "--tiny", "--samples", 4, "--ppl-baseline-samples", 2,
                    "--gen-baseline-samples", 1, "--out", out, "--set", f"output.dir={tmp_path / 'outputs'}",
                    "--set", f"output.reports_dir={tmp_path / 'reports'}",
                    "--set", f"data.processed_dir={tmp_path / 'processed'}", "--set", "eval.max_new_tokens=4")
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["samples"] == 4 and result["rows_from"].startswith("synthetic rows")
    assert result["max_new_tokens"] == 4 and result["adapter"] is None
    ppl = result["ppl"]
    assert ppl["rows"] == 4 and ppl["tokens"] > 0 and ppl["per_sample_rows"] == 2
    assert ppl["batched_s"] > 0 and ppl["speedup"] > 0 and ppl["max_rel_nll_diff"] < 1e-3
    gen = result["gen"]
    assert gen["sequential_rows"] == 1 and gen["endpoint_rows"] == 4 and gen["concurrency"] == 4
    assert gen["endpoint_tokens"] > 0 and gen["sequential_tokens"] > 0 and gen["speedup"] > 0
    assert gen["endpoint"].startswith("http://127.0.0.1:")
    assert (out.parent / "serve.log").is_file()  # the server bench_eval started logged beside the results
    assert re.search(r"written: .*bench_eval\.json", printed)
