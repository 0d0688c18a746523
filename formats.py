"""Raw data layouts for build_datasets.py: file readers, and one registry entry per source format (FORMATS).

A format entry says which raw fields to read, which of them a file must have, how its rows become messages
(and the tags it adds). Adding a format is one entry here plus its name in config.SOURCE_FORMATS.

Formats (data.sources.<name>.format):
  cmath     question (GitHub copy: input), golden -> math answer, bare or \\boxed{} (data.math_answer_style).
            Only dev is trained on: cmath_test is refused (EvalScope's `cmath` benchmark scores it).
  mawps     MAWPS.csv: Question with N_00, N_01... (SVAMP / cv_mawps: number0, number1...) = Numbers.split()[i];
            Answer float (8.0 written 8)
  emoji     question, answer_zh, falling back to answer_en (the DPO rejected side: counted in the report)
  alpaca    instruction, input, output (optional system)
  sharegpt  conversations [{from, value}]: human/gpt/system, function_call/observation; optional system, tools
  messages  OpenAI style: messages with tool_calls / tool turns / reasoning_content; optional tools, tags; a last
            assistant turn may be tool calls (OpenAI's fine-tuning format); content as a string or text parts
            ({"type": "text", "text"} or LLaMA-Factory v1's {"type": "text", "value"}; "reasoning" parts too)
  columns   any table with named columns: "columns": {"prompt": ..., "answer": ..., "system": ..., "id": ...}
Column formats (all but sharegpt and messages) are read as string columns and mapped column-wise (pyarrow
compute); nested layouts are read as dicts and mapped row by row.
Files (data.sources.<name>.local): JSONL, JSON (array or lines), Parquet, CSV/TSV or a save_to_disk folder.
"""

import csv
import json
import math
import os
import re
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

import common

ROLES = ("system", "user", "assistant", "tool")
FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv")
SCHEMA = pa.schema(list(common.row_features().type))
MESSAGE_TYPE = SCHEMA.field("messages").type.value_type
SURROGATE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of non-UTF-8 bytes
# MAWPS writes N_00, N_01...; the SVAMP / cv_mawps CSVs number0, number1...: both index the Numbers column.
PLACEHOLDER = re.compile(r"N_(\d\d)|\bnumber(\d+)")


class RowError(ValueError):
    """A row-level data problem: the row goes to rejects.jsonl with this reason."""


class BuildError(common.UserError):
    """A problem with the configuration or a whole input: the build stops with this message."""


# ---------------------------------------------------------------- inputs: the hub or a local path

def hub_offline():
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hf_dataset_reachable(repo, timeout):
    """One short metadata request; any network failure means "use the local copy"."""
    import httpx
    from huggingface_hub import HfApi, errors
    try:
        HfApi().dataset_info(repo, timeout=timeout)
        return True
    except (httpx.HTTPError, OSError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled) as err:
        print(f"  hub {repo} not reachable ({type(err).__name__}): using the local copy")
        return False


def plan_inputs(name, src, cfg):
    """[(label, kind, target)] where kind is "hub" (target = (repo, data_file)) or "file"."""
    use_hub = cfg["data"]["use_hub"]
    if src.get("hub") and use_hub is not False:
        if hub_offline():
            if use_hub is True:
                raise BuildError(f"data.use_hub is True but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set (source "
                                 f"{name}): unset it, or use --set data.use_hub=auto to fall back to local files")
        elif use_hub is True or hf_dataset_reachable(src["hub"], cfg["data"]["hub_timeout_s"]):
            files = src.get("data_files") or [None]
            return [(f"hub:{src['hub']}" + (f"/{f}" if f else ""), "hub", (src["hub"], f)) for f in files]
    if not src.get("local"):
        raise BuildError(f"data.sources.{name}: the hub is not reachable and no \"local\" path is set")
    path = common.path_in_repo(src["local"])
    if not os.path.exists(path):
        raise BuildError(f"data.sources.{name}: {src['local']} not found (the hub was not used); "
                         f"restore the shipped samples (git checkout dataset/raw) or fix the path")
    if os.path.isfile(path) and not path.lower().endswith(FILE_TYPES):
        raise BuildError(f"data.sources.{name}: unknown file format {src['local']!r}; use one of "
                         f"{', '.join(FILE_TYPES)} or a save_to_disk folder")
    return [(os.path.relpath(path, common.ROOT) if path.startswith(common.ROOT) else path, "file", path)]


# ---------------------------------------------------------------- readers (one per file type)

def reject(rejects, source, label, line, reason, raw=None):
    """One rejected row. `line` is its line (text files), row (tables) or, for a JSON array, its record index:
    normalize_source renames the key to "record" for those."""
    rejects.append({"source": source, "file": label, "line": int(line), "reason": reason,
                    "raw": None if raw is None else str(raw)[:300]})


def reader_reason(reason):
    """common.read_jsonl's exception text, said plainly."""
    if reason.startswith("UnicodeDecodeError"):
        return "non-UTF-8 bytes (" + reason.split(": ", 1)[1] + ")"
    if reason.startswith("JSONDecodeError"):
        return "malformed JSON (" + reason.split(": ", 1)[1] + ")"
    return reason.replace("ValueError: expected", "not a JSON object: expected")


def as_text(value, field):
    """A raw field as text: strings as they are, numbers written out; anything else is a wrong type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError(f"wrong type: {field!r} is {type(value).__name__}, expected a string")


def dict_rows_to_table(rows, fields, source, label, rejects):
    """(line, dict) rows -> a table of the fields as strings (+ _line); wrong types rejected."""
    cols, lines = {f: [] for f in fields}, []
    for line, row in rows:
        try:
            values = [as_text(row.get(f), f) for f in fields]
        except RowError as err:
            reject(rejects, source, label, line, str(err), json.dumps(row, ensure_ascii=False))
            continue
        for f, v in zip(fields, values):
            cols[f].append(v)
        lines.append(line)
    return pa.table({**{f: pa.array(cols[f], pa.string()) for f in fields}, "_line": pa.array(lines, pa.int64())})


def jsonl_fast(path, fields):
    """pyarrow's multi-threaded JSON reader; None when any line needs the careful row-by-row path."""
    schema = pa.schema([(f, pa.string()) for f in fields])
    try:
        table = pajson.read_json(path, parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="ignore"))
        table.validate(full=True)  # the reader does not check UTF-8
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    lines = count_lines(path)
    if lines != table.num_rows:
        return None  # blank lines: pyarrow skips them, so row i is not line i + 1
    return table.append_column("_line", pa.array(np.arange(1, lines + 1)))


def count_lines(path):
    """Lines in a file (a last line without "\n" counts), read in 16 MB blocks."""
    lines, tail = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            lines += block.count(b"\n")
            tail = block[-1:]
    return lines + (tail != b"\n")


def csv_fast(path, fields):
    """pyarrow's CSV reader; None when a record needs the careful path (bad encoding, wrong field count,
    quoted newlines or blank lines, which would make row i + 2 differ from its line)."""
    import pyarrow.csv as pacsv
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","), [])
    present = [f for f in fields if f in header]
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
            delimiter="\t" if path.lower().endswith(".tsv") else ","),
            # every column as text: pyarrow would otherwise infer numbers and turn an id "007" into 7
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 include_columns=present))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if table.num_rows + 1 != count_lines(path) or len(set(header)) != len(header):
        return None
    if any(pc.any(pc.match_substring(table[f], "\n")).as_py() for f in present):
        return None
    cols = {f: table[f] if f in present else pa.nulls(table.num_rows, pa.string()) for f in fields}
    return pa.table({**cols, "_line": pa.array(np.arange(2, table.num_rows + 2))})


def json_array_rows(path, source, label, rejects):
    """(record index, dict) for each element of a JSON array (0-based, as json.load(f)[i] finds it)."""
    # surrogateescape: non-UTF-8 bytes become lone surrogates (SURROGATE), so one bad record is rejected instead
    # of the whole file failing to decode.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    # raw_decode record by record, not json.load: a malformed record then costs the records after it (named in
    # the reject), not every record of the file, and each reject names its index.
    decoder, rows = json.JSONDecoder(), []
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return None  # not an array: JSON Lines under a .json name
    pos, record = pos + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            reject(rejects, source, label, record, f"malformed JSON (line {text.count(chr(10), 0, err.pos) + 1}: "
                   f"{err.msg}); the rest of the file is skipped", text[pos:pos + 200])
            break
        if SURROGATE.search(text, pos, end):
            reject(rejects, source, label, record, "non-UTF-8 bytes", text[pos:end])
        elif not isinstance(row, dict):
            reject(rejects, source, label, record,
                   f"not a JSON object: expected an object, got {type(row).__name__}")
        else:
            rows.append((record, row))
        pos, record = end, record + 1
    return rows


def csv_rows(path, source, label, rejects):
    """(line, dict) per CSV record, with the line where the record starts (quoted fields may span lines)."""
    rows = []
    # newline="": the csv module's requirement for quoted fields that hold newlines
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
        header = next(reader, [])
        start = reader.line_num + 1
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                reject(rejects, source, label, start, f"malformed CSV ({err})")
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not rec:
                continue
            if SURROGATE.search("\x1f".join(rec)):  # all fields in one search; \x1f cannot form a surrogate
                reject(rejects, source, label, line, "non-UTF-8 bytes", ",".join(rec).encode(
                    "utf-8", "surrogateescape").decode("utf-8", "replace"))
            elif len(rec) != len(header):
                reject(rejects, source, label, line, f"expected {len(header)} fields ({', '.join(header)}), "
                       f"got {len(rec)}", ",".join(rec))
            else:
                rows.append((line, dict(zip(header, rec))))
    return rows


def arrow_rows(table):
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


def table_columns(table, fields, source, label, rejects):
    """An Arrow table (Parquet, save_to_disk, hub) -> the fields as strings; nested values are wrong types."""
    cols = {}
    keep = np.ones(table.num_rows, dtype=bool)
    for f in fields:
        if f not in table.column_names:
            cols[f] = pa.nulls(table.num_rows, pa.string())
            continue
        col = table[f].combine_chunks() if table.num_rows else pa.array([], pa.string())
        # numbers are written out as text, as as_text does for JSON rows; lists and structs are wrong types
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type) \
                or pa.types.is_floating(col.type) or pa.types.is_null(col.type):
            cols[f] = col.cast(pa.string())
            continue
        for i in np.flatnonzero(~np.asarray(col.is_null())):
            if keep[i]:
                reject(rejects, source, label, i + 1, f"wrong type: {f!r} is {col.type}, expected a string")
            keep[i] = False
        cols[f] = pa.nulls(table.num_rows, pa.string())
    out = pa.table({**cols, "_line": pa.array(np.arange(1, table.num_rows + 1))})
    return out.filter(pa.array(keep))


def load_input(kind, target, fields, source, label, rejects):
    """(records, unit) of one input: records are a table of `fields` as strings (column formats), or
    [(line, dict)] (fields None); unit says what the line numbers count: "line", or "record" (a JSON array)."""
    try:
        # a .json file is a JSON array or, as often, JSON Lines under that name: json_array_rows tells them apart
        rows = json_array_rows(target, source, label, rejects) if kind == "file" and os.path.isfile(target) \
            and target.lower().endswith(".json") else None
        if rows is not None:
            return (rows if fields is None else dict_rows_to_table(rows, fields, source, label, rejects)), "record"
        return read_input(kind, target, fields, source, label, rejects), "line"
    except (OSError, ValueError, pa.ArrowException) as err:  # a whole file unreadable: one clear error
        raise BuildError(f"{label}: cannot read it ({type(err).__name__}: {err})") from None


def read_input(kind, target, fields, source, label, rejects):
    """load_input for every layout but a JSON array."""
    if kind == "hub":
        import datasets
        repo, data_file = target
        ds = datasets.load_dataset(repo, data_files=data_file, split="train") if data_file else \
            datasets.load_dataset(repo, split="train")
        table = ds.data.table
        return arrow_rows(table) if fields is None else table_columns(table, fields, source, label, rejects)
    path = target
    low = path.lower()
    if os.path.isdir(path):
        import datasets
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise BuildError(f"{label} holds several splits ({', '.join(ds)}): point the source at one, "
                             f"e.g. {os.path.join(label, next(iter(ds)))}")
        table = ds.data.table
        return arrow_rows(table) if fields is None else table_columns(table, fields, source, label, rejects)
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        return arrow_rows(table) if fields is None else table_columns(table, fields, source, label, rejects)
    if low.endswith((".csv", ".tsv")):
        fast = csv_fast(path, fields) if fields is not None else None
        if fast is not None:
            return fast
        rows = csv_rows(path, source, label, rejects)
        return rows if fields is None else dict_rows_to_table(rows, fields, source, label, rejects)
    if fields is not None:
        fast = jsonl_fast(path, fields)
        if fast is not None:
            return fast
    rows = list(common.read_jsonl(path, on_error=lambda line, reason, raw: reject(
        rejects, source, label, line, reader_reason(reason), raw)))
    return rows if fields is None else dict_rows_to_table(rows, fields, source, label, rejects)


# ---------------------------------------------------------------- column-wise helpers

def as_lists(lens, values):
    """values grouped into consecutive lists of these lengths (an Arrow ListArray)."""
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(np.asarray(lens, dtype=np.int64))])
                                             .astype(np.int32)), values)


def build_messages(turns):
    """[(role, StringArray)] -> list<struct> messages; a turn is left out of a row where its content is null."""
    n, k = len(turns[0][1]), len(turns)
    present = np.stack([~np.asarray(arr.is_null(), dtype=bool) for _, arr in turns], axis=1)
    take = (np.arange(k)[None, :] * n + np.arange(n)[:, None])[present]
    contents = pa.concat_arrays([arr.cast(pa.string()) for _, arr in turns]).take(pa.array(take))
    roles = pa.DictionaryArray.from_arrays(pa.array(np.nonzero(present)[1].astype(np.int8)),
                                           pa.array([r for r, _ in turns])).cast(pa.string())
    nulls = pa.nulls(len(take), pa.string())
    struct = pa.StructArray.from_arrays([roles, contents, nulls, nulls, nulls],
                                        fields=list(MESSAGE_TYPE))
    return as_lists(present.sum(axis=1), struct)


def const_tags(n, tags):
    """The same tags on n rows."""
    values = pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(len(tags), dtype=np.int32), n)),
                                            pa.array(list(tags), pa.string())).cast(pa.string())
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * len(tags)), values)


def append_tag(tags, tag, mask):
    """Append `tag` to the rows where mask is True (and the tag is not there yet), without a row loop."""
    mask = np.asarray(mask, dtype=bool) & ~has_tag(tags, tag)
    if not mask.any():
        return tags
    lens = np.asarray(pc.list_value_length(tags), dtype=np.int64)
    flat = tags.flatten()
    new_lens = lens + mask
    new_starts = np.concatenate([[0], np.cumsum(new_lens)[:-1]])
    old_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    take = np.full(int(new_lens.sum()), len(flat))  # default: the appended tag
    take[np.repeat(new_starts - old_starts, lens) + np.arange(len(flat))] = np.arange(len(flat))
    values = pa.concat_arrays([flat, pa.array([tag], pa.string())]).take(pa.array(take))
    return as_lists(new_lens, values)


def has_tag(tags, tag):
    hits = np.asarray(pc.equal(tags.flatten(), tag).fill_null(False), dtype=np.int64)
    return np.bincount(np.asarray(pc.list_parent_indices(tags)), weights=hits, minlength=len(tags)) > 0


def first_reason(n, checks):
    """[(bool mask, reason)] -> a string array with the first failing reason per row (null = fine)."""
    out = pa.nulls(n, pa.string())
    for mask, reason in reversed(checks):  # last check first: an earlier failing check overwrites a later one
        out = pc.if_else(pa.array(np.asarray(mask, dtype=bool)), pa.scalar(reason), out)
    return out


def blank(arr):
    """Empty or whitespace only (the anchored regex stops at the first other character: no copy)."""
    return np.asarray(pc.match_substring_regex(arr.fill_null(""), r"^[\s\p{Z}]*$"), dtype=bool)


def is_null(arr):
    return np.asarray(arr.is_null(), dtype=bool)


# ---------------------------------------------------------------- column formats (one table batch at a time)

def math_answer(answer, style):
    if style == "boxed":
        return pc.binary_join_element_wise("\\boxed{", answer, "}", "")
    return answer


def adapt_cmath(t, src, cfg):
    question = pc.coalesce(t["question"], t["input"]).combine_chunks()
    golden = t["golden"].combine_chunks()
    reason = first_reason(len(t), [(is_null(question), "missing field 'question' (or 'input')"),
                                   (is_null(golden), "missing field 'golden'"),
                                   (blank(question), "empty question"), (blank(golden), "empty answer")])
    messages = build_messages([("user", question), ("assistant", math_answer(golden, cfg["math_answer_style"]))])
    return messages, const_tags(len(t), src["tags"]), reason, {}


SIMPLE_NUMBER = r"^-?\d+(\.\d+)?$"
PAST_END = "placeholder past the end of Numbers (N_ij or numberI names the value at index ij or I)"


def strip_zeros(arr):
    """Plain decimals without trailing zeros: "8.0" -> "8", "2.50" -> "2.5" (MAWPS writes every number as float)."""
    decimal = pc.match_substring(arr, ".").fill_null(False)
    if not pc.any(decimal).as_py():
        return arr
    short = pc.utf8_rtrim(pc.utf8_rtrim(arr.filter(decimal), characters="0"), characters=".")
    return pc.replace_with_mask(arr, decimal, short)


def number_text(text):
    """One MAWPS number as text, a float's trailing zeros dropped ("8.0" -> "8", "2.50" -> "2.5": MAWPS writes every
    number as a float); not a number raises ValueError."""
    if re.fullmatch(SIMPLE_NUMBER, text):
        return text.rstrip("0").rstrip(".") if "." in text else text
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return str(int(value)) if value.is_integer() else repr(value)


def mawps_row(question, numbers, answer):
    """(prompt, answer, reason) of one MAWPS row: each placeholder replaced by its number."""
    if question is None or numbers is None or answer is None:
        missing = [f for f, v in (("Question", question), ("Numbers", numbers), ("Answer", answer)) if v is None]
        return None, None, f"missing field {missing[0]!r}"
    try:
        values = [number_text(v) for v in numbers.split()]
        answer = number_text(answer)
    except ValueError:
        return None, None, f"wrong type: Answer/Numbers must be numbers, got {answer!r} / {numbers!r}"
    parts = PLACEHOLDER.split(question)  # text, N_ij's ij, numberI's I, text...: one regex pass
    wanted = [int(a or b) for a, b in zip(parts[1::3], parts[2::3])]
    if wanted and max(wanted) >= len(values):
        return None, None, PAST_END
    parts[1::3], parts[2::3] = [values[i] for i in wanted], [""] * len(wanted)
    return "".join(parts), answer, None


def list_starts(lists):
    lens = np.asarray(pc.list_value_length(lists).fill_null(0), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64), lens


def fill_placeholders(question, numbers):
    """Question with each N_ij (or numberI) replaced by numbers[row][ij], without a row loop: the question is cut
    at the placeholders ("a N_01 b" -> ["a ", "01", " b"]), odd pieces looked up, pieces joined again.
    -> (prompt, mask of rows naming a placeholder past the end of Numbers)."""
    parts = pc.split_pattern(pc.replace_substring_regex(question, PLACEHOLDER.pattern, "\x00\\1\\2\x00"), "\x00")
    flat = parts.flatten()
    parents = np.asarray(pc.list_parent_indices(parts), dtype=np.int64)
    starts, lens = list_starts(parts)
    odd = ((np.arange(len(flat)) - starts[parents]) % 2 == 1)
    wanted = np.asarray(flat.filter(pa.array(odd)).cast(pa.int64()), dtype=np.int64)
    rows = parents[odd]
    num_starts, num_lens = list_starts(numbers)
    past_end = wanted >= num_lens[rows]
    values = numbers.flatten()
    if len(values):
        picked = values.take(pa.array(np.minimum(num_starts[rows] + wanted, len(values) - 1)))
    else:
        picked = pa.array([""] * len(wanted), pa.string())
    take = np.arange(len(flat))
    take[odd] = len(flat) + np.arange(int(odd.sum()))
    filled = pa.concat_arrays([flat, picked.cast(pa.string())]).take(pa.array(take))
    bad = np.bincount(rows, weights=past_end, minlength=len(question)) > 0
    return pc.binary_join(as_lists(lens, filled), ""), bad


# A speed path: MAWPS column-wise, mawps_row deciding only the rows whose numbers are not plain decimals ("1e3",
# "abc"). The bench's 300k MAWPS rows take 2.1 s this way against 7.5 s with mawps_row on every row; bench_build's
# 1M-row build took 36.7 s with it and 44.0 s without (steps 1-4: 23.9 s against 32.0 s; 2 cores at load 5).
def adapt_mawps(t, src, cfg):
    question, numbers, answer = (t[f].combine_chunks() for f in ("Question", "Numbers", "Answer"))
    numbers_list = pc.utf8_split_whitespace(numbers.fill_null(""))
    plain = np.asarray(pc.match_substring_regex(numbers_list.flatten(), SIMPLE_NUMBER), dtype=np.int64)
    parents = np.asarray(pc.list_parent_indices(numbers_list), dtype=np.int64)
    unusual = np.bincount(parents, weights=1 - plain, minlength=len(t)) > 0
    unusual |= ~np.asarray(pc.match_substring_regex(answer, SIMPLE_NUMBER).fill_null(True), dtype=bool)
    _, lens = list_starts(numbers_list)
    numbers_list = as_lists(lens, strip_zeros(numbers_list.flatten()))
    prompt, past_end = fill_placeholders(question.fill_null(""), numbers_list)
    answer_text = strip_zeros(answer.fill_null(""))
    reason = first_reason(len(t), [(is_null(question), "missing field 'Question'"),
                                   (is_null(numbers), "missing field 'Numbers'"),
                                   (is_null(answer), "missing field 'Answer'")])
    careful = np.flatnonzero(unusual & ~np.asarray(reason.is_valid(), dtype=bool))
    if len(careful):  # numbers like "1e3" or "abc": the row-by-row path decides (and words the reason)
        rows = zip(*(a.take(pa.array(careful)).to_pylist() for a in (question, numbers, answer)))
        out = [mawps_row(*r) for r in rows]
        mask = np.zeros(len(t), dtype=bool)
        mask[careful] = True
        mask = pa.array(mask)
        prompt = pc.replace_with_mask(prompt, mask, pa.array([o[0] or "" for o in out], pa.string()))
        answer_text = pc.replace_with_mask(answer_text, mask, pa.array([o[1] or "" for o in out], pa.string()))
        reason = pc.replace_with_mask(reason, mask, pa.array([o[2] for o in out], pa.string()))
        past_end[careful] = False
    reason = pc.coalesce(reason, first_reason(len(t), [
        (past_end, PAST_END), (blank(prompt), "empty question"),
        (blank(answer_text), "empty answer")]))
    messages = build_messages([("user", prompt), ("assistant", math_answer(answer_text, cfg["math_answer_style"]))])
    return messages, const_tags(len(t), src["tags"]), reason, {}


def adapt_emoji(t, src, cfg):
    question = t["question"].combine_chunks()
    zh, en = t["answer_zh"].combine_chunks(), t["answer_en"].combine_chunks()
    use_zh = ~blank(zh)
    answer = pc.if_else(pa.array(use_zh), zh, en)
    reason = first_reason(len(t), [(is_null(question), "missing field 'question'"),
                                   (is_null(zh) & is_null(en), "missing field 'answer_zh' (and 'answer_en')"),
                                   (blank(question), "empty question"),
                                   (blank(answer), "empty answer (answer_zh and answer_en)")])
    tags = append_tag(append_tag(const_tags(len(t), src["tags"]), "zh", use_zh), "en", ~use_zh)
    fallback = int((~use_zh & ~blank(answer) & is_null(reason)).sum())
    return build_messages([("user", question), ("assistant", answer)]), tags, reason, {"answer_en_fallback": fallback}


def adapt_alpaca(t, src, cfg, fields=("instruction", "input", "output", "system")):
    instruction, extra, output, system = (t[f].combine_chunks() if f else pa.nulls(len(t), pa.string())
                                          for f in fields)
    prompt = pc.if_else(pa.array(blank(extra)), instruction,
                        pc.binary_join_element_wise(instruction, extra, "\n\n"))
    system = pc.if_else(pa.array(blank(system)), pa.nulls(len(t), pa.string()), system)
    reason = first_reason(len(t), [(is_null(instruction), f"missing field {fields[0]!r}"),
                                   (is_null(output), f"missing field {fields[2]!r}"),
                                   (blank(prompt), "empty prompt"), (blank(output), "empty answer")])
    messages = build_messages([("system", system), ("user", prompt), ("assistant", output)])
    return messages, const_tags(len(t), src["tags"]), reason, {}


def adapt_columns(t, src, cfg):
    return adapt_alpaca(t, src, cfg, fields=column_fields(src))


def id_field(src):
    """The column holding a row's own id: "id", or the one a "columns" source names."""
    return (src.get("columns") or {}).get("id") or "id"


def column_fields(src):
    """(prompt, input, answer, system) column names of a "columns" source; None where absent."""
    cols = src.get("columns") or {}
    return cols["prompt"], cols.get("input"), cols.get("answer") or "answer", cols.get("system")


# ---------------------------------------------------------------- nested layouts (one row at a time)

def content_text(content, where):
    """(text, reasoning or None) of a content: a string, or a list of parts. Text parts carry their text under
    "text" (OpenAI) or "value" (LLaMA-Factory v1); a "reasoning" part (LLaMA-Factory v1) is reasoning_content."""
    if content is None:
        return "", None
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise RowError(f"wrong type: content of {where} is {type(content).__name__}, expected a string or parts")
    texts, thoughts = [], []
    for k, part in enumerate(content, 1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "reasoning"):
            raise RowError(f"content part {k} of {where} has type {kind!r}, not text (only text and reasoning "
                           f"parts are supported)")
        value = part.get("text", part.get("value"))
        if not isinstance(value, str):
            raise RowError(f"content part {k} of {where} has no text (\"text\" or \"value\" string)")
        (texts if kind == "text" else thoughts).append(value)
    return "".join(texts), "".join(thoughts) or None


def tool_call(call, n):
    """A raw tool call in the built layout; the rule (and its reasons) is common.parse_tool_call's."""
    parsed, problem = common.parse_tool_call(call, n, flat=True)
    if problem:
        raise RowError(problem)
    return parsed


def tool_schemas(tools):
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("tools is not valid JSON") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("wrong type: tools must be a list of objects")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        if not isinstance(fn.get("name"), str):
            raise RowError("a tool without a name")
        out.append({"type": "function", "function": fn})
    return out


def check_turns(messages):
    """common.conversation_problems' first reason as a RowError; a tool result without tool_call_id gets the id of
    the first call still open (the template pairs them in that order)."""
    problems = common.conversation_problems(messages)
    if problems:
        raise RowError(problems[0])
    pending = []
    for m in messages:
        if m["role"] == "assistant":
            pending = [c["id"] for c in m.get("tool_calls") or []]
        elif m["role"] == "tool":
            m["tool_call_id"] = m["tool_call_id"] or pending[0]
            pending.remove(m["tool_call_id"])


def reasoning(message, mode, stats):
    text = message.pop("reasoning_content", None)
    if not text:
        return
    if not isinstance(text, str):
        raise RowError(f"wrong type: reasoning_content is {type(text).__name__}, expected a string")
    if mode == "inline":
        message["content"] = f"<think>\n{text.strip()}\n</think>\n\n{message['content']}"
        stats["reasoning_inlined"] += 1
    else:
        stats["reasoning_dropped"] += 1


def nonempty_list(row, key):
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field {key!r}")
    if not isinstance(value, list) or not value:
        raise RowError(f"wrong type: {key!r} must be a non-empty list")
    return value


def messages_row(row, mode, stats):
    """A `messages` row -> (messages, tools, tags); RowError names what is wrong."""
    raw = nonempty_list(row, "messages")
    messages, calls = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"wrong type: message {i + 1} is {type(m).__name__}, expected an object")
        if m.get("role") not in ROLES:
            raise RowError(f"unknown role {m.get('role')!r} in message {i + 1}")
        text, thought = content_text(m.get("content"), f"message {i + 1}")
        out = {"role": m["role"], "content": text}
        if m["role"] == "assistant":
            if m.get("tool_calls"):
                if not isinstance(m["tool_calls"], list):
                    raise RowError("wrong type: tool_calls must be a list")
                out["tool_calls"] = [tool_call(c, calls + k) for k, c in enumerate(m["tool_calls"])]
                calls += len(out["tool_calls"])
            if m.get("reasoning_content") or thought:
                out["reasoning_content"] = m.get("reasoning_content") or thought
                reasoning(out, mode, stats)
        elif thought:
            raise RowError(f"a reasoning part in message {i + 1} ({m['role']}): only assistant turns reason")
        if m["role"] == "tool":
            out["tool_call_id"] = as_text(m.get("tool_call_id"), "tool_call_id")
            out["name"] = as_text(m.get("name"), "name")
        messages.append(out)
    check_turns(messages)
    tags = row.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RowError("wrong type: tags must be a list of strings")
    return messages, tool_schemas(row.get("tools")), tags


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "function_call", "observation": "tool"}


def sharegpt_row(row, mode, stats):
    """A ShareGPT row (conversations of {from, value}) -> the messages layout, then the same checks."""
    conv = nonempty_list(row, "conversations")
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) \
        and row["system"].strip() else []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError(f"wrong type: turn {i + 1} is {type(turn).__name__}, expected an object")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise RowError(f"unknown role {turn.get('from')!r} in turn {i + 1}")
        value, thought = content_text(turn.get("value"), f"turn {i + 1}")
        if thought:
            raise RowError(f"a reasoning part in turn {i + 1}: ShareGPT has no place for it (use format messages)")
        if role == "function_call":
            try:
                calls = json.loads(value)
            except json.JSONDecodeError:
                raise RowError(f"function_call in turn {i + 1} is not valid JSON") from None
            calls = calls if isinstance(calls, list) else [calls]
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
                messages[-1]["tool_calls"] = calls  # gpt text, then its call: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": value})
    return messages_row({"messages": messages, "tools": row.get("tools"), "tags": row.get("tags")}, mode, stats)


# ---------------------------------------------------------------- the registry: one entry per format

class Format(NamedTuple):
    """One source format. fields(src): the raw fields read as strings, None for a nested layout (rows read as
    dicts); required(src): groups of fields of which a file must hold one somewhere, else it is not this format;
    adapt: column formats (table, src, data config) -> (messages, tags, reasons, counts), nested layouts
    (row, data.reasoning_content, counts) -> (messages, tools, the row's own tags)."""
    fields: Callable
    required: Callable
    adapt: Callable


def fixed(*values):
    return lambda src: list(values)


FORMATS = {
    "cmath": Format(fixed("question", "input", "golden"), fixed(("question", "input"), ("golden",)), adapt_cmath),
    "mawps": Format(fixed("Question", "Numbers", "Answer"), fixed(("Question",), ("Numbers",), ("Answer",)),
                    adapt_mawps),
    "emoji": Format(fixed("question", "answer_zh", "answer_en"), fixed(("question",), ("answer_zh", "answer_en")),
                    adapt_emoji),
    "alpaca": Format(fixed("instruction", "input", "output", "system"), fixed(("instruction",), ("output",)),
                     adapt_alpaca),
    "columns": Format(lambda src: [f for f in column_fields(src) if f],
                      lambda src: [(column_fields(src)[0],), (column_fields(src)[2],)], adapt_columns),
    "sharegpt": Format(lambda src: None, lambda src: [], sharegpt_row),
    "messages": Format(lambda src: None, lambda src: [], messages_row),
}
