"""Serving throughput of any OpenAI-compatible endpoint, the same client for every server (issue 17's sweep).

Each level sends max(--min-requests, --requests-per-level x concurrency) requests, at most `concurrency` in
flight (one thread each: the client is not what limits a server at 256 streams of ~30 tokens/s), every prompt
exactly --prompt-tokens random token ids (seeded) and every answer exactly --output-tokens long (`ignore_eos` +
`min_tokens`, vLLM's sampling extensions), greedy. Output tokens/s = completion tokens the server reports / the
level's wall time. One warm-up request first. Writes --out (JSON, one entry per server, appended to), a plot of
every entry in it beside it (OUT without .json, .png) and prints a table row.

    python deploy.py serve &                # or: vllm serve DIR --port 8000 (raw vLLM, its defaults)
    python bench/bench_serve.py --url http://127.0.0.1:8000/v1 --model qwen3-4b-sft --label deploy-80gb
    python bench/bench_serve.py --tiny ...  # CPU smoke: chat API, 2 levels, a few tokens

A sweep in one command (--server LABEL=COMMAND, repeated): each server is started in turn, measured once /health
answers (its model name read from /v1/models unless --model is given) and stopped before the next starts, so every
row has the GPU to itself; each server's output goes to OUT.LABEL.log. On the H200:

    python bench/bench_serve.py --url http://127.0.0.1:8000/v1 --out reports/serve.json \
      --server "raw=python -m vllm.entrypoints.cli.main serve /tmp/q3 --port 8000" \
      --server "fp8=python deploy.py serve --model /tmp/q3 --set deploy.quantization=fp8"
"""

import argparse
import concurrent.futures
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import deploy  # noqa: E402


def get(url, api_key):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def post(url, body, api_key):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def request_body(a, prompt_ids, vocab_text):
    """vLLM: /completions with token ids (exact prompt length) and exact answer length. --api chat (an engine
    without token-id prompts, e.g. `transformers serve`): the prompt as words, max_tokens only."""
    if a.api == "completions":
        return {"model": a.model, "prompt": prompt_ids, "max_tokens": a.output_tokens, "temperature": 0,
                "ignore_eos": True, "min_tokens": a.output_tokens}
    return {"model": a.model, "max_tokens": a.output_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": " ".join(vocab_text[i % len(vocab_text)] for i in prompt_ids)}]}


def run_level(a, concurrency, rng, n=None):
    n = n or max(a.min_requests, a.requests_per_level * concurrency)
    words = ["alpha", "bravo", "river", "stone", "cloud", "seven", "north", "light"]
    bodies = [request_body(a, [rng.randrange(1000, 30000) for _ in range(a.prompt_tokens)], words) for _ in range(n)]
    url = a.url.rstrip("/") + ("/completions" if a.api == "completions" else "/chat/completions")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda b: post(url, b, a.api_key), bodies))
    wall = time.perf_counter() - start
    out_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3), "output_tokens": out_tokens,
            "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in replies),
            "output_tok_s": round(out_tokens / wall, 1), "req_s": round(n / wall, 2)}


def measure(a, label, model):
    """One table row: a warm-up request, then each concurrency level; the entry appended to --out."""
    a.label, a.model = label, model
    rng = random.Random(a.seed)
    run_level(a, 1, random.Random(0), n=1)  # warm-up (compiled graphs, caches)
    levels = [run_level(a, c, rng) for c in a.concurrency]
    entry = {"label": label, "model": model, "api": a.api, "prompt_tokens": a.prompt_tokens,
             "output_tokens": a.output_tokens, "date": time.strftime("%Y-%m-%d"), "levels": levels}
    runs = []
    if os.path.isfile(a.out):
        with open(a.out, encoding="utf-8") as f:
            runs = json.load(f)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(runs + [entry], f, indent=1)
    plot(runs + [entry], os.path.splitext(a.out)[0] + ".png")
    return entry


def plot(runs, path):
    """Output tokens/s against concurrency, one line per entry of --out (this invocation's and earlier ones)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    levels = sorted({lv["concurrency"] for entry in runs for lv in entry["levels"]})
    for entry in runs:
        ax.plot([lv["concurrency"] for lv in entry["levels"]], [lv["output_tok_s"] for lv in entry["levels"]], "o-",
                label=f"{entry['label']} ({entry['date']})")
    ax.set(xlabel="concurrency", ylabel="output tokens/s", xscale="log",
           title=f"{runs[-1]['prompt_tokens']} prompt / {runs[-1]['output_tokens']} output tokens per request")
    ax.set_xticks(levels, [str(c) for c in levels])  # ticks at the measured levels only, as plain numbers
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def row(entry):
    return f"| {entry['label']} | " + " | ".join(f"{lv['output_tok_s']:,.0f}" for lv in entry["levels"]) + " |"


def start(a, label, command):
    """Start one --server command in its own process group and wait for /health; the Popen."""
    log_path = f"{a.out}.{label}.log"
    health = common.server_root(a.url) + "/health"
    if common.http_ok(health, 2):
        raise SystemExit(f"error: something already answers {health}: stop it first (the sweep starts its own)")
    print(f"== {label}: {command}\n   log: {log_path}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    began = time.time()
    while not common.http_ok(health, 5):
        if proc.poll() is not None or time.time() - began > a.start_timeout:
            why = f"exited {proc.returncode}" if proc.returncode is not None else f"not healthy in {a.start_timeout} s"
            stop(proc)
            raise RuntimeError(f"{label}: the server {why}; last lines of {log_path}:\n{deploy.log_tail(log_path)}")
        time.sleep(2)
    print(f"   healthy after {time.time() - began:.0f} s", flush=True)
    return proc


def stop(proc):
    """SIGINT first (deploy.py stops the vLLM server it started, also during start-up; vLLM shuts down cleanly),
    then deploy.stop_server's SIGTERM / SIGKILL for whatever is left of the group."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deploy.stop_server(proc)


def sweep(a):
    """Each --server in turn: start, measure, stop. A server that fails to start, or fails a request (it died, it
    answered an error), is a row of its own and the others still run; returns the number that failed."""
    failed, rows = 0, []
    for spec in a.server:
        label, _, command = spec.partition("=")
        try:
            proc = start(a, label, command)
        except RuntimeError as err:
            print(f"error: {err}", flush=True)
            failed += 1
            rows.append(f"| {label} | failed to start: see {a.out}.{label}.log |")
            continue
        try:
            model = a.model or get(a.url.rstrip("/") + "/models", a.api_key)["data"][0]["id"]
            rows.append(row(measure(a, label, model)))
        except (OSError, KeyError, ValueError) as err:  # urllib's errors are OSErrors; a reply without usage
            failed += 1
            rows.append(f"| {label} | failed while measured ({type(err).__name__}: {err}): see {a.out}.{label}.log |")
        finally:
            stop(proc)
        print(rows[-1], flush=True)
    print(f"\n| server | {' | '.join(f'c={c}' for c in a.concurrency)} |  (output tokens/s)\n"
          f"|---|{'---:|' * len(a.concurrency)}\n" + "\n".join(rows), flush=True)
    return failed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the endpoint's /v1 URL")
    p.add_argument("--model", help="the served model name (with --server: default the first of /v1/models)")
    p.add_argument("--label", default="server", help="the row's name in the table (e.g. the flags)")
    p.add_argument("--server", action="append", default=[], metavar="LABEL=COMMAND",
                   help="start COMMAND (serving on --url), measure it as row LABEL, stop it; repeat for a sweep")
    p.add_argument("--start-timeout", type=int, default=900, help="seconds a --server may take to answer /health")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128, 256])
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--requests-per-level", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", "EMPTY"))
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--out", required=True, help="JSON file for the results (appended to when it exists)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: chat API, concurrency 1 and 2, 4 output tokens")
    a = p.parse_args()
    if a.tiny:
        a.api, a.concurrency, a.prompt_tokens, a.output_tokens, a.min_requests = "chat", [1, 2], 16, 4, 2
    bad = [spec for spec in a.server if not spec.partition("=")[0] or not spec.partition("=")[2].strip()]
    if bad:
        p.error(f"--server expects LABEL=COMMAND, got {bad[0]!r}")
    if a.server:
        failed = sweep(a)
        if failed:
            raise SystemExit(f"error: {failed} of {len(a.server)} servers failed (the rows above say how)")
        return
    if not a.model:
        p.error("--model is required without --server")
    entry = measure(a, a.label, a.model)
    print(row(entry) + f"  (output tokens/s at concurrency {', '.join(map(str, a.concurrency))})", flush=True)


if __name__ == "__main__":
    main()
