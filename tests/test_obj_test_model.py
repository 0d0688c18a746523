"""obj_test_model.py on real parts: the metrics on fixed answers with known verdicts, the masked perplexity
against a hand computation on the demo model (SmolLM2-135M with the real Qwen3-2507 template), and the
real CLI with both backends: in-process generate, and a real `transformers serve` on 127.0.0.1 started by
deploy.py (serving base + a real trained LoRA adapter), with EvalScope on the shipped custom data.

    .venv/bin/python -m pytest tests/test_obj_test_model.py -x -q
"""

import json
import math
import os
import subprocess
import sys

import pytest

import common
import config
import obj_test_model as ev

JSON_SYSTEM = "Reply with one JSON object only."
# Rows in the built-split layout ({"messages", "source", "tags", "tools"?}); each bucket is represented.
VALIDATION = [
    {"source": "cmath", "tags": ["math", "zh"], "messages": [
        {"role": "user", "content": "小明有3个苹果，又买了4个，一共有几个苹果？"}, {"role": "assistant", "content": "7"}]},
    {"source": "mawps", "tags": ["math", "en"], "messages": [
        {"role": "user", "content": "Tom had 9 pens and lost 2. How many pens does he have?"},
        {"role": "assistant", "content": "7"}]},
    {"source": "messages", "tags": ["json-only", "en"], "messages": [
        {"role": "system", "content": JSON_SYSTEM},
        {"role": "user", "content": "Extract name and age: Anna is 31."},
        {"role": "assistant", "content": "{\"name\": \"Anna\", \"age\": 31}"}]},
    {"source": "messages", "tags": ["json-only", "zh"], "messages": [
        {"role": "system", "content": JSON_SYSTEM},
        {"role": "user", "content": "提取姓名和年龄：李雷今年12岁。"},
        {"role": "assistant", "content": "{\"name\": \"李雷\", \"age\": 12}"}]},
    {"source": "emoji", "tags": ["chat", "zh"], "messages": [
        {"role": "user", "content": "你好！"}, {"role": "assistant", "content": "你好呀！😊 有什么可以帮你的吗？"}]},
    {"source": "sharegpt", "tags": ["chat", "en"], "messages": [
        {"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "What can you do?"},
        {"role": "assistant", "content": "I can answer questions and help you write."}]},
]
TRAIN = [  # a few JSON-only rows: a handful of steps on them make the tuned model differ from the base
    [{"role": "system", "content": JSON_SYSTEM}, {"role": "user", "content": f"Extract name and age: {n} is {a}."},
     {"role": "assistant", "content": json.dumps({"name": n, "age": a})}]
    for n, a in (("Bob", 40), ("Cleo", 25), ("Dan", 52), ("Eve", 19))]


# ---------------------------------------------------------------- shared fixtures (test_subj imports them)

def build_adapter(cfg, demo_model_dir, outputs_dir, run="eval-run", steps=8):
    """outputs/<run>/adapter as train.py writes it: a real PEFT LoRA with the config's settings on the demo
    model, trained a few AdamW steps on TRAIN with the training mask, saved with the configured tokenizer.
    Built once per session; later calls reuse the folder."""
    path = os.path.join(outputs_dir, run, "adapter")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    tokenizer = common.load_tokenizer(cfg)
    lora = cfg["lora"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32),
                           LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
                                      target_modules=lora["target_modules"], bias=lora["bias"], task_type="CAUSAL_LM"))
    encoded = [common.tokenize_conversation(tokenizer, m) for m in TRAIN]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"])) for e in encoded])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in encoded])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in encoded])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_validation(path, rows=VALIDATION):
    common.write_jsonl(path, rows)
    return path


def merge_adapter(cfg, demo_model_dir, adapter, out_dir):
    """base + adapter merged with PEFT (what `deploy.py merge` does on a CPU), saved with the adapter's
    tokenizer and chat template: the folder a server serves as the tuned model."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    model.merge_and_unload().save_pretrained(out_dir)
    common.load_tokenizer(cfg, adapter).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def eval_work(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "eval_work"


@pytest.fixture(scope="session")
def eval_adapter(eval_work, demo_model_dir):
    cfg = config.build_config("demo")
    return build_adapter(cfg, demo_model_dir, str(eval_work / "outputs"))


@pytest.fixture(scope="session")
def val_file(eval_work):
    os.makedirs(eval_work, exist_ok=True)
    return write_validation(str(eval_work / "val.jsonl"))


@pytest.fixture(scope="session")
def probes_file(eval_work):
    """Four of the shipped probes (two zh, two en): enough to compare sides, quick on a CPU."""
    shipped = ev.load_probes(cfg_with())
    path = eval_work / "probes.json"
    os.makedirs(eval_work, exist_ok=True)
    path.write_text(json.dumps({"probes": shipped[:2] + shipped[-2:]}, ensure_ascii=False), encoding="utf-8")
    return str(path)


def cfg_with(*overrides):
    return config.build_config("demo", list(overrides))


def run_cli(args, timeout=400):
    return subprocess.run([sys.executable, os.path.join(common.ROOT, "obj_test_model.py"), "--profile", "demo", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=common.ROOT)


# ---------------------------------------------------------------- metrics on fixed answers

def test_repeat_share_by_hand():
    # 12 units, 9 4-grams of which 4 are distinct: 1 - 4/9
    assert ev.repeat_share("a b c d a b c d a b c d", 4) == pytest.approx(5 / 9)
    assert ev.repeat_share("好的" * 10, 4) == pytest.approx(1 - 2 / 17)  # 20 CJK units, 17 4-grams, 2 distinct
    assert ev.repeat_share("The answer is 42.", 4) == 0.0  # too short (2 n-grams) to call repetitive
    assert ev.repeat_share("Paris is the capital of France and its largest city by population today.", 4) == 0.0


@pytest.mark.parametrize("text,finish,tags,tools,expected", [
    ("", "stop", ["en"], False, ["empty answer"]),
    ("  \n ", "stop", ["en"], False, ["empty answer"]),
    ("The cat sat on the mat and then", "length", ["en"], False, ["not ended"]),
    ("好的" * 20, "stop", ["chat", "zh"], False, ["degenerate repetition"]),
    ("The capital of China is Beijing.", "stop", ["chat", "zh"], False, ["wrong language"]),
    ("北京是中国的首都，也是一座历史悠久的城市。", "stop", ["chat", "en"], False, ["wrong language"]),
    ("北京是中国的首都。", "stop", ["chat", "zh"], False, []),
    ("42", "stop", ["math", "zh"], False, []),  # no letters: the language check does not apply
    ('{"name": "李雷", "age": 12}', "stop", ["json-only", "zh"], False, []),  # json-only: keys are ASCII
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>', "stop", ["zh"], True, []),
    ("ok ok ok ok ok ok ok ok ok ok ok ok ok", "length", ["en"], False, ["not ended", "degenerate repetition"]),
])
def test_usability_reasons(text, finish, tags, tools, expected):
    reasons = ev.usability(text, finish, tags, cfg_with(), has_tools=tools)
    assert len(reasons) == len(expected), reasons
    for reason, prefix in zip(reasons, expected):
        assert reason.startswith(prefix), reasons


def test_usability_thresholds_come_from_config():
    text = "The capital of China is Beijing."
    assert ev.usability(text, "stop", ["zh"], cfg_with("eval.min_lang_share=0.0")) == []
    assert ev.usability("好的" * 20, "stop", ["zh"], cfg_with("eval.max_repeat_share=0.95")) == []


@pytest.mark.parametrize("text,keys,valid,reason", [
    ('{"name": "Anna", "age": 31}', ["age", "name"], True, None),
    ('  {"name": "Anna", "age": 31}\n', ["age", "name"], True, None),
    ('{"name": "Anna"}', ["age", "name"], False, "JSON object misses keys ['age']"),
    ('```json\n{"name": "Anna", "age": 31}\n```', ["age", "name"], False, "not JSON"),
    ('Sure! {"name": "Anna", "age": 31}', None, False, "not JSON"),
    ('["Anna", 31]', ["age", "name"], False, "expected a JSON object"),
    ('["Anna", 31]', None, True, None),
    ("31", None, True, None),
])
def test_json_validity(text, keys, valid, reason):
    ok, why = ev.json_validity(text, keys)
    assert ok is valid
    assert (why is None) if reason is None else why.startswith(reason)


def test_reference_keys():
    assert ev.reference_keys('{"name": "Anna", "age": 31}') == ["age", "name"]
    assert ev.reference_keys("[1, 2]") is None and ev.reference_keys("7") is None and ev.reference_keys("x") is None


def test_split_for_generation_keeps_earlier_turns():
    messages = VALIDATION[5]["messages"]
    prompt, reference = ev.split_for_generation(messages)
    assert prompt == messages[:3] and reference == "I can answer questions and help you write."
    assert ev.split_for_generation([{"role": "user", "content": "hi"}]) == (None, None)


def test_bucket_stats_by_hand():
    samples = [{"tags": ["math", "zh"], "source": "cmath", "usable": True, "json_valid": None},
               {"tags": ["math", "en"], "source": "mawps", "usable": False, "json_valid": None},
               {"tags": ["json-only", "en"], "source": "messages", "usable": True, "json_valid": False},
               {"tags": ["json-only", "en"], "source": "messages", "usable": True, "json_valid": True}]
    ppl_rows = [{"tags": ["math", "zh"], "source": "cmath", "nll": 2.0, "tokens": 4},
                {"tags": ["math", "en"], "source": "mawps", "nll": 6.0, "tokens": 4}]
    b = ev.bucket_stats(samples, ppl_rows)
    assert b["tags"]["math"]["ppl"] == pytest.approx(math.exp(8.0 / 8))
    assert b["tags"]["zh"]["ppl"] == pytest.approx(math.exp(0.5))
    assert b["tags"]["math"]["usability"] == 0.5 and b["tags"]["math"]["json_validity"] is None
    assert b["tags"]["en"]["usability"] == pytest.approx(2 / 3) and b["tags"]["en"]["json_rows"] == 2
    assert b["tags"]["json-only"]["json_validity"] == 0.5 and b["tags"]["json-only"]["ppl"] is None
    assert b["sources"]["messages"]["generated"] == 2 and b["sources"]["cmath"]["ppl_tokens"] == 4


def test_gates():
    report = {"sides": {"base": {"ppl": 4.0, "usability": 0.9, "json_validity": 0.5},
                        "tuned": {"ppl": 3.0, "usability": 0.8, "json_validity": 0.75}},
              "probe_regressions": ["capital_france"]}
    results = {g: ok for g, ok, _ in ev.check_gates(report, {"max_ppl_ratio": 1.0, "min_json_validity": 0.7,
                                                              "min_usability": 0.85, "no_probe_regression": True})}
    assert results == {"max_ppl_ratio": True, "min_json_validity": True, "min_usability": False,
                       "no_probe_regression": False}
    detail = dict((g, d) for g, _, d in ev.check_gates(report, {"no_probe_regression": True}))
    assert "capital_france" in detail["no_probe_regression"]
    assert ev.check_gates(report, {"max_ppl_ratio": 0.7})[0][1] is False  # 3/4 = 0.75 > 0.7
    assert ev.check_gates(report, config.CONFIG["eval"]["gates"]) == []  # all off by default
    base_only = {"sides": {"base": {"ppl": 4.0, "usability": 1.0, "json_validity": None}}}
    assert [ok for _, ok, _ in ev.check_gates(base_only, {"max_ppl_ratio": 1.0, "min_json_validity": 0.5})] == [False,
                                                                                                                 False]


def test_probe_passed():
    assert ev.probe_passed("The capital is paris.", ["Paris"])
    assert ev.probe_passed("水的化学式是H₂O。", ["H2O", "H₂O"])
    assert not ev.probe_passed("I do not know.", ["Paris"])


# ---------------------------------------------------------------- perplexity against a hand computation

def test_length_batches():
    lengths = [50, 10, 30, 20, 40, 100]
    assert ev.length_batches(lengths, 2, 10_000) == [[1, 3], [2, 4], [0, 5]]
    # 3 rows of width 30 = 90 tokens fit in 100; a 4th at width 40 would make 160
    assert ev.length_batches(lengths, 8, 100) == [[1, 3, 2], [4, 0], [5]]
    assert sorted(i for b in ev.length_batches(lengths, 3, 1) for i in b) == list(range(6))  # each row alone

def test_masked_ppl_matches_hand_computation(demo_model_dir):
    import torch
    cfg = cfg_with()
    model, tokenizer = common.load_model(cfg)
    chats = [common.row_to_chat(r) for r in (VALIDATION[0], VALIDATION[5], VALIDATION[3])]  # 3 lengths: padding
    encoded = ev.encode_for_ppl(tokenizer, chats, cfg)
    assert len({len(ids) for ids, _ in encoded}) == 3, [len(ids) for ids, _ in encoded]
    batched = ev.masked_nll(model, encoded, batch_size=3, pad_id=tokenizer.pad_token_id, max_tokens=10_000)
    total_nll = total_tokens = 0
    for (ids, _), (nll, count), (messages, tools) in zip(encoded, batched, chats):
        # By hand: the training mask, one unpadded forward, -log p(token | prefix) summed over labelled tokens.
        labels = common.tokenize_conversation(tokenizer, messages, tools)["labels"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        hand = [-logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100]
        assert count == len(hand) == sum(1 for x in labels if x != -100) > 0
        assert nll == pytest.approx(sum(hand), rel=1e-4)
        total_nll, total_tokens = total_nll + sum(hand), total_tokens + len(hand)
    # The multi-turn row scores both assistant turns, and no prompt token.
    assert batched[1][1] > batched[0][1]
    ppl = math.exp(sum(n for n, _ in batched) / sum(c for _, c in batched))
    assert ppl == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)


# ---------------------------------------------------------------- the CLI, both backends, EvalScope

def test_shipped_probes_and_tests_load():
    probes = ev.load_probes(cfg_with())
    assert len({p["name"] for p in probes}) == len(probes) >= 10
    assert {p["lang"] for p in probes} == {"zh", "en"} and all(p["keywords"] for p in probes)


@pytest.fixture(scope="session")
def local_run(eval_adapter, val_file, probes_file, eval_work):
    """The CLI in process, base and tuned: its report folder, which the endpoint test compares against."""
    reports = eval_work / "reports_local"
    done = run_cli(["--adapter", eval_adapter, "--data", val_file, "--set", f"output.reports_dir={reports}",
                    "--set", f"eval.probes_file={probes_file}",
                    "--set", "eval.max_new_tokens=12", "--set", "eval.repetition_penalty=1.0",
                    "--set", "eval.gates.max_ppl_ratio=100.0"])
    return done, reports / "eval-run"


def test_cli_in_process(local_run, probes_file):
    done, folder = local_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "📋 EVALUATION SUMMARY" in done.stdout and "Usability Rate" in done.stdout
    assert "gate max_ppl_ratio" in done.stdout
    report = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    base, tuned = report["sides"]["base"], report["sides"]["tuned"]
    assert base["ppl"] != tuned["ppl"]  # the adapter was trained: the weights differ
    assert base["ppl_tokens"] == tuned["ppl_tokens"] > 0 and base["generated"] == tuned["generated"] == len(VALIDATION)
    assert base["json_rows"] == 2 and set(tuned["buckets"]["tags"]) >= {"math", "zh", "en", "chat", "json-only"}
    assert set(tuned["buckets"]["sources"]) == {"cmath", "mawps", "messages", "emoji", "sharegpt"}
    probes = json.loads(open(probes_file, encoding="utf-8").read())["probes"]
    assert list(base["probes"]) == list(tuned["probes"]) == [p["name"] for p in probes]
    assert report["probe_regressions"] == [p for p in base["probes"]
                                           if base["probes"][p]["passed"] and not tuned["probes"][p]["passed"]]
    samples = [json.loads(x) for x in (folder / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 2 * len(VALIDATION)
    for s in samples:  # every verdict is explained, by the rules (module docstring), not by rerunning them
        assert s["usable"] == (s["reasons"] == [])
        if not s["answer"].strip():
            assert s["reasons"] == ["empty answer"]
        else:  # 12 new tokens at most: an answer cut there is "not ended", one that stopped is not
            cut = [r for r in s["reasons"] if r.startswith("not ended")]
            assert cut == (["not ended: finish_reason=length (cut at max_new_tokens=12)"]
                           if s["finish_reason"] == "length" else [])
        assert s["finish_reason"] in ("stop", "length")
    assert (folder / "eval.md").read_text(encoding="utf-8").count("| Perplexity |") == 1
    assert (folder / "eval_tags.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def server(eval_adapter, demo_model_dir, eval_work):
    """A real `transformers serve` on 127.0.0.1 (deploy.py) serving the merged base + trained adapter."""
    import deploy
    cfg = cfg_with(f"deploy.port={deploy.free_port()}")
    merged = merge_adapter(cfg, demo_model_dir, eval_adapter, str(eval_work / "merged"))
    proc = deploy.start_server(cfg, merged, str(eval_work / "serve.log"))
    yield proc, cfg
    deploy.stop_server(proc)


def test_cli_endpoint_and_evalscope(server, eval_adapter, val_file, eval_work, local_run):
    proc, cfg = server
    reports = eval_work / "reports_endpoint"
    done = run_cli(["--adapter", eval_adapter, "--data", val_file, "--endpoint", proc.url,
                    "--endpoint-model", proc.names[0],
                    "--tuned-only", "--evalscope", "--no-probes", "--set", f"output.reports_dir={reports}",
                    "--set", "eval.max_new_tokens=12", "--set", "eval.repetition_penalty=1.0",
                    "--set", "eval.evalscope_limit=2", "--set", "eval.evalscope_hub=False",
                    "--set", "eval.gates.min_usability=1.01"])
    # The impossible gate fails the run, after the report is written.
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gates failed: min_usability" in done.stderr
    report = json.loads((reports / "eval-run" / "eval.json").read_text(encoding="utf-8"))
    assert report["backend"]["tuned"] == proc.url and list(report["sides"]) == ["tuned"]
    tuned = report["sides"]["tuned"]
    assert tuned["generated"] == len(VALIDATION) and tuned["ppl"] is not None and tuned["json_rows"] == 2
    # The same metrics from the endpoint as in process: greedy answers of the same weights and template.
    local = local_run[1] / "eval_samples.jsonl"  # the in-process run of the same adapter (fixture)
    here = {(s["side"], s["index"]): s for s in map(json.loads, local.read_text(encoding="utf-8").splitlines())}
    there = [json.loads(x) for x in (reports / "eval-run" / "eval_samples.jsonl").read_text(
        encoding="utf-8").splitlines()]
    same = sum(s["answer"] == here[("tuned", s["index"])]["answer"] for s in there if s["side"] == "tuned")
    assert same >= len(VALIDATION) - 1, "endpoint answers differ from in-process greedy answers"
    scores = report["evalscope"]
    assert set(scores) == {"general_qa", "general_mcq"}
    qa, mcq = scores["general_qa"]["tuned"], scores["general_mcq"]["tuned"]
    assert qa["num"] == 4 and set(qa["subsets"]) == {"math", "knowledge"}  # 2 subsets × limit 2
    assert mcq["num"] == 2 and mcq["primary"].startswith("accuracy") and mcq["score"] in (0.0, 0.5, 1.0)
    assert 0.0 <= qa["score"] <= 1.0 and qa["primary"].startswith("rouge")
    assert "## EvalScope" in (reports / "eval-run" / "eval.md").read_text(encoding="utf-8")


def test_cli_errors_before_loading(eval_work, val_file):
    done = run_cli(["--adapter", str(eval_work / "nowhere"), "--data", val_file])
    assert done.returncode != 0 and "is not a PEFT adapter folder" in done.stderr
    done = run_cli(["--base-only", "--data", str(eval_work / "missing.jsonl")])
    assert done.returncode != 0 and "does not exist" in done.stderr
    done = run_cli(["--base-only", "--data", val_file, "--evalscope"])
    assert done.returncode != 0 and "--evalscope runs against an endpoint" in done.stderr
    done = run_cli(["--base-only", "--data", val_file, "--endpoint", "http://127.0.0.1:9/v1"])
    assert done.returncode != 0 and "no OpenAI-compatible server answers" in done.stderr
    done = run_cli(["--base-only", "--set", "eval.max_sampls=3"])
    assert done.returncode != 0 and "Did you mean: eval.max_samples" in done.stderr
    done = run_cli(["--base-only", "--data", val_file, "--set", "eval.gates.min_usabilty=0.5"])
    assert done.returncode != 0 and "unknown gate min_usabilty" in done.stderr


def test_generate_does_not_repeat_the_max_length_note(demo_model_dir, capfd):
    """Unsloth sets generation_config.max_length; transformers then logged a max_new_tokens note on every batch."""
    model, tokenizer = common.load_model(cfg_with())
    model.generation_config.max_length = 8192
    settings = dict(common.sampling_settings(cfg_with(), greedy=True), max_new_tokens=4)
    capfd.readouterr()
    out = common.generate_local(model, tokenizer, [([{"role": "user", "content": "Hi"}], None)] * 2, settings,
                                batch_size=1)
    assert all(0 < r["completion_tokens"] <= 4 for r in out)
    assert "seem to have been set" not in capfd.readouterr().err


def test_bad_data_file_is_an_error_not_a_traceback(tmp_path):
    """A malformed --data file raises common.DataError (a UserError) deep in common.load_split; main prints
    `error: <file>:<line>: ...` and exits 1. It used to end in a traceback (only FileNotFoundError was caught)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
                   '{"messages": [\n', encoding="utf-8")
    done = run_cli(["--base-only", "--no-probes", "--data", str(bad)])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: {bad}:2: JSONDecodeError"), done.stderr[-2000:]
