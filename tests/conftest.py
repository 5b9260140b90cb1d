from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))  # 2-core machines: no oversubscription

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(family: str, kv_heads: int = 2, attn: str = "sdpa"):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    if family in ("qwen3",):
        kwargs["head_dim"] = 16
    config = cls(**kwargs)
    config._attn_implementation = attn
    return config


def tiny_model(family: str = "llama", kv_heads: int = 2, attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, kv_heads, attn), attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="session")
def embedded():
    """The shipped model, loaded once per test run (tests that wrap it restore it when they finish)."""
    from attnkit.core.loading import load_model
    return load_model("embedded")


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED


def result_lines(path) -> list[str]:
    """The rows of an attnkit results file, without its settings line."""
    lines = Path(path).read_text().splitlines()
    assert lines and lines[0].startswith('{"attnkit_run"'), "a results file starts with its settings"
    return lines[1:]
