"""Load a Hugging Face causal LM from a local directory (or the embedded model) and describe it."""

from __future__ import annotations

import functools
import hashlib
import json
from itertools import islice
from pathlib import Path

import torch

from attnkit.errors import AttnkitError

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"


DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_device(device: str) -> str:
    """auto -> cuda, then mps, then cpu; an unavailable device is a one-line error."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AttnkitError(f"--device {device}: no CUDA device is available to this torch build "
                               f"({torch.__version__}); use --device cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise AttnkitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise AttnkitError("--device mps: Apple's MPS backend is not available here")
        return device
    raise AttnkitError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype, device: str):
    """A torch dtype from a name or short form; auto is the checkpoint's own dtype on a GPU, float32 on CPU."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto" if device != "cpu" else torch.float32
    if name not in DTYPES:
        raise AttnkitError(f"unknown --dtype {dtype!r}: use auto, float32, bfloat16 (bf16) or float16 (fp16)")
    return getattr(torch, DTYPES[name])


def resolve_spec(spec: str | Path) -> Path:
    """'embedded', a real model from attnkit's registry (`attnkit models list`; installed with `attnkit
    models pull`), a .gguf file (converted once into the cache), a local model directory, or a Hugging
    Face Hub id (from the local cache; downloaded when it is not there and the network allows)."""
    from attnkit.core import models

    if str(spec) == "embedded":
        return EMBEDDED_DIR
    if models.find(str(spec)) is not None and not Path(spec).exists():
        return models.pulled_path(str(spec))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return models.gguf_folder(path)
    if not path.exists() and _looks_like_hub_id(str(spec)):
        path = _from_hub(str(spec))
    if not path.exists():
        raise AttnkitError(f"model path not found: {path}")
    if not (path / "config.json").is_file():
        raise AttnkitError(f"no config.json in {path}: not a Hugging Face model directory")
    return path


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and " " not in spec


def _from_hub(repo_id: str) -> Path:
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except HFValidationError:
        raise AttnkitError(f"model path not found, and {repo_id!r} is no Hugging Face Hub id") from None
    except (LocalEntryNotFoundError, OSError):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise AttnkitError(f"{repo_id} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth or a missing repo: one line, whatever the cause
        raise AttnkitError(f"{repo_id} is not in the local Hugging Face cache and could not be downloaded "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_config(spec: str | Path):
    from transformers import AutoConfig

    path = resolve_spec(spec)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise AttnkitError(f"cannot read the config in {path}: {str(e).splitlines()[0]}") from None


def load_model(spec: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
               device_map: str | dict | None = None, attn_implementation: str = "sdpa"):
    """Return (model, tokenizer) for 'embedded', a local model directory or a Hub id. `device` is auto,
    cpu, cuda[:N] or mps; `dtype` auto, float32, bfloat16/bf16 or float16/fp16; `device_map="auto"`
    spreads the model over every visible GPU (accelerate) and then `device` is not used."""
    if device_map is None:
        device = resolve_device(device)
    dtype = resolve_dtype(dtype, "cuda" if device_map is not None else device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from attnkit.core.hook import WRAPPABLE

    if attn_implementation not in WRAPPABLE:
        raise AttnkitError(f"attention implementation '{attn_implementation}' cannot be wrapped by attnkit "
                           f"(supported: {', '.join(WRAPPABLE)})")
    path = resolve_spec(spec)
    config = load_config(path)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise AttnkitError(f"{path}: model type '{config.model_type}' is not a causal language model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise AttnkitError(f"no usable tokenizer in {path}: {str(e).splitlines()[0]}") from None
    kwargs = {"dtype": dtype or torch.float32, "attn_implementation": attn_implementation,
              "local_files_only": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise AttnkitError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
    if device_map is None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def head_dim(config) -> int:
    """Per-head width (see `attnkit.core.family`)."""
    from attnkit.core.family import architecture
    return architecture(config).head_dim


def rope_base(config) -> float | None:
    """The RoPE base of the full-attention layers (see `attnkit.core.family`)."""
    from attnkit.core.family import architecture
    return architecture(config).rope_base


def model_info(spec: str | Path) -> dict:
    """Architecture facts read from the config (through the model-family layer), plus the parameter
    count (from a meta-device model) and, for a converted GGUF, where it came from."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from attnkit.core.family import architecture
    from attnkit.core.models import source_of

    path = resolve_spec(spec)
    config = load_config(path)
    arch = architecture(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    params = getattr(config, "rope_parameters", None) or {}
    info = {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "layers": arch.layers,
        "query_heads": arch.query_heads,
        "kv_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "rope_base": arch.rope_base,
        "rope_scaling": arch.rope_type if params else None,
        "attention": arch.describe_layers(),
        "max_positions": arch.max_positions,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    source = source_of(path)
    if source:
        info["source"] = source.get("title") or source.get("gguf_path") or source.get("gguf")
    return info


def model_identity(model) -> dict:
    """Where the model came from and a hash of its config and weights (the weight files' sizes and
    first and last MiB when it was loaded from a directory, else a sample of its parameters)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    source = str(getattr(model.config, "_name_or_path", "") or "")
    folder = Path(source) if source else None
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder and folder.is_dir() else []
    from attnkit.core.models import source_of

    if folder is not None and folder.is_dir() and source_of(folder):
        h.update(json.dumps(source_of(folder).get("gguf_sha256", ""), sort_keys=True).encode())
    for f in files:
        stat = f.stat()
        h.update(_file_digest(str(f), stat.st_size, stat.st_mtime_ns))
    if not files:
        for _, p in islice(model.named_parameters(), 4):
            h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    dtype = next(model.parameters()).dtype
    return {"model": source or type(model).__name__, "model_hash": h.hexdigest()[:16], "dtype": str(dtype)}


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """Name, size, first and last MiB of a weight file; every `evaluate` of a run asks again, the file
    is read once (a changed file has another size or mtime, so it is read anew)."""
    h = hashlib.sha256(f"{Path(path).name}:{size}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read())
    return h.digest()
