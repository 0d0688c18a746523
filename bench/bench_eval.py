"""Benchmark obj_test_model.py's two heavy passes over 1,000 validation samples against the slow ways.

1. Perplexity: obj_test_model.masked_nll batched (eval.ppl_batch_size rows per forward, sorted by length)
   vs a per-sample loop (one row per forward, as the seed's script does). Tokenizing is timed in both.
   Target (issue 4): batched at least 20x faster.
2. Generation metrics: answers (greedy, eval.max_new_tokens) from an OpenAI-compatible endpoint with 64
   concurrent requests vs sequential in-process `generate` (one prompt at a time), then the same usability
   metric on both. Target: the endpoint at least 10x faster.
Slow baselines run on a seeded random subsample and are extrapolated linearly to the full count (the
output says which numbers are extrapolated); --ppl-baseline-samples / --gen-baseline-samples 0 means all.

Rows: the built validation split (cycled, each copy's last user message suffixed with a sample number, when
it holds fewer than --samples rows), or synthetic math / JSON / chat rows when no split is built.
The server: --endpoint URL (e.g. vLLM from `python deploy.py serve`), or one started here with deploy.py on
--model-dir (default: outputs/<newest run>/merged, else the base model) after the in-process passes
have freed their memory. In process, the same weights: --model-dir, else base + the newest adapter.
Writes --out (default reports/bench/bench_eval.json) and, when it starts the server, serve.log beside it.

    python bench/bench_eval.py --profile demo --set eval.max_new_tokens=32     # CPU (a few minutes)
    python bench/bench_eval.py --tiny --out /tmp/e.json                        # CPU smoke test (see --tiny)
    python bench/bench_eval.py                                                 # GPU, the real model
    python bench/bench_eval.py --endpoint http://127.0.0.1:8000/v1 --endpoint-model qwen3-4b-sft
"""

import argparse
import json
import os
import platform
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import config  # noqa: E402
import obj_test_model as ev  # noqa: E402

NAMES = ["Anna", "Bob", "李雷", "韩梅梅", "Omar", "Yuki", "张伟", "Sara"]


def synthetic_rows(n, seed):
    """Math (zh/en), JSON-only and chat rows in the built-split layout, when no validation split exists."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, name = rng.randint(2, 99), rng.randint(2, 99), rng.choice(NAMES)
        kind = i % 4
        if kind == 0:
            msgs, tags = [{"role": "user", "content": f"书架上有{a}本书，又放上{b}本，现在一共有多少本？"},
                          {"role": "assistant", "content": str(a + b)}], ["math", "zh"]
        elif kind == 1:
            msgs, tags = [{"role": "user", "content": f"{name} has {a} apples and buys {b} more. How many now?"},
                          {"role": "assistant", "content": str(a + b)}], ["math", "en"]
        elif kind == 2:
            msgs, tags = [{"role": "system", "content": "Reply with one JSON object only."},
                          {"role": "user", "content": f"Extract name and age: {name} is {a}."},
                          {"role": "assistant", "content": json.dumps({"name": name, "age": a}, ensure_ascii=False)}], \
                ["json-only"]
        else:
            msgs, tags = [{"role": "user", "content": f"Give me one tip for learning topic number {a}."},
                          {"role": "assistant", "content": "Practice a little every day."}], \
                ["chat", "en"]
        rows.append({"messages": msgs, "source": "synthetic", "tags": tags})
    return rows


def bench_rows(cfg, n, seed):
    """n rows as (messages, tools, tags): the validation split cycled to n, or synthetic rows."""
    try:
        split = common.load_split(cfg, "validation")
        base = [common.row_to_chat(r) + (list(r["tags"] or []),) for r in split]
        origin = f"the validation split ({len(base)} rows)"
    except FileNotFoundError:
        base = [common.row_to_chat(r) + (r["tags"],) for r in synthetic_rows(n, seed)]
        origin = "synthetic rows (no validation split built)"
    rows = []
    for i in range(n):
        messages, tools, tags = base[i % len(base)]
        if i >= len(base):  # a distinct copy: the last user message carries the sample number
            messages = [dict(m) for m in messages]
            last = max(k for k, m in enumerate(messages) if m["role"] == "user")
            messages[last]["content"] += f" (#{i})"
        rows.append((messages, tools, tags))
    if n > len(base):
        origin += f", cycled to {n} with numbered copies"
    return rows, origin


def subsample(n_total, n, seed):
    if not n or n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_ppl(cfg, model, tokenizer, rows, baseline_n, seed):
    chats = [(m, t) for m, t, _ in rows]
    pad = tokenizer.pad_token_id
    batched, t_batched = timed(lambda: ev.masked_nll(model, ev.encode_for_ppl(tokenizer, chats, cfg),
                                                     cfg["eval"]["ppl_batch_size"], pad, desc="PPL batched",
                                                     max_tokens=cfg["eval"]["ppl_batch_tokens"]))
    idx = subsample(len(chats), baseline_n, seed)

    def loop():  # the seed's way: one conversation at a time, tokenized and scored alone
        return [ev.masked_nll(model, ev.encode_for_ppl(tokenizer, [chats[i]], cfg), 1, pad)[0] for i in idx]
    single, t_single = timed(loop)
    drift = max(abs(a[0] - batched[i][0]) / max(abs(batched[i][0]), 1e-9) for a, i in zip(single, idx))
    full = t_single * len(chats) / len(idx)
    return {"rows": len(chats), "tokens": sum(n for _, n in batched), "batch_size": cfg["eval"]["ppl_batch_size"],
            "batch_tokens": cfg["eval"]["ppl_batch_tokens"],
            "batched_s": round(t_batched, 2), "per_sample_rows": len(idx), "per_sample_s_measured": round(t_single, 2),
            "per_sample_s": round(full, 2), "per_sample_extrapolated": len(idx) < len(chats),
            "speedup": round(full / t_batched, 2), "max_rel_nll_diff": drift}


def usable_share(results, rows, cfg):
    flags = [not ev.usability(r["text"], r["finish_reason"], tags, cfg, has_tools=bool(tools))
             for r, (_, tools, tags) in zip(results, rows)]
    return round(sum(flags) / len(flags), 3) if flags else None


def prompt_of(messages):
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


@common.exits_on_user_error
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000, help="validation samples (default 1000)")
    parser.add_argument("--ppl-baseline-samples", type=int, default=None,
                        help="rows the per-sample PPL loop scores (default: 100 on a CPU, all on a GPU; 0 = all)")
    parser.add_argument("--gen-samples", type=int, default=None,
                        help="rows the endpoint answers (default: 256 on a CPU, all on a GPU; 0 = all)")
    parser.add_argument("--gen-baseline-samples", type=int, default=None,
                        help="rows sequential in-process generate answers (default: 16 on a CPU, 100 on a GPU)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--endpoint", help="an OpenAI-compatible …/v1 URL already serving the model")
    parser.add_argument("--endpoint-model", help="`model` for --endpoint (default deploy.served_model_name)")
    parser.add_argument("--model-dir", help="a full model folder to load and serve (default: the newest run's "
                                            "merged/, else the base)")
    parser.add_argument("--skip", choices=["ppl", "gen"], action="append", default=[], help="skip a part")
    parser.add_argument("--out", default=None, help="the results JSON (default <output.reports_dir>/bench/"
                                                    "bench_eval.json); serve.log goes beside it")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: the demo profile (unless --profile), 8 samples (per-sample PPL 4, "
                             "sequential generate 2), eval.max_new_tokens=8 (unless --set), 4 requests in flight")
    config.add_config_args(parser)
    args = parser.parse_args()
    if args.tiny:
        args.profile = args.profile or "demo"
        args.overrides = ["eval.max_new_tokens=8", *args.overrides]
        args.samples, args.concurrency = min(args.samples, 8), min(args.concurrency, 4)
        args.ppl_baseline_samples = 4 if args.ppl_baseline_samples is None else args.ppl_baseline_samples
        args.gen_baseline_samples = args.gen_baseline_samples or 2
    return args, parser


def endpoint_answers(args, cfg, model_dir, adapter, out, chats, settings):
    """Answers from --endpoint, or from a server started here on the same weights (then stopped), timed."""
    proc = None
    url, name = args.endpoint, args.endpoint_model or cfg["deploy"]["served_model_name"]
    if not url:
        import deploy
        serve_dir = model_dir or common.resolve_model_path(cfg["model"]["name"])
        if adapter:
            print("note: no merged model in the newest run: the server serves the base (run `python deploy.py "
                  "merge` to time the tuned model)")
        cfg["deploy"]["port"] = deploy.free_port(cfg["deploy"]["host"])
        proc = deploy.start_server(cfg, serve_dir, os.path.join(os.path.dirname(out), "serve.log"))
        url, name = proc.url, proc.names[0]
    try:
        common.generate_endpoint(url, name, chats[:2], settings, concurrency=2)  # warm-up, not timed
        answers, seconds = timed(lambda: common.generate_endpoint(url, name, chats, settings,
                                                                  concurrency=args.concurrency, desc="endpoint"))
    finally:
        if proc is not None:
            deploy.stop_server(proc)
    return answers, seconds, url


def bench_gen(args, cfg, loaded, rows, model_dir, adapter, out, counts, seed):
    """Sequential in-process generate on a subsample vs the endpoint on (a superset of) the same rows. `loaded`
    ({"model", "tokenizer"}) is emptied: the model must be gone before a GPU server starts."""
    import functools
    model, tokenizer = loaded.pop("model"), loaded.pop("tokenizer")
    gpu, (gen_n, base_n) = common.has_cuda(), counts
    settings = common.sampling_settings(cfg, greedy=True)
    gen_idx = subsample(len(rows), gen_n, seed)
    # The sequential rows are a subset of the endpoint's: the usability rates below compare the same rows.
    seq_idx = sorted(random.Random(seed + 1).sample(gen_idx, min(base_n, len(gen_idx))))
    seq_rows = [rows[i] for i in seq_idx]
    seq_chats = [(prompt_of(m), t) for m, t, _ in seq_rows]
    generate = functools.partial(common.generate_local, model, tokenizer, seq_chats, settings)
    seq, t_seq = timed(functools.partial(generate, batch_size=1, desc="sequential generate"))
    _, t_batched_gen = timed(functools.partial(generate, batch_size=cfg["eval"]["gen_batch_size"],
                                               desc="batched generate"))
    del model, generate  # a GPU server takes deploy.gpu_memory_utilization of the card: free this copy first
    if gpu:
        import torch
        torch.cuda.empty_cache()
    gen_rows = [rows[i] for i in gen_idx]
    answers, t_ep, url = endpoint_answers(args, cfg, model_dir, adapter, out,
                                          [(prompt_of(m), t) for m, t, _ in gen_rows], settings)
    seq_full = t_seq * len(rows) / len(seq_rows)
    ep_full = t_ep * len(rows) / len(gen_rows)
    gen = {"sequential_rows": len(seq_rows), "sequential_s_measured": round(t_seq, 2),
           "sequential_s": round(seq_full, 1), "sequential_tokens": sum(r["completion_tokens"] for r in seq),
           "endpoint_rows": len(gen_rows), "endpoint_s_measured": round(t_ep, 2), "endpoint_s": round(ep_full, 1),
           "endpoint_tokens": sum(r["completion_tokens"] or 0 for r in answers), "concurrency": args.concurrency,
           "endpoint": url, "speedup": round(seq_full / ep_full, 2),
           "inprocess_batched_s": round(t_batched_gen * len(rows) / len(seq_rows), 1),
           "inprocess_batch_size": cfg["eval"]["gen_batch_size"],
           "usable_sequential": usable_share(seq, seq_rows, cfg),
           "usable_endpoint_same_rows": usable_share([answers[gen_idx.index(i)] for i in seq_idx], seq_rows, cfg),
           "usable_endpoint": usable_share(answers, gen_rows, cfg)}
    print(f"generation metrics for {len(rows)} samples: sequential generate {gen['sequential_s']} s "
          f"(extrapolated from {len(seq_rows)}), endpoint x{args.concurrency} {gen['endpoint_s']} s"
          f"{f' (extrapolated from {len(gen_rows)})' if len(gen_rows) < len(rows) else ''} -> "
          f"{gen['speedup']}x (target 10x); tokens/s {gen['sequential_tokens'] / t_seq:.1f} vs "
          f"{gen['endpoint_tokens'] / t_ep:.1f}; usable on the same {len(seq_rows)} rows "
          f"{gen['usable_sequential']} vs {gen['usable_endpoint_same_rows']} "
          f"(endpoint, all: {gen['usable_endpoint']})")
    print(f"  (for reference: in-process generate batched by {gen['inprocess_batch_size']}: "
          f"{gen['inprocess_batched_s']} s, extrapolated from {len(seq_rows)})")
    return gen


def main():
    args, parser = parse_args()
    common.import_unsloth_first()  # on a GPU: before anything imports transformers (Unsloth patches them)
    cfg = config.resolve(args, parser, quiet=True)
    seed = cfg["training"]["seed"]
    random.seed(seed)
    gpu = common.has_cuda()
    ppl_n = args.ppl_baseline_samples if args.ppl_baseline_samples is not None else (0 if gpu else 100)
    gen_n = args.gen_samples if args.gen_samples is not None else (0 if gpu else 256)
    base_n = args.gen_baseline_samples or (100 if gpu else 16)

    # ---- checks and the weights, before any heavy work
    run = common.latest_run(cfg)
    model_dir = args.model_dir or (os.path.join(run, "merged") if run and os.path.isdir(os.path.join(run, "merged"))
                                   else None)
    adapter = os.path.join(run, "adapter") if run and not model_dir else None
    if args.endpoint:
        ev.require_server(args.endpoint)
    out = os.path.abspath(args.out or common.path_in_repo(os.path.join(cfg["output"]["reports_dir"], "bench",
                                                                       "bench_eval.json")))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows, origin = bench_rows(cfg, args.samples, seed)
    print(f"bench_eval: {len(rows)} samples from {origin}; device: {'cuda' if gpu else 'cpu'} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(f"model: {model_dir or cfg['model']['name']}{' + adapter ' + adapter if adapter else ''}")
    result = {"samples": len(rows), "rows_from": origin, "device": "cuda" if gpu else "cpu",
              "model": model_dir or cfg["model"]["name"], "adapter": adapter,
              "max_new_tokens": cfg["eval"]["max_new_tokens"], "versions": common.package_versions()}

    model, tokenizer = common.load_model(cfg, adapter=adapter, base_path=model_dir and os.path.abspath(model_dir))
    tokenizer.padding_side = "left"
    if "ppl" not in args.skip:
        result["ppl"] = ppl = bench_ppl(cfg, model, tokenizer, rows, ppl_n, seed)
        note = f" (extrapolated from {ppl['per_sample_rows']} rows)" if ppl["per_sample_extrapolated"] else ""
        print(f"PPL over {ppl['rows']} rows ({ppl['tokens']} assistant tokens): batched (batch {ppl['batch_size']}) "
              f"{ppl['batched_s']} s; per-sample loop {ppl['per_sample_s']} s{note} -> {ppl['speedup']}x "
              f"(target 20x); max relative NLL difference {ppl['max_rel_nll_diff']:.1e}")

    if "gen" not in args.skip:
        loaded = {"model": model, "tokenizer": tokenizer}
        del model
        result["gen"] = bench_gen(args, cfg, loaded, rows, model_dir, adapter, out, (gen_n, base_n), seed)

    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
