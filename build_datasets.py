"""Build the SFT data: raw sources -> cleaned, tagged, deduplicated pools -> weighted mix -> train/validation.

Reads every source in CONFIG["data"]["sources"] from its hub name when reachable (datasets.load_dataset with
explicit data_files), else from its local path (JSONL, JSON, Parquet, CSV/TSV or a save_to_disk folder).
Steps, each printed and counted in the report:
  1. load       one adapter per raw layout (formats below); unreadable rows go to rejects.jsonl
  2. normalize  to {"id", "messages": [...]}; control characters, CRs and trailing whitespace removed; assistant
                answers over data.max_answer_chars cut at their last sentence end, or dropped
                (data.overlong_answer_policy); reasoning_content dropped or inlined; turn order checked by
                common.conversation_problems (the rule check_dataset.py applies too)
  3. tag        source + tags: the source's config tags, the row's own tags, and "json-only" (the answer is
                only a JSON object), "multi-turn", "tools" where found
  4. dedup      md5 of the canonical messages (+ tools) within each pool; eval-overlap check (prompts also in
                data.eval_files: flagged, dropped with --decontaminate); save_to_disk dataset/pools/<name>/
  5. mix        "resample": exact counts per weight, with replacement, total_size defaults to 0.9 x rows;
                "interleave": each pool shuffled, then datasets.interleave_datasets(probabilities,
                all_exhausted_without_replacement) cut at total_size: no row twice; both seeded
  6. dedup      after mixing: a text two sources share keeps only the first source's rows (repeats of one
                row made by resampling are the asked weight and stay; the report counts them as epochs)
  7. split      shuffle, then train/validation with at least data.min_valid rows, by prompt group: prompts
                equal after NFKC, lowercasing and removing whitespace, punctuation and symbols (digits are
                kept: "2+3" and "5+7" are different problems) never land on both sides; validation keeps one
                copy of a row that resampling repeated
  8. export     <processed_dir>/train/ and validation/ (Arrow), train.jsonl, val.jsonl (UTF-8, not
                ASCII-escaped), report.json, report.md, rejects.jsonl (file, line or JSON-array record, reason),
                config.json; written to <processed_dir>.tmp and swapped in at the end. A build that ends with
                no rows or an empty split fails and leaves the previous build alone (<processed_dir>.failed/)
Same seed and inputs -> byte-identical outputs (no timestamps in files; every order is seeded or sorted).
Speed: Arrow/pyarrow column operations, md5 straight from Arrow buffers, one worker per source (data.num_proc,
inputs over 32 MB); bench/bench_build.py builds 1M rows ~2-3x faster than a plain-Python loop (docs/BENCHMARKS.md).

Formats (data.sources.<name>.format): cmath, mawps, emoji, alpaca, sharegpt, messages, columns (described in
formats.py and at the end of --help). Every row keeps an id: its own "id" field, else "<source>:<line>" (JSON array:
"<source>:<record index>"; a source with several files: "<source>:<file>:<line>").
Row layout of every output (Arrow and JSONL): see common.py (row_to_chat, load_split).

Commands:
    python build_datasets.py                       # default sources (offline: the samples in dataset/raw/)
    python build_datasets.py --profile demo        # the same data, with the demo config saved next to it
    python build_datasets.py --strict              # exit 1 if any row was rejected
    python build_datasets.py --decontaminate       # drop rows whose prompt is in data.eval_files
    python build_datasets.py --set data.mix_mode=interleave --set data.sources.emoji.weight=0.4
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm as _tqdm

import common
import config
import formats
from formats import (
    FORMATS,
    MESSAGE_TYPE,
    SCHEMA,
    BuildError,
    RowError,
    append_tag,
    as_lists,
    as_text,
    first_reason,
    has_tag,
    id_field,
    load_input,
    plan_inputs,
    reject,
)

BATCH = 32_768  # rows per vectorized batch: temporaries of a few MB stay cache- and allocator-friendly
PARALLEL_MIN_ROWS = 50_000  # below this, worker start-up (~1 s) costs more than the row-by-row work
PARALLEL_MIN_BYTES = 32 << 20  # local inputs under 32 MB build in ~1 s in one process
IN_WORKER = False
CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x{80}-\x{9f}]"  # C0 except \t \n \r, DEL, C1
NEEDS_CLEAN = CONTROL + r"|\r|[ \t\p{Z}]\n"  # plus trailing whitespace, found on the last character
SPECIAL = r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>"  # would break the template's turn boundaries
PROMPT_NOISE = r"[\s\p{P}\p{S}\p{Z}]+"
# Characters NFKC leaves alone (ASCII, CJK unified ideographs, common CJK punctuation and quotes) or maps to
# characters PROMPT_NOISE removes anyway (full-width punctuation, the ideographic space): rows made only of
# these get the same key without NFKC. Anything else (full-width letters, compatibility forms, combining
# marks, emoji...) goes through NFKC.
KEEPS_NFKC_NOT = (r"[^\x00-\x7f\x{4e00}-\x{9fff}\x{3000}-\x{3002}\x{300a}-\x{3011}\x{2014}\x{2018}\x{2019}"
                  r"\x{201c}\x{201d}\x{ff01}-\x{ff0f}\x{ff1a}-\x{ff20}\x{ff3b}-\x{ff40}\x{ff5b}-\x{ff5e}]")
# Where an over-long answer may be cut: after a CJK 。！？；… or after . ! ? ; followed by a space, a newline or the
# end ("3.5", "e.g.x" and "a.php?x=1" are not ends); closing quotes and brackets right after it stay.
SENTENCE_END = re.compile(r"[。！？；…][\"'”’」』）)\]】]*|[.!?;][\"'”’)\]]*(?=\s|$)")
# Splits a configured benchmark scores: training on them would inflate the scores.
HELD_OUT = {"cmath_test": "EvalScope's `cmath` benchmark scores cmath_test; train on cmath_dev only"}


def tqdm(*args, **kwargs):
    """Progress bars on a terminal; none in logs and captured output (disable=None)."""
    kwargs.setdefault("disable", None)
    return _tqdm(*args, **kwargs)


# ---------------------------------------------------------------- config checks (before any heavy work)

def check_config(cfg):
    """The sources to build (weight > 0), checked; a clear error for anything wrong, before any heavy work."""
    data = cfg["data"]
    try:  # allowed values, source fields and types (config.build_config did it too, unless cfg was edited since)
        config.validate(cfg)
    except config.ConfigError as err:
        raise BuildError(str(err)) from None
    sources = {}
    for name, src in data["sources"].items():
        weight = src.get("weight", 1.0)
        if weight == 0:
            continue
        for f in list(src.get("data_files") or []) + [src.get("local") or ""]:
            base = os.path.basename(str(f)).split(".")[0]
            if base in HELD_OUT:
                raise BuildError(f"data.sources.{name}: refusing {f}: {HELD_OUT[base]}")
        sources[name] = dict(src, weight=float(weight), tags=list(src.get("tags") or []))
    if not sources:
        raise BuildError("No data source has a weight above 0: see data.sources in config.py")
    for path in data["eval_files"]:
        if not os.path.isfile(common.path_in_repo(path)):
            raise BuildError(f"data.eval_files: {path} not found (set --set data.eval_files=[] to skip the check)")
    return sources


# ---------------------------------------------------------------- 1-2. load (formats.py), nested layouts in workers

def adapt_rows_batch(batch, format_name, mode, base_tags):
    """Rows of one batch -> encoded rows + (line, reason, raw) rejects + counts. Runs in a worker too."""
    stats = {"reasoning_dropped": 0, "reasoning_inlined": 0}
    good, bad = [], []
    for line, row in batch:
        try:
            messages, tools, tags = FORMATS[format_name].adapt(row, mode, stats)
            row_id = as_text(row.get("id"), "id")
        except RowError as err:
            bad.append((line, str(err), json.dumps(row, ensure_ascii=False)))
            continue
        merged = list(dict.fromkeys([*base_tags, *tags]))
        good.append({**common.chat_to_row(messages, tools, "", merged, row_id), "_line": line})
    return good, bad, stats


def adapt_rows(rows, format_name, src, cfg, source, label, rejects):
    """The row adapters over all rows; in data.num_proc workers when the pool is big enough to pay off."""
    mode, n = cfg["data"]["reasoning_content"], len(rows)
    chunks = [rows[i:i + BATCH // 10] for i in range(0, n, BATCH // 10)] or [[]]
    workers = cfg["data"]["num_proc"] if n >= PARALLEL_MIN_ROWS and not IN_WORKER else 1
    results = []
    with tqdm(total=n, desc=f"  normalize {source}", unit="rows", leave=False) as bar:
        if workers > 1:
            with mp_context().Pool(workers) as pool:
                for res in pool.imap(_adapt_worker, [(c, format_name, mode, src["tags"]) for c in chunks]):
                    results.append(res)
                    bar.update(len(res[0]) + len(res[1]))
        else:
            for c in chunks:
                results.append(adapt_rows_batch(c, format_name, mode, src["tags"]))
                bar.update(len(c))
    good, stats = [], {"reasoning_dropped": 0, "reasoning_inlined": 0}
    for ok, bad, st in results:
        good += ok
        for line, reason, raw in bad:
            reject(rejects, source, label, line, reason, raw)
        for k in stats:
            stats[k] += st[k]
    table = pa.Table.from_pylist(good, schema=SCHEMA.append(pa.field("_line", pa.int64())))
    return table, stats


def mp_context():
    """fork where the OS has it (workers start in ~10 ms and share what is loaded), else spawn."""
    import multiprocessing
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _adapt_worker(args):
    return adapt_rows_batch(*args)


# ---------------------------------------------------------------- 2-3. clean, truncate, check, tag (vectorized)

def clean_text(arr):
    """Control characters out, CRLF/CR -> LF, trailing whitespace off every line and the end."""
    last = pc.utf8_slice_codeunits(arr, -1)  # one character per row: a cheap trailing-whitespace test
    dirty = pc.or_(pc.match_substring_regex(arr, NEEDS_CLEAN), pc.match_substring_regex(last, r"^[\s\p{Z}]$"))
    dirty = dirty.fill_null(False)
    if not pc.any(dirty).as_py():
        return arr
    fixed = arr.filter(dirty)
    fixed = pc.replace_substring(pc.replace_substring(fixed, "\r\n", "\n"), "\r", "\n")
    fixed = pc.replace_substring_regex(fixed, CONTROL, "")
    fixed = pc.replace_substring_regex(fixed, r"[ \t\p{Z}]+\n", "\n")
    fixed = pc.utf8_rtrim_whitespace(fixed)
    return pc.replace_with_mask(arr, dirty, fixed)


def per_row_any(messages, flags):
    flags = np.asarray(flags, dtype=np.int64)
    return np.bincount(np.asarray(pc.list_parent_indices(messages)), weights=flags, minlength=len(messages)) > 0


def rebuild(messages, **fields):
    flat = messages.flatten()
    arrays = [fields.get(f.name, flat.field(f.name)) for f in MESSAGE_TYPE]
    return as_lists(pc.list_value_length(messages), pa.StructArray.from_arrays(arrays, fields=list(MESSAGE_TYPE)))


def cut_at_sentence_end(text, max_chars):
    """The text up to its last sentence end within max_chars (SENTENCE_END), or None when there is none. An inlined
    <think> block is never cut: the end must come after its </think>."""
    start = text.find("</think>") + len("</think>") if text.startswith("<think>") else 0
    ends = [m.end() for m in SENTENCE_END.finditer(text, start, max_chars + 1) if m.end() <= max_chars]
    # finditer stops at max_chars + 1 so "." may see the character after it; an end past the limit is not taken.
    return text[:ends[-1]].rstrip() if ends else None


def clean_messages(messages, max_chars, policy):
    """-> (messages, cleaned rows mask, truncated rows mask, reasons): every content cleaned; assistant answers over
    max_chars cut at their last sentence end (policy "truncate"), or their row rejected (none there, or "drop")."""
    flat = messages.flatten()
    content = flat.field("content")
    cleaned = clean_text(content)
    changed = np.asarray(pc.not_equal(content, cleaned), dtype=bool)
    role = flat.field("role")
    long = np.asarray(pc.and_(pc.equal(role, "assistant"), pc.greater(pc.utf8_length(cleaned), max_chars)),
                      dtype=bool)
    uncut = np.zeros(len(long), dtype=bool)  # over-long answers left as they are: their rows are rejected
    if long.any() and policy == "truncate":  # rare rows: a Python loop over them only
        cuts = [cut_at_sentence_end(t, max_chars) for t in cleaned.filter(pa.array(long)).to_pylist()]
        uncut[np.flatnonzero(long)] = [c is None for c in cuts]
        cleaned = pc.replace_with_mask(cleaned, pa.array(long), pa.array([c or "" for c in cuts], pa.string()))
    elif long.any():
        uncut = long
    no_calls = np.asarray(flat.field("tool_calls").is_null(), dtype=bool)
    empty = np.asarray(pc.equal(cleaned, ""), dtype=bool)
    is_user = np.asarray(pc.equal(role, "user"), dtype=bool)
    is_asst = np.asarray(pc.equal(role, "assistant"), dtype=bool)
    other = ~(is_user | is_asst)  # system and tool turns: an empty one is an instruction or a result lost
    special = np.asarray(pc.match_substring_regex(cleaned, SPECIAL), dtype=bool)
    over = f"answer over data.max_answer_chars={max_chars}"
    reason = first_reason(len(messages), [
        (per_row_any(messages, uncut & (policy == "drop")), f"{over} (data.overlong_answer_policy=drop)"),
        (per_row_any(messages, uncut), f"{over} with no sentence end before the limit to cut at"),
        (per_row_any(messages, empty & is_asst & no_calls), "empty answer"),
        (per_row_any(messages, empty & is_user), "empty user turn"),
        (per_row_any(messages, empty & other), "empty system or tool turn"),
        (per_row_any(messages, special), "special token (<|im_start|>, <|im_end|>, <|endoftext|>) in content")])
    return (rebuild(messages, content=cleaned), per_row_any(messages, changed), per_row_any(messages, long & ~uncut),
            reason)


def last_answers(messages):
    ends = np.cumsum(np.asarray(pc.list_value_length(messages), dtype=np.int64)) - 1
    return messages.flatten().field("content").take(pa.array(ends))


def json_only(messages, tags):
    """(mask of rows whose answer is only a JSON object, reason for rows tagged json-only whose answer is not)."""
    answers = last_answers(messages)
    # Anchored tests on the first and last characters only; json.loads just for the few that look like JSON.
    opens = pc.match_substring_regex(answers, r"^\s*\{")
    closes = pc.match_substring_regex(pc.utf8_slice_codeunits(answers, -8), r"\}\s*$")
    candidates = np.flatnonzero(np.asarray(pc.and_(opens, closes), dtype=bool))
    valid = np.zeros(len(messages), dtype=bool)
    for i, text in zip(candidates, answers.take(pa.array(candidates, pa.int64())).to_pylist()):
        try:
            valid[i] = isinstance(json.loads(text), dict)
        except json.JSONDecodeError:
            pass
    tagged = has_tag(tags, "json-only")
    reason = first_reason(len(messages), [(tagged & ~valid, "json-only answer is not a valid JSON object")])
    return valid, reason


def auto_tags(messages, tags, tools):
    users = np.asarray(pc.equal(messages.flatten().field("role"), "user"), dtype=np.int64)
    per_row = np.bincount(np.asarray(pc.list_parent_indices(messages)), weights=users, minlength=len(messages))
    tags = append_tag(tags, "multi-turn", per_row > 1)
    return append_tag(tags, "tools", ~np.asarray(tools.is_null(), dtype=bool))


# ---------------------------------------------------------------- hashing and prompt keys

def canonical_text(table):
    """One string per row that two rows share exactly when their messages and tools are equal."""
    flat = table["messages"].combine_chunks().flatten()
    parts = [pc.coalesce(flat.field(f.name), "") for f in MESSAGE_TYPE]
    per_message = pc.binary_join_element_wise(*parts, "\x1f")
    nested = as_lists(pc.list_value_length(table["messages"].combine_chunks()), per_message)
    return pc.binary_join_element_wise(pc.binary_join(nested, "\x1e"), pc.coalesce(table["tools"], ""), "\x1d")


def md5_digests(strings):
    """md5 of each string's UTF-8 bytes, read straight from the Arrow buffer (no Python str per row)."""
    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    arr = arr.cast(pa.large_string())
    n = len(arr)
    if n == 0:
        return pa.array([], pa.binary(16))
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1].tolist()
    data = memoryview(arr.buffers()[2] or b"")  # no data buffer when every string is empty
    md5 = hashlib.md5
    digests = b"".join([md5(data[a:b]).digest() for a, b in zip(offsets, offsets[1:])])
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(digests)])


def prompt_keys(messages):
    """The user turns, normalized: NFKC, lowercase, whitespace/punctuation/symbols removed (digits kept)."""
    flat = messages.flatten()
    is_user = pc.equal(flat.field("role"), "user")
    users = flat.field("content").filter(is_user)
    parents = np.asarray(pc.list_parent_indices(messages))[np.asarray(is_user, dtype=bool)]
    counts = np.bincount(parents, minlength=len(messages))
    nested = as_lists(counts, users)
    return normalize_prompt(pc.binary_join(nested, "\n"))


def normalize_prompt(text):
    """NFKC, lowercase, whitespace/punctuation/symbols removed (digits kept). The same keys, ~3x faster than
    one regex replace per row: ASCII rows go through two byte tables in one numpy pass (fold_ascii); other
    rows get NFKC only where it may change something (KEEPS_NFKC_NOT) and the regex only where it matches."""
    text = text.fill_null("")
    ascii_rows = pc.string_is_ascii(text)
    out = pc.replace_with_mask(text, ascii_rows, fold_ascii(text.filter(ascii_rows)))
    other = pc.invert(ascii_rows)
    if not pc.any(other).as_py():
        return out
    rest = text.filter(other)
    changes = pc.match_substring_regex(rest, KEEPS_NFKC_NOT)
    if pc.any(changes).as_py():
        rest = pc.replace_with_mask(rest, changes, pc.utf8_normalize(rest.filter(changes), "NFKC"))
    rest = pc.utf8_lower(rest)
    noisy = pc.match_substring_regex(rest, PROMPT_NOISE)
    if pc.any(noisy).as_py():
        rest = pc.replace_with_mask(rest, noisy, pc.replace_substring_regex(rest.filter(noisy), PROMPT_NOISE, ""))
    return pc.replace_with_mask(out, other, rest)


ASCII_LOWER = np.arange(128, dtype=np.uint8)
ASCII_LOWER[65:91] += 32  # A-Z -> a-z
# PROMPT_NOISE within ASCII: \t \n \f \r, space, punctuation and symbols (not \v or other control characters).
ASCII_KEEP = np.array([not (chr(c) in "\t\n\f\r " or (32 < c < 127 and not chr(c).isalnum())) for c in range(128)])


def fold_ascii(arr):
    """ASCII strings lowercased and without PROMPT_NOISE characters: two 128-entry tables applied to the whole
    data buffer in one numpy pass, then offsets shifted by the bytes dropped before each row."""
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    if not len(arr) or offsets[-1] == offsets[0]:
        return arr.cast(pa.string())
    data = ASCII_LOWER[np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]]
    keep = ASCII_KEEP[data]
    kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    return pa.LargeStringArray.from_buffers(len(arr), pa.py_buffer(kept[offsets - offsets[0]]),
                                            pa.py_buffer(data[keep].tobytes())).cast(pa.string())


def first_occurrences(digests):
    """Mask of the first row of each distinct digest. dictionary_encode numbers values in order of first
    appearance, so a row is a first occurrence exactly when its id exceeds every id before it."""
    ids = np.asarray(pc.dictionary_encode(digests).indices, dtype=np.int64)
    before = np.maximum.accumulate(np.concatenate([[-1], ids[:-1]])) if len(ids) else ids
    return ids > before


# ---------------------------------------------------------------- steps 1-4 for one source

def check_fields(records, format_name, src, name, label):
    """A field no row has means the wrong format or file: stop with a clear error, not N rejects."""
    if not records.num_rows:
        return
    for options in FORMATS[format_name].required(src):
        if all(records[f].null_count == records.num_rows for f in options):
            raise BuildError(f"{label}: no row has {' or '.join(map(repr, options))}; is "
                             f"data.sources.{name}.format={format_name!r} the right format for it?")


def normalize_source(name, src, plan, cfg, rejects):
    """Load every input of a source (plan: from plan_inputs), then normalize, clean, check and tag it
    -> (list of normalized batch tables, stats)."""
    format_name = src["format"]
    fields = FORMATS[format_name].fields(src)
    fields = None if fields is None else list(dict.fromkeys(fields + [id_field(src)]))
    stats = {"inputs": [], "rows_in": 0, "rejected": 0, "cleaned": 0, "truncated": 0}
    tables = []
    for label, kind, target in plan:
        before = len(rejects)
        records, unit = load_input(kind, target, fields, name, label, rejects)
        # Rows without an id of their own get "<source>:<line or record>" ("<source>:<file>:<line>" when the
        # source has several inputs, whose line numbers repeat).
        id_prefix = f"{name}:" if len(plan) == 1 else f"{name}:{os.path.basename(label)}:"
        stats["inputs"].append(label)
        stats["rows_in"] += len(records) + len(rejects) - before
        if fields is None:
            records, extra = adapt_rows(records, format_name, src, cfg, name, label, rejects)
            for key, value in extra.items():
                stats[key] = stats.get(key, 0) + value
        else:
            check_fields(records, format_name, src, name, label)
        total, holder = len(records), [records]
        del records  # release_batches holds the only reference and frees it chunk by chunk
        with tqdm(total=total, desc=f"  normalize {name}", unit="rows", leave=False) as bar:
            for batch in release_batches(holder):
                tables.append(normalize_batch(batch, fields, name, src, cfg, (label, id_prefix), rejects, stats))
                bar.update(len(batch))
        if unit == "record":
            for r in rejects[before:]:
                r["record"] = r.pop("line")
    stats["rejected"] = sum(1 for r in rejects if r["source"] == name)
    stats["kept"] = sum(t.num_rows for t in tables)
    return tables, stats


def release_batches(holder):
    """Batches of ~BATCH rows from the table in holder (a one-item list, emptied) that let go of its chunks
    as they go: the raw input is freed while its normalized copy grows."""
    chunks = holder.pop().to_batches()
    chunks.reverse()  # pop() from the end: the first chunk comes first
    while chunks:
        group = [chunks.pop()]
        while chunks and sum(len(c) for c in group) < BATCH:
            group.append(chunks.pop())
        yield pa.Table.from_batches(group)


def normalize_batch(records, fields, name, src, cfg, input_ids, rejects, stats):
    """Steps 2-3 on one batch: adapter (column formats), cleaning, checks, tags, ids; bad rows to rejects.
    input_ids: (label of the input, prefix of the ids made for its rows)."""
    format_name, (label, id_prefix) = src["format"], input_ids
    ids = records["id" if fields is None else id_field(src)].combine_chunks()
    ids = pc.coalesce(ids, pc.binary_join_element_wise(id_prefix, records["_line"].cast(pa.string()), ""))
    if fields is None:  # row formats arrive adapted already
        messages, tags, tools = (records[c].combine_chunks() for c in ("messages", "tags", "tools"))
        reason = pa.nulls(len(records), pa.string())
    else:
        messages, tags, reason, extra = FORMATS[format_name].adapt(records, src, cfg["data"])
        tools = pa.nulls(len(records), pa.string())
        for key, value in extra.items():
            stats[key] = stats.get(key, 0) + value
    messages, cleaned, truncated, clean_reason = clean_messages(messages, cfg["data"]["max_answer_chars"],
                                                                cfg["data"]["overlong_answer_policy"])
    valid_json, json_reason = json_only(messages, tags)
    reason = pc.coalesce(reason, clean_reason, json_reason)
    bad = np.asarray(reason.is_valid(), dtype=bool)
    if bad.any():
        idx = pa.array(np.flatnonzero(bad))
        raws = [{k: v for k, v in r.items() if v is not None} for r in
                (records.select(fields) if fields else pa.table({"messages": messages})).take(idx).to_pylist()]
        for line, why, raw in zip(records["_line"].take(idx).to_pylist(), reason.take(idx).to_pylist(), raws):
            reject(rejects, name, label, line, why, json.dumps(raw, ensure_ascii=False))
    tags = auto_tags(messages, append_tag(tags, "json-only", valid_json), tools)
    stats["cleaned"] += int((cleaned & ~bad).sum())
    stats["truncated"] += int((truncated & ~bad).sum())
    return pa.table({"id": ids, "messages": messages,
                     "source": pa.repeat(pa.scalar(name, pa.string()), len(messages)), "tags": tags, "tools": tools},
                    schema=SCHEMA).filter(pa.array(~bad))


def eval_prompts(cfg):
    """{normalized prompt: "file:line"} over data.eval_files (messages rows, or prompt/question fields)."""
    texts, where = [], []
    for path in cfg["data"]["eval_files"]:
        for line, row in common.read_eval_rows(common.path_in_repo(path)):  # JSONL, or a JSON list (probes)
            if isinstance(row.get("messages"), list):
                text = "\n".join(m.get("content") or "" for m in row["messages"]
                                 if isinstance(m, dict) and m.get("role") == "user")
            else:
                text = next((row[k] for k in ("prompt", "question", "instruction", "query") if row.get(k)), None)
            if not isinstance(text, str) or not text.strip():
                raise common.DataError(f"{path}:{line}: an eval row needs user messages or a prompt/question field")
            texts.append(text)
            where.append(f"{path}:{line}")
    keys = normalize_prompt(pa.array(texts, pa.string())).to_pylist() if texts else []
    return dict(zip(keys, where))


def dedup_pool(name, tables, evals, cfg, stats):
    """Step 4: md5 dedup within the pool, then the eval-overlap check -> (pool with _md5, flagged).
    tables: the normalized batches, emptied as the pool is built (one copy of the rows at a time)."""
    digests = [md5_digests(canonical_text(t)) for t in tqdm(tables, desc=f"  md5 {name}", leave=False)]
    digests = pa.concat_arrays(digests) if digests else pa.array([], pa.binary(16))
    keep = first_occurrences(digests)
    chunks, start = [], 0
    for i, t in enumerate(tables):
        chunks.append(t.filter(pa.array(keep[start:start + len(t)])))
        start += len(t)
        tables[i] = None
    table = pa.concat_tables(chunks) if chunks else SCHEMA.empty_table()
    table = table.append_column("_md5", digests.filter(pa.array(keep)))
    stats["deduplicated"] = stats["kept"] - table.num_rows
    keys = pa.chunked_array([prompt_keys(c) for c in table["messages"].chunks], pa.string())
    table = table.append_column("_pkey", keys)
    overlap = np.asarray(pc.is_in(keys, value_set=pa.array(list(evals), pa.string())), dtype=bool) \
        if evals else np.zeros(table.num_rows, dtype=bool)
    stats["eval_overlap"] = int(overlap.sum())
    flagged = [{"source": name, "prompt": next(m["content"] for m in row["messages"] if m["role"] == "user")[:120],
                "eval": evals[key]}
               for row, key in zip(table.filter(pa.array(overlap)).select(["messages"]).to_pylist(),
                                   keys.filter(pa.array(overlap)).to_pylist())]
    if cfg["data"]["decontaminate"] and overlap.any():
        table = table.filter(pa.array(~overlap))
    stats["pool_rows"] = table.num_rows
    return table, flagged


def process_source(name, src, plan, cfg, evals):
    """Steps 1-4 for one source; runs in a worker process when the inputs are big (see source_workers).
    -> (stats, rejects, eval-overlap flags, md5 of each pool row and of its prompt key). The pool is on disk."""
    rejects = []
    tables, stats = normalize_source(name, src, plan, cfg, rejects)
    pool, flagged = dedup_pool(name, tables, evals, cfg, stats)
    path = os.path.join(common.path_in_repo(cfg["data"]["pools_dir"]), name)
    save_arrow(pool, path, fingerprint("pool", name, md5_of(pool["_md5"])))
    # md5 of the prompt keys: grouping 1M 16-byte digests in the main process takes ~0.2 s, the keys ~0.8 s.
    return stats, rejects, flagged, pool["_md5"].combine_chunks(), md5_digests(pool["_pkey"])


def _source_worker(args):
    global IN_WORKER
    IN_WORKER = True  # pool workers are daemons: they may not start workers of their own
    return process_source(*args)


def source_workers(sources, cfg):
    """Processes for steps 1-4: one per source up to data.num_proc, once the local inputs pass
    PARALLEL_MIN_BYTES (forking and sending results back costs ~0.5 s)."""
    size = 0
    for src in sources.values():
        path = common.path_in_repo(src.get("local") or "")
        if os.path.isfile(path):
            size += os.path.getsize(path)
    return max(1, min(int(cfg["data"]["num_proc"]), len(sources))) if size >= PARALLEL_MIN_BYTES else 1


def run_sources(sources, plans, cfg, evals):
    """{name: process_source result}, the same whichever worker finishes first."""
    workers = source_workers(sources, cfg)
    jobs = [(name, src, plans[name], cfg, evals) for name, src in sources.items()]
    if workers == 1:
        return {job[0]: process_source(*job) for job in jobs}
    # Biggest inputs first, so the last worker to finish is not the one holding the biggest source.
    jobs.sort(key=lambda j: -os.path.getsize(common.path_in_repo(j[1]["local"]))
              if os.path.isfile(common.path_in_repo(j[1].get("local") or "")) else 0)
    with mp_context().Pool(workers, maxtasksperchild=1) as pool:
        results = dict(zip([j[0] for j in jobs], pool.imap(_source_worker, jobs)))
    return {name: results[name] for name in sources}


def fingerprint(*parts):
    return hashlib.md5("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:16]


def save_arrow(table, path, fp):
    """save_to_disk with a content fingerprint, so two builds of the same rows write the same bytes."""
    import datasets
    if os.path.isdir(path):
        shutil.rmtree(path)
    ds = datasets.Dataset(table.select(SCHEMA.names).cast(SCHEMA), fingerprint=fp)
    # save_to_disk writes record batches of datasets.config.DEFAULT_MAX_BATCH_SIZE (1,000) rows, each paying
    # ~2 ms of schema work: 2 s per million rows. Batches of BATCH rows write the same table in ~0.1 s.
    default = datasets.config.DEFAULT_MAX_BATCH_SIZE
    datasets.config.DEFAULT_MAX_BATCH_SIZE = BATCH
    try:
        ds.save_to_disk(path)
    finally:
        datasets.config.DEFAULT_MAX_BATCH_SIZE = default


# ---------------------------------------------------------------- 5-7. mix, dedup, split

def exact_counts(weights, total):
    """Largest-remainder rounding: counts proportional to weights that sum to exactly `total`."""
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:total - counts.sum()]] += 1
    return counts


def mix(sizes, weights, cfg):
    """Step 5 -> (pool index, row in pool) of every mixed row, and the rows per pool."""
    data, rng = cfg["data"], np.random.default_rng(data_seed(cfg))
    weights = np.where(sizes > 0, weights, 0.0)
    if data["mix_mode"] == "resample":
        total = data["total_size"] if data["total_size"] is not None else int(0.9 * sizes.sum())
        counts = exact_counts(weights, int(total))
        rows = [epoch_sample(rng, int(n), int(k)) for n, k in zip(sizes, counts)]
        return np.repeat(np.arange(len(sizes)), counts), np.concatenate(rows), counts
    import datasets
    # Only the (pool, row) pairs go through interleave_datasets: the rows themselves are taken once, at export.
    # Each pool is shuffled first (else total_size keeps the first rows of each file); without replacement, a
    # pool that runs out is never drawn again (no up-sampling: that is resample's job).
    live = [i for i in range(len(sizes)) if sizes[i]]
    dsets = [datasets.Dataset(pa.table({"_src": np.full(sizes[i], i), "_row": rng.permutation(sizes[i])}),
                              fingerprint=fingerprint("pool", i, sizes[i], data_seed(cfg))) for i in live]
    probs = weights[live] / weights[live].sum()
    mixed = datasets.interleave_datasets(dsets, probabilities=list(probs), seed=data_seed(cfg),
                                         stopping_strategy="all_exhausted_without_replacement").with_format("numpy")
    total = data["total_size"] if data["total_size"] is not None else int(0.9 * sizes.sum())
    src, rows = np.asarray(mixed["_src"], dtype=np.int64)[:total], np.asarray(mixed["_row"], dtype=np.int64)[:total]
    return src, rows, np.bincount(src, minlength=len(sizes))


def epoch_sample(rng, n, k):
    """k row indices from n, with replacement but balanced: whole shuffled passes over the pool, then a
    random part of one more. Exact like random.choices, but no row is left out by chance (i.i.d. draws of
    k = n rows miss ~37% of them) and repeats differ by at most one between rows."""
    if not k or not n:
        return np.zeros(0, dtype=np.int64)
    full, rest = divmod(k, n)
    passes = rng.permuted(np.tile(np.arange(n), (full, 1)), axis=1).ravel() if full else np.zeros(0, np.int64)
    return np.concatenate([passes, rng.permutation(n)[:rest]]).astype(np.int64)


def data_seed(cfg):
    return int(cfg["data"]["seed"])


def cross_source_duplicates(md5s):
    """Per pool: rows whose text an earlier pool (config order) already holds."""
    masks, seen = [], None
    for digests in md5s:
        masks.append(np.asarray(pc.is_in(digests, value_set=seen), dtype=bool) if seen is not None and len(seen)
                     else np.zeros(len(digests), dtype=bool))
        seen = digests if seen is None else pa.concat_arrays([seen, digests])
    return masks


def split(groups, rows, cfg):
    """Step 7: shuffled prompt groups fill validation up to its target; the rest is train. Validation keeps
    one copy of a row that resampling repeated (copies would weigh it twice in every metric); the other
    copies are dropped, never moved to train. groups: prompt group of each mixed row; rows: its pool row.
    -> (train positions, validation positions, target, capped, number of groups, copies dropped)."""
    n, data = len(groups), cfg["data"]
    first = first_occurrences(pa.array(rows))
    distinct = np.bincount(groups[first], minlength=int(groups.max()) + 1 if n else 0)  # rows per group
    target = max(int(data["min_valid"]), math.ceil(data["valid_ratio"] * n))
    capped = target > int(first.sum()) // 2  # min_valid would take most of a small build: keep half to train on
    target = min(target, int(first.sum()) // 2)
    rng = np.random.default_rng(data_seed(cfg))
    order = rng.permutation(len(distinct))
    cut = int(np.searchsorted(np.cumsum(distinct[order]), target)) + 1 if target else 0
    in_val = np.zeros(len(distinct), dtype=bool)
    in_val[order[:cut]] = True
    val = np.flatnonzero(in_val[groups] & first)
    train = np.flatnonzero(~in_val[groups])
    dropped = int((in_val[groups] & ~first).sum())
    return rng.permutation(train), rng.permutation(val), target, capped, int((distinct > 0).sum()), dropped


# ---------------------------------------------------------------- 8. export

# The lines are put together column-wise from JSON string literals: 200k bench rows in 1.3 s, against 6.8 s for
# json.JSONEncoder on each row's dict (to_pylist and dropping the null keys included; 2 cores at load 7). For the
# bench's 1M rows the per-row way would add ~25 s to a ~20 s build: bench_build's 2x target would not hold.

def json_string(arr):
    """JSON string literals as json.dumps(s, ensure_ascii=False) writes them: json.dumps itself on the strings with
    a character to escape (" \\ or a control character), quotes added column-wise to the others."""
    quoted = pc.binary_join_element_wise('"', arr, '"', "")
    needs = pc.match_substring_regex(arr, r'["\\\x00-\x1f]').fill_null(False)
    if pc.any(needs).as_py():
        escaped = [json.dumps(text, ensure_ascii=False) for text in arr.filter(needs).to_pylist()]
        quoted = pc.replace_with_mask(quoted, needs, pa.array(escaped, pa.string()))
    return quoted


def optional(key, arr):
    """', "key": value' where arr is not null, else ''."""
    return pc.coalesce(pc.binary_join_element_wise(f', "{key}": ', arr, ""), "")


def json_label(arr):
    """json_string for columns with few distinct values (roles, sources, tags): escaped once per value."""
    encoded = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    return pa.DictionaryArray.from_arrays(encoded.indices, json_string(encoded.dictionary)).dictionary_decode()


def jsonl_lines(table):
    """Each row as its JSON line + "\\n", built column-wise (byte-identical to json.dumps per row).
    Optional keys (tool_calls, tool_call_id, name, tools) cost nothing in batches that have none."""
    messages = table["messages"].combine_chunks()
    flat = messages.flatten()
    parts = ['{"role": ', json_label(flat.field("role")), ', "content": ', json_string(flat.field("content"))]
    for key in ("tool_calls", "tool_call_id", "name"):
        column = flat.field(key)
        if column.null_count < len(column):
            parts.append(optional(key, column if key == "tool_calls" else json_string(column)))
    per_message = pc.binary_join_element_wise(*parts, "}", "")
    nested = as_lists(pc.list_value_length(messages), per_message)
    tags = table["tags"].combine_chunks()
    quoted = as_lists(pc.list_value_length(tags), json_label(tags.flatten()))
    tools = table["tools"].combine_chunks()
    tail = [optional("tools", tools)] if tools.null_count < len(tools) else []
    return pc.binary_join_element_wise(
        '{"id": ', json_string(table["id"].combine_chunks()), ', "messages": [', pc.binary_join(nested, ", "),
        '], "source": ', json_label(table["source"]),
        ', "tags": [', pc.binary_join(quoted, ", "), "]", *tail, "}\n", "")


def write_rows_jsonl(table, path):
    """Rows -> JSONL, batch by batch, written straight from the Arrow buffers of the built lines."""
    with open(path, "wb") as f:
        for start in tqdm(range(0, table.num_rows, BATCH), desc=f"  {os.path.basename(path)}", leave=False):
            lines = jsonl_lines(table.slice(start, BATCH))
            lines = (lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines).cast(pa.large_string())
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset:lines.offset + len(lines) + 1]
            f.write(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])


# ---------------------------------------------------------------- report

def markdown_table(columns, rows):
    """A Markdown table: header, alignment (first column left, the numbers right), one line per row."""
    return (["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def report_markdown(rep):
    out = ["# Dataset build report", "", "## Sources", ""]
    out += markdown_table(
        ["source", "rows in", "rejected", "cleaned", "truncated", "kept", "dedup", "eval overlap", "pool"],
        [[name, s["rows_in"], s["rejected"], s["cleaned"], s["truncated"], s["kept"], s["deduplicated"],
          s["eval_overlap"], s["pool_rows"]] for name, s in rep["sources"].items()])
    m = rep["mix"]
    out += ["", f"## Mix ({m['mode']}, {m['rows']} rows; {m['cross_source_duplicates']} cross-source duplicates "
            f"removed after mixing)", ""]
    out += markdown_table(
        ["source", "weight asked", "rows asked", "rows", "share", "effective epochs", "distinct rows", "train", "val"],
        [[name, f"{s['weight']:.3f}", s["rows_asked"], s["rows"], f"{s['share']:.3f}", f"{s['effective_epochs']:.2f}",
          s["distinct_rows"], s["train"], s["validation"]] for name, s in m["sources"].items()])
    sp = rep["split"]
    out += ["", f"## Split: {sp['train']} train / {sp['validation']} validation (target {sp['validation_target']}"
            f"{', capped to half the rows' if sp['capped'] else ''}; {sp['prompt_groups']} prompt groups; "
            f"{sp['validation_copies_dropped']} resampled copies left out of validation)", ""]
    d = rep["decontamination"]
    out += [f"## Decontamination: {d['flagged']} rows share a prompt with {', '.join(d['eval_files']) or '-'}"
            f" ({'dropped' if d['dropped'] else 'flagged only; --decontaminate drops them'})", ""]
    out += [f"- {f['source']}: {f['prompt']!r} (also {f['eval']})" for f in d["examples"]]
    r = rep["rejects"]
    out += ["", f"## Rejected rows: {r['total']} (see rejects.jsonl)", ""]
    out += [f"- {reason}: {count}" for reason, count in r["by_reason"].items()]
    return "\n".join(out) + "\n"


def make_report(cfg, names, stats, weights, sizes, asked, src_idx, row_idx, drop, positions, split_info, flagged,
                rejects):
    """The report dict: counts per source, the mix against the asked weights, the split, flags, rejects."""
    data, (train_pos, val_pos), (target, capped, n_groups, dropped) = cfg["data"], positions, split_info
    by_reason = {}
    for r in rejects:
        by_reason[reason_kind(r["reason"])] = by_reason.get(reason_kind(r["reason"]), 0) + 1
    mix_rows = {}
    for i, name in enumerate(names):
        mine = src_idx == i
        mix_rows[name] = {
            "weight": round(float(weights[i] / weights.sum()), 6), "rows_asked": int(asked[i]),
            "rows": int(mine.sum()), "share": round(float(mine.sum() / max(len(src_idx), 1)), 6),
            "effective_epochs": round(float(mine.sum() / max(sizes[i], 1)), 4),  # times each row repeats
            "distinct_rows": int((np.bincount(row_idx[mine], minlength=int(sizes[i])) > 0).sum()),
            "train": int((src_idx[train_pos] == i).sum()), "validation": int((src_idx[val_pos] == i).sum())}
    return {
        "seed": data_seed(cfg),
        "sources": {n: stats[n] for n in names},
        "mix": {"mode": data["mix_mode"], "rows": int(len(src_idx)), "total_size_asked": data["total_size"],
                "cross_source_duplicates": int(drop.sum()), "sources": mix_rows},
        "split": {"train": int(len(train_pos)), "validation": int(len(val_pos)), "validation_target": int(target),
                  "validation_copies_dropped": dropped, "capped": bool(capped), "prompt_groups": int(n_groups),
                  "valid_ratio": data["valid_ratio"], "min_valid": data["min_valid"]},
        "decontamination": {"eval_files": list(data["eval_files"]), "flagged": len(flagged),
                            "dropped": bool(data["decontaminate"]), "examples": flagged[:50]},
        "rejects": {"total": len(rejects), "by_reason": dict(sorted(by_reason.items())),
                    "by_source": {n: stats[n]["rejected"] for n in names}},
    }


def reason_kind(reason):
    """The reason without its details: "message 2: two assistant turns in a row" -> "two assistant turns in a row"."""
    return re.split(r" \(|:", re.sub(r"^(message|turn) \d+: ", "", reason), maxsplit=1)[0]


# ---------------------------------------------------------------- main

def build(cfg):
    """All eight steps; returns the report dict (also written to <processed_dir>/report.json)."""
    import datasets
    datasets.disable_progress_bars()  # ours cover the same passes; two sets of bars garble the step lines
    data = cfg["data"]
    np.random.seed(data_seed(cfg))

    # ---- check the config, the paths and the hub before any heavy work
    sources = check_config(cfg)
    plans = {name: plan_inputs(name, src, cfg) for name, src in sources.items()}
    out_dir = os.path.normpath(common.path_in_repo(data["processed_dir"]))
    names = list(sources)

    # ---- 1-4. load, normalize, tag, dedup: one pool per source, saved to data.pools_dir
    stats, rejects, flagged, md5s, keys = load_pools(sources, plans, cfg)
    # Everything is written to a folder next to out_dir and swapped in at the end: a failed build leaves the
    # previous one as it was (its rejects and report go to <processed_dir>.failed/).
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    common.write_jsonl(os.path.join(tmp_dir, "rejects.jsonl"), rejects)
    sizes = np.array([len(m) for m in md5s], dtype=np.int64)
    if not sizes.sum():
        fail(tmp_dir, out_dir, f"no rows left after loading: all {len(rejects)} rows were rejected or duplicates "
                               f"(reasons above)")

    # ---- 5-6. mix by weight, then drop text that two sources share
    clock = time.perf_counter()
    weights = np.array([sources[n]["weight"] for n in names])
    src_idx, row_idx, asked, drop = mix_pools(sizes, weights, md5s, cfg)
    where = np.concatenate([[0], np.cumsum(sizes)])[src_idx] + row_idx  # row in all pools, in config order

    # ---- 7. shuffle and split by prompt group
    positions, split_info = split_step(keys, where, cfg)
    del keys
    if not len(positions[0]) or not len(positions[1]):
        fail(tmp_dir, out_dir, f"{len(positions[0])} train / {len(positions[1])} validation rows from {len(where)} "
                               f"mixed rows (data.total_size={data['total_size']}: None takes 0.9 x "
                               f"{int(sizes.sum())} pool rows); both splits need rows: add rows, or set "
                               f"data.total_size")

    # ---- 8. export the splits, the report and the config; swap the build in
    print(f"[8/8] export to {os.path.relpath(out_dir, common.ROOT)} (steps 5-7: {time.perf_counter() - clock:.1f} s)",
          flush=True)
    export_splits(names, sizes, where, positions, md5s, cfg, tmp_dir)
    rep = make_report(cfg, names, stats, weights, sizes, asked, src_idx, row_idx, drop, positions, split_info,
                      flagged, rejects)
    write_report(rep, cfg, tmp_dir)
    swap_in(tmp_dir, out_dir)
    return rep


def load_pools(sources, plans, cfg):
    """Steps 1-4 for every source, with their counts printed -> (stats, rejects, flags, pool md5s, key md5s)."""
    evals = eval_prompts(cfg)
    print(f"[1-4/8] load, normalize, tag, dedup: {len(sources)} sources, {source_workers(sources, cfg)} worker(s)",
          flush=True)
    clock = time.perf_counter()
    results = run_sources(sources, plans, cfg, evals)
    stats = {name: r[0] for name, r in results.items()}
    rejects = [rej for r in results.values() for rej in r[1]]
    flagged = [f for r in results.values() for f in r[2]]
    md5s, keys = [r[3] for r in results.values()], [r[4] for r in results.values()]
    print(f"[1-3/8] load, normalize, tag ({time.perf_counter() - clock:.1f} s for steps 1-4)", flush=True)
    for name, s in stats.items():
        print(f"  {name:<10} {s['rows_in']:>8} rows in  {s['rejected']:>6} rejected  {s['cleaned']:>6} cleaned  "
              f"{s['truncated']:>5} truncated  {s['kept']:>8} kept   ({', '.join(s['inputs'])})", flush=True)
    print("[4/8] dedup within each pool (md5), eval-overlap check, save pools", flush=True)
    pools_dir = common.path_in_repo(cfg["data"]["pools_dir"])
    for name, s in stats.items():
        print(f"  {name:<10} {s['deduplicated']:>6} duplicates  {s['eval_overlap']:>4} eval overlap  "
              f"-> {s['pool_rows']} rows in {os.path.relpath(os.path.join(pools_dir, name), common.ROOT)}",
              flush=True)
    names = list(sources)
    rejects.sort(key=lambda r: (names.index(r["source"]), r["file"], r.get("line", r.get("record"))))
    print_rejects(rejects)
    return stats, rejects, flagged, md5s, keys


def mix_pools(sizes, weights, md5s, cfg):
    """Steps 5-6 -> (pool index, row in pool) of every mixed row kept, rows asked per pool, the rows dropped."""
    print(f"[5/8] mix ({cfg['data']['mix_mode']}, seed {data_seed(cfg)})", flush=True)
    src_idx, row_idx, counts = mix(sizes, weights, cfg)
    asked = exact_counts(np.where(sizes > 0, weights, 0), int(counts.sum())) if counts.sum() else counts
    print("[6/8] dedup after mixing (text shared by two sources keeps the first source's rows)", flush=True)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    drop = np.concatenate(cross_source_duplicates(md5s))[starts[src_idx] + row_idx]
    print(f"  {int(drop.sum())} cross-source duplicates removed; {int((~drop).sum())} rows", flush=True)
    return src_idx[~drop], row_idx[~drop], asked, drop


def split_step(keys, where, cfg):
    """Step 7 -> ((train positions, validation positions), (target, capped, prompt groups, copies dropped))."""
    data = cfg["data"]
    print(f"[7/8] shuffle and split (validation >= {data['min_valid']}, grouped by normalized prompt)", flush=True)
    groups = np.asarray(pc.dictionary_encode(pa.concat_arrays(keys)).indices, dtype=np.int64)[where]
    train_pos, val_pos, target, capped, n_groups, dropped = split(groups, where, cfg)
    if capped and len(train_pos) and len(val_pos):
        print(f"  warning: only {len(where)} rows: validation capped at half of them ({target} rows) "
              f"instead of data.min_valid={data['min_valid']}", flush=True)
    if len(train_pos) and len(val_pos):
        print(f"  {len(train_pos)} train / {len(val_pos)} validation rows in {n_groups} prompt groups "
              f"({dropped} repeated copies left out of validation)", flush=True)
    return (train_pos, val_pos), (target, capped, n_groups, dropped)


def export_splits(names, sizes, where, positions, md5s, cfg, tmp_dir):
    """Step 8: each split as Arrow (save_to_disk) and JSONL, taken from the pools on disk."""
    import datasets
    clock = time.perf_counter()
    pools_dir = common.path_in_repo(cfg["data"]["pools_dir"])
    all_md5 = pa.concat_arrays(md5s)
    # Each split is one take from the pools as save_to_disk wrote them (memory-mapped, unmapped before writing).
    # Empty pools add no rows (and datasets cannot load an empty save_to_disk folder back).
    everything = pa.concat_tables([datasets.load_from_disk(os.path.join(pools_dir, n)).data.table
                                   for n, size in zip(names, sizes) if size])
    for split_name, pos, jsonl in (("train", positions[0], "train.jsonl"), ("validation", positions[1], "val.jsonl")):
        rows = pa.array(where[pos])
        table = everything.take(rows)
        save_arrow(table, os.path.join(tmp_dir, split_name), fingerprint(split_name, md5_of(all_md5.take(rows))))
        write_rows_jsonl(table, os.path.join(tmp_dir, jsonl))
    print(f"  train and validation written ({time.perf_counter() - clock:.1f} s)", flush=True)


def write_report(rep, cfg, tmp_dir):
    with open(os.path.join(tmp_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(rep, f, ensure_ascii=False, indent=2)
    with open(os.path.join(tmp_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(rep))
    config.save_config(cfg, os.path.join(tmp_dir, "config.json"), extra={"git_sha": common.git_sha()})


def print_rejects(rejects, shown=30):
    """Every reason with its count and first place, then the first `shown` rejects one per line."""
    if not rejects:
        return
    kinds = {}
    for r in rejects:
        kinds.setdefault(reason_kind(r["reason"]), [0, place(r)])[0] += 1
    print(f"  {len(rejects)} rows rejected (all of them in rejects.jsonl):", flush=True)
    for kind, (count, first) in sorted(kinds.items()):
        print(f"    {count:>6} x {kind} (first: {first})")
    for r in rejects[:shown]:
        print(f"    {place(r)}: {r['reason']}")
    if len(rejects) > shown:
        print(f"    ... {len(rejects) - shown} more")


def place(r):
    """A reject's place as a user finds it: file:line, or file[record] in a JSON array (0-based, as json.load)."""
    return f"{r['file']}[{r['record']}]" if "record" in r else f"{r['file']}:{r['line']}"


def fail(tmp_dir, out_dir, message):
    """Stop the build: what was written goes to <out_dir>.failed/, the previous build stays in out_dir."""
    failed = out_dir + ".failed"
    shutil.rmtree(failed, ignore_errors=True)
    os.rename(tmp_dir, failed)
    raise BuildError(f"{message}. Rejected rows: {os.path.join(failed, 'rejects.jsonl')}; "
                     f"{out_dir} is left as it was")


def swap_in(tmp_dir, out_dir):
    """Replace out_dir by the finished build in tmp_dir (two renames; the old build is removed after)."""
    old = out_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    for stale in (old, out_dir + ".failed"):  # a failed build's rejects no longer describe the data
        shutil.rmtree(stale, ignore_errors=True)


def md5_of(digests):
    """One md5 over a column of 16-byte digests (a content fingerprint of a table)."""
    arr = digests.combine_chunks() if isinstance(digests, pa.ChunkedArray) else digests
    if not len(arr):
        return hashlib.md5(b"").hexdigest()
    return hashlib.md5(memoryview(arr.buffers()[1])[arr.offset * 16:(arr.offset + len(arr)) * 16]).hexdigest()


@common.exits_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__ + "\n" + formats.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strict", action="store_true", help="exit 1 if any row is rejected (data.strict)")
    parser.add_argument("--decontaminate", action="store_true",
                        help="drop rows whose prompt is in data.eval_files (data.decontaminate)")
    config.add_config_args(parser)
    args = parser.parse_args()
    args.overrides += ["data.strict=True"] * args.strict + ["data.decontaminate=True"] * args.decontaminate
    cfg = config.resolve(args, parser)
    rep = build(cfg)  # BuildError and DataError are UserErrors: `error: <why>` and exit 1
    print()
    print(report_markdown(rep))
    if cfg["data"]["strict"] and rep["rejects"]["total"]:
        print(f"--strict: {rep['rejects']['total']} rows were rejected: see "
              f"{os.path.join(cfg['data']['processed_dir'], 'rejects.jsonl')}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
