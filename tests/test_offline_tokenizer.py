"""check_dataset.py on the default (Qwen3) config with no hub: token statistics come from Qwen3's own tokenizer,
rebuilt offline (common.qwen3_tokenizer_offline), and the output says so."""

import json
import os
import subprocess
import sys

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_dataset_uses_qwen3_rebuilt_offline(tmp_path, qwen3_tokenizer):
    data = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好"}]}
    data.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    report = tmp_path / "report.json"
    # An empty hub cache: the model is out of reach even on a machine that has it cached.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFT_PROFILE": "", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "check_dataset.py", str(data), "--json-report", str(report)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokenizer: Qwen3, rebuilt offline (unsloth/Qwen3-4B-Instruct-2507: " in proc.stdout
    stats = json.loads(report.read_text(encoding="utf-8"))["per_file"]
    # By hand: <|im_start|> user \n 你好 <|im_end|> \n <|im_start|> assistant \n 你好 <|im_end|> \n = 12 tokens
    # (你好 is one Qwen token, 108386), of which 你好 <|im_end|> \n carry loss: 3 of 12.
    (s,) = stats.values()
    assert (s["min"], s["max"], s["loss_share"]) == (12, 12, 0.25)


def test_only_qwen3_names_get_it():
    assert common.is_qwen3("unsloth/Qwen3-4B-Instruct-2507") and common.is_qwen3("Qwen3-8B")
    assert not common.is_qwen3("Qwen/Qwen3.5-9B") and not common.is_qwen3("HuggingFaceTB/SmolLM2-135M-Instruct")
