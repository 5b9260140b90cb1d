from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))  # 2-core machines: no oversubscription

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(family: str, kv_heads: int = 2, attn: str = "sdpa"):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma3": Gemma3TextConfig}[family]
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    if family in ("qwen3", "gemma3"):
        kwargs["head_dim"] = 16
    if family == "gemma3":  # hybrid: a sliding-window layer between two global ones, bases per layer type
        kwargs.update(sliding_window=8, layer_types=["full_attention", "sliding_attention", "full_attention"])
    config = cls(**kwargs)
    config._attn_implementation = attn
    return config


def tiny_model(family: str = "llama", kv_heads: int = 2, attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, kv_heads, attn), attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _embedded_once():
    """`load_model("embedded")` (and a real model by its registry name) loads once per test run, for
    the library and the in-process CLI alike (each test that wraps the model restores it when it
    finishes)."""
    import attnkit.core.loading as L

    original, cache = L.load_model, {}

    from attnkit.core.models import find

    def load(spec, device="cpu", dtype=None, device_map=None, attn_implementation="sdpa"):
        name = "embedded" if str(spec) == "embedded" else getattr(find(str(spec)), "name", None)
        if name is None or device_map is not None or attn_implementation != "sdpa":
            return original(spec, device, dtype, device_map, attn_implementation)
        where = L.resolve_device(device)
        key = (name, where, L.resolve_dtype(dtype, where) or torch.float32)
        if key not in cache:
            cache[key] = original(name, *key[1:])
        model, tok = cache[key]
        assert model.config._attn_implementation == "sdpa", "a test left the shared model wrapped"
        return model, tok

    L.load_model = load
    yield
    L.load_model = original


@pytest.fixture(scope="session")
def embedded(_embedded_once):
    """The shipped model, loaded once per test run."""
    import attnkit.core.loading as L
    return L.load_model("embedded")


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args) -> CliResult:
    """`attnkit ARGS` in this process (typer's CliRunner), with `main()`'s handling of user errors:
    `error: <message>` on stderr and exit code 2."""
    from typer.testing import CliRunner

    from attnkit.cli import app
    from attnkit.errors import AttnkitError

    r = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(r.exception, AttnkitError):
        return CliResult(2, r.stdout, f"error: {r.exception}\n")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)


def real_model(name: str):
    """A real model from attnkit's registry, loaded once per run. Not installed: the test skips, or
    fails where CI set ATTNKIT_REQUIRE_REAL_MODELS=1 (.ci/run pulls them first)."""
    import os

    import attnkit.core.loading as L
    from attnkit.core.models import find, is_pulled

    if not is_pulled(find(name)):
        message = f"{name} is not installed (attnkit models pull {name})"
        if os.environ.get("ATTNKIT_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return L.load_model(name)


@pytest.fixture(scope="session")
def smollm2(_embedded_once):
    return real_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3(_embedded_once):
    return real_model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen(_embedded_once):
    return real_model("qwen2.5-coder-1.5b-instruct")


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
