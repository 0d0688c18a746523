"""train.check_packing_isolation's verdict when packed and alone differ for a reason other than attention: kernels
that round a long packed row differently from a short one (4-bit SmolLM2-135M on an H100 differed by 5.7e-2). The
check then asks whether changing the earlier samples changes a sample's loss; only a leak makes it."""

import common  # noqa: F401  (conftest puts the repo on sys.path)
import train


def shape_dependent(model):
    """The final norm's output (so the logits) scaled by 1 + 0.1 x row length / 100: deterministic, the same for
    every row of one length, so a sample's loss depends on the length of the row it sits in (as with
    shape-dependent kernels), not on the other samples' tokens. (The norm, not the LM head: TRL's loss reads the
    head's weight without calling it.)"""
    def scale(module, args, output):
        return output * (1 + 0.1 * output.shape[1] / 100)
    model.get_decoder().norm.register_forward_hook(scale)
    return model


def drop_position_ids(model):
    """The leak of tests/test_train.py: without position_ids the packed row is one causal sequence."""
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {k: v for k, v in kwargs.items()
                                                                         if k != "position_ids"}), with_kwargs=True)
    return model


def test_rounding_on_other_shapes_is_not_a_leak(tiny_qwen3_dir, qwen_tokenizer):
    from transformers import AutoModelForCausalLM
    model = shape_dependent(AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir))
    ok, message = train.check_packing_isolation(model, qwen_tokenizer)
    assert ok, message
    assert message.startswith("isolated (changing the other samples does not change"), message
    # The numbers behind it: packed vs alone beyond 1e-4, the neighbours' change far below it.
    alone = float(message.split("packed vs alone: max relative difference ")[1].split(" ")[0])
    neighbours = float(message.split("earlier samples changed: ")[1].split(" ")[0])
    assert alone > 1e-4 and neighbours <= 1e-5, message


def test_a_leak_fails_even_beside_rounding(tiny_qwen3_dir, qwen_tokenizer):
    from transformers import AutoModelForCausalLM
    model = drop_position_ids(shape_dependent(AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir)))
    ok, message = train.check_packing_isolation(model, qwen_tokenizer)
    assert not ok and "see each other" in message, message
