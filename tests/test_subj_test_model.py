"""subj_test_model.py driven through a real pseudo-terminal (pexpect): the menu, the predefined tests, the
chat with its commands, Ctrl-C and Ctrl-D, and --compare; plus the streaming helper and the adapter switch
it relies on, on the demo model (SmolLM2-135M) with a real trained LoRA adapter.

    .venv/bin/python -m pytest tests/test_subj_test_model.py -x -q
"""

import os
import subprocess
import sys

import pexpect
import pytest

import common
import config
import subj_test_model as subj
from test_obj_test_model import build_adapter

CHOICE = "Enter your choice (1-4): "
YOU = "👤 You: "
TIMEOUT = 300  # seconds per expectation: a loaded 2-core machine can take a while for the first answer


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, demo_model_dir):
    # Same folder as test_obj_test_model's fixture: built once per session, whichever file runs first.
    return build_adapter(config.build_config("demo"), demo_model_dir,
                         str(tmp_path_factory.getbasetemp() / "eval_work" / "outputs"))


def spawn(*args, max_new_tokens=8):
    child = pexpect.spawn(sys.executable, [os.path.join(common.ROOT, "subj_test_model.py"), "--profile", "demo",
                                           "--set", f"eval.max_new_tokens={max_new_tokens}", *args],
                          cwd=common.ROOT, encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 120),
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    child.expect_exact(CHOICE)
    return child


def exit_status(child):
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.signalstatus


def test_predefined_tests_file_covers_the_spec():
    tests = subj.load_tests(config.build_config("demo"))
    tags = [set(t["tags"]) for t in tests]
    assert {"math", "zh"} in tags and {"math", "en"} in tags and {"json-only", "zh"} in tags
    assert any(t.get("tools") for t in tests) and any(t["name"] == "self_intro" for t in tests)
    assert any(t["tags"][0] == "chat" for t in tests)


def test_streaming_pieces_make_the_answer(demo_model_dir):
    cfg = config.build_config("demo", ["eval.max_new_tokens=12", "eval.temperature=0.0"])
    model, tokenizer = common.load_model(cfg)
    chat = [([{"role": "user", "content": "Name three colors."}], None)]
    settings = common.sampling_settings(cfg)
    pieces = []
    streamed = common.generate_local(model, tokenizer, chat, settings, on_text=pieces.append)[0]
    plain = common.generate_local(model, tokenizer, chat, settings)[0]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == streamed["text"].strip()
    assert streamed["text"] == plain["text"] and streamed["completion_tokens"] == plain["completion_tokens"]


def test_base_side_is_the_base_model(adapter, demo_model_dir):
    """--compare's base answers come from the same PEFT model with the adapter switched off."""
    import torch
    cfg = config.build_config("demo")
    tuned, tokenizer = common.load_model(cfg, adapter=adapter)
    base, _ = common.load_model(cfg)
    ids = torch.tensor([common.prompt_ids(tokenizer, [{"role": "user", "content": "Extract name and age: Al is 9."}])])
    with torch.no_grad():
        expected = base(ids).logits
        with common.answering_as(tuned, "base"):
            as_base = tuned(ids).logits
        with common.answering_as(tuned, "tuned"):
            as_tuned = tuned(ids).logits
    assert torch.allclose(as_base, expected, atol=1e-4)
    assert (as_tuned - expected).abs().max() > 1e-2


def test_menu_tests_chat_interrupt_and_eof(adapter):
    child = spawn("--adapter", adapter)
    child.sendline("9")
    child.expect_exact("Invalid choice '9'")
    child.expect_exact(CHOICE)

    child.sendline("1")  # every predefined test, printed as Input / streamed Output
    for test in subj.load_tests(config.build_config("demo")):
        child.expect_exact(f"🤔 Input: {test['messages'][-1]['content']}")
        child.expect_exact("🤖 Output:")
        child.expect(r"⏱  \d+ tokens in [\d.]+ s, [\d.]+ tokens/s")
    child.expect_exact("1. Run predefined tests\r\n2. Interactive chat\r\n3. Both\r\n4. Exit")  # the menu is back
    child.expect_exact(CHOICE)

    child.sendline("2")  # chat: history grows, /system and /reset clear it
    child.expect_exact(YOU)
    child.sendline("Hello!")
    child.expect(r"tokens/s.*\r\n   history: 1 turn\(s\)")
    child.expect_exact(YOU)
    child.sendline("And what is 2 + 2?")
    child.expect_exact("history: 2 turn(s)")
    child.expect_exact(YOU)
    child.sendline("/system You are a terse assistant.")
    child.expect_exact("System prompt set; history cleared.")
    child.sendline("/system")
    child.expect_exact("System prompt: You are a terse assistant.")
    child.sendline("Hi")
    child.expect_exact("history: 1 turn(s)")
    child.expect_exact(YOU)
    child.sendline("Again")
    child.expect_exact("history: 2 turn(s)")
    child.sendline("/reset")
    child.expect_exact("History cleared.")
    child.sendline("Once more")
    child.expect_exact("history: 1 turn(s)")
    child.sendline("/nope")
    child.expect_exact("Unknown command /nope")
    child.sendline("/exit")
    child.expect_exact(CHOICE)

    child.sendline("4")
    child.expect_exact("Bye")
    assert exit_status(child) == (0, None)

    # Ctrl-C while an answer streams: back to the menu, not out of the program. Up to 200 new tokens (~10 s on a
    # CPU) and the Ctrl-C sent on the first streamed character: the answer cannot have ended before it lands.
    child = spawn("--adapter", adapter, max_new_tokens=200)
    child.sendline("2")
    child.expect_exact(YOU)
    child.sendline("Tell me a long story about the sea.")
    child.expect_exact("🤖 Output:")
    child.expect(r"\S")  # the answer is streaming
    child.sendintr()
    child.expect_exact(CHOICE)
    assert "tokens in" not in child.before and "history:" not in child.before  # cut, not finished
    child.sendline("2")  # a new chat: the interrupted question is in no history
    child.expect_exact(YOU)
    child.sendline("Hi")
    child.expect_exact("history: 1 turn(s)")
    child.sendline("/exit")
    child.expect_exact(CHOICE)
    child.sendintr()  # Ctrl-C at the menu: the menu again
    child.expect_exact("back to the menu")
    child.expect_exact(CHOICE)
    child.sendeof()  # Ctrl-D at the menu: a clean exit
    child.expect_exact("Bye")
    assert exit_status(child) == (0, None)


def test_compare_both_side_by_side(adapter):
    child = spawn("--adapter", adapter, "--compare", max_new_tokens=6)
    child.sendline("3")  # Both: predefined tests, then the chat
    for _ in subj.load_tests(config.build_config("demo")):
        child.expect_exact("🤖 Output (base):")
        child.expect_exact("🤖 Output (tuned):")
        child.expect_exact("side by side")
        child.expect(r"BASE +│ TUNED")
    child.expect_exact(YOU)
    child.sendline("Who are you?")
    child.expect_exact("🤖 Output (base):")
    child.expect_exact("🤖 Output (tuned):")
    child.expect(r"BASE +│ TUNED")
    child.expect_exact("history: 1 turn(s)")
    child.sendline("/exit")
    child.expect_exact(CHOICE)
    child.sendline("4")
    child.expect_exact("Bye")
    assert exit_status(child) == (0, None)


def test_errors_before_loading(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, os.path.join(common.ROOT, "subj_test_model.py"), "--profile", "demo",
                               *args], capture_output=True, text=True, timeout=120, cwd=common.ROOT)
    done = run("--compare", "--base-only")
    assert done.returncode == 2 and "--compare needs the adapter" in done.stderr
    done = run("--adapter", str(tmp_path))
    assert done.returncode == 1 and "is not a PEFT adapter folder" in done.stderr
    done = run("--set", f"output.dir={tmp_path}")
    assert done.returncode == 1 and "no adapter found" in done.stderr
    done = run("--base-only", "--set", f"eval.tests_file={tmp_path / 'none.json'}")
    assert done.returncode == 1 and "predefined tests file" in done.stderr
