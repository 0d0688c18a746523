"""config.py: --set overrides (types, errors, suggestions, `=` in values), profiles, and a real script's CLI."""

import argparse
import json
import os
import subprocess
import sys

import pytest

import config
from config import ConfigError, build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setting(overrides, key, profile=None):
    cfg = build_config(profile, overrides)
    section, name = key.split(".", 1)
    return cfg[section][name]


@pytest.mark.parametrize("item,key,value", [
    ("model.max_seq_length=1024", "model.max_seq_length", 1024),
    ("training.learning_rate=1e-4", "training.learning_rate", 1e-4),
    ("training.learning_rate=1", "training.learning_rate", 1.0),  # an int where a float is expected: widened
    ("training.max_steps=2e3", "training.max_steps", 2000),  # a whole float where an int is expected
    ("sft.packing=False", "sft.packing", False),
    ("model.load_in_4bit=True", "model.load_in_4bit", True),
    ("lora.target_modules=['q_proj', 'v_proj']", "lora.target_modules", ["q_proj", "v_proj"]),
    ("eval.evalscope_datasets=[]", "eval.evalscope_datasets", []),
    ("training.lr_scheduler_type=linear", "training.lr_scheduler_type", "linear"),  # bare string
    ("training.lr_scheduler_type='linear'", "training.lr_scheduler_type", "linear"),  # quoted string
    ("output.dir=outputs/run1", "output.dir", "outputs/run1"),
    ("output.dir=my runs", "output.dir", "my runs"),  # a bare string with a space
    ("training.run_name=None", "training.run_name", None),
    ("data.total_size=5000", "data.total_size", 5000),  # None default: any value
    ("training.gradient_checkpointing=True", "training.gradient_checkpointing", True),  # "unsloth" | True | False
    ("deploy.kv_cache_dtype=fp8", "deploy.kv_cache_dtype", "fp8"),
    (" model.max_seq_length = 256 ", "model.max_seq_length", 256),  # spaces around key and value
])
def test_set_parses_and_types_values(item, key, value):
    got = setting([item], key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item,value", [
    ("deploy.api_key=abc=def==", "abc=def=="),  # split on the first '=' only
    ("model.name=/models/run=3/merged", "/models/run=3/merged"),
    ("data.raw_dir=a=1,b=2", "a=1,b=2"),  # (run names are plain names: tests/test_secrets.py)
])
def test_equals_sign_inside_value(item, value):
    key = item.split("=", 1)[0]
    assert setting([item], key) == value


@pytest.mark.parametrize("item,message", [
    ("model.max_seq_length=abc", "model.max_seq_length expects int, got 'abc'"),
    ("model.max_seq_length=1.5", "model.max_seq_length expects int, got 1.5"),
    ("training.learning_rate=True", "training.learning_rate expects a number, got True"),
    ("training.learning_rate=fast", "training.learning_rate expects float, got 'fast'"),
    ("sft.packing=false", "sft.packing expects True or False, got 'false'"),
    ("sft.packing=1", "sft.packing expects True or False, got 1"),
    ("lora.target_modules=q_proj", "lora.target_modules expects a list, got 'q_proj'"),
    ("lora.r=[16]", "lora.r expects int, got [16]"),
    ("training.lr_scheduler_type=['cosine']", "training.lr_scheduler_type expects str, got ['cosine']"),
    ("model={'name': 'x'}", "model is a section"),
    ("profile=demo", "Unknown config key: profile"),
    ("model.max_seq_length", "--set expects KEY=VALUE, got 'model.max_seq_length'"),
])
def test_type_errors(item, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, [item])
    assert message in str(err.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        build_config(None, ["training.learning_rte=1e-4"])
    assert str(err.value).startswith("Unknown config key: training.learning_rte. Did you mean: training.learning_rate")
    with pytest.raises(ConfigError) as err:
        build_config(None, ["zzz.qqq=1"])
    assert "Unknown config key: zzz.qqq. See config.py for the keys." == str(err.value)
    with pytest.raises(ConfigError, match="Unknown config key: model.name.extra"):
        build_config(None, ["model.name.extra=1"])  # a leaf is not a section
    with pytest.raises(ConfigError, match="Unknown config key: data.sources.nosuch.weight"):
        build_config(None, ["data.sources.nosuch.weight=0.5"])  # open dicts take new entries, not new paths


def test_open_sections_accept_new_entries():
    cfg = build_config(None, ["data.sources.mine={'format': 'messages', 'local': 'my.jsonl', 'weight': 0.5}",
                              "data.sources.cmath.weight=0.5", "eval.gates.max_ppl_ratio=1.2"])
    assert cfg["data"]["sources"]["mine"]["weight"] == 0.5 and cfg["data"]["sources"]["cmath"]["weight"] == 0.5
    assert cfg["eval"]["gates"]["max_ppl_ratio"] == 1.2
    with pytest.raises(ConfigError, match="expects float"):
        build_config(None, ["data.sources.cmath.weight=high"])


def test_profile_demo_and_precedence():
    cfg = build_config("demo")
    assert cfg["profile"] == "demo"
    for key, value in config.PROFILES["demo"].items():
        section, name = key.split(".", 1)
        assert cfg[section][name] == value
    assert cfg["model"]["name"] == config.DEMO_MODEL_DIR and cfg["training"]["optim"] == "adamw_torch"
    assert cfg["lora"] == config.CONFIG["lora"]  # keys the profile leaves alone keep their defaults
    assert setting(["model.max_seq_length=256"], "model.max_seq_length", "demo") == 256  # --set wins
    assert config.CONFIG["model"]["name"] == "unsloth/Qwen3-4B-Instruct-2507"  # the defaults are not mutated
    with pytest.raises(ConfigError, match="Unknown profile 'tiny'; choose from demo"):
        build_config("tiny")


def test_defaults_have_the_issue_values():
    cfg = build_config()
    assert cfg["profile"] is None
    assert (cfg["lora"]["r"], cfg["lora"]["lora_alpha"], cfg["lora"]["lora_dropout"], cfg["lora"]["bias"]) == \
        (16, 32, 0.0, "none")
    assert len(cfg["lora"]["target_modules"]) == 7 and cfg["training"]["seed"] == 42
    assert (cfg["data"]["min_valid"], cfg["data"]["max_answer_chars"]) == (100, 3000)
    assert (cfg["deploy"]["max_model_len"], cfg["deploy"]["gpu_memory_utilization"], cfg["deploy"]["max_num_seqs"],
            cfg["deploy"]["max_num_batched_tokens"], cfg["deploy"]["enforce_eager"]) == (16384, 0.82, 4, 2048, True)


def test_resolve_from_argparse_env_profile_and_save(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SFT_PROFILE", "demo")
    parser = config.add_config_args(argparse.ArgumentParser())
    cfg = config.resolve(parser.parse_args(["--set", "lora.r=8", "--set", "lora.lora_alpha=16"]), parser)
    assert cfg["profile"] == "demo" and cfg["lora"]["r"] == 8 and cfg["lora"]["lora_alpha"] == 16
    out = capsys.readouterr().out
    assert out.startswith("Effective config (profile: demo):") and "  lora.r = 8\n" in out
    path = tmp_path / "run" / "config.json"
    config.save_config(cfg, str(path), extra={"git_sha": "abc"})
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == {"git_sha": "abc", "config": json.loads(json.dumps(cfg))}


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SFT_PROFILE": ""})


def test_script_cli_rejects_unknown_key_with_exit_2():
    proc = run_script("check_dataset.py", "--profile", "demo", "--set", "training.learning_rte=1e-4")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("usage: check_dataset.py")
    assert ("check_dataset.py: error: Unknown config key: training.learning_rte. "
            "Did you mean: training.learning_rate") in proc.stderr
    proc = run_script("check_dataset.py", "--set", "sft.packing=maybe")
    assert proc.returncode == 2 and "error: sft.packing expects True or False, got 'maybe'" in proc.stderr


def test_config_cli_prints_the_effective_config():
    proc = run_script("config.py", "--profile", "demo", "--set", "training.learning_rate=3e-4")
    assert proc.returncode == 0, proc.stderr
    assert "Effective config (profile: demo):" in proc.stdout
    assert "  training.learning_rate = 0.0003\n" in proc.stdout and "  model.max_seq_length = 512\n" in proc.stdout


# ---------------------------------------------------------------- issue 15: values, source fields, types

@pytest.mark.parametrize("items,message", [
    (["deploy.perf_dataset=rnadom"], "deploy.perf_dataset must be one of 'file', 'random', got 'rnadom'"),
    (["data.mix_mode=interleaved"], "data.mix_mode must be one of 'resample', 'interleave', got 'interleaved'"),
    (["data.overlong_answer_policy=cut"], "data.overlong_answer_policy must be one of 'truncate', 'drop'"),
    (["sft.overlong_policy=keep"], "sft.overlong_policy must be one of 'drop', 'truncate', 'fail', got 'keep'"),
    (["data.use_hub=1"], "data.use_hub must be one of 'auto', True, False, got 1"),  # 1 == True, yet not True
    (["training.gradient_checkpointing=unslot"], "training.gradient_checkpointing must be one of 'unsloth'"),
    (["data.sources.emoji.wieght=0.9"], "Unknown field data.sources.emoji.wieght. Did you mean "
                                        "data.sources.emoji.weight?"),
    (["data.sources.mine={'format': 'messages', 'local': 'my.jsonl', 'wieght': 0.3}"],
     "Unknown field data.sources.mine.wieght. Did you mean data.sources.mine.weight?"),
    (["data.sources.mine={'format': 'messages', 'local': 'my.jsonl', 'weight': 'high'}"],
     "data.sources.mine.weight must be a number >= 0, got 'high'"),
    (["data.sources.mine={'format': 'messages', 'local': 'my.jsonl', 'weight': -1}"],
     "data.sources.mine.weight must be a number >= 0, got -1"),
    (["data.sources.mine={'format': 'yaml', 'local': 'my.yaml'}"], "data.sources.mine.format must be one of cmath"),
    (["data.sources.mine={'local': 'my.jsonl'}"], "data.sources.mine needs a format"),
    (["data.sources.mine={'format': 'messages', 'local': 'my.jsonl', 'tags': 'math'}"],
     "data.sources.mine.tags must be a list of strings, got 'math'"),
    (["data.sources.mine={'format': 'columns', 'local': 'x.csv', 'columns': {'answer': 'a'}}"],
     "format 'columns' needs"),
    (["data.sources.mine={'format': 'columns', 'local': 'x.csv', 'columns': {'prompt': 'q', 'anwser': 'a'}}"],
     "data.sources.mine.columns must be"),
    (["data.sources.mine=['messages', 'my.jsonl']"], "data.sources.mine must be a dict"),
    (["data.total_size=lots"], "data.total_size expects int or None, got 'lots'"),  # None default: was any value
    (["data.total_size=True"], "data.total_size expects int or None, got True"),
    (["eval.gates.min_usability=high"], "eval.gates.min_usability expects float or None, got 'high'"),
    (["training.run_name=2024"], "training.run_name expects str or None, got 2024 (quote it: --set "
                                 "training.run_name='2024')"),
    (["training.checkpoint_skip_layers=many"], "training.checkpoint_skip_layers expects an integer >= 0 or 'auto', "
                                               "got 'many'"),
    (["training.checkpoint_skip_layers=-1"], "expects an integer >= 0 or 'auto', got -1"),
    (["training.checkpoint_skip_layers=True"], "expects an integer >= 0 or 'auto', got True"),
])
def test_values_and_source_fields_are_checked_when_the_config_is_built(items, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, items)
    assert message in str(err.value)


def test_allowed_values_cover_the_defaults_and_the_documented_alternatives():
    cfg = build_config(None, ["data.use_hub=True", "deploy.perf_dataset=random", "data.overlong_answer_policy=drop",
                              "training.gradient_checkpointing=False", "data.total_size=500",
                              "eval.gates.min_usability=1", "training.run_name='2024'",
                              "training.checkpoint_skip_layers=auto", "training.checkpoint_skip_layers=3",
                              "data.sources.mine={'format': 'columns', 'local': 'x.csv', 'weight': 0.2, "
                              "'columns': {'prompt': 'q', 'answer': 'a', 'id': 'qid'}, 'tags': ['x'], 'hub': None}"])
    assert cfg["data"]["overlong_answer_policy"] == "drop" and cfg["data"]["sources"]["mine"]["weight"] == 0.2
    assert cfg["training"]["checkpoint_skip_layers"] == 3  # "auto", then a number over it
    assert build_config("demo")["data"]["overlong_answer_policy"] == "truncate"


@pytest.mark.parametrize("script", [["deploy.py", "all"], ["build_datasets.py"], ["train.py"]])
def test_every_script_fails_on_a_bad_value_before_any_work(script):
    proc = run_script(*script, "--set", "deploy.perf_dataset=rnadom")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: deploy.perf_dataset must be one of 'file', 'random', got 'rnadom'" in proc.stderr
    assert "Effective config" not in proc.stdout and "merge" not in proc.stdout.lower()
    proc = run_script(*script, "--set", "data.sources.emoji.wieght=0.9")
    assert proc.returncode == 2 and "Did you mean data.sources.emoji.weight?" in proc.stderr
