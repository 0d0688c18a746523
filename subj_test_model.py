"""Subjective test of a training run: predefined prompts and an interactive chat, tokens streamed.

Reads  the adapter (newest outputs/<run>/adapter, or --adapter) on top of model.name, and
       eval.tests_file (dataset/predefined_tests.json). Writes nothing.

    python subj_test_model.py                      # base + newest adapter
    python subj_test_model.py --profile demo       # the CPU demo (SmolLM2-135M)
    python subj_test_model.py --adapter outputs/RUN/adapter
    python subj_test_model.py --adapter outputs/RUN/checkpoints/checkpoint-100   # any saved step
    python subj_test_model.py --base-only          # the untuned model
    python subj_test_model.py --compare            # base and tuned answer each prompt, shown side by side
    python subj_test_model.py --set eval.temperature=0.2 --set eval.max_new_tokens=256

Menu: 1. Run predefined tests  2. Interactive chat  3. Both  4. Exit (shown again after each action;
Ctrl-C stops an answer and returns to the menu; Ctrl-D at the menu exits). Chat commands: /reset (clear
the history), /system <text> (set the system prompt and clear the history; /system alone shows it),
/exit (back to the menu). Sampling comes from the eval section (temperature, top_p, top_k,
repetition_penalty, max_new_tokens). --compare loads the weights once and switches the adapter off
for the base answers (PEFT disable_adapter), reseeding before each side so both draw the same noise.
"""

import argparse
import itertools
import shutil
import unicodedata

import common
import config

MENU = "\n🔧 What would you like to do?\n1. Run predefined tests\n2. Interactive chat\n3. Both\n4. Exit"
CHOICE_PROMPT = "Enter your choice (1-4): "
CHAT_HELP = "Commands: /reset clears the history, /system <text> sets the system prompt, /exit returns to the menu."


# ---------------------------------------------------------------- helpers

def load_tests(cfg):
    path = common.path_in_repo(cfg["eval"]["tests_file"])
    tests = common.load_json_list(path, "tests", "eval.tests_file", "predefined tests file")
    for k, t in enumerate(tests):
        if not t.get("messages") or t["messages"][-1].get("role") != "user":
            raise common.UserError(f"{path}: test #{k + 1} ({t.get('name', '?')}) must end with a user message")
    return tests


def seed_all(seed):
    import random

    import torch
    random.seed(seed)
    torch.manual_seed(seed)


def width_of(text):
    """Terminal columns: CJK and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text, width):
    """Lines of at most `width` columns, breaking anywhere (CJK has no spaces)."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for c in paragraph:
            if width_of(line + c) > width:
                lines.append(line)
                line = ""
            line += c
        lines.append(line)
    return lines


def side_by_side(answers):
    """Two answers in two columns, labelled by side."""
    columns = shutil.get_terminal_size((100, 24)).columns  # (100, 24) when not a terminal (a pipe, a test)
    col = max(20, (columns - 3) // 2)
    (left_name, left), (right_name, right) = answers.items()
    print(f"{'─' * 10} side by side {'─' * 10}")
    rows = itertools.zip_longest([left_name.upper(), *wrap(left, col)], [right_name.upper(), *wrap(right, col)],
                                 fillvalue="")
    for a, b in rows:
        print(f"{a}{' ' * (col - width_of(a))} │ {b}")


def stream_answer(model, tokenizer, messages, tools, settings, side, seed):
    """Stream one answer to the terminal as `side` and print its speed; returns the result dict."""
    seed_all(seed)  # the same seed before each side: with sampling on, base and tuned differ by weights alone
    with common.answering_as(model, side):
        result = common.generate_local(model, tokenizer, [(messages, tools)], settings, batch_size=1,
                                       on_text=lambda piece: print(piece, end="", flush=True))[0]
    speed = result["completion_tokens"] / result["seconds"] if result["seconds"] else 0.0
    cut = " (cut at max_new_tokens)" if result["finish_reason"] == "length" else ""
    print(f"\n⏱  {result['completion_tokens']} tokens in {result['seconds']:.1f} s, {speed:.1f} tokens/s{cut}")
    return result


def answer_all_sides(model, tokenizer, messages_by_side, tools, settings, sides, seed):
    """Each side answers its own conversation; with two sides the answers are then shown side by side."""
    texts = {}
    for side in sides:
        print(f"🤖 Output{f' ({side})' if len(sides) > 1 else ''}:", flush=True)
        texts[side] = stream_answer(model, tokenizer, messages_by_side[side], tools, settings, side, seed)["text"]
    if len(sides) > 1:
        side_by_side(texts)
    return texts


def run_tests(model, tokenizer, tests, settings, sides, seed):
    for k, test in enumerate(tests, 1):
        print(f"\n[{k}/{len(tests)}] {test.get('name', '')}")
        system = next((m["content"] for m in test["messages"] if m["role"] == "system"), None)
        if system:
            print(f"⚙️  System: {system}")
        if test.get("tools"):
            print(f"🧰 Tools: {', '.join(t['function']['name'] for t in test['tools'])}")
        print(f"🤔 Input: {test['messages'][-1]['content']}")
        answer_all_sides(model, tokenizer, {s: test["messages"] for s in sides}, test.get("tools"), settings, sides,
                         seed)


def chat(model, tokenizer, settings, sides, seed):
    """Multi-turn chat (one history per side) until /exit or Ctrl-D; Ctrl-C propagates to the menu."""
    system = None
    history = {s: [] for s in sides}
    print(f"\n💬 Interactive chat. {CHAT_HELP}")
    while True:
        try:
            text = input("👤 You: ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            history = {s: [] for s in sides}
            print("🧹 History cleared.")
            continue
        if text == "/system" or text.startswith("/system "):
            new = text[len("/system"):].strip()
            if not new:
                print(f"⚙️  System prompt: {system or '(none)'}")
                continue
            system, history = new, {s: [] for s in sides}
            print("⚙️  System prompt set; history cleared.")
            continue
        if text.startswith("/"):
            print(f"❓ Unknown command {text.split()[0]}. {CHAT_HELP}")
            continue
        for s in sides:
            history[s].append({"role": "user", "content": text})
        # the system prompt is kept apart from the history and put first at each turn: /reset keeps it
        convs = {s: ([{"role": "system", "content": system}] if system else []) + history[s] for s in sides}
        try:
            answers = answer_all_sides(model, tokenizer, convs, None, settings, sides, seed)
        except KeyboardInterrupt:
            for s in sides:
                history[s].pop()  # the unanswered question leaves the history
            raise
        for s in sides:
            history[s].append({"role": "assistant", "content": answers[s]})
        print(f"   history: {len(history[sides[0]]) // 2} turn(s)")


# ---------------------------------------------------------------- main

@common.exits_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="adapter folder: outputs/<run>[/adapter | /adapter_last | "
                                          "/checkpoints/checkpoint-N] (default: the newest outputs/<run>/adapter)")
    parser.add_argument("--base-only", action="store_true", help="chat with the untuned base model")
    parser.add_argument("--compare", action="store_true", help="base and tuned answer every prompt, side by side")
    config.add_config_args(parser)
    args = parser.parse_args()
    cfg = config.resolve(args, parser)
    seed = cfg["training"]["seed"]

    if args.compare and args.base_only:
        parser.error("--compare needs the adapter: drop --base-only")
    adapter = None if args.base_only else common.resolve_adapter(cfg, args.adapter)
    tests = load_tests(cfg)
    common.import_unsloth_first()  # on a GPU: Unsloth patches transformers/PEFT only if imported before them
    sides = ["base", "tuned"] if args.compare else ["base" if args.base_only else "tuned"]

    print(f"Loading {cfg['model']['name']}" + (f" + adapter {adapter}" if adapter else " (base only)") + " ...",
          flush=True)
    model, tokenizer = common.load_model(cfg, adapter=adapter)
    settings = common.sampling_settings(cfg)
    print(f"Sampling: {', '.join(f'{k}={v}' for k, v in settings.items())}")

    while True:
        print(MENU)
        try:
            choice = input(CHOICE_PROMPT).strip()
        except EOFError:
            print("\n👋 Bye")
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-C: back to the menu; choose 4 or press Ctrl-D to exit)")
            continue
        try:
            if choice == "1":
                run_tests(model, tokenizer, tests, settings, sides, seed)
            elif choice == "2":
                chat(model, tokenizer, settings, sides, seed)
            elif choice == "3":
                run_tests(model, tokenizer, tests, settings, sides, seed)
                chat(model, tokenizer, settings, sides, seed)
            elif choice == "4":
                print("👋 Bye")
                return
            else:
                print(f"❌ Invalid choice {choice!r}: enter 1, 2, 3 or 4.")
        except KeyboardInterrupt:
            print("\n⏹  Interrupted: back to the menu.")


if __name__ == "__main__":
    main()
