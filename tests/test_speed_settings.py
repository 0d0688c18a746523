"""Speed settings that need no GPU to check: the allocator option train.py sets, and that the user's wins."""

import config
import train


def test_expandable_segments_set_unless_the_user_set_the_variable(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert train.use_expandable_segments(config.build_config()) == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert train.use_expandable_segments(config.build_config()) == "max_split_size_mb:256"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    off = config.build_config(overrides=["training.expandable_segments=False"])
    assert train.use_expandable_segments(off) == "default"
    import os
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_lora_dropout_defaults_to_zero_and_stays_settable():
    assert config.build_config()["lora"]["lora_dropout"] == 0.0
    assert config.build_config(overrides=["lora.lora_dropout=0.05"])["lora"]["lora_dropout"] == 0.05
