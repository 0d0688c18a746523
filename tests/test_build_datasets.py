"""build_datasets.py: adapters on the shipped raw samples, dedup, mixing, the split rule, decontamination,
every bad-input case, reproducibility, and the real CLI. Builds go to tmp dirs (never dataset/processed)."""

import copy
import csv
import json
import os
import random
import re
import subprocess
import sys
import unicodedata

import pyarrow as pa
import pytest

import build_datasets
import common
import config
import formats

ROOT = common.ROOT
RAW = os.path.join(ROOT, "dataset", "raw")


# ---------------------------------------------------------------- helpers

def run_cli(tmp, *args):
    cmd = [sys.executable, "build_datasets.py", "--set", f"data.processed_dir={tmp}/processed",
           "--set", f"data.pools_dir={tmp}/pools", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def cfg_for(tmp, sources=None, *overrides):
    items = [f"data.processed_dir={tmp}/processed", f"data.pools_dir={tmp}/pools", *overrides]
    if sources is not None:
        items.append(f"data.sources={sources!r}")
    return config.build_config(None, items)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pool_chats(tmp, name):
    import datasets
    return [common.row_to_chat(row) for row in datasets.load_from_disk(os.path.join(tmp, "pools", name))]


def clean(text):
    """The cleaning rule, written independently: control characters out, trailing whitespace off."""
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()


def prompt_key(text):
    """The split/decontamination key, written independently with unicodedata."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if not (c in "\t\n\f\r " or unicodedata.category(c)[0] in "PSZ"))


def number(text):
    return text[:-2] if text.endswith(".0") else text


def raw_lines(name):
    with open(os.path.join(RAW, name), "rb") as f:
        return f.read().split(b"\n")


def rejected_lines(build, source):
    """Lines (records, for a JSON array) of a source's rejected rows."""
    return {r.get("line", r.get("record")) for r in build["rejects"] if r["source"] == source}


def kind(reason):
    """A reject reason without its details or the message number it starts with."""
    return re.sub(r"^message \d+: ", "", reason).split(" (")[0].split(":")[0]


def write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return str(path)


def msgs(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="session")
def default_build(tmp_path_factory):
    """The real CLI on the shipped samples, as a fresh clone runs it (offline: the local files)."""
    tmp = str(tmp_path_factory.mktemp("build_a"))
    proc = run_cli(tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = os.path.join(tmp, "processed")
    return {"tmp": tmp, "out": out, "stdout": proc.stdout, "report": json.load(open(os.path.join(out, "report.json"))),
            "rejects": read_jsonl(os.path.join(out, "rejects.jsonl")),
            "train": read_jsonl(os.path.join(out, "train.jsonl")), "val": read_jsonl(os.path.join(out, "val.jsonl"))}


# ---------------------------------------------------------------- the default build through the CLI

def test_cli_prints_every_step_and_a_consistent_report(default_build):
    out, rep = default_build["stdout"], default_build["report"]
    for step in ("[1-3/8]", "[4/8]", "[5/8]", "[6/8]", "[7/8]", "[8/8]", "## Sources", "## Mix", "## Rejected rows"):
        assert step in out
    for name, s in rep["sources"].items():
        assert s["rows_in"] == s["kept"] + s["rejected"], name
        assert s["pool_rows"] == s["kept"] - s["deduplicated"], name  # not decontaminated: flagged rows stay
    mix = rep["mix"]
    assert sum(s["rows"] for s in mix["sources"].values()) == mix["rows"]
    assert rep["split"]["train"] + rep["split"]["validation"] + rep["split"]["validation_copies_dropped"] == mix["rows"]
    val = [json.dumps(r, sort_keys=True) for r in default_build["val"]]
    assert len(set(val)) == len(val)  # resampled repeats stay out of validation
    assert len(default_build["train"]) == rep["split"]["train"]
    assert len(default_build["val"]) == rep["split"]["validation"]
    assert not rep["split"]["capped"] and rep["split"]["validation"] >= 100
    for name in rep["sources"]:
        assert os.path.isfile(os.path.join(default_build["tmp"], "pools", name, "state.json"))
    for f in ("train/state.json", "validation/state.json", "report.md", "config.json"):
        assert os.path.isfile(os.path.join(default_build["out"], f))
    saved = json.load(open(os.path.join(default_build["out"], "config.json")))["config"]
    assert saved["data"]["processed_dir"] == os.path.join(default_build["tmp"], "processed")


def test_jsonl_is_utf8_and_identical_to_json_dumps(default_build):
    with open(os.path.join(default_build["out"], "train.jsonl"), encoding="utf-8") as f:
        text = f.read()
    assert "小明" in text or "芳芳" in text or "😊" in text or "北京" in text  # Chinese or emoji kept as is
    for line in text.splitlines():
        assert line == json.dumps(json.loads(line), ensure_ascii=False)
    tools = [r for r in default_build["train"] + default_build["val"] if "tools" in r]
    assert tools and all(r["tools"][0]["type"] == "function" for r in tools)


def test_load_split_and_row_to_chat_match_the_jsonl(default_build, qwen_tokenizer):
    cfg = {"data": {"processed_dir": default_build["out"]}}
    for split, rows in (("train", default_build["train"]), ("validation", default_build["val"])):
        ds = common.load_split(cfg, split)
        assert len(ds) == len(rows)
        for arrow_row, json_row in zip(ds, rows):
            assert common.row_to_chat(arrow_row) == common.row_to_chat(json_row)
            assert arrow_row["source"] == json_row["source"] and arrow_row["tags"] == json_row["tags"]
    from_jsonl = common.load_split(cfg, os.path.join(default_build["out"], "val.jsonl"))
    assert [common.row_to_chat(r) for r in from_jsonl] == [common.row_to_chat(r) for r in default_build["val"]]
    tool_row = next(r for r in default_build["train"] + default_build["val"]
                    if any(m.get("tool_calls") for m in r["messages"]))
    messages, tools = common.row_to_chat(tool_row)
    enc = common.tokenize_conversation(qwen_tokenizer, messages, tools)
    text = qwen_tokenizer.decode(enc["input_ids"])
    assert "<tool_call>" in text and messages[1]["tool_calls"][0]["function"]["name"] in text
    assert all(end is not None for end in enc["turn_ends"])
    with pytest.raises(FileNotFoundError, match="build_datasets.py"):
        common.load_split({"data": {"processed_dir": default_build["tmp"] + "/nothing"}}, "train")


def test_reproducible_bytes(default_build, tmp_path):
    proc = run_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for base_a, base_b in ((default_build["out"], str(tmp_path / "processed")),
                           (os.path.join(default_build["tmp"], "pools"), str(tmp_path / "pools"))):
        files = sorted(os.path.relpath(os.path.join(d, f), base_a) for d, _, fs in os.walk(base_a) for f in fs)
        assert files == sorted(os.path.relpath(os.path.join(d, f), base_b) for d, _, fs in os.walk(base_b) for f in fs)
        for rel in files:
            a, b = open(os.path.join(base_a, rel), "rb").read(), open(os.path.join(base_b, rel), "rb").read()
            if rel == "config.json":  # holds the two output paths
                a, b = (json.loads(x) for x in (a, b))
                for c in (a, b):
                    c["config"]["data"].pop("processed_dir"), c["config"]["data"].pop("pools_dir")
            assert a == b, rel


# ---------------------------------------------------------------- adapters on the shipped raw samples

def test_cmath_adapter(default_build):
    bad = rejected_lines(default_build, "cmath")
    expected = set()
    for i, line in enumerate(raw_lines("cmath_dev.jsonl"), 1):
        if line.strip() and i not in bad:
            row = json.loads(line)
            expected.add((clean(row.get("question") or row["input"]), clean(row["golden"])))
    got = {(m[0]["content"], m[1]["content"]) for m, _ in pool_chats(default_build["tmp"], "cmath")}
    assert got == expected and len(got) > 20
    assert default_build["report"]["sources"]["cmath"]["cleaned"] >= 1  # the row with \x07 and trailing spaces


def test_mawps_adapter_fills_placeholders(default_build):
    bad = rejected_lines(default_build, "mawps")
    expected = set()
    with open(os.path.join(RAW, "MAWPS.csv"), encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if reader.line_num in bad:
                continue
            question = row["Question"]
            for i, value in enumerate(row["Numbers"].split()):
                question = question.replace(f"N_{i:02d}", number(value))
            expected.add((question, number(row["Answer"])))
    got = {(m[0]["content"], m[1]["content"]) for m, _ in pool_chats(default_build["tmp"], "mawps")}
    assert got == expected and len(got) > 20
    assert not any("N_0" in q or a.endswith(".0") for q, a in got)


def test_emoji_adapter_falls_back_to_answer_en(default_build):
    bad = rejected_lines(default_build, "emoji")
    rows = [json.loads(line) for i, line in enumerate(raw_lines("emoji.jsonl"), 1) if line.strip() and i not in bad]
    expected = {(r["question"], r["answer_zh"] if r["answer_zh"].strip() else r["answer_en"]) for r in rows}
    import datasets
    pool = datasets.load_from_disk(os.path.join(default_build["tmp"], "pools", "emoji"))
    assert {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in pool} == expected
    fallbacks = sum(1 for r in rows if not r["answer_zh"].strip())
    assert default_build["report"]["sources"]["emoji"]["answer_en_fallback"] == fallbacks > 0
    assert all(("en" in r["tags"]) == (not any("\u4e00" <= c <= "\u9fff" for c in r["messages"][1]["content"]))
               for r in pool)


def test_alpaca_adapter(default_build):
    bad = rejected_lines(default_build, "alpaca")
    text = open(os.path.join(RAW, "alpaca.json"), encoding="utf-8").read()
    expected = set()
    for index, rec in enumerate(json.loads(text)):
        if index in bad:
            continue
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        expected.add(((rec.get("system"),) if rec.get("system") else ()) + (user, rec["output"]))
    got = {tuple(m["content"] for m in msgs_) for msgs_, _ in pool_chats(default_build["tmp"], "alpaca")}
    assert got == expected
    json_rows = [m for m, _ in pool_chats(default_build["tmp"], "alpaca") if m[-1]["content"].startswith("{")]
    import datasets
    tagged = [r for r in datasets.load_from_disk(os.path.join(default_build["tmp"], "pools", "alpaca"))
              if "json-only" in r["tags"]]
    assert len(tagged) == len(json_rows) > 0  # answers that are only a JSON object get the json-only tag


def test_sharegpt_and_messages_adapters_keep_tools_and_drop_reasoning(default_build):
    chats = pool_chats(default_build["tmp"], "sharegpt")
    tool_chats = [(m, t) for m, t in chats if t]
    assert tool_chats
    for messages, tools in tool_chats:
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        call = messages[1]["tool_calls"][0]
        assert call["type"] == "function" and isinstance(call["function"]["arguments"], dict)
        assert messages[2]["tool_call_id"] == call["id"]
        assert call["function"]["name"] in {t["function"]["name"] for t in tools}
    assert any(m[0]["role"] == "system" for m, _ in chats)
    raw = [json.loads(line) for i, line in enumerate(raw_lines("messages.jsonl"), 1)
           if line.strip() and i not in rejected_lines(default_build, "messages")]
    with_reasoning = [r for r in raw if any(m.get("reasoning_content") for m in r["messages"])]
    assert default_build["report"]["sources"]["messages"]["reasoning_dropped"] == len(with_reasoning) > 0
    chats = pool_chats(default_build["tmp"], "messages")
    assert not any("reasoning_content" in m or "<think>" in m["content"] for c, _ in chats for m in c)
    parallel = [c for c, _ in chats if any(len(m.get("tool_calls", [])) == 2 for m in c)]
    assert parallel and [m["tool_call_id"] for m in parallel[0] if m["role"] == "tool"] == ["c1", "c2"]


def test_dedup_counts_match_duplicate_lines(default_build):
    for name, file in (("cmath", "cmath_dev.jsonl"), ("emoji", "emoji.jsonl"), ("sharegpt", "sharegpt.jsonl"),
                       ("messages", "messages.jsonl"), ("json_only", "json_only.jsonl")):
        bad = rejected_lines(default_build, name)
        kept = [line for i, line in enumerate(raw_lines(file), 1) if line.strip() and i not in bad]
        assert default_build["report"]["sources"][name]["deduplicated"] == len(kept) - len(set(kept)) > 0, name


def test_every_shipped_broken_row_is_rejected_with_its_line(default_build):
    kinds = set()
    for r in default_build["rejects"]:
        path = os.path.join(ROOT, r["file"])
        if "record" in r:  # a JSON array: the record at that index is the bad one
            rec = json.load(open(path, encoding="utf-8"))[r["record"]]
            m = re.match(r"missing field '(\w+)'", r["reason"])
            assert not m or not rec.get(m.group(1))
            kinds.add(kind(r["reason"]))
            continue
        with open(path, "rb") as f:
            line = f.read().split(b"\n")[r["line"] - 1]
        if "non-UTF-8" in r["reason"]:
            with pytest.raises(UnicodeDecodeError):
                line.decode("utf-8")
        elif r["reason"].startswith("malformed JSON"):
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
        elif path.endswith(".jsonl"):
            row = json.loads(line)
            m = re.match(r"missing field '(\w+)'", r["reason"])
            if m:
                assert not row.get(m.group(1))
            if "before any user turn" in r["reason"]:
                turns = row.get("messages") or row.get("conversations")
                assert (turns[0].get("role") or turns[0].get("from")) in ("assistant", "gpt")
        kinds.add(kind(r["reason"]))
    for name in ("malformed JSON", "non-UTF-8 bytes", "wrong type", "empty answer",
                 "assistant turn before any user turn"):
        assert name in kinds
    assert any(k.startswith("missing field") for k in kinds)
    assert default_build["report"]["rejects"]["total"] == len(default_build["rejects"]) > 0


# ---------------------------------------------------------------- bad input, exact lines, --strict

def test_each_bad_input_lands_in_rejects_with_file_line_reason(tmp_path):
    good = json.dumps({"question": "1加1等于几？", "golden": "2"}, ensure_ascii=False)
    cm = write(tmp_path / "cm.jsonl", [
        good,
        '{"question": "2加2等于几？", "golden": "4"',  # 2 malformed JSON
        json.dumps({"question": "3加3等于几？"}, ensure_ascii=False),  # 3 missing field
        json.dumps({"question": "4加4等于几？", "golden": [8]}, ensure_ascii=False),  # 4 wrong type
        json.dumps({"question": "5加5等于几？", "golden": "  "}, ensure_ascii=False),  # 5 empty answer
        b'{"question": "\xc1\xfa", "golden": "1"}',  # 6 non-UTF-8
        json.dumps({"question": "7加7等于几？", "golden": "14"}, ensure_ascii=False)])
    ms = write(tmp_path / "ms.jsonl", [
        json.dumps(msgs("hi", "hello")),
        json.dumps({"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]}),  # 2 assistant before any user
        json.dumps(msgs("bye", "")),  # 3 empty answer
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}),  # 4
    ])
    sources = {"cm": {"format": "cmath", "local": cm, "weight": 1.0}, "ms": {"format": "messages", "local": ms,
                                                                         "weight": 1.0}}
    rep = build_datasets.build(cfg_for(tmp_path, sources, "data.eval_files=[]", "data.min_valid=1"))
    got = {(r["file"], r["line"], kind(r["reason"]))
           for r in read_jsonl(tmp_path / "processed" / "rejects.jsonl")}
    assert got == {(cm, 2, "malformed JSON"), (cm, 3, "missing field 'golden'"), (cm, 4, "wrong type"),
                   (cm, 5, "empty answer"), (cm, 6, "non-UTF-8 bytes"),
                   (ms, 2, "assistant turn before any user turn"), (ms, 3, "empty answer"), (ms, 4, "wrong type")}
    assert rep["sources"]["cm"]["kept"] == 2 and rep["sources"]["ms"]["kept"] == 1


def test_strict_exits_1_and_unknown_format_is_a_clear_error(tmp_path):
    proc = run_cli(str(tmp_path / "a"), "--strict")
    assert proc.returncode == 1 and "rejects.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert os.path.isfile(tmp_path / "a" / "processed" / "rejects.jsonl")  # written before the exit
    proc = run_cli(str(tmp_path / "b"), "--set", "data.sources.cmath.format=yaml")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data.sources.cmath.format must be one of cmath, mawps" in proc.stderr and "got 'yaml'" in proc.stderr


def test_config_errors_before_any_work(tmp_path):
    txt = write(tmp_path / "data.txt", ["hello"])
    cases = [({"x": {"format": "alpaca", "local": txt, "weight": 1}}, "unknown file format"),
             ({"x": {"format": "cmath", "local": "dataset/raw/cmath_test.jsonl", "weight": 1}}, "cmath_test"),
             ({"x": {"format": "cmath", "local": str(tmp_path / "missing.jsonl"), "weight": 1}}, "not found"),
             ({"x": {"format": "alpaca", "local": txt, "weight": 0}}, "No data source")]
    for sources, message in cases:
        with pytest.raises(build_datasets.BuildError, match=message):
            build_datasets.build(cfg_for(tmp_path, sources))
    with pytest.raises(build_datasets.BuildError, match="use_hub is True"):
        build_datasets.build(cfg_for(tmp_path, None, "data.use_hub=True"))  # HF_HUB_OFFLINE=1 in the tests
    assert not os.path.exists(tmp_path / "processed")


# ---------------------------------------------------------------- mixing and splitting

@pytest.fixture
def three_pools(tmp_path):
    """Three pools of distinct rows in three layouts: 120 cmath JSONL, 80 alpaca JSON, 40 CSV columns."""
    a = write(tmp_path / "a.jsonl", [json.dumps({"question": f"题目{i}：{i}加{i + 1}等于几？", "golden": str(2 * i + 1)},
                                                ensure_ascii=False) for i in range(120)])
    with open(tmp_path / "b.json", "w", encoding="utf-8") as f:
        json.dump([{"instruction": f"Spell the number {i}.", "input": "", "output": f"n{i}"} for i in range(80)], f)
    with open(tmp_path / "c.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "a"])
        w.writerows([[f"Color number {i}?", f"c{i}"] for i in range(40)])
    return {"a": {"format": "cmath", "local": a, "weight": 0.5},
            "b": {"format": "alpaca", "local": str(tmp_path / "b.json"), "weight": 0.3},
            "c": {"format": "columns", "local": str(tmp_path / "c.csv"), "columns": {"prompt": "q", "answer": "a"},
                  "weight": 0.2}}


def mixed_rows(tmp_path):
    return read_jsonl(tmp_path / "processed" / "train.jsonl") + read_jsonl(tmp_path / "processed" / "val.jsonl")


def test_resample_counts_are_exact_and_balanced(three_pools, tmp_path):
    rep = build_datasets.build(cfg_for(tmp_path, three_pools, "data.total_size=400", "data.eval_files=[]"))
    mix = rep["mix"]["sources"]
    assert {n: s["rows"] for n, s in mix.items()} == {"a": 200, "b": 120, "c": 80}  # 400 x 0.5 / 0.3 / 0.2
    epochs = {n: s["effective_epochs"] for n, s in mix.items()}
    assert epochs == pytest.approx({"a": 200 / 120, "b": 1.5, "c": 2.0}, abs=1e-4)
    assert mix["a"]["distinct_rows"] == 120 and mix["c"]["distinct_rows"] == 40  # no row missed by chance
    train = read_jsonl(tmp_path / "processed" / "train.jsonl")
    c_train = [r["messages"][0]["content"] for r in train if r["source"] == "c"]
    assert c_train and all(c_train.count(p) == 2 for p in c_train)  # 2 epochs: every row twice, not 1 or 3
    assert rep["split"]["validation_copies_dropped"] == 400 - rep["split"]["train"] - rep["split"]["validation"]
    rep = build_datasets.build(cfg_for(tmp_path, three_pools, "data.eval_files=[]"))  # total_size: 0.9 x 240
    assert rep["mix"]["rows"] == 216 and [s["rows"] for s in rep["mix"]["sources"].values()] == [108, 65, 43]


def test_interleave_shuffles_each_pool_and_never_upsamples(three_pools, tmp_path):
    """Seed 000, 3.2.2 step 5.1: each pool shuffled, rows drawn by weight until pools run out, an exhausted pool
    never drawn again. The 40-row pool at weight 0.9 gives its 40 rows once (all_exhausted repeated the small
    pools ~20x), and a small total_size does not keep only the first rows of each file."""
    pools = {n: dict(s, weight=w) for (n, s), w in zip(three_pools.items(), (0.05, 0.05, 0.9))}
    rep = build_datasets.build(cfg_for(tmp_path, pools, "data.mix_mode=interleave", "data.eval_files=[]"))
    rows = mixed_rows(tmp_path)
    assert rep["mix"]["rows"] == len(rows) == 216  # total_size None: 0.9 x 240 rows, each at most once
    assert len({json.dumps(r["messages"]) for r in rows}) == 216
    assert rep["mix"]["sources"]["c"]["rows"] == 40 and rep["split"]["validation_copies_dropped"] == 0
    pools = {n: dict(s, weight=w) for (n, s), w in zip(three_pools.items(), (0.6, 0.3, 0.1))}
    rep = build_datasets.build(cfg_for(tmp_path, pools, "data.mix_mode=interleave", "data.eval_files=[]",
                                       "data.total_size=30", "data.min_valid=5"))
    picked = sorted(int(re.match(r"题目(\d+)", r["messages"][0]["content"]).group(1))
                    for r in mixed_rows(tmp_path) if r["source"] == "a")
    assert len(picked) == rep["mix"]["sources"]["a"]["rows"] > 5
    assert picked != list(range(len(picked)))  # shuffled: not the file's first rows


def test_min_validation_and_cap(three_pools, tmp_path):
    rep = build_datasets.build(cfg_for(tmp_path, three_pools, "data.eval_files=[]", "data.total_size=200"))
    assert rep["split"]["validation"] == 100 and rep["split"]["train"] == 100  # 10% would be 20: min_valid wins
    small = {"c": three_pools["c"]}
    rep = build_datasets.build(cfg_for(tmp_path, small, "data.eval_files=[]", "data.total_size=40"))
    assert rep["split"]["capped"] and rep["split"]["validation"] == 20 and rep["split"]["train"] == 20


def test_near_identical_prompts_never_straddle_the_split(tmp_path):
    variants = [lambda q: q, lambda q: q.upper() + "!!", lambda q: "  " + q.replace(" ", "  ") + " ?",
                lambda q: q.replace(",", "，")]
    lines = []
    for i in range(60):
        base = f"Name, in one word, colour number {i}"
        lines += [json.dumps(msgs(v(base), f"answer {i}.{k}")) for k, v in enumerate(variants)]
    path = write(tmp_path / "near.jsonl", lines)
    rep = build_datasets.build(cfg_for(tmp_path, {"near": {"format": "messages", "local": path, "weight": 1}},
                                       "data.eval_files=[]", "data.total_size=240", "data.min_valid=30"))
    train = {prompt_key(r["messages"][0]["content"]) for r in read_jsonl(tmp_path / "processed" / "train.jsonl")}
    val = {prompt_key(r["messages"][0]["content"]) for r in read_jsonl(tmp_path / "processed" / "val.jsonl")}
    assert train and val and not train & val
    assert rep["split"]["prompt_groups"] == 60
    keys = build_datasets.normalize_prompt(pa.array(["What is 2+3?", "what is 5+7", "WHAT IS 2 + 3!"])).to_pylist()
    assert keys[0] == keys[2] != keys[1]  # digits are kept: different numbers, different problems


def test_cross_source_duplicates_keep_the_first_source(tmp_path):
    shared = [json.dumps(msgs(f"shared question {i}", f"a{i}")) for i in range(10)]
    one = write(tmp_path / "one.jsonl", shared + [json.dumps(msgs(f"one {i}", "x")) for i in range(20)])
    two = write(tmp_path / "two.jsonl", shared + [json.dumps(msgs(f"two {i}", "y")) for i in range(20)])
    sources = {"one": {"format": "messages", "local": one, "weight": 1}, "two": {"format": "messages", "local": two,
                                                                               "weight": 1}}
    rep = build_datasets.build(cfg_for(tmp_path, sources, "data.eval_files=[]", "data.total_size=60",
                                       "data.min_valid=10"))
    rows = mixed_rows(tmp_path)
    shared_rows = [r for r in rows if r["messages"][0]["content"].startswith("shared")]
    assert shared_rows and all(r["source"] == "one" for r in shared_rows)
    assert rep["mix"]["cross_source_duplicates"] == 60 - len(rows) > 0


# ---------------------------------------------------------------- decontamination, options, other layouts

def test_decontamination_flags_then_drops(default_build, tmp_path):
    eval_keys = {prompt_key(m["content"]) for r in read_jsonl(os.path.join(ROOT, "dataset/eval/qa.jsonl"))
                 for m in r["messages"] if m["role"] == "user"}
    flagged = {(n, m[0]["content"] if m[0]["role"] == "user" else m[1]["content"])
               for n in default_build["report"]["sources"] for m, _ in pool_chats(default_build["tmp"], n)
               if prompt_key("\n".join(x["content"] for x in m if x["role"] == "user")) in eval_keys}
    rep = default_build["report"]["decontamination"]
    assert rep["flagged"] == len(flagged) >= 3 and not rep["dropped"]
    assert {(f["source"], f["prompt"]) for f in rep["examples"]} == flagged
    rep = build_datasets.build(cfg_for(tmp_path, None, "data.decontaminate=True"))
    assert rep["decontamination"]["dropped"] and rep["decontamination"]["flagged"] == len(flagged)
    for name in rep["sources"]:
        for messages, _ in pool_chats(str(tmp_path), name):
            assert prompt_key("\n".join(x["content"] for x in messages if x["role"] == "user")) not in eval_keys
        assert rep["sources"][name]["pool_rows"] == (rep["sources"][name]["kept"] - rep["sources"][name]["deduplicated"]
                                                     - rep["sources"][name]["eval_overlap"])


def test_answer_style_reasoning_inline_and_truncation(tmp_path):
    cfg = cfg_for(tmp_path, None, "data.math_answer_style=boxed", "data.reasoning_content=inline")
    cfg["data"]["sources"] = {n: s for n, s in cfg["data"]["sources"].items() if n in ("cmath", "messages", "emoji")}
    rep = build_datasets.build(cfg)
    assert all(m[1]["content"].startswith("\\boxed{") for m, _ in pool_chats(str(tmp_path), "cmath"))
    thinking = [m for m, _ in pool_chats(str(tmp_path), "messages") if m[-1]["content"].startswith("<think>\n")]
    assert len(thinking) == rep["sources"]["messages"]["reasoning_inlined"] > 0
    cfg["data"]["max_answer_chars"] = 40
    rep = build_datasets.build(cfg)
    assert rep["sources"]["messages"]["truncated"] > 0
    answers = [m["content"] for n in ("emoji", "messages") for c, _ in pool_chats(str(tmp_path), n)
               for m in c if m["role"] == "assistant"]
    assert all(len(a) <= 40 for a in answers)
    assert all(a.count("<think>") == a.count("</think>") for a in answers)  # never cut inside the <think> block
    assert "I told my computer a joke about UDP." in answers


def test_parquet_tsv_and_save_to_disk_inputs_match_jsonl(tmp_path):
    import datasets
    import pyarrow.parquet as pq
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "ok")]
    write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "a_dir"))
    write(tmp_path / "a.tsv", ["instruction\tinput\toutput"] + [f"{r['instruction']}\t\t{r['output']}" for r in rows])
    got = {}
    for name in ("a.jsonl", "a.parquet", "a_dir", "a.tsv"):
        out = tmp_path / name.replace(".", "_")
        build_datasets.build(cfg_for(out, {"x": {"format": "alpaca", "local": str(tmp_path / name), "weight": 1}},
                                     "data.eval_files=[]", "data.min_valid=1"))
        got[name] = sorted(json.dumps(m) for m, _ in pool_chats(str(out), "x"))
    assert len(got["a.jsonl"]) == 4 and all(v == got["a.jsonl"] for v in got.values())


def test_parallel_build_writes_the_same_bytes(tmp_path, monkeypatch):
    """Workers per source, the row adapters' pool and the forked JSONL half write the same bytes."""
    sources = copy.deepcopy(config.CONFIG["data"]["sources"])
    six = {n: s for n, s in sources.items() if n != "json_only"}
    one = {"json_only": sources["json_only"]}
    for name, srcs in (("six", six), ("one", one)):
        build_datasets.build(cfg_for(tmp_path / f"{name}_seq", srcs, "data.num_proc=1"))
    monkeypatch.setattr(build_datasets, "PARALLEL_MIN_BYTES", 1)  # 6 sources on 2 forked workers
    monkeypatch.setattr(build_datasets, "PARALLEL_MIN_ROWS", 30)  # 61 rows through the row adapters' pool
    for name, srcs in (("six", six), ("one", one)):
        build_datasets.build(cfg_for(tmp_path / f"{name}_par", srcs, "data.num_proc=2"))
    for name in ("six", "one"):
        a, b = tmp_path / f"{name}_seq", tmp_path / f"{name}_par"
        files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs
                       if f != "config.json")  # config.json holds num_proc and the paths
        assert len(files) > 10
        for rel in files:
            assert open(a / rel, "rb").read() == open(b / rel, "rb").read(), rel
    assert len(read_jsonl(tmp_path / "six_par" / "processed" / "train.jsonl")) > 30  # the JSONL was split


# ---------------------------------------------------------------- the vectorized paths against plain Python

def test_vectorized_mawps_matches_the_row_by_row_path():
    rng = random.Random(0)
    qs, ns, answers = [], [], []
    for _ in range(1500):
        qs.append(" ".join(rng.choice(["x", f"N_{rng.randint(0, 4):02d}", f"number{rng.randint(0, 4)}", "y ."])
                           for _ in range(rng.randint(0, 6))))
        ns.append(" ".join(rng.choice(["8.0", "2.50", "10", "-3.0", "0.125", "1e3", "abc", "7"])
                           for _ in range(rng.randint(0, 4))))
        answers.append(rng.choice(["8.0", "2.50", "abc", None, "1e2", "12"]))
    table = pa.table({"Question": qs, "Numbers": ns, "Answer": pa.array(answers, pa.string())})
    messages, _, reason, _ = formats.adapt_mawps(table, {"tags": []}, {"math_answer_style": "plain"})
    for i, args in enumerate(zip(qs, ns, answers)):
        prompt, answer, why = formats.mawps_row(*args)
        if why is None and prompt.strip():
            assert reason[i].as_py() is None and messages[i].as_py()[0]["content"] == prompt
            assert messages[i].as_py()[1]["content"] == answer
        elif why is not None:
            assert reason[i].as_py() is not None


def test_vectorized_text_helpers_match_python():
    rng = random.Random(1)
    alphabet = list("ab \"\\\n\t\r\x01\x1f\b\fé😀，。A1题？Ａ１《》…") + [" ", "\u3000", "e\u0301", "\u2460", "ﬁ", "«", "\u00a0", "©", "\u2028", "№", "·", "—"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    assert build_datasets.json_string(pa.array(texts)).to_pylist() == [json.dumps(t, ensure_ascii=False) for t in texts]
    ascii_texts = ["".join(chr(rng.randint(0, 127)) for _ in range(rng.randint(0, 15))) for _ in range(3000)]
    keys = build_datasets.normalize_prompt(pa.array(texts + ascii_texts)).to_pylist()
    assert keys == [prompt_key(t) for t in texts + ascii_texts]
    cleaned = build_datasets.clean_text(pa.array(texts)).to_pylist()
    assert cleaned == [clean(t) for t in texts]


def test_config_keeps_cmath_dev_only_and_emoji_files_explicit():
    sources = copy.deepcopy(config.CONFIG["data"]["sources"])
    assert sources["cmath"]["data_files"] == ["cmath_dev.jsonl"]
    assert all(f.endswith(".jsonl") for f in sources["emoji"]["data_files"])


# ---------------------------------------------------------------- public layouts (issue 15), tests/data/build/

BUILD_DATA = os.path.join(ROOT, "tests", "data", "build")


def one_source(tmp_path, fmt, name, *overrides, **extra):
    """Build a single source from tests/data/build/<name>; -> (report, rejects, pool chats)."""
    sources = {"src": {"format": fmt, "local": os.path.join(BUILD_DATA, name), "weight": 1, **extra}}
    rep = build_datasets.build(cfg_for(tmp_path, sources, "data.eval_files=[]", "data.min_valid=1", *overrides))
    return rep, read_jsonl(tmp_path / "processed" / "rejects.jsonl"), pool_chats(str(tmp_path), "src")


def test_llamafactory_v1_text_parts_keep_their_text(tmp_path):
    """LLaMA-Factory v1 writes content as [{"type": "text", "value": ...}]: the system instruction was blanked and
    user/assistant rows rejected as "empty answer"."""
    rep, rejects, chats = one_source(tmp_path, "messages", "llamafactory_v1.jsonl")
    assert sorted((m for m, _ in chats), key=json.dumps) == sorted([
        [{"role": "system", "content": "You are a terse geography tutor."},
         {"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}],
        [{"role": "user", "content": "把这句话翻译成英文：你好，世界"}, {"role": "assistant", "content": "Hello, world."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]], key=json.dumps)
    assert rep["sources"]["src"]["reasoning_dropped"] == 1  # the reasoning part, counted like reasoning_content
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (4, 'content part 1 of message 1 has no text ("text" or "value" string)'),
        (5, "content part 1 of message 1 has type 'image_url', not text (only text and reasoning parts are "
            "supported)")]


def test_openai_tool_calling_rows_may_end_in_a_call(tmp_path, qwen_tokenizer):
    """OpenAI's fine-tuning format for tool calling ends with an assistant turn that carries tool_calls (the
    model learns to call); a user turn right after a tool result is refused by the build and the check alike."""
    import check_dataset
    rep, rejects, chats = one_source(tmp_path, "messages", "openai_tools.jsonl", "data.total_size=2")
    ending = [m for m, _ in chats if m[-1].get("tool_calls")]
    assert len(chats) == 2 and len(ending) == 1
    assert ending[0] == [{"role": "user", "content": "What is the weather in San Francisco?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"id": "call_id", "type": "function", "function": {
                                 "name": "get_current_weather",
                                 "arguments": {"location": "San Francisco, USA", "format": "celsius"}}}]}]
    assert all(t[0]["function"]["name"] == "get_current_weather" for _, t in chats)
    reason = "message 4: user turn after a tool turn; an assistant turn must come between"
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, reason)]
    raw = json.loads(open(os.path.join(BUILD_DATA, "openai_tools.jsonl")).read().splitlines()[2])
    assert check_dataset.check_roles(raw["messages"]) == [("roles", reason)]  # one rule for both scripts
    enc = common.tokenize_conversation(qwen_tokenizer, *chats[[c[0] for c in chats].index(ending[0])])
    assert enc["turn_ends"][-1] == len(enc["input_ids"]) - 1  # the call is trained, through its <|im_end|>
    assert check_dataset.check_roles(ending[0]) == []


def test_svamp_number_placeholders_come_from_numbers(tmp_path):
    """SVAMP / cv_mawps write number0, number1 where MAWPS writes N_00: they were left in the question."""
    rep, rejects, chats = one_source(tmp_path, "mawps", "svamp_cv_mawps.csv")
    assert sorted((m[0]["content"], m[1]["content"]) for m, _ in chats) == sorted([
        ("Mary is baking a cake . The recipe calls for 6 cups of flour and 8 cups of sugar . She already put in "
         "4 cups of flour . How many more cups of flour does she need to add ?", "2"),
        ("Tom has 12 marbles . He gives 5 to Ann . How many does he have left ?", "7"),
        ("There are 11.5 birds on 1 trees . How many birds are there in all ?", "11.5")])
    assert [(r["line"], kind(r["reason"])) for r in rejects] == [(4, "placeholder past the end of Numbers")]


def test_json_array_rejects_name_the_record_index(tmp_path, capsys):
    """A one-line Alpaca JSON array: every reject said "line 1"; now the record index, as json.load(f)[i]."""
    rep, rejects, chats = one_source(tmp_path, "alpaca", "alpaca_bad_records.json")
    assert [(r["record"], kind(r["reason"])) for r in rejects] == [
        (1, "missing field 'output'"), (3, "wrong type"), (4, "not a JSON object")]
    assert not any("line" in r for r in rejects)
    assert sorted(m[-1]["content"] for m, _ in chats) == ["7", "Glad.", "chat"]
    assert "alpaca_bad_records.json[3]: wrong type: 'output' is list, expected a string" in capsys.readouterr().out
    ids = {r["id"] for r in mixed_rows(tmp_path)}
    assert ids <= {"src:0", "src:2", "src:5"} and ids  # ids name the record too


def test_a_source_with_no_good_row_beside_a_good_one(tmp_path, capsys):
    """Was IndexError from datasets at export (an empty pool saved, then loaded back), no report, no rejects."""
    good = write(tmp_path / "good.jsonl", [json.dumps(msgs(f"question {i}?", f"answer {i}.")) for i in range(20)])
    sources = {"bad": {"format": "messages", "local": os.path.join(BUILD_DATA, "all_bad.jsonl"), "weight": 0.5},
               "good": {"format": "messages", "local": good, "weight": 0.5}}
    rep = build_datasets.build(cfg_for(tmp_path, sources, "data.eval_files=[]", "data.min_valid=2"))
    assert rep["sources"]["bad"]["kept"] == 0 and rep["mix"]["sources"]["bad"]["rows"] == 0
    assert rep["split"]["train"] > 0 and {r["source"] for r in mixed_rows(tmp_path)} == {"good"}
    expected = [(1, "message 1: assistant turn before any user turn"),
                (2, "last turn is user; a conversation must end with an assistant turn (an answer or tool calls)"),
                (3, "empty answer")]
    assert [(r["line"], r["reason"]) for r in read_jsonl(tmp_path / "processed" / "rejects.jsonl")] == expected
    out = capsys.readouterr().out
    assert all(f"all_bad.jsonl:{line}: {reason}" in out for line, reason in expected)


def test_every_row_rejected_prints_reasons_and_writes_rejects(tmp_path):
    """Was "see the reasons above" with no reasons printed and no rejects.jsonl."""
    bad = os.path.join(BUILD_DATA, "all_bad.jsonl")
    proc = run_cli(str(tmp_path), "--set", f"data.sources={{'bad': {{'format': 'messages', 'local': {bad!r}}}}}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: no rows left after loading: all 3 rows were rejected" in proc.stderr
    for line, reason in ((1, "assistant turn before any user turn"), (2, "last turn is user"), (3, "empty answer")):
        assert f"all_bad.jsonl:{line}: " in proc.stdout and reason in proc.stdout
    rejects = read_jsonl(tmp_path / "processed.failed" / "rejects.jsonl")
    assert [r["line"] for r in rejects] == [1, 2, 3] and str(tmp_path / "processed.failed") in proc.stderr


def test_an_empty_split_fails_and_keeps_the_previous_build(tmp_path):
    """One good row: 0.9 x 1 rounded to an empty mix and exit code 0. The good build before it must survive."""
    first = {"c": {"format": "alpaca", "local": write(tmp_path / "ok.jsonl", [json.dumps(
        {"instruction": f"Say {i}.", "input": "", "output": str(i)}) for i in range(10)]), "weight": 1}}
    build_datasets.build(cfg_for(tmp_path, first, "data.eval_files=[]", "data.min_valid=2"))
    before = {f: open(tmp_path / "processed" / f, "rb").read() for f in ("train.jsonl", "val.jsonl", "report.json")}
    one = {"c": {"format": "alpaca", "local": write(tmp_path / "one.jsonl", [json.dumps(
        {"instruction": "Say hi.", "input": "", "output": "hi"})]), "weight": 1}}
    for extra in ((), ("data.total_size=1",)):
        with pytest.raises(build_datasets.BuildError, match="both splits need rows") as err:
            build_datasets.build(cfg_for(tmp_path, one, "data.eval_files=[]", *extra))
        assert "is left as it was" in str(err.value)
        assert {f: open(tmp_path / "processed" / f, "rb").read() for f in before} == before
        assert not os.path.exists(tmp_path / "processed.tmp")


def test_overlong_answers_cut_at_a_sentence_end_or_dropped(tmp_path):
    """data.max_answer_chars cut mid-word, and the cut answer was trained with <|im_end|>."""
    long_en = "The first sentence is short. The second one runs on and on past the limit"
    long_zh = "第一句话很短。第二句话" + "很长" * 20
    rows = [msgs("en?", long_en), msgs("zh?", long_zh), msgs("none?", "x" * 60), msgs("pi?", "Pi is 3.14159 and so on, and so on, and so on"),
            {"messages": [{"role": "user", "content": "tools?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                          {"role": "assistant", "content": "Done! " + "and then some more words " * 3}]},
            msgs("short?", "Short."), msgs("fine?", "Fine.")]
    path = write(tmp_path / "long.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    sources = {"x": {"format": "messages", "local": path, "weight": 1}}
    rep = build_datasets.build(cfg_for(tmp_path, sources, "data.eval_files=[]", "data.min_valid=1",
                                       "data.max_answer_chars=40"))
    answers = sorted(m[-1]["content"] for m, _ in pool_chats(str(tmp_path), "x"))
    assert answers == sorted(["The first sentence is short.", "第一句话很短。", "Done!", "Short.", "Fine."])
    assert rep["sources"]["x"]["truncated"] == 3
    no_end = "answer over data.max_answer_chars=40 with no sentence end before the limit to cut at"
    assert [(r["line"], r["reason"]) for r in read_jsonl(tmp_path / "processed" / "rejects.jsonl")] == [
        (3, no_end), (4, no_end)]
    rep = build_datasets.build(cfg_for(tmp_path, sources, "data.eval_files=[]", "data.min_valid=1",
                                       "data.max_answer_chars=40", "data.overlong_answer_policy=drop",
                                       "data.total_size=2"))
    assert [m[-1]["content"] for m, _ in pool_chats(str(tmp_path), "x")] == ["Short.", "Fine."]
    assert rep["sources"]["x"]["truncated"] == 0 and rep["sources"]["x"]["rejected"] == 5
    assert rep["rejects"]["by_reason"] == {"answer over data.max_answer_chars=40": 5}


def test_row_ids_follow_the_row_to_the_export(tmp_path):
    """A row's own id, else source:line, kept through pools, mix, split, JSONL and Arrow."""
    path = write(tmp_path / "ids.jsonl", [json.dumps({"id": f"conv-{i}", **msgs(f"q{i}?", f"a{i}.")}) if i % 2
                                          else json.dumps(msgs(f"q{i}?", f"a{i}.")) for i in range(12)])
    build_datasets.build(cfg_for(tmp_path, {"s": {"format": "messages", "local": path, "weight": 1}},
                                 "data.eval_files=[]", "data.min_valid=2", "data.total_size=12"))
    rows = mixed_rows(tmp_path)
    assert len(rows) == 12
    for r in rows:
        i = int(r["messages"][0]["content"][1:-1])
        assert r["id"] == (f"conv-{i}" if i % 2 else f"s:{i + 1}")
    arrow = common.load_split({"data": {"processed_dir": str(tmp_path / "processed")}}, "train")
    jsonl = read_jsonl(tmp_path / "processed" / "train.jsonl")
    assert [r["id"] for r in arrow] == [r["id"] for r in jsonl]


@pytest.mark.parametrize("name,content,fmt,said", [
    ("garbage.parquet", b"PAR1 not a parquet file", "alpaca", "garbage.parquet: cannot read it (ArrowInvalid"),
    ("rows.json", b'[{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}, 7]',
     "messages", "rows.json[1]: not a JSON object: expected an object, got int"),
    ("only_bad.jsonl", b'[1, 2]\n"text"\n{"messages": "hi"}\n', "messages",
     "only_bad.jsonl:3: wrong type: 'messages' must be a non-empty list"),
])
def test_no_input_file_ends_in_a_traceback(tmp_path, name, content, fmt, said):
    """Every problem is a reject with its place and reason, or one clear error for the whole build (these were a
    pyarrow traceback, and datasets' IndexError once a source kept no row)."""
    (tmp_path / name).write_bytes(content)
    good = write(tmp_path / "good.jsonl", [json.dumps(msgs(f"q{i}?", f"a{i}.")) for i in range(6)])
    sources = {"x": {"format": fmt, "local": str(tmp_path / name), "weight": 1},
               "good": {"format": "messages", "local": good, "weight": 1}}
    proc = run_cli(str(tmp_path), "--set", f"data.sources={sources!r}", "--set", "data.eval_files=[]",
                   "--set", "data.min_valid=1")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert said in (proc.stderr if proc.returncode else proc.stdout)
    assert not proc.returncode or proc.stderr.startswith("error: ")
    if not proc.returncode:
        rejects = read_jsonl(tmp_path / "processed" / "rejects.jsonl")
        assert rejects and all(r["file"].endswith(name) for r in rejects)
