"""Objective evaluation of a training run: base vs tuned, side by side.

Reads  the validation split (data.processed_dir/validation, or --data FILE.jsonl with rows
       {"messages", "source", "tags", "tools"?}), the adapter (newest outputs/<run>/adapter, or --adapter),
       eval.probes_file (forgetting probes) and, with --evalscope, the EvalScope data in dataset/evalscope/.
Writes reports/<run>/eval.json, eval.md, eval_tags.png (per-tag bar chart), eval_samples.jsonl (every
       generated answer with its usability verdict and reasons) and, with --evalscope, reports/<run>/evalscope/.

    python obj_test_model.py                                   # newest run, in-process generation
    python obj_test_model.py --profile demo                    # the CPU demo
    python obj_test_model.py --adapter outputs/RUN/adapter --set eval.max_samples=50
    python obj_test_model.py --adapter outputs/RUN/checkpoints/checkpoint-100   # any saved step
    python obj_test_model.py --endpoint http://127.0.0.1:8000/v1 --evalscope   # e.g. `python deploy.py serve`
    python obj_test_model.py --set eval.gates.max_ppl_ratio=1.0 --set eval.gates.no_probe_regression=True

Metrics (the same for both backends: the in-process `generate` and an OpenAI-compatible endpoint):
- Perplexity: exp(sum of per-token NLL / number of tokens) over the tokens that carry loss in training
  (common.tokenize_conversation's labels: assistant content + <|im_end|>), rows cut at model.max_seq_length.
  Always computed in process (an endpoint gives no prompt log-probabilities); --no-ppl skips it.
- Usability rate. An answer is usable when all of these hold (each failure's reason is saved):
    1. non-empty: some non-whitespace text (a tool call counts as text);
    2. ended: finish_reason "stop" (a stop token / EOS ended it; an endpoint's "tool_calls" also counts),
       not "length" (cut at eval.max_new_tokens);
    3. not degenerate: split into units (one CJK character, one word, one number or one symbol each); when
       there are at least 8 n-grams of eval.repeat_ngram (4) units, the repeated share
       1 - distinct / total must not exceed eval.max_repeat_share (0.5);
    4. expected language: rows tagged zh need CJK characters to make up ≥ eval.min_lang_share (0.5) of the
       letters, rows tagged en need ASCII letters to; skipped under 5 letters (an answer like "42"), and
       for json-only rows and rows with tools (JSON keys and function names are ASCII by convention).
- JSON validity on rows tagged json-only: the whole answer (stripped; no code fences) parses with
  json.loads, and with eval.json_keys_from_reference it is an object holding the reference answer's keys.
- Buckets per tag (math, zh, en, chat, json-only, ...) and per source; forgetting probes (general
  questions, pass when the answer holds one of the expected keywords): base passes + tuned fails =
  a regression, reported by name.
- Gates (eval.gates; off by default) make the exit code non-zero when the tuned model fails one.
Generation decodes greedily when eval.greedy (the default) so base and tuned differ only by weights.
"""

import argparse
import json
import math
import os
import random
import sys
import time

os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # perplexity needs real logits from Unsloth's forward

import common  # noqa: E402
import config  # noqa: E402

# One implementation of the answer metrics (train.py's generation eval uses them too): common.py.
from common import (  # noqa: E402,F401
    expected_language,
    json_validity,
    language_share,
    reference_keys,
    repeat_share,
    split_for_generation,
    usability,
)

SIDES = ("base", "tuned")
MODELSCOPE_HOST = "www.modelscope.cn"  # EvalScope downloads its public benchmarks from ModelScope by default


# ---------------------------------------------------------------- metrics on finished answers

def probe_passed(answer, keywords):
    folded = answer.casefold()
    return any(k.casefold() in folded for k in keywords)


def rate(flags):
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def bucket_stats(samples, ppl_rows):
    """Per tag and per source: rows, perplexity (token-weighted) and usability / JSON validity rates."""
    out = {"tags": {}, "sources": {}}
    keys = lambda r: [("tags", t) for t in r["tags"]] + [("sources", r["source"] or "(none)")]  # noqa: E731
    groups = {}
    for r in ppl_rows:
        for kind, name in keys(r):
            g = groups.setdefault((kind, name), {"nll": 0.0, "tokens": 0, "gen": []})
            g["nll"] += r["nll"]
            g["tokens"] += r["tokens"]
    for s in samples:
        for kind, name in keys(s):
            groups.setdefault((kind, name), {"nll": 0.0, "tokens": 0, "gen": []})["gen"].append(s)
    for (kind, name), g in sorted(groups.items()):
        json_rows = [s for s in g["gen"] if s["json_valid"] is not None]
        out[kind][name] = {
            "ppl": math.exp(g["nll"] / g["tokens"]) if g["tokens"] else None, "ppl_tokens": g["tokens"],
            "generated": len(g["gen"]), "usability": rate(s["usable"] for s in g["gen"]),
            "json_validity": rate(s["json_valid"] for s in json_rows), "json_rows": len(json_rows)}
    return out


def check_gates(report, gates):
    """[(gate, passed, detail)] for the gates that are switched on."""
    base, tuned = report["sides"].get("base"), report["sides"].get("tuned")
    results = []
    if gates.get("max_ppl_ratio") is not None:
        if not (base and tuned and base["ppl"] and tuned["ppl"]):
            results.append(("max_ppl_ratio", False, "needs base and tuned perplexity (no --base-only / --no-ppl)"))
        else:
            ratio = tuned["ppl"] / base["ppl"]
            results.append(("max_ppl_ratio", ratio <= gates["max_ppl_ratio"],
                            f"tuned/base PPL = {ratio:.3f} (limit {gates['max_ppl_ratio']})"))
    for gate, metric in (("min_json_validity", "json_validity"), ("min_usability", "usability")):
        if gates.get(gate) is not None:
            side = tuned or base
            value = side[metric] if side else None
            results.append((gate, value is not None and value >= gates[gate],
                            f"{metric} = {'n/a (no rows)' if value is None else f'{value:.3f}'} "
                            f"(need ≥ {gates[gate]})"))
    if gates.get("no_probe_regression"):
        regressions = report.get("probe_regressions")
        results.append(("no_probe_regression", regressions == [],
                        "needs base and tuned probes" if regressions is None else
                        f"regressions: {', '.join(regressions) or 'none'}"))
    return results


# ---------------------------------------------------------------- data

def load_eval_rows(cfg, data):
    """Validation rows as dicts: chat (messages, tools), source, tags, prompt, reference."""
    try:
        split = common.load_split(cfg, data)
    except FileNotFoundError as err:
        raise common.UserError(str(err)) from None
    rows = []
    for i, row in enumerate(split):
        messages, tools = common.row_to_chat(row)
        prompt, reference = split_for_generation(messages)
        rows.append({"index": i, "id": row.get("id"), "chat": (messages, tools), "source": row.get("source") or "",
                     "tags": list(row.get("tags") or []), "prompt": prompt, "reference": reference})
    if not rows:
        raise common.UserError(f"the split {data!r} has no rows")
    return rows


def load_probes(cfg):
    path = common.path_in_repo(cfg["eval"]["probes_file"])
    probes = common.load_json_list(path, "probes", "eval.probes_file", "forgetting probes file")
    for k, p in enumerate(probes):
        missing = [key for key in ("name", "question", "keywords") if not p.get(key)]
        if missing:
            raise common.UserError(f"{path}: probe #{k + 1} lacks {missing}")
    return probes


# ---------------------------------------------------------------- perplexity

def encode_for_ppl(tokenizer, chats, cfg):
    """(input_ids, labels) per chat with the training mask, cut at model.max_seq_length like training."""
    limit, sft = cfg["model"]["max_seq_length"], cfg["sft"]
    encoded = []
    for messages, tools in chats:
        enc = common.tokenize_for_training(tokenizer, messages, tools, sft)
        encoded.append((enc["input_ids"][:limit], enc["labels"][:limit]))  # training truncates the same way
    return encoded


def length_batches(lengths, max_rows, max_tokens):
    """Index batches of rows sorted by length: at most max_rows rows and max_tokens padded tokens each
    (a row longer than max_tokens goes alone)."""
    batches, batch = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) == max_rows or (len(batch) + 1) * lengths[i] > max_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + ([batch] if batch else [])


def masked_nll(model, encoded, batch_size, pad_id, desc=None, max_tokens=None):
    """[(NLL summed over label tokens, label token count)] per row. Rows are sorted by length and batched
    with right padding (batch_size rows, max_tokens padded tokens at most); token t is scored from the
    logits at t - 1, exactly as the training loss. The LM head runs on the scored positions only (a hook
    on its input): a full (tokens × vocab) logits tensor is ~2.5 GB a batch for Qwen3 and mostly unused."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    batches = length_batches([len(ids) for ids, _ in encoded], batch_size, max_tokens or float("inf"))
    out = [None] * len(encoded)
    with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, disable=desc is None, unit="row") as bar:
        for idx in batches:
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.tensor([encoded[i][0] + [pad_id] * (width - len(encoded[i][0])) for i in idx], device=device)
            labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in idx], device=device)
            mask = (torch.arange(width, device=device)[None, :] < torch.tensor([len(encoded[i][0]) for i in idx],
                                                                                device=device)[:, None]).long()
            scored = torch.zeros_like(labels, dtype=torch.bool)
            scored[:, :-1] = labels[:, 1:] != -100  # hidden state t predicts label t + 1
            logits = scored_logits(model, head, scored, input_ids=ids, attention_mask=mask)
            targets = labels[:, 1:][scored[:, :-1]]
            # 1024 positions at a time: their fp32 copy is 1024 × 151,936 × 4 B ≈ 0.6 GB for Qwen3's vocabulary,
            # where the whole batch's could be tens of GB.
            nll = torch.cat([F.cross_entropy(logits[s:s + 1024].float(), targets[s:s + 1024], reduction="none")
                             for s in range(0, len(targets), 1024)] or [logits.new_zeros(0, dtype=torch.float32)])
            rows = torch.arange(len(idx), device=device)[:, None].expand_as(scored)[scored]
            sums = torch.zeros(len(idx), device=device, dtype=torch.float32).index_add_(0, rows, nll)
            for i, total, count in zip(idx, sums.tolist(), scored.sum(1).tolist()):
                out[i] = (total, count)
            bar.update(len(idx))
    return out


def scored_logits(model, head, scored, **inputs):
    """The model's logits at the `scored` (batch × seq) positions only, as (n_scored × vocab)."""
    def keep_scored(module, args):
        hidden = args[0]
        if hidden.shape[:-1].numel() != scored.numel():
            raise RuntimeError(f"the LM head got hidden states of shape {tuple(hidden.shape)} for inputs "
                               f"{tuple(scored.shape)}; cannot pick the scored positions")
        return (hidden.reshape(-1, hidden.shape[-1])[scored.reshape(-1)],) + tuple(args[1:])
    handle = head.register_forward_pre_hook(keep_scored)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    n = int(scored.sum())
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != n:  # e.g. Unsloth handing back placeholder logits
        raise RuntimeError(f"the model returned {logits.shape[0]} rows of logits for {n} scored positions; "
                           f"with Unsloth set UNSLOTH_RETURN_LOGITS=1")
    return logits


# ---------------------------------------------------------------- backends

def require_server(url):
    """Fail before heavy work when nothing answers at url (…/v1): /health (vLLM, transformers serve) or /models."""
    if not common.openai_server_up(url):
        raise common.UserError(f"no OpenAI-compatible server answers at {url} (tried {common.server_root(url)}/health "
                               f"and {url}/models); start one with `python deploy.py serve` (add --profile demo on "
                               f"a CPU) or fix --endpoint")


def make_generator(cfg, model, tokenizer, endpoint, endpoint_model):
    """A function chats -> results for one side: the endpoint when given, else in-process generate."""
    settings = common.sampling_settings(cfg, greedy=cfg["eval"]["greedy"])
    if endpoint:
        return lambda chats, desc: common.generate_endpoint(
            endpoint, endpoint_model, chats, settings, concurrency=cfg["eval"]["concurrency"],
            api_key=cfg["deploy"]["api_key"], timeout_s=cfg["eval"]["request_timeout_s"], desc=desc)
    return lambda chats, desc: common.generate_local(model, tokenizer, chats, settings,
                                                     batch_size=cfg["eval"]["gen_batch_size"], desc=desc)


# ---------------------------------------------------------------- one side

def evaluate_side(side, cfg, rows, gen_rows, probes, model, tokenizer, generate, do_ppl):
    e = cfg["eval"]
    result = {"ppl": None}
    ppl_rows = []
    if do_ppl:
        scored = rows if e["ppl_max_samples"] is None else rows[:e["ppl_max_samples"]]
        encoded = encode_for_ppl(tokenizer, [r["chat"] for r in scored], cfg)
        t0 = time.perf_counter()
        nll = masked_nll(model, encoded, e["ppl_batch_size"], tokenizer.pad_token_id, desc=f"{side}: perplexity",
                         max_tokens=e["ppl_batch_tokens"])
        for r, (total, count) in zip(scored, nll):
            ppl_rows.append({"tags": r["tags"], "source": r["source"], "nll": total, "tokens": count})
        tokens = sum(n for _, n in nll)
        result.update(ppl=math.exp(sum(t for t, _ in nll) / tokens) if tokens else None, ppl_rows=len(scored),
                      ppl_tokens=tokens, ppl_rows_without_labels=sum(1 for _, n in nll if n == 0),
                      ppl_seconds=round(time.perf_counter() - t0, 2))
        print(f"✅ {side}: Perplexity {result['ppl']:.3f} over {tokens} assistant tokens in {len(scored)} rows")
    t0 = time.perf_counter()
    answers = generate([(r["prompt"], r["chat"][1]) for r in gen_rows], f"{side}: answers") if gen_rows else []
    samples = []
    for r, a in zip(gen_rows, answers):
        reasons, valid, why = common.score_answer(a["text"], a["finish_reason"], r["tags"], r["reference"], cfg,
                                                  has_tools=bool(r["chat"][1]))
        samples.append({"side": side, "index": r["index"], "id": r["id"], "source": r["source"], "tags": r["tags"],
                        "prompt": r["prompt"][-1]["content"] if r["prompt"] else "", "reference": r["reference"],
                        "answer": a["text"], "finish_reason": a["finish_reason"],
                        "completion_tokens": a["completion_tokens"], "usable": not reasons, "reasons": reasons,
                        "json_valid": valid, "json_reason": why})
    seconds = time.perf_counter() - t0
    tokens = sum(s["completion_tokens"] or 0 for s in samples)
    result.update(usability=rate(s["usable"] for s in samples), generated=len(samples),
                  json_validity=rate(s["json_valid"] for s in samples if s["json_valid"] is not None),
                  json_rows=sum(1 for s in samples if s["json_valid"] is not None),
                  gen_seconds=round(seconds, 2), gen_tokens_per_s=round(tokens / seconds, 1) if seconds else None)
    usable = sum(s["usable"] for s in samples)
    print(f"✅ {side}: Usability Rate {score_text(result['usability'])} ({usable}/{len(samples)}), "
          f"JSON validity {score_text(result['json_validity'])} ({result['json_rows']} json-only rows)")
    if probes:
        probe_answers = generate([([{"role": "user", "content": p["question"]}], None) for p in probes],
                                 f"{side}: probes")
        result["probes"] = {p["name"]: {"passed": probe_passed(a["text"], p["keywords"]), "answer": a["text"]}
                            for p, a in zip(probes, probe_answers)}
        print(f"✅ {side}: probes passed {sum(v['passed'] for v in result['probes'].values())}/{len(probes)}")
    result["buckets"] = bucket_stats(samples, ppl_rows)
    return result, samples


# ---------------------------------------------------------------- EvalScope

def run_evalscope(cfg, endpoint, model_name, work_dir):
    """EvalScope against the endpoint: the shipped custom QA/MCQ data, plus eval.evalscope_datasets when the
    hub is reachable. Returns {dataset: {"primary" (metric name), "score", "num", "subsets": {name: score},
    "metrics": {every metric: score}}}; EvalScope's own files go to work_dir."""
    from evalscope import TaskConfig, run_task
    e = cfg["eval"]
    dataset_args = {name: {**args, "local_path": common.path_in_repo(args["local_path"])}
                    for name, args in e["evalscope_local"].items()}
    datasets = list(dataset_args)
    use_hub = e["evalscope_hub"]
    if use_hub == "auto":
        use_hub = common.tcp_reachable(MODELSCOPE_HOST, 443)
    if use_hub:
        datasets += list(e["evalscope_datasets"])
    else:
        print(f"note: the ModelScope hub is not reachable: EvalScope runs the shipped data only "
              f"({', '.join(datasets)}), not {', '.join(e['evalscope_datasets'])}")
    generation = {"max_tokens": e["max_new_tokens"], "temperature": 0.0 if e["greedy"] else e["temperature"]}
    if not e["greedy"]:
        generation["top_p"] = e["top_p"]
    task = TaskConfig(model=model_name, api_url=endpoint, api_key=cfg["deploy"]["api_key"] or "EMPTY",
                      eval_type="openai_api", datasets=datasets, dataset_args=dataset_args,
                      generation_config=generation, eval_batch_size=e["concurrency"], limit=e["evalscope_limit"],
                      work_dir=work_dir, no_timestamp=True, seed=cfg["training"]["seed"])
    reports = run_task(task_cfg=task)
    out = {}
    for name, report in reports.items():
        primary = next((m for m in report.metrics if m.identity == report.primary_metric_identity), report.metrics[0])
        out[name] = {"primary": primary.name, "score": primary.score, "num": primary.num,
                     "subsets": {s.name: s.score for c in primary.categories for s in c.subsets},
                     "metrics": {m.name: m.score for m in report.metrics}}
    return out


# ---------------------------------------------------------------- report

def score_text(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_rows(report):
    sides = report["sides"]
    rows = [("Perplexity", {k: score_text(v["ppl"]) for k, v in sides.items()}),
            ("Usability Rate", {k: score_text(v["usability"]) for k, v in sides.items()}),
            ("JSON validity", {k: score_text(v["json_validity"]) for k, v in sides.items()})]
    if all("probes" in v for v in sides.values()):
        rows.append(("Probes passed", {k: f"{sum(p['passed'] for p in v['probes'].values())}/{len(v['probes'])}"
                                       for k, v in sides.items()}))
    return rows


def print_summary(report, gate_results):
    names = list(report["sides"])
    print("\n" + "=" * 60 + "\n📋 EVALUATION SUMMARY\n" + "=" * 60)
    print(f"{'':<18}" + "".join(f"{n:>12}" for n in names))
    for label, values in summary_rows(report):
        print(f"{label:<18}" + "".join(f"{values[n]:>12}" for n in names))
    if report.get("probe_regressions"):
        print(f"⚠️  forgetting-probe regressions: {', '.join(report['probe_regressions'])}")
    for name, scores in (report.get("evalscope") or {}).items():
        for side, v in scores.items():
            print(f"EvalScope {name} ({side}): {v['primary']} = {score_text(v['score'])} over {v['num']} samples")
    for gate, passed, detail in gate_results:
        print(f"{'✅' if passed else '❌'} gate {gate}: {detail}")


def write_markdown(report, gate_results, path):
    names = list(report["sides"])
    lines = [f"# Evaluation: {report['run']}", "",
             f"Adapter: `{report['adapter']}`; generation: "
             + ", ".join(f"{n} {report['backend'][n] or 'in process'}" for n in names) + f"; data: `{report['data']}`; "
             f"greedy decoding: {report['config']['eval']['greedy']}; max_new_tokens: "
             f"{report['config']['eval']['max_new_tokens']}.", "",
             "| Metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values[n] for n in names) + " |" for label, values in summary_rows(report)]
    for kind in ("tags", "sources"):
        lines += ["", f"## Per {kind[:-1]}", "",
                  "| " + kind[:-1] + " | " + " | ".join(f"{n} PPL | {n} usability | {n} JSON" for n in names) + " |",
                  "|---|" + "---|" * (3 * len(names))]
        keys = sorted({k for n in names for k in report["sides"][n]["buckets"][kind]})
        for key in keys:
            cells = []
            for n in names:
                b = report["sides"][n]["buckets"][kind].get(key, {})
                cells += [score_text(b.get("ppl")), score_text(b.get("usability")), score_text(b.get("json_validity"))]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if all("probes" in report["sides"][n] for n in names):
        lines += ["", "## Forgetting probes", "", "| probe | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for probe in report["sides"][names[0]]["probes"]:
            lines.append(f"| {probe} | " + " | ".join("pass" if report["sides"][n]["probes"][probe]["passed"]
                                                       else "FAIL" for n in names) + " |")
        regressions = ", ".join(report.get("probe_regressions") or []) or "none"
        lines += ["", f"Regressions (base passes, tuned fails): {regressions}"]
    if report.get("evalscope"):
        lines += ["", "## EvalScope", ""]
        lines += ["| benchmark | side | primary metric | score | samples | per subset |", "|---|---|---|---|---|---|"]
        for name, scores in report["evalscope"].items():
            for side, v in scores.items():
                subsets = ", ".join(f"{s} {score_text(x)}" for s, x in v["subsets"].items())
                lines.append(f"| {name} | {side} | `{v['primary']}` | {score_text(v['score'])} | {v['num']} "
                             f"| {subsets} |")
        lines += ["", "All EvalScope metrics are in eval.json; its own reports under `evalscope/<side>/`."]
    if gate_results:
        lines += ["", "## Gates", ""] + [f"- {'pass' if ok else 'FAIL'} {g}: {d}" for g, ok, d in gate_results]
    lines += ["", "Usability reasons per answer: `eval_samples.jsonl`. Chart: `eval_tags.png`.", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def plot_tags(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["sides"])
    tags = sorted({t for n in names for t in report["sides"][n]["buckets"]["tags"]})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(tags) + 4), 4))
    width = 0.8 / len(names)
    for ax, metric, title in ((axes[0], "usability", "Usability rate by tag"), (axes[1], "ppl", "Perplexity by tag")):
        for k, n in enumerate(names):
            values = [report["sides"][n]["buckets"]["tags"].get(t, {}).get(metric) or 0 for t in tags]
            ax.bar([i + k * width for i in range(len(tags))], values, width, label=n)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tags))], tags, rotation=30)
        ax.set_title(title)
        ax.legend()
    axes[0].set_ylim(0, 1.05)
    axes[1].set_yscale("log")  # one hard bucket (PPL in the hundreds) would flatten the others
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_label(adapter, cfg):
    """The report folder's name: the adapter's run (<run>-checkpoint-N for a checkpoint), else
    training.run_name or base-<model> for the base alone."""
    if adapter is None:
        return cfg["training"]["run_name"] or "base-" + common.model_slug(cfg)
    return common.run_of_adapter(adapter)[1]


# ---------------------------------------------------------------- steps of main()

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="adapter folder: outputs/<run>[/adapter | /adapter_last | "
                                          "/checkpoints/checkpoint-N] (default: the newest outputs/<run>/adapter)")
    parser.add_argument("--base-only", action="store_true", help="evaluate the untuned base model only")
    parser.add_argument("--tuned-only", action="store_true", help="evaluate the tuned model only (no base column; "
                                                                  "gates comparing with the base then fail)")
    parser.add_argument("--data", default="validation",
                        help="validation split: 'validation' (data.processed_dir) or a .jsonl / save_to_disk path")
    parser.add_argument("--endpoint", help="OpenAI-compatible …/v1 URL serving the tuned model "
                                           "(e.g. from `deploy.py serve`)")
    parser.add_argument("--endpoint-model", help="`model` to request (default eval.endpoint_model, "
                                                 "else deploy.served_model_name)")
    parser.add_argument("--base-endpoint", help="…/v1 URL serving the base model (default: the base in process)")
    parser.add_argument("--base-endpoint-model", help="`model` for --base-endpoint (default: as --endpoint-model)")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity (then no model is loaded "
                                                              "when every side uses an endpoint)")
    parser.add_argument("--no-probes", action="store_true", help="skip the forgetting probes")
    parser.add_argument("--evalscope", action="store_true", help="also run EvalScope against --endpoint")
    parser.add_argument("--report-dir", help="where eval.* go (default output.reports_dir/<run>)")
    config.add_config_args(parser)
    args = parser.parse_args()
    if args.base_only and args.tuned_only:
        parser.error("--base-only and --tuned-only exclude each other")
    return args, config.resolve(args, parser)


def check_request(args, cfg):
    """Every check that needs no model: known gates, the adapter, reachable endpoints. Returns the adapter."""
    unknown = sorted(set(cfg["eval"]["gates"]) - set(config.CONFIG["eval"]["gates"]))
    if unknown:
        raise common.UserError(f"unknown gate {', '.join(unknown)}; "
                               f"eval.gates has {', '.join(config.CONFIG['eval']['gates'])}")
    adapter = None if args.base_only else common.resolve_adapter(cfg, args.adapter)
    if args.evalscope and not args.endpoint:
        raise common.UserError("--evalscope runs against an endpoint: start one (`python deploy.py serve`) and pass "
                               "--endpoint URL")
    for url in (args.endpoint, args.base_endpoint):
        if url:
            require_server(url)
    return adapter


def plan_sides(args, cfg):
    """(sides, endpoint URL or None per side, `model` to request per side)."""
    endpoint_model = args.endpoint_model or cfg["eval"]["endpoint_model"] or cfg["deploy"]["served_model_name"]
    sides = ["base"] if args.base_only else ["tuned"] if args.tuned_only else list(SIDES)
    endpoints = {"tuned": args.endpoint, "base": args.base_endpoint if not args.base_only else args.endpoint}
    models = {"tuned": endpoint_model, "base": args.base_endpoint_model or endpoint_model}
    return sides, endpoints, models


def generation_rows(rows, cfg, seed):
    """The rows answered per side: those with an assistant turn, eval.max_samples of them drawn with the seed."""
    usable = [r for r in rows if r["prompt"]]
    if len(usable) < len(rows):
        print(f"note: {len(rows) - len(usable)} of {len(rows)} rows have no assistant turn to answer: perplexity only")
    n = cfg["eval"]["max_samples"]
    if n is None or n >= len(usable):
        return usable
    return [usable[i] for i in sorted(random.Random(seed).sample(range(len(usable)), n))]


def load_eval_model(cfg, adapter, need_model):
    """(model or None, tokenizer): one copy of the weights; the base side switches the adapter off."""
    if not need_model:
        return None, common.load_tokenizer(cfg)
    model, tokenizer = common.load_model(cfg, adapter=adapter)
    tokenizer.padding_side = "left"
    return model, tokenizer


def evaluate_sides(report, sides, endpoints, models, cfg, rows, gen_rows, probes, model, tokenizer, do_ppl):
    """Each side's result into report["sides"] (+ probe regressions); returns every generated sample."""
    all_samples = []
    for side in sides:
        generate = make_generator(cfg, model, tokenizer, endpoints[side], models[side])
        with common.answering_as(model, side):
            result, samples = evaluate_side(side, cfg, rows, gen_rows, probes, model, tokenizer, generate, do_ppl)
        report["sides"][side] = result
        all_samples += samples
    if probes and len(sides) == 2:
        base, tuned = report["sides"]["base"]["probes"], report["sides"]["tuned"]["probes"]
        report["probe_regressions"] = [p for p in base if base[p]["passed"] and not tuned[p]["passed"]]
    return all_samples


def add_evalscope(report, sides, endpoints, models, cfg, report_dir):
    report["evalscope"] = {}
    for side in sides:
        if endpoints[side]:
            scores = run_evalscope(cfg, endpoints[side], models[side], os.path.join(report_dir, "evalscope", side))
            for dataset, metrics in scores.items():
                report["evalscope"].setdefault(dataset, {})[side] = metrics


def write_reports(report, gate_results, all_samples, report_dir):
    with open(os.path.join(report_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2, default=str)
    common.write_jsonl(os.path.join(report_dir, "eval_samples.jsonl"), all_samples)
    write_markdown(report, gate_results, os.path.join(report_dir, "eval.md"))
    plot_tags(report, os.path.join(report_dir, "eval_tags.png"))
    print_summary(report, gate_results)
    print(f"\n📝 Report: {report_dir}/eval.md (+ eval.json, eval_tags.png, eval_samples.jsonl)")


# ---------------------------------------------------------------- main

@common.exits_on_user_error
def main():
    args, cfg = parse_args()

    # ---- seed, then every check before any model is loaded
    seed = cfg["training"]["seed"]
    random.seed(seed)
    adapter = check_request(args, cfg)
    common.import_unsloth_first()  # on a GPU: Unsloth patches transformers/PEFT only if imported before them
    rows = load_eval_rows(cfg, args.data)
    probes = None if args.no_probes else load_probes(cfg)
    gen_rows = generation_rows(rows, cfg, seed)
    sides, endpoints, models = plan_sides(args, cfg)
    label = report_label(adapter, cfg)
    report_dir = args.report_dir or common.report_dir(cfg, label)
    os.makedirs(report_dir, exist_ok=True)

    print("=" * 60 + "\n🔍 OBJECTIVE MODEL EVALUATION\n" + "=" * 60)
    print(f"📊 Model: {cfg['model']['name']} + adapter {adapter or '(none: base only)'}")
    print(f"📁 Validation data: {args.data} ({len(rows)} rows; {len(gen_rows)} answered per side)")
    print(f"⚙️  Generation: {', '.join(f'{s}: ' + (endpoints[s] or 'in process') for s in sides)}")

    # ---- load once (perplexity, or a side answered in process); the base is the adapter switched off
    need_model = not args.no_ppl or any(not endpoints[s] for s in sides)
    model, tokenizer = load_eval_model(cfg, adapter, need_model)

    # ---- each side: perplexity, answers, probes; then EvalScope against the endpoints
    report = {"run": label, "adapter": adapter, "data": args.data, "backend": endpoints, "sides": {},
              "rows": len(rows), "rows_without_assistant": sum(1 for r in rows if not r["prompt"]),
              "git_sha": common.git_sha(), "versions": common.package_versions(),
              "config": config.masked(cfg, None)}  # no secrets in files
    all_samples = evaluate_sides(report, sides, endpoints, models, cfg, rows, gen_rows, probes, model, tokenizer,
                                 do_ppl=not args.no_ppl)
    if args.evalscope:
        del model  # EvalScope talks to the server; free this process's copy first
        add_evalscope(report, sides, endpoints, models, cfg, report_dir)

    # ---- gates, report files, exit code
    gate_results = check_gates(report, cfg["eval"]["gates"])
    report["gates"] = [{"gate": g, "passed": ok, "detail": d} for g, ok, d in gate_results]
    write_reports(report, gate_results, all_samples, report_dir)
    failed = [g for g, ok, _ in gate_results if not ok]
    if failed:
        sys.exit(f"❌ gates failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
