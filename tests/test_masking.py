"""common.tokenize_conversation on Qwen3-4B-Instruct-2507's own tokenizer (rebuilt offline, see conftest) and
its real template, token by token.

The expected loss of every case is written down by hand: the text of each trained turn, in order. check_mask
then pins where each loss run sits: right after the "<|im_start|>assistant\n" header (ids 151644 77091 198)
and ending with "<|im_end|>\n" (151645 198), with nothing else carrying loss."""


import pytest

import check_dataset
import common

IM_START, ASSISTANT, NEWLINE, IM_END = 151644, 77091, 198, 151645  # Qwen3's published ids
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
SINGLE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
MULTI = [{"role": "system", "content": "You answer briefly."},
         {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Japan?"}, {"role": "assistant", "content": "Tokyo."},
         {"role": "user", "content": "中国的首都？"}, {"role": "assistant", "content": "北京。"}]
TOOL = [{"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 degrees in Paris."}]


def tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def loss_runs(labels):
    """[start, end) of each maximal run of loss-carrying labels."""
    runs, start = [], None
    for i, lab in enumerate(list(labels) + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_mask(tok, messages, tools=None, expected=(), **options):
    """Assert the labels token by token against `expected`, the hand-written text of each trained turn."""
    enc = common.tokenize_conversation(tok, messages, tools, **options)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids == tokens(tok, common.render(tok, messages, tools))
    runs = loss_runs(labels)
    assert [tok.decode(ids[a:b]) for a, b in runs] == list(expected)
    for a, b in runs:
        assert labels[a:b] == ids[a:b]
        assert ids[a - 3:a] == [IM_START, ASSISTANT, NEWLINE]  # the header carries no loss
        assert ids[b - 2:b] == [IM_END, NEWLINE]
    assert enc["turn_ends"] == [b - 1 for a, b in runs]  # one past each trained <|im_end|>
    return enc


def trl_assistant_mask(tok, messages, tools=None):
    out = tok.apply_chat_template(messages, tools=tools, chat_template=common.chat_template(
        "qwen3_instruct_2507_training"), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def test_qwen3_ids_are_the_published_ones(qwen3_tokenizer):
    tok = qwen3_tokenizer
    assert tokens(tok, "Hello, world!") == [9707, 11, 1879, 0]
    assert tokens(tok, "<|im_start|>assistant\n") == [IM_START, ASSISTANT, NEWLINE]
    assert tokens(tok, "12345") == [16, 17, 18, 19, 20]  # Qwen splits numbers into single digits
    assert tokens(tok, "e\u0301") == tokens(tok, "\u00e9") == [963]  # NFC normalizer
    assert tokens(tok, "你好") == [108386]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                                      "<tool_response>", "<think>", "</think>"]) == \
        [151643, 151645, 151657, 151658, 151665, 151667, 151668]
    assert len(tok) == 151669 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    # <think> and <tool_call> are added but not special: a decode that skips specials keeps them
    assert tok.decode([151667, 9707, IM_END], skip_special_tokens=True) == "<think>Hello"


def test_single_turn(qwen3_tokenizer):
    enc = check_mask(qwen3_tokenizer, SINGLE, expected=["2 + 3 = 5.<|im_end|>\n"])
    prompt = common.prompt_ids(qwen3_tokenizer, SINGLE[:1])
    assert enc["input_ids"][:len(prompt)] == prompt and set(enc["labels"][:len(prompt)]) == {-100}


def test_multi_turn_all(qwen3_tokenizer):
    check_mask(qwen3_tokenizer, MULTI, expected=["Paris.<|im_end|>\n", "Tokyo.<|im_end|>\n", "北京。<|im_end|>\n"])


def test_multi_turn_last(qwen3_tokenizer):
    enc = check_mask(qwen3_tokenizer, MULTI, train_on_turns="last", expected=["北京。<|im_end|>\n"])
    assert [t for t in enc["labels"] if t != -100] == [68990, 1773, IM_END, NEWLINE]  # 北京 。 <|im_end|> \n


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'


def test_tool_call_trained(qwen3_tokenizer):
    enc = check_mask(qwen3_tokenizer, TOOL, tools=[WEATHER], expected=[CALL, "It is 18 degrees in Paris.<|im_end|>\n"])
    text = common.render(qwen3_tokenizer, TOOL, [WEATHER])
    assert "<tool_response>\n{\"temp_c\": 18}\n</tool_response>" in text  # the tool turn, rendered as user
    call = loss_runs(enc["labels"])[0]
    assert enc["input_ids"][call[0]] == 151657  # the loss starts on <tool_call> itself


def test_tool_call_not_trained(qwen3_tokenizer):
    check_mask(qwen3_tokenizer, TOOL, tools=[WEATHER], train_tool_calls=False,
               expected=["It is 18 degrees in Paris.<|im_end|>\n"])


def test_tool_call_with_content_and_two_calls(qwen3_tokenizer):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}
             for i, c in enumerate(["Oslo", "Rome"])]
    messages = [{"role": "user", "content": "Oslo and Rome?"},
                {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "24"},
                {"role": "tool", "tool_call_id": "c0", "content": "3"},
                {"role": "assistant", "content": "Oslo 3, Rome 24."}]
    check_mask(qwen3_tokenizer, messages, tools=[WEATHER], expected=[
        'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n',
        "Oslo 3, Rome 24.<|im_end|>\n"])


@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_system_prompt_carries_no_loss(qwen3_tokenizer, tools):
    messages = [{"role": "system", "content": "You are a pirate."}] + SINGLE
    enc = check_mask(qwen3_tokenizer, messages, tools=tools, expected=["2 + 3 = 5.<|im_end|>\n"])
    text = common.render(qwen3_tokenizer, messages, tools)
    assert text.startswith("<|im_start|>system\nYou are a pirate.")  # merged into the tools block when tools
    assert enc["input_ids"][:3] == [IM_START, 8948, NEWLINE]  # <|im_start|> system \n, no loss (checked above)


def test_reasoning_content_is_not_rendered_nor_trained(qwen3_tokenizer):
    messages = [SINGLE[0], {"role": "assistant", "content": "5.", "reasoning_content": "2 plus 3 makes 5"}]
    check_mask(qwen3_tokenizer, messages, expected=["5.<|im_end|>\n"])
    assert "2 plus 3" not in common.render(qwen3_tokenizer, messages)


def test_inline_thinking_is_trained_with_qwen_think_tokens(qwen3_tokenizer):
    """data.reasoning_content="inline" writes <think>…</think> into the content: trained, on ids 151667/151668."""
    answer = "<think>\n2 plus 3 makes 5\n</think>\n\n5."
    enc = check_mask(qwen3_tokenizer, [SINGLE[0], {"role": "assistant", "content": answer}],
                     expected=[answer + "<|im_end|>\n"])
    a, b = loss_runs(enc["labels"])[0]
    assert enc["input_ids"][a] == 151667 and 151668 in enc["input_ids"][a:b]


def test_think_in_content_is_flagged(demo_cfg):
    row = {"messages": [SINGLE[0], {"role": "assistant", "content": "<think>2 plus 3</think>5."}]}
    _, _, problems = check_dataset.row_problems(row, demo_cfg)
    assert [p[0] for p in problems] == ["special_tokens"] and "<think>" in problems[0][1]
    demo_cfg["data"]["reasoning_content"] = "inline"  # build_datasets.py writes this form on purpose
    assert check_dataset.row_problems(row, demo_cfg)[2] == []


def test_full_sequence_loss_when_assistant_only_is_off(qwen3_tokenizer):
    enc = common.tokenize_conversation(qwen3_tokenizer, MULTI, assistant_only=False)
    assert enc["labels"] == enc["input_ids"]


@pytest.mark.parametrize("tokenizer", ["qwen3_tokenizer", "qwen_tokenizer"])  # Qwen3's own, and the demo's
@pytest.mark.parametrize("messages,tools", [(SINGLE, None), (MULTI, None), (TOOL, [WEATHER])])
def test_mask_equals_trl_generation_mask(request, tokenizer, messages, tools):
    """The same tokens as TRL's assistant_only_loss would pick from the {% generation %} template."""
    tok = request.getfixturevalue(tokenizer)
    ids, mask = trl_assistant_mask(tok, messages, tools)
    enc = common.tokenize_conversation(tok, messages, tools)
    assert enc["input_ids"] == ids
    assert [int(lab != -100) for lab in enc["labels"]] == mask


# Which assistant turns carry loss, by hand: (messages, tools, train_on_turns, train_tool_calls, flags).
AUDIT_CASES = [(SINGLE, None, "all", True, [True]), (SINGLE, None, "last", True, [True]),
               (MULTI, None, "all", True, [True, True, True]), (MULTI, None, "last", True, [False, False, True]),
               (MULTI, None, "all", False, [True, True, True]),
               (TOOL, [WEATHER], "all", True, [True, True]), (TOOL, [WEATHER], "last", True, [False, True]),
               (TOOL, [WEATHER], "all", False, [False, True])]


@pytest.mark.parametrize("messages,tools,turns,calls,flags", AUDIT_CASES)
def test_audit_passes_on_every_case(qwen3_tokenizer, messages, tools, turns, calls, flags):
    """check_dataset's token-level audit agrees with tokenize_conversation on all the cases above."""
    markers = check_dataset.mask_markers(qwen3_tokenizer)
    enc = common.tokenize_conversation(qwen3_tokenizer, messages, tools, train_on_turns=turns, train_tool_calls=calls)
    assert common.trained_turns(messages, turns, calls) == flags
    assert check_dataset.audit_mask(enc, flags, markers) == ([], enc["turn_ends"][-1])
