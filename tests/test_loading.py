"""Loading by Hub id from a local Hugging Face cache (offline), devices and dtypes."""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.core.loading import EMBEDDED_DIR, load_model, resolve_device, resolve_dtype
from attnkit.errors import AttnkitError
from conftest import tiny_model


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding one tiny model, `attnkit-test/tiny-llama`, and no network."""
    import huggingface_hub.constants as C

    snapshot = tmp_path / "hub" / "models--attnkit-test--tiny-llama" / "snapshots" / ("a" * 40)
    model = tiny_model("llama", 2)
    model.config.vocab_size = 6144
    model.resize_token_embeddings(6144)
    model.save_pretrained(snapshot)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_DIR / f, snapshot / f)
    (tmp_path / "hub" / "models--attnkit-test--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--attnkit-test--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model


def test_a_hub_id_loads_from_the_local_cache(hub_cache):
    model, tok = load_model("attnkit-test/tiny-llama")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hub_cache(ids).logits)
    r = CliRunner().invoke(app, ["info", "attnkit-test/tiny-llama", "--json"])
    assert r.exit_code == 0 and '"layers": 3' in r.stdout
    with pytest.raises(AttnkitError, match="not in the local Hugging Face cache"):
        load_model("attnkit-test/not-there")


def test_devices_and_dtypes():
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("fp16", "cpu") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("auto", "cuda") == "auto"
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(AttnkitError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(AttnkitError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(AttnkitError, match="unknown --dtype"):
        resolve_dtype("bf17", "cpu")
    model, _ = load_model("embedded", device="cpu", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
