"""deploy.py on real parts: a real LoRA adapter on the demo model (SmolLM2-135M), merged through the CLI,
served by a real `transformers serve` process on 127.0.0.1 (one server for the session), tested with the
openai client, stressed with EvalScope, and stopped with no process left behind. Errors are provoked for
real: a busy port, missing/incomplete model folders, vLLM absent, a server that dies while starting.

    .venv/bin/python -m pytest tests/test_deploy.py -x -q
"""

import argparse
import json
import os
import shutil
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
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="session")
def overrides(work):
    """--set overrides shared by the CLI runs and the in-process config: tiny sizes, a free port."""
    return [f"output.dir={work / 'outputs'}", f"output.reports_dir={work / 'reports'}",
            f"deploy.port={deploy.free_port()}", "deploy.perf_concurrency=[1, 2]", "deploy.perf_min_requests=2",
            "deploy.perf_requests_per_level=1", "deploy.test_max_tokens=16", "deploy.perf_max_tokens=8"]


@pytest.fixture(scope="session")
def cfg(overrides):
    return config.build_config("demo", overrides)


@pytest.fixture(scope="session")
def run_path(cfg, demo_model_dir):
    """outputs/<run>/adapter + config.json as train.py writes them: a real PEFT LoRA (config's settings)
    on the demo model, with its B matrices perturbed so that the merge is not a no-op."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    path = common.run_dir(cfg, "demo-run")
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    lora = cfg["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], task_type="CAUSAL_LM",
                                             lora_dropout=lora["lora_dropout"], bias=lora["bias"],
                                             target_modules=lora["target_modules"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(os.path.join(path, "adapter"))
    common.load_tokenizer(cfg).save_pretrained(os.path.join(path, "adapter"))
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


def test_endpoint_checks_pass(server, cfg, run_path, merged_dir):
    out = os.path.join(deploy.reports_dir(cfg, run_path), "deploy_test.json")
    results = deploy.check_endpoint(cfg, cfg, os.path.join(run_path, "adapter"), merged_dir, out)
    assert results["engine"] == "transformers"
    assert results["chat"]["completion_tokens"] >= 1 and results["chat"]["tokens_per_s"] > 0
    assert results["stream"]["chunks"] >= 1 and results["stream"]["ttft_s"] <= results["stream"]["latency_s"]
    assert results["json"]["enforced"] is False and isinstance(results["json"]["valid_json"], bool)
    assert results["tool_round_trip"]["arguments"] == {"city": "Paris"}
    parity = results["template_parity"]["conversations"]
    assert len(parity) == 3 and all(c["equal"] for c in parity)
    assert all(c["server_prompt_tokens"] == c["tokens"] for c in parity)
    assert json.load(open(out))["template_parity"]["conversations"] == parity


def test_template_parity_fails_loudly_on_another_template(server, cfg, run_path, merged_dir, tmp_path,
                                                          demo_model_dir):
    """A served folder whose chat template is not the one training used (SmolLM2's own) must fail."""
    other = copy_small_files(merged_dir, str(tmp_path / "other"))
    shutil.copy(os.path.join(demo_model_dir, "chat_template.jinja"), other)
    with pytest.raises(deploy.DeployError, match="template parity FAILED"):
        deploy.check_template_parity(cfg, deploy.openai_client(cfg), "transformers",
                                     cfg["deploy"]["served_model_name"], cfg, os.path.join(run_path, "adapter"), other)


def test_a_failing_check_does_not_hide_the_others(server, cfg, run_path, merged_dir, tmp_path, demo_model_dir):
    """`deploy.py test` runs every check, writes them all, then fails naming the failed ones."""
    other = copy_small_files(merged_dir, str(tmp_path / "other"))
    shutil.copy(os.path.join(demo_model_dir, "chat_template.jinja"), other)
    out = str(tmp_path / "deploy_test.json")
    with pytest.raises(deploy.DeployError, match=r"1 of 6 endpoint checks failed: template_parity$"):
        deploy.check_endpoint(cfg, cfg, os.path.join(run_path, "adapter"), other, out)
    written = json.load(open(out))
    assert "template parity FAILED" in written["template_parity"]["error"]
    # parity runs first: the checks after it still ran and passed
    assert written["stream"]["chunks"] >= 1 and "error" not in written["json"]
    assert written["tool_round_trip"]["arguments"] == {"city": "Paris"}


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


def test_test_and_perf_find_the_folder_the_server_serves(server, cfg, run_path, merged_dir, tmp_path):
    """`deploy.py test|perf` without a merged folder: fine for a vLLM server in LoRA mode (the adapter holds the
    tokenizer), a clear error against `transformers serve`, which serves merged folders only."""
    args = argparse.Namespace(model=None, lora=False)
    assert deploy.running_server_folder(cfg, args, run_path) == merged_dir
    bare = tmp_path / "run-without-merge"
    shutil.copytree(os.path.join(run_path, "adapter"), bare / "adapter")
    with pytest.raises(deploy.DeployError, match="is not vLLM, so it cannot be serving the adapter unmerged"):
        deploy.running_server_folder(cfg, args, str(bare))
    with pytest.raises(deploy.DeployError, match=r"cannot be serving the adapter unmerged \(--lora was given\)"):
        deploy.running_server_folder(cfg, argparse.Namespace(model=None, lora=True), run_path)
    assert deploy.running_server_folder(cfg, argparse.Namespace(model=merged_dir, lora=False), str(bare)) == merged_dir


def test_port_in_use_is_refused(server, cfg, merged_dir, tmp_path):
    with pytest.raises(deploy.DeployError, match=f"port {cfg['deploy']['port']} .* is in use"):
        deploy.start_server(cfg, merged_dir, str(tmp_path / "second.log"))


def test_stop_server_leaves_no_process(server):
    pids = deploy.group_pids(server.pid)
    assert server.pid in pids and server.poll() is None
    deploy.stop_server(server)
    assert server.poll() is not None
    assert not any(alive(pid) for pid in pids) and deploy.group_pids(server.pid) == []


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
    if deploy.vllm_installed():
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
        deploy.start_server(cfg, demo_model_dir, str(tmp_path / "l.log"), adapter_dir=os.path.join(run_path, "adapter"))


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
    adapter = os.path.join(run_path, "adapter")
    lora = " ".join(deploy.vllm_command(cfg, "/models/base", adapter, deploy.vllm_settings(cfg, memory_gb=16)))
    assert f"--enable-lora --lora-modules qwen3-4b-sft={adapter}" in lora and "--max-lora-rank 16" in lora
    assert f"--chat-template {adapter}/chat_template.jinja" in lora and "--served-model-name" not in lora
    # The unmerged base has no generation_config.json of ours: the deploy sampling goes on the command line.
    assert '--override-generation-config {"temperature": 0.7, "top_p": 0.8, "top_k": 20}' in lora
    assert "--override-generation-config" not in joined


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
