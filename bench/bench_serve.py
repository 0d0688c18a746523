"""Serving throughput of any OpenAI-compatible endpoint, the same client for every server (issue 17's sweep).

Each level sends max(--min-requests, --requests-per-level x concurrency) requests, at most `concurrency` in
flight (one thread each: the client is not what limits a server at 256 streams of ~30 tokens/s), every prompt
exactly --prompt-tokens random token ids (seeded) and every answer exactly --output-tokens long (`ignore_eos` +
`min_tokens`, vLLM's sampling extensions), greedy. Output tokens/s = completion tokens the server reports / the
level's wall time. One warm-up request first. Writes --out (JSON, one entry per level) and prints a table row.

    python deploy.py serve &                # or: vllm serve DIR --port 8000 (raw vLLM, its defaults)
    python bench/bench_serve.py --url http://127.0.0.1:8000/v1 --model qwen3-4b-sft --label deploy-80gb
    python bench/bench_serve.py --tiny ...  # CPU smoke: chat API, 2 levels, a few tokens
"""

import argparse
import concurrent.futures
import json
import os
import random
import time
import urllib.request


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the endpoint's /v1 URL")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--label", default="server", help="the row's name in the table (e.g. the flags)")
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
    rng = random.Random(a.seed)
    run_level(a, 1, random.Random(0), n=1)  # warm-up (compiled graphs, caches)
    levels = [run_level(a, c, rng) for c in a.concurrency]
    entry = {"label": a.label, "model": a.model, "api": a.api, "prompt_tokens": a.prompt_tokens,
             "output_tokens": a.output_tokens, "date": time.strftime("%Y-%m-%d"), "levels": levels}
    runs = []
    if os.path.isfile(a.out):
        with open(a.out, encoding="utf-8") as f:
            runs = json.load(f)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(runs + [entry], f, indent=1)
    print(f"| {a.label} | " + " | ".join(f"{lv['output_tok_s']:,.0f}" for lv in levels) + " |  (output tokens/s at "
          f"concurrency {', '.join(map(str, a.concurrency))})", flush=True)


if __name__ == "__main__":
    main()
