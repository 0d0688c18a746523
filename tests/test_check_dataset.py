"""check_dataset.py: each error class in tests/data/check/*.jsonl found at its line (through the real CLI),
a clean file passing, --show marking exactly the assistant tokens, the mask audit, lengths and Arrow input."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest

import check_dataset
import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join("tests", "data", "check")
FIXTURES = sorted(f for f in os.listdir(os.path.join(ROOT, DATA)) if f.endswith(".jsonl"))
# (file, line, class, words of the reason): every error and warning the fixture files must produce.
EXPECTED = [
    ("parse.jsonl", 2, "parse", "JSONDecodeError"),
    ("parse.jsonl", 3, "parse", "expected a JSON object"),
    ("schema.jsonl", 2, "schema", "'messages' must be a non-empty list (missing"),
    ("schema.jsonl", 3, "schema", "message 1: role None is not one of"),
    ("schema.jsonl", 3, "schema", "message 2: role None is not one of"),
    ("schema.jsonl", 4, "schema", "content must be a string, got list"),
    ("schema.jsonl", 5, "schema", "arguments are not valid JSON"),
    ("schema.jsonl", 6, "schema", "(empty;"),
    ("roles.jsonl", 2, "roles", "message 2: system is only allowed as the first message"),
    ("roles.jsonl", 3, "roles", "message 2: user turn after a user turn"),
    ("roles.jsonl", 4, "roles", "message 1: assistant turn before any user turn"),
    ("roles.jsonl", 5, "roles", "message 2: tool result without an assistant tool_calls turn"),
    ("roles.jsonl", 6, "roles", "tool_call_id 'call_b' matches no open call"),
    ("roles.jsonl", 7, "roles", "before the tool calls of message 2 are answered (unanswered: call_c)"),
    ("roles.jsonl", 8, "roles", "last turn is user"),
    ("empty.jsonl", 2, "empty", "message 2 (assistant) has empty content"),
    ("empty.jsonl", 3, "empty", "message 1 (user) has empty content"),
    ("special_tokens.jsonl", 2, "special_tokens", "<|im_end|>"),
    ("special_tokens.jsonl", 3, "special_tokens", "<think>, </think>"),
    ("special_tokens.jsonl", 4, "special_tokens", "<tool_call>"),
    ("special_tokens.jsonl", 5, "special_tokens", "<|endoftext|>"),
    ("json_only.jsonl", 2, "json_only", "not valid JSON"),
    ("json_only.jsonl", 3, "json_only", "fence"),
    ("duplicate.jsonl", 3, "duplicate", "duplicate.jsonl:1"),
    ("duplicate.jsonl", 4, "duplicate", "duplicate.jsonl:2"),  # key order and null fields don't matter
    ("duplicate.jsonl", 5, "leak", "clean.jsonl:1"),  # files are checked in the order given (sorted here)
    ("warnings.jsonl", 1, "reasoning", "reasoning_content"),
    ("warnings.jsonl", 2, "tools", "'get_time'"),
]


@pytest.fixture(autouse=True, scope="module")
def converted_demo_model(demo_model_dir):
    """Convert the demo model once here, not inside the first CLI subprocess."""
    return demo_model_dir


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "check_dataset.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def fixture(name):
    return os.path.join(DATA, name)


@pytest.fixture(scope="session")
def all_fixtures_run(tmp_path_factory):
    """One CLI run over every fixture file: (completed process, JSON report)."""
    report = str(tmp_path_factory.mktemp("check") / "report.json")
    proc = run_cli("--profile", "demo", "--json-report", report, *[fixture(f) for f in FIXTURES])
    with open(report, encoding="utf-8") as f:
        return proc, json.load(f)


@pytest.fixture
def tokenizer(qwen_tokenizer):
    return qwen_tokenizer


def check(paths, cfg, tokenizer, show=0):
    report, shown = check_dataset.check_paths([os.path.join(ROOT, p) for p in paths], cfg, tokenizer, show)
    return report, shown


def keyed(findings):
    return {(os.path.basename(f["file"]), f["line"], f["class"]) for f in findings}


# ---------------------------------------------------------------- each error class, through the CLI

@pytest.mark.parametrize("name,line,cls,words", EXPECTED, ids=[f"{e[0]}:{e[1]}" for e in EXPECTED])
def test_fixture_finding(all_fixtures_run, name, line, cls, words):
    proc, report = all_fixtures_run
    hits = [f for f in report["findings"] if os.path.basename(f["file"]) == name and f["line"] == line
            and f["class"] == cls and words in f["reason"]]
    assert len(hits) == 1, [f for f in report["findings"] if f["line"] == line]
    assert f"{fixture(name)}:{line}: {hits[0]['severity']} [{cls}] {hits[0]['reason']}" in proc.stdout


def test_nothing_else_is_flagged(all_fixtures_run):
    """Valid rows inside the bad files (line 1 of each, an empty content next to tool_calls, a prose answer
    without the json-only tag) stay clean, and clean.jsonl has no finding at all."""
    _, report = all_fixtures_run
    assert keyed(report["findings"]) == {(f, line, cls) for f, line, cls, _ in EXPECTED}


def test_cli_exit_code_and_summary(all_fixtures_run):
    proc, report = all_fixtures_run
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = sum(1 for e in EXPECTED if check_dataset.CLASSES[e[2]][0] == "error")
    assert report["errors"] == errors and report["warnings"] == len(EXPECTED) - errors
    assert report["exit_code"] == 1 and report["rows"] == sum(
        1 for f in FIXTURES for line in open(os.path.join(ROOT, DATA, f), encoding="utf-8") if line.strip())
    for cls in check_dataset.CLASSES:
        n = sum(1 for e in EXPECTED if e[2] == cls)
        assert report["counts"][cls]["count"] == n
        assert re.search(rf"^  {cls} +{check_dataset.CLASSES[cls][0]} +{n}  ", proc.stdout, re.M), cls
    assert f"FAILED: {errors} error(s), {len(EXPECTED) - errors} warning(s)" in proc.stdout
    assert "TRL's own default is 1024" in proc.stdout and "max_seq_length=512" in proc.stdout


# ---------------------------------------------------------------- a clean file and --show

def expected_loss_texts(messages):
    """Each assistant turn as qwen3_instruct_2507.jinja writes it, plus <|im_end|>\\n."""
    out = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        calls = ["<tool_call>\n{\"name\": \"" + c["function"]["name"] + "\", \"arguments\": "
                 + json.dumps(c["function"]["arguments"], ensure_ascii=False) + "}\n</tool_call>"
                 for c in m.get("tool_calls") or []]
        out.append(m["content"] + ("\n" if m["content"] and calls else "") + "\n".join(calls) + "<|im_end|>\n")
    return out


def test_clean_file_passes_and_show_marks_exactly_the_assistant_tokens():
    rows = [common.row_to_chat(row) for _, row in common.read_jsonl(os.path.join(ROOT, fixture("clean.jsonl")))]
    proc = run_cli("--profile", "demo", "--show", str(len(rows)), fixture("clean.jsonl"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "OK: 0 error(s), 0 warning(s) in 6 rows" in proc.stdout
    assert "\033[" not in proc.stdout  # not a terminal: plain markers
    samples = proc.stdout.split("── sample ")[1:]
    assert len(samples) == len(rows)
    for sample, (messages, _tools) in zip(samples, rows):
        body = sample.split("──\n", 1)[1].split("\n\nToken lengths")[0].rstrip("\n") + "\n"
        assert re.findall(r"⟦(.*?)⟧", body, re.S) == expected_loss_texts(messages)


def test_show_plain_text_is_the_rendered_conversation(tokenizer, demo_cfg, capsys):
    report, shown = check([fixture("clean.jsonl")], demo_cfg, tokenizer, show=6)
    check_dataset.show_samples(tokenizer, shown, color=False, boundaries=False)
    out = capsys.readouterr().out
    bodies = [s.split("──\n", 1)[1] for s in out.split("── sample ")[1:]]
    for body, s in zip(bodies, shown):
        text = common.render(tokenizer, s["messages"], s["tools"])
        assert body.replace("⟦", "").replace("⟧", "").rstrip("\n") == text.rstrip("\n")


def test_show_boundaries_are_the_tokens(tokenizer, demo_cfg, capsys):
    """ASCII row: every │-separated piece is one token, and the pieces between ⟦ ⟧ are the loss tokens."""
    _, shown = check([fixture("clean.jsonl")], demo_cfg, tokenizer, show=2)
    sample = shown[1]  # system + two turns, ASCII only
    check_dataset.show_samples(tokenizer, [sample], color=False, boundaries=True)
    body = capsys.readouterr().out.split("──\n", 1)[1][:-1]  # less print's own newline
    ids, labels = sample["enc"]["input_ids"], sample["enc"]["labels"]
    pieces = re.split("[│⟦⟧]", body)
    assert [p for p in pieces if p] == [tokenizer.decode([t]) for t in ids]
    loss_pieces = [p for seg in re.findall(r"⟦(.*?)⟧", body, re.S) for p in seg.split("│")]
    assert loss_pieces == [tokenizer.decode([t]) for t, lab in zip(ids, labels) if lab != -100]


def test_show_colour_marks_loss_tokens(tokenizer, demo_cfg, capsys):
    _, shown = check([fixture("clean.jsonl")], demo_cfg, tokenizer, show=1)
    check_dataset.show_samples(tokenizer, shown, color=True, boundaries=False)
    out = capsys.readouterr().out
    green = "".join(re.findall(r"\033\[30;48;5;(?:114|151)m(.*?)\033\[0m", out, re.S))
    assert green == expected_loss_texts(shown[0]["messages"])[0].replace("\n", "↵")
    assert "⟦" not in out


# ---------------------------------------------------------------- lengths, truncation and the mask audit

def last_im_end(tokenizer, messages, tools):
    ids = tokenizer(common.render(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
    return max(i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|im_end|>")), len(ids)


def test_truncation_is_flagged_at_small_max_seq_length(tmp_path):
    """Through the CLI: with overlong_policy=fail, rows whose last <|im_end|> is beyond max_seq_length fail."""
    report_path = tmp_path / "r.json"
    proc = run_cli("--profile", "demo", "--set", "model.max_seq_length=45", "--set", "sft.overlong_policy=fail",
                   "--json-report", str(report_path), fixture("clean.jsonl"))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert proc.returncode == 1
    flagged = {f["line"] for f in report["findings"] if f["class"] == "truncation" and f["severity"] == "error"}
    assert flagged and flagged == {f["line"] for f in report["findings"]}
    stats = report["per_file"][fixture("clean.jsonl")]
    assert stats["share_over_max_seq_length"] == stats["over_max_seq_length"] / 6 > 0
    assert "max_seq_length 45 cuts it before the last trained <|im_end|>" in proc.stdout


def test_truncation_lines_match_the_template(tokenizer, demo_cfg):
    """Which rows are cut, derived from the rendered token ids; a warning under the default 'drop' policy."""
    demo_cfg["model"]["max_seq_length"] = 45
    report, _ = check([fixture("clean.jsonl")], demo_cfg, tokenizer)
    rows = list(common.read_jsonl(os.path.join(ROOT, fixture("clean.jsonl"))))
    cut = {line for line, row in rows if last_im_end(tokenizer, *common.row_to_chat(row))[0] >= 45}
    over = sum(last_im_end(tokenizer, *common.row_to_chat(row))[1] > 45 for _, row in rows)
    assert 0 < len(cut) < len(rows)
    assert {f["line"] for f in report["findings"]} == cut
    assert all(f["class"] == "truncation" and f["severity"] == "warning" for f in report["findings"])
    assert report["errors"] == 0 and report["per_file"][os.path.join(ROOT, fixture("clean.jsonl"))][
        "over_max_seq_length"] == over


def test_length_stats_and_loss_share(tokenizer, demo_cfg):
    import numpy as np
    report, _ = check([fixture("clean.jsonl")], demo_cfg, tokenizer)
    lengths, loss = [], 0
    for _, row in common.read_jsonl(os.path.join(ROOT, fixture("clean.jsonl"))):
        enc = common.tokenize_conversation(tokenizer, *common.row_to_chat(row))
        lengths.append(len(enc["input_ids"]))
        loss += sum(t != -100 for t in enc["labels"])
    s = next(iter(report["per_file"].values()))
    assert (s["min"], s["max"], s["p50"], s["p95"]) == (min(lengths), max(lengths), np.percentile(lengths, 50),
                                                       np.percentile(lengths, 95))
    assert s["loss_share"] == pytest.approx(loss / sum(lengths)) and report["loss_share"] == s["loss_share"]


def test_mask_audit_catches_broken_labels(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye!"}]
    markers = check_dataset.mask_markers(tokenizer)
    enc = common.tokenize_conversation(tokenizer, messages)
    flags = common.trained_turns(messages)
    assert check_dataset.audit_mask(enc, flags, markers)[0] == []
    ids = enc["input_ids"]
    user_tok = ids.index(tokenizer.encode("Hi", add_special_tokens=False)[0])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last_im_end = max(i for i, t in enumerate(ids) if t == im_end)

    def audit_with(**changes):
        broken = copy.deepcopy(enc)
        for i, value in changes.get("labels", {}).items():
            broken["labels"][i] = value
        return [r for _, r in check_dataset.audit_mask(broken, changes.get("flags", flags), markers)[0]]

    assert any("user tokens carry loss" in r for r in audit_with(labels={user_tok: ids[user_tok]}))
    assert any("system tokens carry loss" in r for r in audit_with(labels={3: ids[3]}))
    assert any("turn 2 does not end in a loss-carrying <|im_end|>" in r
               for r in audit_with(labels={last_im_end: -100}))
    assert any("turn 1 carries loss but sft settings exclude it" in r for r in audit_with(flags=[False, True]))
    header = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|im_start|>")][2] + 1
    assert any("header carries loss" in r for r in audit_with(labels={header: ids[header]}))
    assert any("no token carries loss" in r for r in audit_with(labels={i: -100 for i in range(len(ids))},
                                                                 flags=[False, False]))


# ---------------------------------------------------------------- other inputs and options

def test_arrow_split_and_cross_file_leak(tokenizer, demo_cfg, tmp_path):
    """A save_to_disk folder in the built layout (tool_calls/tools as JSON strings) checks like its JSONL;
    rows are numbered from 1, and a row also present in another file is a leak naming it."""
    from datasets import Dataset
    rows = [row for _, row in common.read_jsonl(os.path.join(ROOT, fixture("clean.jsonl")))]
    bad = {"messages": [{"role": "user", "content": "A?"}, {"role": "user", "content": "B?"},
                        {"role": "assistant", "content": "C."}]}
    arrow = [common.chat_to_row(r["messages"], r.get("tools"), r.get("source"), r.get("tags")) for r in rows + [bad]]
    path = str(tmp_path / "train")
    Dataset.from_list(arrow, features=common.row_features()).save_to_disk(path)
    report, _ = check_dataset.check_paths([path, os.path.join(ROOT, fixture("clean.jsonl"))], demo_cfg, tokenizer)
    assert keyed(report["findings"]) == {("train", 7, "roles")} | {("clean.jsonl", i, "leak") for i in range(1, 7)}
    assert "same messages as " + path + ":1" in report["findings"][1]["reason"]
    jsonl_stats, arrow_stats = report["per_file"][os.path.join(ROOT, fixture("clean.jsonl"))], report["per_file"][path]
    assert arrow_stats["rows"] == 7 and arrow_stats["rows_tokenized"] == 6
    # Same loss tokens; total lengths may differ: the Arrow layout stores tools with sorted keys.
    assert {k: arrow_stats[k] for k in ("min", "loss_tokens")} == {k: jsonl_stats[k] for k in ("min", "loss_tokens")}
    assert check_dataset.expand_path(str(tmp_path)) == [path]


def test_missing_built_dataset_and_unknown_model_are_clear(tmp_path):
    proc = run_cli("--profile", "demo", "--set", f"data.processed_dir={tmp_path}")
    assert proc.returncode == 2 and "run `python build_datasets.py` first" in proc.stderr
    proc = run_cli("--set", "model.name=no-such-org/no-such-model", fixture("clean.jsonl"),
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot load the tokenizer of 'no-such-org/no-such-model'" in proc.stderr
    assert "--profile demo" in proc.stderr and "--set model.name=" in proc.stderr
    proc = run_cli("--profile", "demo", fixture("no_such.jsonl"))
    assert proc.returncode == 2 and "no_such.jsonl: no such file" in proc.stderr


@pytest.mark.parametrize("strict", [False, True])
def test_warnings_fail_only_with_strict(strict):
    proc = run_cli("--profile", "demo", *(["--strict"] if strict else []), fixture("warnings.jsonl"))
    assert proc.returncode == int(strict)
    assert f"{'FAILED' if strict else 'OK'}: 0 error(s), 2 warning(s)" in proc.stdout


def test_the_build_rule_for_turns_and_row_ids_in_findings(tmp_path):
    """check_dataset.py and build_datasets.py judge turn order by one function (common.conversation_problems):
    a row ending in an assistant tool call (OpenAI's fine-tuning format) is fine, a user turn right after a tool
    result is not (the build used to pass it). Findings and samples carry the row id that names the raw row."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"city\": \"Oslo\"}"}}
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}}]
    rows = [{"id": "mine:1", "messages": [{"role": "user", "content": "Time in Oslo?"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]}], "tools": tools},
            {"id": "mine:2", "messages": [{"role": "user", "content": "Time in Oslo?"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]},
                                          {"role": "tool", "tool_call_id": "call_1", "content": "09:00"},
                                          {"role": "user", "content": "Thanks"},
                                          {"role": "assistant", "content": "You're welcome."}], "tools": tools}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    proc = run_cli("--profile", "demo", "--show", "1", str(path))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"{path}:2: error [roles] message 4: user turn after a tool turn; an assistant turn must come between "
            f"(id mine:2)") in proc.stdout
    assert f"{path}:1:" not in proc.stdout  # ends in a call: no "never answered"
    assert f"── sample 1/1 · {path}:1 · id mine:1 ·" in proc.stdout


@pytest.mark.parametrize("arguments,problem", [
    ("", None), (None, None), ({"city": "Oslo"}, None), ("{\"city\": \"Oslo\"}", None),
    ("{\"city\": ", "tool call 'get_time': arguments are not valid JSON"),
    ("[1, 2]", "wrong type: arguments of 'get_time' are list, expected an object"),
])
def test_the_build_rule_for_tool_calls(arguments, problem):
    """check_dataset.py, build_datasets.py and the training reader take one rule for a tool call's arguments
    (common.parse_tool_call): an empty string or null is a call without arguments, which the build always
    accepted and check_dataset.py used to call "not valid JSON" / "must be a JSON object"."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": arguments}}
    found = check_dataset.check_call(call)
    assert (found is None) if problem is None else found.startswith(problem), found
    if problem is None:
        messages, _ = common.row_to_chat({"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}]})
        assert messages[0]["tool_calls"][0]["function"]["arguments"] == ({"city": "Oslo"} if arguments else {})
