"""Benchmark build_datasets.py at scale against a plain-Python, seed-style loop over the same files.

Generates 1,000,000 rows in three pools, in their raw layouts: CMATH JSONL (40%), MAWPS CSV (30%) and
emoji JSONL (30%), about 5% of each repeated. Then runs, each in a fresh process of its own:
  baseline  the seed's steps in plain Python: read every row (json.loads / csv), normalize to messages,
            md5 per row + set dedup, random.choices resample to 0.9 x rows, shuffle, write train/val JSONL
  build     build_datasets.build(): all eight steps (cleaning, checks, tags, md5 dedup, Arrow pools,
            resample mix, cross-source dedup, grouped split, Arrow + JSONL export, reports)
and prints rows/s and peak memory of each. Peak memory is summed over the process and its workers (PSS, so
pages a forked worker shares with its parent count once), sampled every 100 ms, and at least the process's
own peak RSS.
Targets (issue 2): build at least 2x faster than the baseline in the same run, under 1.5 GB.

    python bench/bench_build.py                  # 1,000,000 rows, a few minutes on 2 cores
    python bench/bench_build.py --rows 200000    # quicker
    python bench/bench_build.py --keep DIR       # keep the generated data and outputs in DIR
    python bench/bench_build.py --tiny           # smoke test: 2,000 rows (targets not meaningful at that size)
"""

import argparse
import csv
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARES = {"cmath": 0.4, "mawps": 0.3, "emoji": 0.3}
FRUITS = ["苹果", "梨", "桃子", "橘子", "香蕉", "西瓜", "草莓", "葡萄"]
CITIES = ["成都", "杭州", "西安", "厦门", "昆明", "青岛", "长沙", "苏州"]
DISHES = ["面条", "小笼包", "火锅", "烤鸭", "米线", "煎饼", "饺子", "烧烤"]


def pick(rng, i):
    """Row i, or (5% of the time) an earlier row again: the duplicates dedup must find."""
    return i if i == 0 or rng.random() > 0.05 else rng.randrange(i)


def generate(folder, rows, seed=0):
    """The three raw files; ~270 bytes a row on average (CMATH ~170, MAWPS ~190, emoji ~480)."""
    rng = random.Random(seed)
    n = {k: int(rows * v) for k, v in SHARES.items()}
    n["emoji"] = rows - n["cmath"] - n["mawps"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cmath_dev.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n["cmath"]):
            j = pick(rng, i)
            a, b, fruit = j % 997 + 3, j // 997 + 2, FRUITS[j % 8]
            f.write(json.dumps({"grade": j % 6 + 1, "reasoning_step": 2, "num_digits": len(str(a)),
                                "question": f"小明有{a}个{fruit}，小红又给了他{b}个，他吃掉了{(a + b) // 3}个，"
                                            f"现在小明还有多少个{fruit}？（第{j}题）",
                                "golden": str(a + b - (a + b) // 3)}, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "MAWPS.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Question", "Equation", "Answer", "Numbers"])
        for i in range(n["mawps"]):
            j = pick(rng, i)
            a, b = j % 991 + 1, j // 991 + 1
            writer.writerow([f"Tom had N_00 marbles in his collection . His friend gave him N_01 more marbles "
                             f"at school . How many marbles does Tom have now ? ( case {j} )", "N_00 + N_01",
                             f"{float(a + b)}", f"{float(a)} {float(b)}"])
    with open(os.path.join(folder, "emoji.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n["emoji"]):
            j = pick(rng, i)
            city, dish = CITIES[j % 8], DISHES[j // 8 % 8]
            f.write(json.dumps({
                "question": f"用轻松的语气介绍一下{city}第{j}号街区的美食和好玩的地方吧",
                "answer_zh": f"😊 {city}第{j}号街区可太有意思啦！🍜 这里最有名的是{dish}，街头小吃琳琅满目；"
                             f"🏯 逛累了可以去老街和湖边公园走走，傍晚散步特别舒服 🌅。推荐春秋两季去，气候宜人 🌸，"
                             f"记得带上好胃口和相机 📷！",
                "answer_en": f"Block {j} in {city} is known for {dish}, street food, an old street and a lakeside "
                             f"park. Spring and autumn are the best seasons to visit."}, ensure_ascii=False) + "\n")
    return n


# ---------------------------------------------------------------- the baseline: the seed's steps, plain Python

def baseline(folder, out, seed=42):
    raw = {}
    for name in ("cmath", "emoji"):
        with open(os.path.join(folder, "cmath_dev.jsonl" if name == "cmath" else "emoji.jsonl"),
                  encoding="utf-8") as f:
            raw[name] = [json.loads(line) for line in f]
    with open(os.path.join(folder, "MAWPS.csv"), encoding="utf-8", newline="") as f:
        raw["mawps"] = list(csv.DictReader(f))
    pools = {}
    for name, rows in raw.items():  # normalize + tag
        out_rows = []
        for r in rows:
            if name == "cmath":
                q, a, tags = r["question"], r["golden"], ["math", "zh"]
            elif name == "emoji":
                q, a, tags = r["question"], r.get("answer_zh") or r["answer_en"], ["chat", "emoji"]
            else:
                q = r["Question"]
                for k, v in enumerate(r["Numbers"].split()):
                    q = q.replace(f"N_{k:02d}", v[:-2] if v.endswith(".0") else v)
                a, tags = r["Answer"][:-2] if r["Answer"].endswith(".0") else r["Answer"], ["math", "en"]
            out_rows.append({"messages": [{"role": "user", "content": q.strip()},
                                          {"role": "assistant", "content": a.strip()[:3000]}],
                             "source": name, "tags": tags})
        seen, kept = set(), []
        for r in out_rows:  # md5 per row + set dedup
            h = hashlib.md5(json.dumps(r["messages"], ensure_ascii=False).encode("utf-8")).hexdigest()
            if h not in seen:
                seen.add(h)
                kept.append(r)
        pools[name] = kept
    rnd = random.Random(seed)
    total = int(0.9 * sum(len(p) for p in pools.values()))
    mixed = []
    for name, rows in pools.items():
        mixed += rnd.choices(rows, k=round(total * SHARES[name]))
    rnd.shuffle(mixed)
    n_val = max(100, int(0.1 * len(mixed)))
    os.makedirs(out, exist_ok=True)
    for path, part in (("val.jsonl", mixed[:n_val]), ("train.jsonl", mixed[n_val:])):
        with open(os.path.join(out, path), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(mixed)


def build(folder, out):
    import build_datasets
    import config
    sources = {
        "cmath": {"format": "cmath", "local": os.path.join(folder, "cmath_dev.jsonl"), "weight": SHARES["cmath"],
                  "tags": ["math", "zh"]},
        "mawps": {"format": "mawps", "local": os.path.join(folder, "MAWPS.csv"), "weight": SHARES["mawps"],
                  "tags": ["math", "en"]},
        "emoji": {"format": "emoji", "local": os.path.join(folder, "emoji.jsonl"), "weight": SHARES["emoji"],
                  "tags": ["chat", "emoji"]},
    }
    cfg = config.build_config(None, [f"data.sources={sources!r}", "data.use_hub=False",
                                     f"data.processed_dir={os.path.join(out, 'processed')}",
                                     f"data.pools_dir={os.path.join(out, 'pools')}"])
    rep = build_datasets.build(cfg)
    return rep["split"]["train"] + rep["split"]["validation"]


def child(which, folder, out):
    """Runs in its own process; prints one JSON line with its wall time and own peak RSS."""
    start = time.perf_counter()
    rows_out = baseline(folder, out) if which == "baseline" else build(folder, out)
    seconds = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print(json.dumps({"seconds": seconds, "rows_out": rows_out, "self_maxrss_mb": usage[0].ru_maxrss / 1024,
                      "cpu_seconds": sum(u.ru_utime + u.ru_stime for u in usage)}))


def memory(proc):
    """PSS where the OS reports it (a forked worker's pages shared with its parent are split between them,
    not counted twice), else RSS."""
    try:
        return proc.memory_full_info().pss
    except (AttributeError, OSError):
        return proc.memory_info().rss


def measure(which, folder, out):
    """Run a child, sampling the RSS of it plus its workers every 100 ms."""
    import psutil
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", which, "--data", folder,
                             "--out", out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(memory(p) for p in [parent] + parent.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{which} failed (exit {proc.returncode}); run it alone to see why:\n"
                         f"  python {__file__} --child {which} --data {folder} --out {out}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = max(peak / 2 ** 20, result["self_maxrss_mb"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="generated rows over the three pools (default "
                                                                "1,000,000; --tiny 2,000)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: 2,000 rows unless --rows")
    parser.add_argument("--keep", default=None, help="folder for data and outputs (kept); default: a temp dir")
    parser.add_argument("--child", choices=["baseline", "build"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.data, args.out)
    args.rows = args.rows or (2_000 if args.tiny else 1_000_000)

    work = args.keep or tempfile.mkdtemp(prefix="bench_build_")
    data = os.path.join(work, "raw")
    print(f"Generating {args.rows:,} rows in {data} ...", flush=True)
    start = time.perf_counter()
    counts = generate(data, args.rows)
    size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
    print(f"  {', '.join(f'{k} {v:,}' for k, v in counts.items())} rows, {size / 2 ** 20:.0f} MB, "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    results, load = {}, os.getloadavg()[0]
    for which in ("baseline", "build"):
        print(f"Running {which} ...", flush=True)
        results[which] = measure(which, data, os.path.join(work, which))
    base, new = results["baseline"], results["build"]
    speedup = base["seconds"] / new["seconds"]
    print()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.rows:,} input rows ({size / 2 ** 20:.0f} MB)")
    print(f"Load average before the runs: {load:.1f} (other work on the machine slows the parallel build most)")
    print("| run | wall s | rows/s | CPU s (all processes) | peak RSS (MB) | rows out |")
    print("|---|---:|---:|---:|---:|---:|")
    for which, r in results.items():
        print(f"| {which} | {r['seconds']:.1f} | {args.rows / r['seconds']:,.0f} | {r['cpu_seconds']:.1f} | "
              f"{r['peak_rss_mb']:,.0f} | {r['rows_out']:,} |")
    ok_speed, ok_mem = speedup >= 2, new["peak_rss_mb"] < 1536
    print(f"\nbuild vs baseline: {speedup:.2f}x faster (target >= 2x: {'met' if ok_speed else 'NOT met'}); "
          f"build peak {new['peak_rss_mb']:,.0f} MB (target < 1536 MB: {'met' if ok_mem else 'NOT met'})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
