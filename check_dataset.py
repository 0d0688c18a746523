"""Check chat data before training: structure, content, duplicates, token lengths and the loss mask.

Reads the built splits (`dataset/processed/train` and `validation`, the `save_to_disk` folders that
build_datasets.py writes) by default, or any JSONL file / `save_to_disk` folder given on the command
line. Rows look like {"messages": [...], "source": ..., "tags": [...], "tools": optional}.
Every row is rendered with the real chat template and tokenized with `common.tokenize_conversation`
(the same renderer and mask train.py uses), and the mask is audited token by token.

    python check_dataset.py --profile demo                      # the built splits, demo tokenizer
    python check_dataset.py data.jsonl --show 3                 # + 3 samples with the loss tokens marked
    python check_dataset.py data.jsonl --show 1 --boundaries --no-color   # ⟦loss⟧ and │ between tokens
    python check_dataset.py data.jsonl --set model.max_seq_length=1024 --json-report reports/check.json

Errors: parse, schema, roles (common.conversation_problems, the build's rule too: system only first;
user/assistant alternate; tool only after an assistant tool_calls turn, ids matching, every call answered
before the next turn; last turn assistant, an answer or tool calls), empty, special_tokens (template
tokens such as <|im_end|>, <think>, <tool_call> written into content), json_only (rows tagged json-only whose
final answer is not JSON), leak (a row also in another file: train vs validation), render, mask (each
trained assistant turn ends in a loss-carrying <|im_end|>; no system/user/tool token carries loss).
Warnings: duplicate (repeats inside a file: the resample mix makes them on purpose), truncation (the row's
last trained <|im_end|> lies beyond model.max_seq_length; an error with sft.overlong_policy=fail),
reasoning (reasoning_content: not rendered by the Qwen3-2507 template), tools (undeclared function).

Writes findings (`file:line: error [class] reason (id ROW_ID)`: the id build_datasets.py gave the row, which
names its raw source row), length and loss statistics and a summary table
to stdout; `--json-report PATH` writes all of it as JSON. Exit code 1 when any error was found
(warnings fail only with --strict), 2 for usage errors (unknown option or config key, missing file,
a model that cannot be loaded).
"""

import argparse
import hashlib
import json
import os
import sys

import jinja2

import common
import config

ROLES = ("system", "user", "assistant", "tool")
# class -> (severity, what it means). "truncation" is an error only with sft.overlong_policy="fail":
# otherwise train.py drops or truncates those rows and says how many. Repeats inside one built split are
# the "resample" mix working as asked (build_datasets.py counts them as epochs), so only a warning.
CLASSES = {
    "parse": ("error", "line is not a JSON object"),
    "schema": ("error", "missing field or wrong type"),
    "roles": ("error", "turn order: system first, user/assistant alternate, tool answers tool_calls, "
                       "ends with assistant (common.conversation_problems)"),
    "empty": ("error", "empty content"),
    "special_tokens": ("error", "template token written into content"),
    "json_only": ("error", "json-only sample whose answer is not valid JSON"),
    "leak": ("error", "same conversation as a row of another file (e.g. train and validation)"),
    "duplicate": ("warning", "same conversation as an earlier row of the file (resampling repeats rows on purpose)"),
    "render": ("error", "chat template could not render the row"),
    "mask": ("error", "loss mask wrong: untrained <|im_end|> or loss outside assistant turns"),
    "truncation": ("warning", "max_seq_length cuts the row before its last trained <|im_end|>"),
    "reasoning": ("warning", "reasoning_content is not rendered by the template: never trained"),
    "tools": ("warning", "tool call names a function missing from tools"),
}
# Rows with these can't be rendered or masked reliably: they get no token statistics.
UNRENDERABLE = {"parse", "schema", "roles", "special_tokens"}
PLAIN_OPEN, PLAIN_CLOSE, PLAIN_SEP = "⟦", "⟧", "│"
# 256-colour backgrounds; alternating shades show the token boundaries without extra characters.
LOSS_BG = ("\033[30;48;5;114m", "\033[30;48;5;151m")
PROMPT_BG = ("\033[48;5;236m", "\033[48;5;239m")
RESET = "\033[0m"


# ---------------------------------------------------------------- reading

def expand_path(path):
    """A JSONL file, a `save_to_disk` folder, or a DatasetDict folder (one entry per split)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not os.path.isdir(path):
        return [path]
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
            return [os.path.join(path, split) for split in json.load(f)["splits"]]
    if os.path.exists(os.path.join(path, "state.json")):
        return [path]
    splits = [os.path.join(path, s) for s in ("train", "validation") if os.path.isdir(os.path.join(path, s))]
    if splits:
        return splits
    raise FileNotFoundError(f"{path}: not a JSONL file or a save_to_disk folder (no state.json)")


def default_paths(cfg):
    """The built splits: Arrow folders, else the JSONL exports."""
    processed = common.path_in_repo(cfg["data"]["processed_dir"])
    arrow = [os.path.join(processed, s) for s in ("train", "validation")]
    if all(os.path.exists(os.path.join(p, "state.json")) for p in arrow):
        return arrow
    jsonl = [os.path.join(processed, f) for f in ("train.jsonl", "val.jsonl")]
    if all(os.path.isfile(p) for p in jsonl):
        return jsonl
    raise FileNotFoundError(f"no built dataset in {processed}: run `python build_datasets.py` first, "
                            f"or pass a JSONL file to check")


def display_path(path):
    """Relative to the working directory when inside it, so findings read `dataset/processed/train:17`."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def open_rows(cfg, path, findings):
    """(row count, iterator of (line, row)). JSONL is read line by line (common.load_split would stop at the
    first bad line); lines that don't parse become `parse` findings."""
    if os.path.isdir(path):
        ds = common.load_split(cfg, os.path.abspath(path))  # a path as given here is relative to the cwd
        return len(ds), enumerate(ds, 1)
    with open(path, "rb") as f:
        total = sum(1 for line in f if line.strip())  # tqdm's total; read_jsonl skips blank lines the same way

    def on_error(line, reason, raw):
        findings.append(finding(path, line, "parse", reason))
    return total, common.read_jsonl(path, on_error=on_error)


def finding(path, line, cls, reason, severity=None, row_id=None):
    return {"file": path, "line": line, "id": row_id, "class": cls, "severity": severity or CLASSES[cls][0],
            "reason": reason}


# ---------------------------------------------------------------- structure and content

def decode_json_field(value, what):
    """Fields the Arrow layout stores as JSON strings (tool_calls, tools) -> Python; (value, problem)."""
    if not isinstance(value, str):
        return value, None
    try:
        return json.loads(value), None
    except ValueError as err:
        return None, f"{what} is a string but not valid JSON ({err})"


def check_schema(row):
    """Problems that stop a row from being read as a conversation: [(class, reason)]. Accepts both built
    layouts (Arrow: tool_calls/tools as JSON strings, null fields; JSONL: plain lists)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else "empty" if isinstance(messages, list) else type(messages).__name__
        return [("schema", f"'messages' must be a non-empty list ({got}; row fields: {', '.join(sorted(row))})")]
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            out.append(("schema", f"message {n} is a {type(m).__name__}, not an object"))
            continue
        role = m.get("role")
        if role not in ROLES:
            hint = " (ShareGPT rows: convert them with build_datasets.py)" if "from" in m else ""
            out.append(("schema", f"message {n}: role {role!r} is not one of {', '.join(ROLES)}{hint}"))
        for key in ("content", "reasoning_content", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                out.append(("schema", f"message {n} ({role}): {key} must be a string, got {type(m[key]).__name__}"))
        calls, problem = decode_json_field(m.get("tool_calls"), f"message {n}: tool_calls")
        if problem:
            out.append(("schema", problem))
        elif calls and role != "assistant":
            out.append(("schema", f"message {n} ({role}): only assistant turns may carry tool_calls"))
        elif calls is not None and not isinstance(calls, list):
            out.append(("schema", f"message {n}: tool_calls must be a list, got {type(calls).__name__}"))
        elif calls:
            out += [("schema", f"message {n}: {r}") for r in map(check_call, calls) if r]
    tools, problem = decode_json_field(row.get("tools"), "'tools'")
    if problem or (tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools))):
        out.append(("schema", problem or f"'tools' must be a list of function specs, got {type(tools).__name__}"))
    tags = row.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        out.append(("schema", f"'tags' must be a list of strings, got {tags!r}"))
    return out


def check_call(call):
    """Why one tool call of a built row is malformed, or None: common.parse_tool_call, the rule the build uses."""
    return common.parse_tool_call(call)[1]


def check_roles(messages):
    """Turn order problems, all of them: [(class, reason)]. The rule is common.conversation_problems, the one
    build_datasets.py rejects rows by."""
    return [("roles", reason) for reason in common.conversation_problems(messages)]


def check_content(row, messages, tools, reasoning_mode):
    """Empty contents, template tokens inside content, json-only answers, reasoning and tool names.
    `messages`/`tools` come from common.row_to_chat; reasoning_content is looked up in the raw row."""
    out = []
    declared = {(t.get("function") or t).get("name") for t in tools or []}
    for n, m in enumerate(messages, 1):
        content, role = m["content"], m["role"]
        if not content.strip() and not (role == "assistant" and m.get("tool_calls")):
            out.append(("empty", f"message {n} ({role}) has empty content"))
        if role == "assistant" and reasoning_mode == "inline":
            content = strip_inline_think(content)
        # Tool-call arguments and tools are rendered with tojson, which leaves < and > as they are.
        texts = [content] + [json.dumps(c["function"], ensure_ascii=False) for c in m.get("tool_calls") or []]
        found = [tok for tok in common.SPECIAL_MARKERS if any(tok in text for text in texts)]
        if found:
            out.append(("special_tokens", f"message {n} ({role}) contains {', '.join(found)}: the chat template "
                                          f"writes these itself"))
        for call in m.get("tool_calls") or []:
            if tools and call["function"]["name"] not in declared:
                out.append(("tools", f"message {n}: calls {call['function']['name']!r}, not among the row's tools "
                                     f"({', '.join(sorted(map(str, declared)))})"))
    found = [tok for tok in (common.IM_START, common.IM_END, "<|endoftext|>") if tok in json.dumps(tools or [])]
    if found:
        out.append(("special_tokens", f"'tools' contains {', '.join(found)}"))
    for n, m in enumerate(row["messages"], 1):
        if m.get("reasoning_content"):
            out.append(("reasoning", f"message {n}: reasoning_content ({len(m['reasoning_content'])} chars) is not "
                                     f"rendered by the chat template (build_datasets.py with "
                                     f"data.reasoning_content=inline writes it into the content)"))
    if "json-only" in (row.get("tags") or []):
        answer = messages[-1]["content"]
        try:
            json.loads(answer)
        except ValueError as err:
            hint = " (a ``` fence around it?)" if answer.lstrip().startswith("```") else ""
            out.append(("json_only", f"json-only sample: final answer is not valid JSON{hint}: {err}"))
    return out


def strip_inline_think(text):
    """With data.reasoning_content=inline, one leading <think>…</think> block is intended content."""
    if text.startswith("<think>") and text.count("<think>") == 1 and text.count("</think>") == 1:
        return text.replace("<think>", "").replace("</think>", "")
    return text


def messages_md5(messages, tools=None):
    """md5 of the conversation as common.row_to_chat gives it (+ tools, as build_datasets.py dedups)."""
    return hashlib.md5(json.dumps([messages, tools], ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- tokens and the loss mask

def mask_markers(tokenizer):
    """Token ids the audit needs: <|im_start|>, <|im_end|> and each role name's tokens."""
    return {"im_start": tokenizer.convert_tokens_to_ids(common.IM_START),
            "im_end": tokenizer.convert_tokens_to_ids(common.IM_END),
            "roles": {r: tokenizer.encode(r, add_special_tokens=False) for r in ROLES}}


def turn_blocks(ids, markers):
    """Split token ids at <|im_start|>: [(role, start, header_end, im_end index or None, end)].
    The role is read from the tokens after <|im_start|> (tool results render as 'user')."""
    starts = [i for i, t in enumerate(ids) if t == markers["im_start"]]
    blocks = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(ids)
        role, header_end = None, start + 1
        for name, seq in markers["roles"].items():
            if ids[start + 1:start + 1 + len(seq)] == seq:
                role, header_end = name, start + 1 + len(seq)
        im_end = next((i for i in range(header_end, end) if ids[i] == markers["im_end"]), None)
        blocks.append((role, start, header_end, im_end, end))
    return blocks


def audit_mask(enc, flags, markers):
    """Check one row's labels token by token, independently of how they were made.
    Returns (problems [(class, reason)], index one past the last trained <|im_end|> or None)."""
    ids, labels = enc["input_ids"], enc["labels"]
    blocks = turn_blocks(ids, markers)
    out, ends = [], []
    first = blocks[0][1] if blocks else len(ids)
    if any(lab != -100 for lab in labels[:first]):
        out.append(("mask", "tokens before the first <|im_start|> carry loss"))
    assistant = [b for b in blocks if b[0] == "assistant"]
    if len(assistant) != len(flags):
        out.append(("mask", f"template rendered {len(assistant)} assistant turns for {len(flags)} assistant messages"))
    turn = 0
    for role, start, header_end, im_end, end in blocks:
        loss = [i for i in range(start, end) if labels[i] != -100]
        if role != "assistant":
            if loss:
                out.append(("mask", f"{len(loss)} {role or 'unknown-role'} tokens carry loss "
                                    f"(tokens {loss[0]}-{loss[-1]})"))
            continue
        trained = flags[turn] if turn < len(flags) else False
        turn += 1
        if any(i < header_end for i in loss):
            out.append(("mask", f"assistant turn {turn}: the <|im_start|>assistant header carries loss"))
        if trained and (im_end is None or labels[im_end] == -100):
            out.append(("mask", f"assistant turn {turn} does not end in a loss-carrying <|im_end|>"))
        elif not trained and loss:
            out.append(("mask", f"assistant turn {turn} carries loss but sft settings exclude it"))
        if trained and im_end is not None:
            ends.append(im_end + 1)
    if enc["turn_ends"] != ends and not out:
        out.append(("mask", f"tokenize_conversation turn_ends {enc['turn_ends']} != audited {ends}"))
    last_end = ends[-1] if ends else None
    if not any(lab != -100 for lab in labels):
        out.append(("mask", "no token carries loss"))
    return out, last_end


def token_checks(tokenizer, markers, messages, tools, cfg):
    """(enc or None, [(class, reason, severity)]) for one structurally valid row."""
    sft, max_len = cfg["sft"], cfg["model"]["max_seq_length"]
    try:
        enc = common.tokenize_for_training(tokenizer, messages, tools, sft)
    except (common.DataError, jinja2.TemplateError) as err:
        return None, [("render", f"{type(err).__name__}: {err}", None)]
    out = []
    if sft["assistant_only_loss"]:
        flags = common.trained_turns(messages, sft["train_on_turns"], sft["train_tool_calls"])
        problems, last_end = audit_mask(enc, flags, markers)
        out += [(cls, reason, None) for cls, reason in problems]
        if last_end is not None and last_end > max_len:
            severity = "error" if sft["overlong_policy"] == "fail" else "warning"
            out.append(("truncation", f"{len(enc['input_ids'])} tokens: max_seq_length {max_len} cuts it before "
                                      f"the last trained <|im_end|> (token {last_end - 1}); train.py will "
                                      f"{sft['overlong_policy']} it (sft.overlong_policy)", severity))
    elif len(enc["input_ids"]) > max_len:
        out.append(("truncation", f"{len(enc['input_ids'])} tokens > max_seq_length {max_len}",
                    "error" if sft["overlong_policy"] == "fail" else "warning"))
    return enc, out


def length_stats(lengths, loss_tokens, max_len):
    import numpy as np
    if not lengths:
        return {"rows_tokenized": 0}
    arr = np.asarray(lengths)
    return {"rows_tokenized": len(lengths), "tokens": int(arr.sum()), "min": int(arr.min()),
            "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max()),
            "over_max_seq_length": int((arr > max_len).sum()),
            "share_over_max_seq_length": float((arr > max_len).mean()),
            "loss_tokens": int(loss_tokens), "loss_share": float(loss_tokens / arr.sum())}


# ---------------------------------------------------------------- one pass over the data

def check_paths(paths, cfg, tokenizer, show=0):
    """Check every row of every path. Returns the report dict; the first `show` rows are kept for --show."""
    from tqdm import tqdm
    markers = mask_markers(tokenizer)
    findings, seen, shown, per_file = [], {}, [], {}
    for path in paths:
        file_findings = []
        total, rows = open_rows(cfg, path, file_findings)
        lengths, loss_tokens, n_rows = [], 0, 0
        # progress on stderr: stdout holds only the findings, which a user may pipe or grep
        for line, row in tqdm(rows, total=total, desc=os.path.basename(path.rstrip("/")), unit="row", file=sys.stderr,
                              leave=False):
            n_rows += 1
            messages, tools, problems = row_problems(row, cfg)
            if messages is not None:
                digest = messages_md5(messages, tools)
                if digest in seen:  # seen first in this file: a duplicate; in another (train vs validation): a leak
                    first = seen[digest]
                    problems.append(("duplicate" if first[0] == path else "leak",
                                     f"same messages as {first[0]}:{first[1]}", None))
                else:
                    seen[digest] = (path, line)
            if messages is not None and not any(p[0] in UNRENDERABLE for p in problems):
                enc, more = token_checks(tokenizer, markers, messages, tools, cfg)
                problems += more
                if enc is not None:
                    lengths.append(len(enc["input_ids"]))
                    loss_tokens += sum(lab != -100 for lab in enc["labels"])
                    if len(shown) < show:
                        shown.append({"file": path, "line": line, "id": row_id(row), "messages": messages,
                                      "tools": tools, "enc": enc})
            file_findings += [finding(path, line, cls, reason, sev, row_id(row)) for cls, reason, sev in problems]
        file_findings.sort(key=lambda f: f["line"])
        findings += file_findings
        per_file[path] = {"rows": n_rows + sum(f["class"] == "parse" for f in file_findings),
                          **length_stats(lengths, loss_tokens, cfg["model"]["max_seq_length"])}
    return build_report(paths, cfg, findings, per_file), shown


def row_id(row):
    """The row's id (build_datasets.py writes one per row: the raw row it came from), or None."""
    value = row.get("id")
    return None if value is None else str(value)


def row_problems(row, cfg):
    """(messages, tools, [(class, reason, severity or None)]) of one parsed row; messages is None when the
    row can't be read as a conversation."""
    problems = check_schema(row)
    if problems:
        return None, None, [(cls, reason, None) for cls, reason in problems]
    try:
        messages, tools = common.row_to_chat(row)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return None, None, [("schema", f"common.row_to_chat cannot read it: {type(err).__name__}: {err}", None)]
    problems = check_roles(messages) + check_content(row, messages, tools, cfg["data"]["reasoning_content"])
    return messages, tools, [(cls, reason, None) for cls, reason in problems]


def build_report(paths, cfg, findings, per_file):
    counts = {cls: {"severity": sev, "count": 0, "meaning": meaning} for cls, (sev, meaning) in CLASSES.items()}
    for f in findings:
        counts[f["class"]]["count"] += 1
        counts[f["class"]]["severity"] = f["severity"]
    errors = sum(f["severity"] == "error" for f in findings)
    total_lengths = {k: sum(s.get(k, 0) for s in per_file.values()) for k in ("tokens", "loss_tokens")}
    return {"files": list(paths), "rows": sum(s["rows"] for s in per_file.values()),
            "errors": errors, "warnings": len(findings) - errors, "counts": counts, "per_file": per_file,
            "loss_share": total_lengths["loss_tokens"] / total_lengths["tokens"] if total_lengths["tokens"] else None,
            "max_seq_length": cfg["model"]["max_seq_length"],
            "note": (f"train.py passes model.max_seq_length={cfg['model']['max_seq_length']} to SFTConfig.max_length "
                     f"(TRL's own default is 1024); lengths above are checked against it"),
            "findings": findings, "config": config.masked(cfg, None)}  # no secrets in files


# ---------------------------------------------------------------- printing

def token_pieces(text, offsets, labels):
    """[(text, carries_loss)] per token, from character offsets; a character split over several byte-level
    tokens is printed once, with its first token."""
    pieces, cursor = [], 0
    for (a, b), lab in zip(offsets, labels):
        a = max(a, cursor)
        if b <= a:
            continue
        if a > cursor:
            pieces.append((text[cursor:a], False))
        pieces.append((text[a:b], lab != -100))
        cursor = b
    if cursor < len(text):
        pieces.append((text[cursor:], False))
    return pieces


def highlight(pieces, color, boundaries):
    """Loss-carrying tokens between ⟦ ⟧ (or on a green background); │ (or shades) between tokens."""
    out, inside = [], False
    for k, (text, loss) in enumerate(pieces):
        if color:  # a newline has no visible background: a trained one is drawn as ↵ first
            bg = (LOSS_BG if loss else PROMPT_BG)[k % 2]
            parts = text.replace("\n", "↵\n").split("\n") if loss else text.split("\n")
            out.append("\n".join(bg + part + RESET if part else part for part in parts))
            continue
        if loss != inside:
            out.append(PLAIN_OPEN if loss else PLAIN_CLOSE)
            inside = loss
        elif boundaries and k:
            out.append(PLAIN_SEP)
        out.append(text)
    if inside:
        out.append(PLAIN_CLOSE)
    return "".join(out)


def show_samples(tokenizer, shown, color, boundaries):
    legend = ("green = carries loss (↵ a trained newline), grey = no loss, alternating shades = token boundaries"
              if color else
              f"{PLAIN_OPEN}…{PLAIN_CLOSE} = carries loss" + (f", {PLAIN_SEP} = token boundary" * boundaries))
    print(f"\nSamples rendered with the chat template ({legend}):")
    for k, s in enumerate(shown, 1):
        text = common.render(tokenizer, s["messages"], s["tools"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != s["enc"]["input_ids"]:
            raise RuntimeError(f"{s['file']}:{s['line']}: re-tokenizing for display gave different tokens")
        labels = s["enc"]["labels"]
        n_loss = sum(lab != -100 for lab in labels)
        print(f"\n── sample {k}/{len(shown)} · {s['file']}:{s['line']}" + (f" · id {s['id']}" if s["id"] else "")
              + f" · {len(labels)} tokens, "
              f"{n_loss} carry loss ({n_loss / len(labels):.0%}) ──")
        print(highlight(token_pieces(text, enc["offset_mapping"], labels), color, boundaries))


def print_findings(findings, per_class):
    printed = {}
    for f in findings:
        printed[f["class"]] = printed.get(f["class"], 0) + 1
        if printed[f["class"]] <= per_class:
            print(f"{f['file']}:{f['line']}: {f['severity']} [{f['class']}] {f['reason']}"
                  + (f" (id {f['id']})" if f.get("id") else ""))
    for cls, n in printed.items():
        if n > per_class:
            print(f"... {n - per_class} more [{cls}] findings (all of them: --json-report PATH)")


def print_summary(report):
    print("\nToken lengths (rendered with the chat template):")
    print(f"  {'file':<40} {'rows':>6} {'tokenized':>9} {'min':>6} {'p50':>7} {'p95':>7} {'max':>6} "
          f"{'>max_len':>8} {'loss':>6}")
    for path, s in report["per_file"].items():
        name = path if len(path) <= 40 else "…" + path[-39:]
        line = f"  {name:<40} {s['rows']:>6} {s['rows_tokenized']:>9}"
        if s["rows_tokenized"]:
            line += (f" {s['min']:>6} {s['p50']:>7.0f} {s['p95']:>7.0f} {s['max']:>6} "
                     f"{s['share_over_max_seq_length']:>8.1%} {s['loss_share']:>6.1%}")
        print(line)
    if report["loss_share"] is not None:
        print(f"  share of tokens that carry loss: {report['loss_share']:.1%}")
    print(f"  {report['note']}")
    print(f"\nSummary ({len(report['files'])} file(s), {report['rows']} rows):")
    print(f"  {'class':<15} {'severity':<8} {'count':>6}  meaning")
    for cls, c in report["counts"].items():
        print(f"  {cls:<15} {c['severity']:<8} {c['count']:>6}  {c['meaning']}")


# ---------------------------------------------------------------- main

def load_checked_tokenizer(cfg):
    """The configured tokenizer (Qwen3's rebuilt offline for a Qwen3 out of reach), or exit 2 at once when the
    model can't be had (from_pretrained alone would retry the hub for ~50 s first)."""
    name = cfg["model"]["name"]
    tokenizer, reason = common.load_stats_tokenizer(cfg)  # a Qwen3 out of reach: its tokenizer rebuilt offline
    if reason:
        print(f"error: cannot load the tokenizer of {name!r}: {reason}.\nRun with --profile demo "
              f"(the bundled SmolLM2), or --set model.name=/path/to/local/model", file=sys.stderr)
        sys.exit(2)
    return tokenizer


@common.exits_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="JSONL files or save_to_disk folders (default: the built splits)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N rows rendered with the template, loss-carrying tokens marked")
    parser.add_argument("--boundaries", action="store_true",
                        help=f"with --show: mark every token boundary with {PLAIN_SEP} (colour shows them anyway)")
    parser.add_argument("--no-color", action="store_true",
                        help=f"plain {PLAIN_OPEN}…{PLAIN_CLOSE} markers even on a terminal (also NO_COLOR=1)")
    parser.add_argument("--json-report", metavar="PATH", help="write the findings, statistics and config as JSON")
    parser.add_argument("--max-findings", type=int, default=20, metavar="N", help="printed per class (default 20)")
    parser.add_argument("--strict", action="store_true", help="warnings fail too")
    config.add_config_args(parser)
    args = parser.parse_args()
    cfg = config.resolve(args, parser)

    # 1. inputs exist, before loading anything heavy
    try:
        paths = [p for arg in args.paths for p in expand_path(arg)] if args.paths else default_paths(cfg)
        paths = [display_path(p) for p in paths]
    except FileNotFoundError as err:
        parser.error(str(err))
    # 2. the model's tokenizer with the configured chat template
    tokenizer = load_checked_tokenizer(cfg)
    sft = " ".join(f"{k}={cfg['sft'][k]}" for k in ("assistant_only_loss", "train_on_turns", "train_tool_calls",
                                                      "overlong_policy"))
    print(f"Checking {len(paths)} file(s) with the tokenizer of {cfg['model']['name']}, template "
          f"{cfg['model']['chat_template'] or '(the tokenizer own)'}, "
          f"max_seq_length {cfg['model']['max_seq_length']}, {sft}", flush=True)
    # 3. one pass: structure, content, duplicates, tokens, mask
    report, shown = check_paths(paths, cfg, tokenizer, show=args.show)
    # 4. findings, samples, statistics, summary
    print_findings(report["findings"], args.max_findings)
    if shown:
        color = sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR")
        show_samples(tokenizer, shown, color, args.boundaries)
    print_summary(report)
    failed = report["errors"] > 0 or (args.strict and report["warnings"] > 0)
    report["exit_code"] = 1 if failed else 0
    if args.json_report:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_report)), exist_ok=True)
        with open(args.json_report, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1, default=str)
        print(f"JSON report: {args.json_report}")
    print(f"\n{'FAILED' if failed else 'OK'}: {report['errors']} error(s), {report['warnings']} warning(s) "
          f"in {report['rows']} rows")
    sys.exit(report["exit_code"])


if __name__ == "__main__":
    main()
