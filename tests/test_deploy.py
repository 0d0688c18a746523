"""deploy.py on real parts: a real LoRA adapter on the demo model (SmolLM2-135M), merged through the CLI,
served by a real `transformers serve` process on 127.0.0.1 (one server for the session), tested with the
openai client, stressed with EvalScope, and stopped with no process left behind. Errors are provoked for
real: a busy port, missing/incomplete model folders, vLLM absent, a server that dies while starting.

    .venv/bin/python -m pytest tests/test_deploy.py -x -q
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import common
import config
import deploy

# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy")
    common.write_jsonl(str(path / "processed" / "val.jsonl"), VAL_ROWS)
    return path


@pytest.fixture(scope="session")
def overrides(work):
    """--set overrides shared by the CLI runs and the in-process config: tiny sizes, a free port."""
    return [f"output.dir={work / 'outputs'}", f"output.reports_dir={work / 'reports'}",
            f"deploy.port={deploy.free_port()}", "deploy.perf_concurrency=[1, 2]", "deploy.perf_min_requests=2",
            "deploy.perf_requests_per_level=1", "deploy.test_max_tokens=32", "deploy.perf_max_tokens=8",
            f"data.processed_dir={work / 'processed'}", "deploy.parity_prompts=3", "deploy.parity_max_tokens=8"]


@pytest.fixture(scope="session")
def cfg(overrides):
    return config.build_config("demo", overrides)


WEATHER = [{"type": "function", "function": {  # deploy.WEATHER_TOOL, written out: the test does not trust the code
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
TRAIN_ROWS = [  # (messages, tools): what the demo adapter learns, so its tool calls and JSON come from the model
    ([{"role": "user", "content": f"What's the weather in {city} right now? Use the tool."},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}], WEATHER)
    if city else
    ([{"role": "system", "content": "Reply with a JSON object only."},
      {"role": "user", "content": f'Give {{"name": <string>, "age": <integer>}} for {name}, who is {age}.'},
      {"role": "assistant", "content": f'{{"name": "{name}", "age": {age}}}'}], None)
    # One pass, alternating: on 2 shared cores a step takes 15-75 s; after one step on a call the loss on another
    # city's call was already 0.11.
    for city, name, age in (("Berlin", None, None), (None, "Bob", 41), ("Tokyo", None, None), (None, "Carol", 25))]
VAL_ROWS = [  # data.processed_dir/val.jsonl for the parity gate (a tool row, which the gate skips, and 3 it uses)
    {"messages": [{"role": "user", "content": "What's the weather in Oslo right now? Use the tool."},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}],
     "tools": WEATHER},
    {"messages": [{"role": "system", "content": "Reply with a JSON object only."},
                  {"role": "user", "content": 'Give {"name": <string>, "age": <integer>} for Dan, who is 52.'},
                  {"role": "assistant", "content": '{"name": "Dan", "age": 52}'}]},
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Reply with a JSON object only."},
                  {"role": "user", "content": 'Give {"name": <string>, "age": <integer>} for Eve, who is 37.'},
                  {"role": "assistant", "content": '{"name": "Eve", "age": 37}'}]},
]


def train_adapter(cfg, base_dir, out_dir, lr=2e-3, seed=0):
    """A real PEFT LoRA (the config's settings) trained on TRAIN_ROWS with the suite's loss mask, saved as train.py
    saves one (adapter + tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    tokenizer = common.load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = cfg["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], task_type="CAUSAL_LM",
                                             lora_dropout=0.0, bias=lora["bias"], target_modules=lora["target_modules"]))
    rows = [common.tokenize_conversation(tokenizer, m, tools=t) for m, t in TRAIN_ROWS]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for row in rows:
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return loss.item()


@pytest.fixture(scope="session")
def run_path(cfg, demo_model_dir):
    """outputs/<run>/adapter + config.json as train.py writes them: a LoRA trained on TRAIN_ROWS."""
    path = common.run_folder(cfg, "demo-run")
    assert train_adapter(cfg, demo_model_dir, os.path.join(path, "adapter")) < 0.5  # the last row, once
    config.save_config(cfg, os.path.join(path, "config.json"))
    return path


def run_cli(args, overrides, timeout=300, env=None):
    return subprocess.run([sys.executable, os.path.join(common.ROOT, "deploy.py"), *args, "--profile", "demo",
                           *[x for o in overrides for x in ("--set", o)]],
                          capture_output=True, text=True, timeout=timeout, cwd=common.ROOT, env=env)


@pytest.fixture(scope="session")
def merged_dir(run_path, overrides):
    done = run_cli(["merge", "--run", run_path], overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "merge check" in done.stdout
    assert ("GGUF export skipped" in done.stdout) == (deploy.gguf_tools()[0] is None)
    return os.path.join(run_path, "merged")


@pytest.fixture(scope="session")
def server(cfg, merged_dir, run_path):
    proc = deploy.start_server(cfg, merged_dir, os.path.join(run_path, "serve.log"))
    yield proc
    if proc.poll() is None:
        deploy.stop_server(proc)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def copy_small_files(src, dst):
    """A model folder without its weights: config, tokenizer, template, generation config."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), dst)
    return dst


# ---------------------------------------------------------------- merge

def test_merge_matches_base_plus_adapter(merged_dir, run_path, demo_model_dir, qwen_tokenizer):
    """Tolerance: fp32 weights, so logits of merged vs base + adapter agree within 1e-3 (observed ~1e-4),
    while the adapter itself moves them by far more (so a no-op merge would fail)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    check = json.load(open(os.path.join(merged_dir, "merge_check.json")))
    assert check["passed"] and check["dtype"] == "float32" and check["max_abs_diff"] <= 1e-3
    ids = torch.tensor([common.prompt_ids(qwen_tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, os.path.join(run_path, "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (merged - adapted).abs().max().item() <= 1e-3
    assert (adapted - base_logits).abs().max().item() > 0.1


def test_copied_run_loads_its_adapter_on_the_configured_base(tiny_qwen3_dir, tmp_path):
    """A run copied from the machine it trained on: its adapter_config.json names a base path that is not here. A
    loader that takes the adapter folder alone (Unsloth's FastLanguageModel in merge and GPU eval; transformers'
    from_pretrained, the same mechanism, on this CPU) fails on it (the H200 merge: "Cannot determine model type");
    through common.adapter_on_base it loads the configured base with the adapter: the logits of base + PEFT."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=config.LINEAR_PROJECTIONS,
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = str(tmp_path / "copied-run" / "adapter")
    lora.save_pretrained(adapter)
    path = os.path.join(adapter, "adapter_config.json")
    conf = json.load(open(path))
    conf["base_model_name_or_path"] = "/home/someone/sft/models/Qwen3-4B-Instruct-2507"  # the training machine's
    json.dump(conf, open(path, "w"))
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(adapter)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        fresh = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
        want = PeftModel.from_pretrained(fresh, adapter).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        folder = common.adapter_on_base(adapter, tiny_qwen3_dir)
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5 and (want - plain).abs().max().item() > 1e-3
    assert json.load(open(path))["base_model_name_or_path"].startswith("/home/someone")  # the run is not changed
    assert common.adapter_on_base(folder, tiny_qwen3_dir) == folder  # naming the base already: used as it is


def test_merged_folder_ships_template_and_sampling(merged_dir, qwen_tokenizer):
    gen = json.load(open(os.path.join(merged_dir, "generation_config.json")))
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["do_sample"]) == (0.7, 0.8, 20, True)
    assert qwen_tokenizer.convert_tokens_to_ids(common.IM_END) in gen["eos_token_id"]
    with open(os.path.join(merged_dir, "chat_template.jinja"), encoding="utf-8") as f:
        assert f.read() == common.chat_template("qwen3_instruct_2507")
    assert not os.path.exists(merged_dir + ".tmp")


def test_merged_tokenizer_passes_vllms_grammar_engine(merged_dir):
    """vLLM builds its structured-output grammars (a named tool_choice, a JSON-schema answer) with xgrammar over
    the served folder's tokenizer. Below is the structural tag vLLM 0.25 builds for the hermes parser and a named
    tool_choice (vllm/tool_parsers/structural_tag_registry.py): every token of a valid call must pass it and
    <|im_end|> must end it. A tokenizer that xgrammar mis-reads rejects the first newline, and vLLM answers 500."""
    import xgrammar as xgr
    from transformers import AutoTokenizer
    from xgrammar.structural_tag import JSONSchemaFormat, TagFormat, TagsWithSeparatorFormat
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    function = deploy.WEATHER_TOOL["function"]
    tags = [TagFormat(begin=f'{begin}{function["name"]}", "arguments": ', end=end,
                      content=JSONSchemaFormat(json_schema=function["parameters"]))
            for begin, end in [('<tool_call>\n{"name": "', "}\n</tool_call>"), ('<tool_call>{"name": "', "}</tool_call>")]]
    forced = xgr.StructuralTag(format=TagsWithSeparatorFormat(tags=tags, separator="", at_least_one=True,
                                                              stop_after_first=True))
    compiler = xgr.GrammarCompiler(info)
    cases = [(compiler.compile_structural_tag(json.dumps(forced.model_dump())),
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
             (compiler.compile_json_schema(json.dumps(function["parameters"])), '{\n  "city": "New York"\n}')]
    for grammar, text in cases:
        matcher = xgr.GrammarMatcher(grammar)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            assert matcher.accept_token(token), f"xgrammar rejected {tokenizer.decode([token])!r} in {text!r}"
        assert matcher.accept_token(tokenizer.convert_tokens_to_ids(common.IM_END)) and matcher.is_terminated()


def hub_cache_with(model_dir, repo_id, cache):
    """The layout huggingface_hub leaves after a download: models--org--name/{refs/main, snapshots/<sha>/}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


def test_merge_works_offline_with_the_base_only_in_the_hub_cache(run_path, overrides, demo_model_dir, tmp_path):
    """model.name a hub id, no folder of that name, the hub unreachable (HF_HUB_OFFLINE=1): the merge takes the
    cached snapshot. Without the snapshot it fails with a clear error, not a traceback."""
    repo_id = "test-org/SmolLM2-135M-Instruct"
    run = tmp_path / "hub-run"
    shutil.copytree(os.path.join(run_path, "adapter"), run / "adapter")
    with open(os.path.join(run_path, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    saved["config"]["model"]["name"] = repo_id
    (run / "config.json").write_text(json.dumps(saved))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    overrides = overrides + [f"output.dir={tmp_path}"]  # --run must sit directly under output.dir
    missing = run_cli(["merge", "--run", str(run), "--no-gguf"], overrides, env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert f"the merge base {repo_id} is neither a local folder nor in the hub cache" in missing.stderr
    snapshot = hub_cache_with(demo_model_dir, repo_id, tmp_path / "hub-cache")
    env["HF_HUB_CACHE"] = str(tmp_path / "hub-cache")
    done = run_cli(["merge", "--run", str(run), "--no-gguf"], overrides, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"onto the 16-bit base {snapshot}" in done.stdout
    with open(run / "merged" / "merge_check.json", encoding="utf-8") as f:
        check = json.load(f)
    assert check["passed"] and check["base"] == str(snapshot) and check["adapter_effect_max_abs"] > 0


def test_merge_refuses_a_quantized_base(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3",
                                                      "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(deploy.DeployError, match="quantized checkpoint"):
        deploy.base_model_path(str(tmp_path))


# ---------------------------------------------------------------- serve, test, perf on the CPU server

def test_server_answers_the_served_name(server, cfg):
    assert server.engine == "transformers" and server.url == deploy.endpoint_url(cfg)
    assert deploy.endpoint_url(cfg) == f"http://127.0.0.1:{cfg['deploy']['port']}/v1"
    r = deploy.openai_client(cfg).chat.completions.create(
        model=cfg["deploy"]["served_model_name"], max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.completion_tokens >= 1


def test_cpu_server_holds_a_kv_cache_of_its_own_size(server, cfg):
    """`transformers serve --continuous-batching` sized its KV cache to 80% of the machine's RAM on a CPU (20 GB
    resident for a 2-layer model here; a second server beside it was killed for memory). deploy.py sizes it from
    deploy.max_num_seqs x max_model_len: the 135M demo model in fp32 (~0.5 GB) plus a cache of 4 x 2048 tokens."""
    deploy.openai_client(cfg).chat.completions.create(  # the model and its cache load with the first request
        model=cfg["deploy"]["served_model_name"], max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    with open(f"/proc/{server.pid}/status", encoding="utf-8") as f:
        rss_gib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024 ** 2
    assert rss_gib < 3, f"the CPU server holds {rss_gib:.1f} GiB"


def run_target(cfg, run_path, lora=False):
    target = deploy.deploy_targets(cfg, argparse.Namespace(run=[run_path], model=None, lora=lora, adapter=None))[0]
    return dict(target, served_dir=deploy.running_server_folder(cfg, target, lora))


def test_endpoint_checks_pass(server, cfg, run_path, merged_dir):
    out = os.path.join(deploy.reports_dir(cfg, run_path), "deploy_test.json")
    results = deploy.check_endpoint(cfg, run_target(cfg, run_path), out)
    assert results["engine"] == "transformers" and results["models"]["listed"] == ["smollm2-demo"]
    assert results["chat"]["completion_tokens"] >= 1 and results["chat"]["tokens_per_s"] > 0
    assert results["stream"]["chunks"] >= 1 and results["stream"]["ttft_s"] <= results["stream"]["latency_s"]
    # transformers serve ignores response_format: the trained adapter's own JSON, not a constrained one
    assert results["json"]["enforced"] is False and results["json"]["valid_json"] is True
    assert json.loads(results["json"]["text"]) == {"name": "Alice", "age": 30}
    tool = results["tool_round_trip"]
    assert tool["call_source"] == "model (tool_choice=auto)" and tool["model_call"] == "valid"
    assert tool["arguments"] == {"city": "Paris"} and tool["answer"].strip()
    parity = results["template_parity"]["conversations"]
    assert len(parity) == 3 and all(c["equal"] for c in parity)
    assert all(c["server_prompt_tokens"] == c["tokens"] for c in parity)
    gate = results["parity"]
    assert gate["prompts"] == 3 and "not returned by the transformers engine" in gate["logprobs"]
    assert set(gate["pairs"]) == {"served_vs_merged", "served_vs_adapter", "merged_vs_adapter", "served_vs_base"}
    for pair in ("served_vs_merged", "served_vs_adapter"):  # fp32 on both sides: the same greedy tokens
        assert gate["pairs"][pair]["top1_agreement"] == 1.0 and gate["pairs"][pair]["clear_positions"] >= 8
        assert gate["pairs"][pair]["mean_abs_dlogprob"] is None
    assert gate["pairs"]["merged_vs_adapter"]["mean_abs_dlogprob"] < 1e-3  # in process: logprobs on both sides
    # the base would answer the JSON prompts otherwise (it wrote "Here's a Python function ..." to this one)
    assert gate["pairs"]["served_vs_base"]["changed_share"] > 0 and gate["adapter_effect"]["passed"]
    assert gate["pairs"]["served_vs_adapter"]["changed_share"] == 0.0
    assert gate["greedy_identical"].endswith("/3 served vs merged")
    assert json.load(open(out))["parity"]["pairs"] == json.loads(json.dumps(gate["pairs"]))


def test_a_failing_check_does_not_hide_the_others(server, cfg, run_path, merged_dir, tmp_path, demo_model_dir):
    """`deploy.py test` runs every check, writes them all, then fails naming the failed ones."""
    other = copy_small_files(merged_dir, str(tmp_path / "other"))
    shutil.copy(os.path.join(demo_model_dir, "chat_template.jinja"), other)
    out = str(tmp_path / "deploy_test.json")
    quick = dict(cfg, deploy=dict(cfg["deploy"], parity_prompts=0))  # no gate: 6 checks
    with pytest.raises(deploy.DeployError, match=r"1 of 6 endpoint checks failed: template_parity$"):
        deploy.check_endpoint(quick, dict(run_target(cfg, run_path), served_dir=other), out)
    written = json.load(open(out))
    assert "template parity FAILED" in written["template_parity"]["error"]
    # parity runs first: the checks after it still ran and passed
    assert written["stream"]["chunks"] >= 1 and "error" not in written["json"]
    assert written["tool_round_trip"]["arguments"] == {"city": "Paris"}


def test_a_model_without_an_answer_still_gets_the_parity_gate(server, cfg, run_path, merged_dir, tmp_path,
                                                                monkeypatch):
    """Seen on the H200: a random-weight Qwen3-4B shape trained 4 steps answered the chat check with its stop token
    alone, and that check stopped `deploy.py test` before the parity gate. Now it is one failed check among the
    others. (The chat check is replaced here: the demo model always answers.)"""
    def no_text(client, name, max_tokens):
        raise deploy.DeployError("the chat completion returned no text (finish_reason 'stop', 1 completion tokens)")
    monkeypatch.setattr(deploy, "check_chat", no_text)
    out = tmp_path / "deploy_test.json"
    with pytest.raises(deploy.DeployError, match=r"1 of 7 endpoint checks failed: chat$"):
        deploy.check_endpoint(cfg, run_target(cfg, run_path), str(out))
    written = json.loads(out.read_text())
    assert "returned no text" in written["chat"]["error"] and written["parity"]["adapter_effect"]["passed"]
    assert written["parity"]["pairs"]["served_vs_merged"]["top1_agreement"] == 1.0


def test_gate_fails_on_a_broken_merge(server, cfg, run_path, merged_dir, demo_model_dir, tmp_path):
    """A merged folder with the adapter applied at twice its scale (lora_alpha doubled): the served model (the good
    merge) still matches base + adapter, the broken folder matches neither."""
    adapter = tmp_path / "double"
    shutil.copytree(os.path.join(run_path, "adapter"), adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["lora_alpha"] *= 2
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    broken = str(tmp_path / "broken")
    deploy.merge_peft(demo_model_dir, str(adapter), broken)
    target = dict(run_target(cfg, run_path), merged=broken)
    with pytest.raises(deploy.ParityError) as err:
        deploy.check_parity(cfg, deploy.openai_client(cfg), "transformers", "smollm2-demo", target,
                            deploy.target_tokenizer(target))
    message, pairs = str(err.value), err.value.result["pairs"]
    # merged_vs_adapter has logprobs on both sides (in process); served_vs_merged only top-1 (transformers serve)
    assert "merged_vs_adapter: " in message and "mean |Δlogprob|" in message and "worst prompt 0" in message
    assert "served_vs_adapter" not in message and pairs["served_vs_adapter"]["top1_agreement"] == 1.0
    assert pairs["merged_vs_adapter"]["mean_abs_dlogprob"] > 0.1


def test_adapter_effect_rule():
    """Served vs base must differ more than parity_min_adapter_effect (3) × served vs adapter."""
    cfg = config.build_config()

    def pairs(base, adapter, logprobs=True):
        key = "mean_abs_dlogprob"
        return {"served_vs_base": {key: base if logprobs else None, "changed_share": base},
                "served_vs_adapter": {key: adapter if logprobs else None, "changed_share": 0.3,
                                      "clear_disagree_share": adapter}}
    assert deploy.adapter_effect(cfg, pairs(0.30, 0.02))["passed"]  # 15× further from the base
    noop = deploy.adapter_effect(cfg, pairs(0.02, 0.02))  # an adapter that changes nothing: noise both ways
    assert not noop["passed"] and "mean |Δlogprob| 0.0200" in noop["why"]
    assert not deploy.adapter_effect(cfg, pairs(0.0, 0.0, logprobs=False))["passed"]  # the base itself served
    assert deploy.adapter_effect(cfg, pairs(0.25, 0.0, logprobs=False))["passed"]
    assert not deploy.adapter_effect(cfg, pairs(0.25, 0.25, logprobs=False))["passed"]
    # near-ties flipped by the merge's rounding (changed_share 0.3 against base + adapter) are not noise
    assert deploy.adapter_effect(cfg, pairs(0.24, 0.0, logprobs=False))["passed"]


@pytest.mark.parametrize("failure", ["http-500", "dropped"])
def test_a_tool_call_the_cpu_server_cannot_parse_is_constructed(failure):
    """`transformers serve` answers 500 when its tool parser meets an undertrained model's broken <tool_call> JSON:
    on that engine the round trip says so and goes on with a constructed call; on vLLM the error is not hidden.
    The server here is a loopback stand-in that answers as transformers serve did (500, then a reply)."""
    import http.server
    import threading
    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append([m["role"] for m in body["messages"]])
            tool_result = any(m["role"] == "tool" for m in body["messages"])
            if not tool_result and failure == "dropped":  # the answer breaks off: no response at all
                self.close_connection = True
                return
            reply = ({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "18 C and cloudy in Paris."}}],
                      "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}
                     if tool_result else {"error": {"message": "Expecting ',' delimiter: line 1 column 30"}})
            data = json.dumps(reply).encode()
            self.send_response(200 if tool_result else 500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = not tool_result  # uvicorn drops the connection after the 500, unannounced

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = config.build_config(overrides=[f"deploy.port={server.server_address[1]}"])
        client = deploy.openai_client(cfg)
        result = deploy.check_tool_round_trip(client, "m", 16, "transformers")
        why = "HTTP 500" if failure == "http-500" else "connection dropped"
        assert result["call_source"].startswith("constructed") and f"could not parse it ({why})" in result["model_call"]
        assert result["arguments"] == {"city": "Paris"} and result["answer"] == "18 C and cloudy in Paris."
        assert asked == [["user"], ["user", "assistant", "tool"]]
        from openai import APIConnectionError, InternalServerError
        with pytest.raises((InternalServerError, APIConnectionError)):
            deploy.check_tool_round_trip(client, "m", 16, "vllm")
    finally:
        server.shutdown()


def test_unusable_model_tool_calls_are_named():
    """What the tool check says about the model's own call before it forces or writes one (seen on the H100:
    the SmolLM2 demo run called a tool named after the city)."""
    from openai.types.chat import ChatCompletionMessage

    def message(name=None, arguments=None):
        calls = [{"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}] if name else None
        return ChatCompletionMessage(role="assistant", content=None, tool_calls=calls)

    call, why = deploy.weather_call(message("get_weather", '{"city": "Paris"}'))
    assert call.id == "c1" and why is None
    assert deploy.weather_call(message()) == (None, "no tool call")
    assert deploy.weather_call(message("Paris", '{"city": "Paris"}')) == (None, "called 'Paris', not get_weather")
    assert deploy.weather_call(message("get_weather", '{"city": "Par')) == (
        None, "arguments are not JSON: '{\"city\": \"Par'")


def test_perf_writes_report(server, cfg, run_path, merged_dir):
    out = deploy.reports_dir(cfg, run_path)
    result = deploy.run_perf(cfg, merged_dir, out)
    assert [r["concurrency"] for r in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["succeeded"] == level["requests"] == 2 and level["failed"] == 0
        assert level["output_tok_s"] > 0 and level["avg_ttft_ms"] > 0 and level["avg_tpot_ms"] > 0
        assert level["p99_latency_s"] >= level["p50_latency_s"] > 0
    assert json.load(open(os.path.join(out, "perf.json")))["levels"] == result["levels"]
    assert open(os.path.join(out, "perf.md")).read().count("\n| ") == 3  # header + 2 levels
    assert os.path.getsize(os.path.join(out, "perf.png")) > 10_000


def test_serving_bench_measures_the_running_server(server, cfg, tmp_path):
    """bench/bench_serve.py (the sweep's client) against the CPU server: every level's requests answered and
    counted from the server's own usage numbers."""
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, os.path.join(common.ROOT, "bench", "bench_serve.py"), "--tiny", "--url",
                           deploy.endpoint_url(cfg), "--model", cfg["deploy"]["served_model_name"], "--label", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    entry = json.loads(out.read_text())[0]
    assert entry["label"] == "cpu" and [lv["concurrency"] for lv in entry["levels"]] == [1, 2]
    assert [lv["requests"] for lv in entry["levels"]] == [2, 4]
    for level in entry["levels"]:
        assert 1 <= level["output_tokens"] <= 4 * level["requests"] and level["prompt_tokens"] > 16 * level["requests"]
        assert level["output_tok_s"] > 0
    assert done.stdout.strip().splitlines()[-1].startswith("| cpu | ")
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_serving_sweep_starts_measures_and_stops_each_server(tiny_qwen3_dir, overrides, tmp_path):
    """bench_serve.py --server (the sweep in one command): each server started, measured under the name /v1/models
    gives, and stopped before the next; one that fails to start is reported and the sweep goes on, exiting 1."""
    port = deploy.free_port()
    sets = " ".join(f"--set {shlex.quote(o)}" for o in [*overrides, f"output.dir={tmp_path / 'no-runs'}",
                                                       f"deploy.port={port}"])
    serve = f"{sys.executable} {os.path.join(common.ROOT, 'deploy.py')} serve --model {tiny_qwen3_dir} --profile demo"
    out = tmp_path / "sweep.json"
    failing = tmp_path / "failing.py"  # healthy, lists a model, answers every request with HTTP 500
    failing.write_text("import http.server, json, sys\n"
                       "class H(http.server.BaseHTTPRequestHandler):\n"
                       "    def reply(self, code, body):\n"
                       "        self.send_response(code); self.end_headers(); self.wfile.write(json.dumps(body).encode())\n"
                       "    def do_GET(self): self.reply(200, {'data': [{'id': 'm'}]})\n"
                       "    def do_POST(self): self.reply(500, {'error': 'no'})\n"
                       "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    done = subprocess.run([sys.executable, os.path.join(common.ROOT, "bench", "bench_serve.py"), "--tiny", "--url",
                           f"http://127.0.0.1:{port}/v1", "--out", str(out), "--server", f"a={serve} {sets}",
                           "--server", f"broken={sys.executable} -c 'import sys; sys.exit(3)'",
                           "--server", f"failing={sys.executable} {failing} {port}",
                           "--server", f"b={serve} {sets} --set deploy.max_model_len=1024"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1 and "2 of 4 servers failed" in done.stderr, done.stdout[-3000:] + done.stderr
    assert "broken: the server exited 3" in done.stdout
    assert "| failing | failed while measured (HTTPError: HTTP Error 500" in done.stdout
    entries = json.loads(out.read_text())
    assert [e["label"] for e in entries] == ["a", "b"]
    for entry in entries:
        assert entry["model"] == "smollm2-demo"  # the demo profile's served name, read from /v1/models
        assert all(lv["output_tok_s"] > 0 for lv in entry["levels"])
    table = done.stdout[done.stdout.index("| server |"):].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["a", "broken", "failing", "b"]
    assert (tmp_path / "sweep.json.a.log").read_text().count("starting transformers server") == 1
    assert (tmp_path / "sweep.png").stat().st_size > 10_000  # both servers' lines
    assert not common.http_ok(f"http://127.0.0.1:{port}/health", 2)  # the last server was stopped too
    assert serving_processes(tiny_qwen3_dir) == []  # deploy.py, and the server it started, are gone


def test_test_and_perf_find_the_folder_the_server_serves(server, cfg, run_path, merged_dir, tmp_path):
    """`deploy.py test|perf` without a merged folder: fine for a vLLM server in LoRA mode (the adapter holds the
    tokenizer), a clear error against `transformers serve`, which serves merged folders only."""
    def folder(run, lora=False, model=None):
        args = argparse.Namespace(run=[str(run)] if run else None, model=model, lora=lora, adapter=None)
        return deploy.running_server_folder(cfg, deploy.deploy_targets(cfg, args)[0], lora)
    assert folder(run_path) == merged_dir
    bare = os.path.join(os.path.dirname(run_path), "run-without-merge")  # runs live under output.dir
    shutil.copytree(os.path.join(run_path, "adapter"), os.path.join(bare, "adapter"), dirs_exist_ok=True)
    with pytest.raises(deploy.DeployError, match="is not vLLM, so it cannot be serving the adapter unmerged"):
        folder(bare)
    with pytest.raises(deploy.DeployError, match=r"cannot be serving the adapter unmerged \(--lora was given\)"):
        folder(run_path, lora=True)
    assert folder(bare, model=merged_dir) == merged_dir
    assert folder(None, model=merged_dir) == merged_dir  # --model alone: no run needed


def test_port_in_use_is_refused(server, cfg, merged_dir, tmp_path):
    with pytest.raises(deploy.DeployError, match=f"port {cfg['deploy']['port']} .* is in use"):
        deploy.start_server(cfg, merged_dir, str(tmp_path / "second.log"))


def test_stop_server_leaves_no_process(server):
    pids = deploy.group_pids(server.pid)
    assert server.pid in pids and server.poll() is None
    deploy.stop_server(server)
    assert server.poll() is not None
    assert not any(alive(pid) for pid in pids) and deploy.group_pids(server.pid) == []


# ---------------------------------------------------------------- served folders that are not the trained model

def served_like(merged_dir, weights_dir, template_dir, dst):
    """A complete model folder: merged_dir's config and tokenizer, weights_dir's weights, template_dir's chat
    template (links: nothing is copied twice)."""
    copy_small_files(merged_dir, dst)
    shutil.copy(os.path.join(template_dir, "chat_template.jinja"), dst)
    os.symlink(os.path.join(weights_dir, "model.safetensors"), os.path.join(dst, "model.safetensors"))
    return dst


def server_child(pid):
    """The server deploy.py started: its child that leads a process group of its own."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat", encoding="utf-8").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        if int(fields[1]) == pid and int(fields[2]) == int(entry):
            return int(entry)
    return None


def cli_serve(folder, overrides, tmp_path):
    """`deploy.py serve --model FOLDER` with no training run anywhere (an empty output.dir), on a port of its own;
    returns (process, config, the server's pid) once /health answers."""
    port = deploy.free_port()
    sets = overrides + [f"output.dir={tmp_path / 'no-runs'}", f"output.reports_dir={tmp_path / 'reports'}",
                        f"deploy.port={port}"]
    log = open(tmp_path / "cli.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(common.ROOT, "deploy.py"), "serve", "--model", folder,
                             "--profile", "demo", *[x for o in sets for x in ("--set", o)]],
                            stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT)
    one = config.build_config("demo", sets)
    deadline = time.time() + 600
    while not deploy.server_up(one):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "cli.log").read_text()[-3000:]
        time.sleep(2)
    return proc, one, server_child(proc.pid)


def stop_cli(proc, signum, server_pid, cfg, tmp_path):
    """Send signum to deploy.py (Ctrl-C is SIGINT) and check that no process of the server is left."""
    group = deploy.group_pids(server_pid)
    assert server_pid in group
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=120) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    assert "server stopped" in (tmp_path / "cli.log").read_text()
    assert not any(alive(pid) for pid in group) and deploy.group_pids(server_pid) == []
    deploy.check_port_free("127.0.0.1", cfg["deploy"]["port"])  # as a server binds: TIME_WAIT is free


def test_served_folder_without_the_adapter_fails_the_gate_and_ctrl_c_stops_it(
        server, cfg, run_path, merged_dir, demo_model_dir, overrides, tmp_path):
    """`deploy.py serve --model` serves the base's weights under training's tokenizer and template: the gate against
    the run fails on served vs adapter and on the adapter effect; the gate for --model alone (no run) passes against
    the folder itself. Ctrl-C leaves no process behind."""
    base_like = served_like(merged_dir, demo_model_dir, merged_dir, str(tmp_path / "base-like"))
    proc, one, server_pid = cli_serve(base_like, overrides, tmp_path)
    try:
        target = run_target(cfg, run_path)
        with pytest.raises(deploy.ParityError) as err:
            deploy.check_parity(one, deploy.openai_client(one), "transformers", "smollm2-demo", target,
                                deploy.target_tokenizer(target))
        assert "served_vs_adapter: top-1 agreement" in str(err.value) and "adapter effect:" in str(err.value)
        assert err.value.result["pairs"]["served_vs_base"]["changed_share"] == 0.0
        alone = deploy.deploy_targets(one, argparse.Namespace(run=None, model=base_like, lora=False, adapter=None))[0]
        alone["served_dir"] = deploy.running_server_folder(one, alone, False)
        assert alone["run"] is None and alone["adapter"] is None and alone["served_dir"] == base_like
        gate = deploy.check_parity(one, deploy.openai_client(one), "transformers", "smollm2-demo", alone,
                                   deploy.target_tokenizer(alone))
        assert list(gate["pairs"]) == ["served_vs_model"] and gate["adapter_effect"] is None
        assert gate["pairs"]["served_vs_model"]["top1_agreement"] == 1.0 and "adapter pairs skipped" in gate["skipped"]
    finally:
        stop_cli(proc, signal.SIGINT, server_pid, one, tmp_path)


def test_another_chat_template_fails_parity_and_sigterm_stops_it(
        server, cfg, run_path, merged_dir, demo_model_dir, overrides, tmp_path):
    """The merged weights served under SmolLM2's own template: the server's own prompt ids differ from training's
    (template parity, the check of `deploy.py test` that catches it: on this demo the greedy continuations under the
    two templates agreed, so the continuation pairs alone did not). SIGTERM (`kill PID`) leaves no process behind."""
    other = served_like(merged_dir, merged_dir, demo_model_dir, str(tmp_path / "other-template"))
    proc, one, server_pid = cli_serve(other, overrides, tmp_path)
    try:
        target = run_target(cfg, run_path)
        tokenizer = deploy.target_tokenizer(target)
        client = deploy.openai_client(one)
        with pytest.raises(deploy.DeployError, match="template parity FAILED"):
            # the training tokenizer's folder, so only the server's own prompt_tokens can differ
            deploy.check_template_parity(one, client, "transformers", "smollm2-demo", tokenizer, merged_dir)
    finally:
        stop_cli(proc, signal.SIGTERM, server_pid, one, tmp_path)


def serving_processes(marker):
    """Command lines of live processes whose command line holds `marker` and `serve`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if "serve" in cmdline and marker in cmdline and alive(int(pid)):
            found.append(cmdline)
    return found


def test_kill_during_start_up_stops_the_server(overrides, demo_model_dir, tmp_path):
    """`kill PID` (SIGTERM) while the server starts (vLLM: minutes) used to end deploy.py at once and leave the server,
    in its own process group, running with the GPU. Now it stops it and says so, without a traceback."""
    port = deploy.free_port()
    sets = overrides + [f"output.dir={tmp_path / 'no-runs'}", f"deploy.port={port}"]
    log_path = tmp_path / "cli.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(common.ROOT, "deploy.py"), "serve", "--model",
                                 demo_model_dir, "--profile", "demo", *[x for o in sets for x in ("--set", o)]],
                                stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT)
    deadline = time.time() + 120
    while "starting transformers server" not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    assert not common.http_ok(f"http://127.0.0.1:{port}/health", 1)  # still starting
    proc.terminate()
    assert proc.wait(timeout=120) == 1
    text = log_path.read_text()
    assert "error: interrupted while the server was starting; it was stopped" in text and "Traceback" not in text
    assert serving_processes(f"--port {port}") == []


def test_a_second_ctrl_c_does_not_cut_the_stop_short(monkeypatch, tmp_path):
    """Ctrl-C pressed again while serve_forever stops the server (vLLM takes seconds to shut down) used to raise
    KeyboardInterrupt inside stop_server: a traceback, and the server's group possibly left. A real process group
    stands in for the server; real SIGINTs to this process press Ctrl-C."""
    import threading
    server = subprocess.Popen(["sleep", "60"], start_new_session=True)
    server.names, server.url, server.log_path, server.link_dir = ["m"], "http://127.0.0.1:1/v1", "-", None
    real_stop = deploy.stop_server

    def stop_with_second_ctrl_c(proc, timeout_s=30):
        os.kill(os.getpid(), signal.SIGINT)  # the impatient second press, as the stop begins
        time.sleep(0.1)  # Python runs a signal's handler between bytecodes: let it
        real_stop(proc, timeout_s)

    monkeypatch.setattr(deploy, "stop_server", stop_with_second_ctrl_c)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # the first press
    try:
        deploy.serve_forever(server)  # returns once the server is stopped
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        if server.poll() is None:
            server.kill()
    assert server.returncode == -signal.SIGTERM and deploy.group_pids(server.pid) == []


# ---------------------------------------------------------------- errors

def test_busy_port_is_refused_before_starting(cfg, merged_dir, tmp_path):
    busy = dict(cfg, deploy=dict(cfg["deploy"], port=deploy.free_port()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy["deploy"]["port"]))
        s.listen()
        with pytest.raises(deploy.DeployError, match="is in use.*deploy.port"):
            deploy.start_server(busy, merged_dir, str(tmp_path / "s.log"))
    assert not (tmp_path / "s.log").exists()  # refused before any process started


def test_missing_and_incomplete_model_dirs(cfg, merged_dir, tmp_path):
    with pytest.raises(deploy.DeployError, match="does not exist.*deploy.py merge"):
        deploy.start_server(cfg, str(tmp_path / "nowhere"), str(tmp_path / "s.log"))
    partial = copy_small_files(merged_dir, str(tmp_path / "partial"))
    with pytest.raises(deploy.DeployError, match=r"incomplete: missing model weights"):
        deploy.check_model_dir(partial)
    with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}, f)
    os.symlink(os.path.join(merged_dir, "model.safetensors"), os.path.join(partial, "model-00001-of-00002.safetensors"))
    with pytest.raises(deploy.DeployError, match="missing model-00002-of-00002.safetensors"):
        deploy.check_model_dir(partial)
    os.remove(os.path.join(partial, "tokenizer.json"))
    with pytest.raises(deploy.DeployError, match="tokenizer.json"):
        deploy.check_model_dir(partial)


def test_vllm_not_installed_gives_the_install_hint(cfg, run_path, overrides):
    if common.package_installed("vllm"):
        pytest.skip("vLLM is installed here; the hint is for machines without it")
    with pytest.raises(deploy.DeployError, match="vLLM is not installed: pip install vllm"):
        deploy.resolve_engine(cfg, "vllm")
    done = run_cli(["serve", "--engine", "vllm", "--run", run_path], overrides, timeout=120)
    assert done.returncode != 0 and "pip install vllm" in done.stderr


def test_server_dying_during_startup_is_reported(cfg, merged_dir, tmp_path):
    """Files complete but the config names no known architecture: the real server exits while loading."""
    broken = copy_small_files(merged_dir, str(tmp_path / "broken"))
    os.symlink(os.path.join(merged_dir, "model.safetensors"), os.path.join(broken, "model.safetensors"))
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump({"model_type": "no-such-architecture", "architectures": ["NoSuchForCausalLM"]}, f)
    one = dict(cfg, deploy=dict(cfg["deploy"], port=deploy.free_port()))
    log = str(tmp_path / "broken.log")
    with pytest.raises(deploy.DeployError, match="exited during start-up") as err:
        deploy.start_server(one, broken, log)
    assert "no-such-architecture" in str(err.value)  # the log's tail names the cause
    assert "no-such-architecture" in open(log).read()


def test_startup_timeout_stops_the_server(cfg, merged_dir, tmp_path):
    one = dict(cfg, deploy=dict(cfg["deploy"], port=deploy.free_port(), startup_timeout_s=1))
    started = time.time()
    with pytest.raises(deploy.DeployError, match="not healthy after 1 s"):
        deploy.start_server(one, merged_dir, str(tmp_path / "slow.log"))
    assert time.time() - started < 60
    with socket.socket() as s:  # the port is free again: the half-started server is gone
        s.bind(("127.0.0.1", one["deploy"]["port"]))


def test_lora_mode_needs_vllm(cfg, demo_model_dir, run_path, tmp_path):
    with pytest.raises(deploy.DeployError, match="needs vLLM"):
        deploy.start_server(cfg, demo_model_dir, str(tmp_path / "l.log"), {"a": os.path.join(run_path, "adapter")})


def test_bad_perf_prompt_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"question": "ok"}\n{"prompt": "wrong key"}\n')
    with pytest.raises(common.DataError, match=r"prompts.jsonl:2: expected"):
        deploy.perf_prompts(str(path))


def test_shipped_perf_prompts_are_valid():
    path, count = deploy.perf_prompts(config.CONFIG["deploy"]["perf_prompts_file"])
    assert count >= 32


# ---------------------------------------------------------------- vLLM flags (built here, run on a GPU)

def test_vllm_flags_keep_the_16gb_settings_on_16gb():
    cfg = config.build_config()
    s = deploy.vllm_settings(cfg, memory_gb=16)
    assert (s["max_num_seqs"], s["max_num_batched_tokens"], s["enforce_eager"], s["gpu_memory_utilization"],
            s["max_model_len"]) == (4, 2048, True, 0.82, 16384)
    assert s["scaled_keys"] == []


def test_vllm_flags_scale_with_memory_and_tensor_parallel():
    cfg = config.build_config()
    big = deploy.vllm_settings(cfg, memory_gb=80)
    assert big["max_num_seqs"] >= 128 and big["max_num_batched_tokens"] > 2048 and not big["enforce_eager"]
    two = deploy.vllm_settings(cfg, memory_gb=40, tensor_parallel_size=2)  # 2 × 40 GB counts as 80 GB
    assert two["tensor_parallel_size"] == 2 and two["max_num_seqs"] == big["max_num_seqs"]
    mid = deploy.vllm_settings(cfg, memory_gb=24)
    assert 4 < mid["max_num_seqs"] < big["max_num_seqs"]
    user = config.build_config(overrides=["deploy.max_num_seqs=8"])
    assert deploy.vllm_settings(user, memory_gb=80)["max_num_seqs"] == 8  # a user's value is kept
    same = config.build_config(overrides=["deploy.max_num_seqs=4", "deploy.enforce_eager=True"])
    kept = deploy.vllm_settings(same, memory_gb=141)  # also a value equal to the default: the user gave it
    assert (kept["max_num_seqs"], kept["enforce_eager"], kept["max_num_batched_tokens"]) == (4, True, 8192)
    assert kept["scaled_keys"] == ["gpu_memory_utilization", "max_num_batched_tokens"]
    tier = config.build_config(overrides=["deploy.tiers.80gb.max_num_seqs=512"])  # a sweep edits a tier
    assert deploy.vllm_settings(tier, memory_gb=141)["max_num_seqs"] == 512
    off = config.build_config(overrides=["deploy.scale_to_gpu=False"])
    assert deploy.vllm_settings(off, memory_gb=80)["max_num_seqs"] == 4


def test_vllm_command_flags(run_path, tmp_path):
    cfg = config.build_config(overrides=["deploy.api_key=secret", "deploy.kv_cache_dtype=fp8",
                                         "deploy.tensor_parallel_size=2"])
    cmd = deploy.vllm_command(cfg, "/models/merged", settings=deploy.vllm_settings(cfg, memory_gb=8))  # 2 × 8 GB
    joined = " ".join(cmd)
    for flag in ("serve /models/merged", "--host 127.0.0.1", "--served-model-name qwen3-4b-sft",
                 "--enable-auto-tool-choice", "--tool-call-parser hermes", "--max-model-len 16384",
                 "--gpu-memory-utilization 0.82", "--max-num-seqs 4", "--max-num-batched-tokens 2048",
                 "--enforce-eager", "--kv-cache-dtype fp8", "--tensor-parallel-size 2"):
        assert flag in joined, flag
    assert "secret" not in joined and "--api-key" not in joined  # the key goes through VLLM_API_KEY
    for flag in ("--quantization", "async-scheduling", "--compilation-config"):  # vLLM's defaults unless asked
        assert flag not in joined
    adapter = os.path.join(run_path, "adapter")
    lora = " ".join(deploy.vllm_command(cfg, "/models/base", {"qwen3-4b-sft": adapter},
                                        deploy.vllm_settings(cfg, memory_gb=16)))
    assert f"--enable-lora --lora-modules qwen3-4b-sft={adapter} --max-loras 1 --max-lora-rank 16" in lora
    assert f"--chat-template {adapter}/chat_template.jinja" in lora and "--served-model-name" not in lora
    # The unmerged base has no generation_config.json of ours: the deploy sampling goes on the command line.
    assert '--override-generation-config {"temperature": 0.7, "top_p": 0.8, "top_k": 20}' in lora
    assert "--override-generation-config" not in joined


def test_vllm_sweep_flags_pass_through():
    cfg = config.build_config(overrides=[
        "deploy.quantization=fp8", "deploy.async_scheduling=True", "deploy.vllm_args=['--enable-prefix-caching']",
        "deploy.compilation_config={'cudagraph_mode': 'FULL_AND_PIECEWISE', 'max_cudagraph_capture_size': 256}"])
    cmd = deploy.vllm_command(cfg, "/m", settings=deploy.vllm_settings(cfg, memory_gb=141))
    joined = " ".join(cmd)
    assert "--quantization fp8" in joined and "--async-scheduling" in cmd and cmd[-1] == "--enable-prefix-caching"
    i = cmd.index("--compilation-config")
    assert json.loads(cmd[i + 1]) == {"cudagraph_mode": "FULL_AND_PIECEWISE", "max_cudagraph_capture_size": 256}
    off = config.build_config(overrides=["deploy.async_scheduling=False"])
    assert "--no-async-scheduling" in deploy.vllm_command(off, "/m", settings=deploy.vllm_settings(off, 141))
    with pytest.raises(deploy.DeployError, match="deploy.quantization must be None or 'fp8'"):
        deploy.vllm_settings(config.build_config(overrides=["deploy.quantization=awq"]), memory_gb=141)


def test_several_adapters_in_lora_mode(cfg, run_path, tmp_path):
    """`--lora --run A --run B`: one base, each adapter under its run's folder name, all in one batch."""
    runs, out = [], os.path.dirname(run_path)  # runs live under output.dir
    for name, rank in (("run-a", 16), ("run-b", 32)):
        shutil.copytree(run_path, os.path.join(out, name), ignore=shutil.ignore_patterns("merged*", "*.log"),
                        dirs_exist_ok=True)
        settings_path = os.path.join(out, name, "adapter", "adapter_config.json")
        with open(settings_path, encoding="utf-8") as f:
            settings = json.load(f)
        with open(settings_path, "w", encoding="utf-8") as f:
            json.dump(dict(settings, r=rank), f)
        runs.append(os.path.join(out, name))
    args = argparse.Namespace(run=runs, model=None, lora=True, adapter=None)
    targets = deploy.deploy_targets(cfg, args)
    assert [t["name"] for t in targets] == ["run-a", "run-b"]
    assert [t["reports"] for t in targets] == [deploy.reports_dir(cfg, r) for r in runs]
    base, adapters = deploy.serve_plan(args, targets)
    assert base == common.path_in_repo(config.DEMO_MODEL_DIR) and list(adapters) == ["run-a", "run-b"]
    cmd = " ".join(deploy.vllm_command(cfg, base, adapters, deploy.vllm_settings(cfg, memory_gb=80)))
    assert (f"--lora-modules run-a={runs[0]}/adapter run-b={runs[1]}/adapter --max-loras 2 --max-lora-rank 32"
            in cmd)
    with pytest.raises(deploy.DeployError, match="several --run are served together only as unmerged adapters"):
        deploy.deploy_targets(cfg, argparse.Namespace(run=runs, model=None, lora=False, adapter=None))
    with open(os.path.join(runs[1], "adapter", "chat_template.jinja"), "a", encoding="utf-8") as f:
        f.write("{# another template #}")
    with pytest.raises(deploy.DeployError, match="trained with different chat templates"):
        deploy.vllm_command(cfg, base, adapters)


def test_16bit_merge_check_ignores_ties_but_catches_clear_flips():
    """A near-tie that 16-bit rounding flips is not a failed merge; a flipped clear leader is."""
    import torch
    ref = torch.tensor([[5.0, 4.9, 0.0], [6.0, 0.0, 0.0]])
    tie_flipped = torch.tensor([[4.9, 5.0, 0.0], [6.0, 0.0, 0.0]])
    clear_flipped = torch.tensor([[5.0, 4.9, 0.0], [0.0, 6.0, 0.0]])
    ok = deploy.compare_logits([ref], [tie_flipped], "bfloat16")
    assert ok["passed"] and ok["top1_positions"] == 1 and ok["top1_agreement"] == 1.0
    bad = deploy.compare_logits([ref], [clear_flipped], "bfloat16")
    assert not bad["passed"] and bad["top1_agreement"] == 0.0


def test_all_merges_in_a_process_of_its_own_with_explicit_arguments():
    """`all` on a GPU merges in a child process. Its command names the runs this process resolved and its own
    options; it used to be argv with the first "all" replaced, even a run named all."""
    args = argparse.Namespace(step="all", run=["all"], adapter="outputs/all/checkpoints/checkpoint-4", no_gguf=True,
                              profile="demo", overrides=["deploy.port=9001"])
    cmd = deploy.merge_command(args, [{"run": "/work/outputs/all"}])
    assert cmd == [sys.executable, os.path.abspath(deploy.__file__), "merge", "--run", "/work/outputs/all",
                   "--adapter", "outputs/all/checkpoints/checkpoint-4", "--no-gguf", "--profile", "demo",
                   "--set", "deploy.port=9001"]
