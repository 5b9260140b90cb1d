"""Helpers shared by the benchmark scripts: the models they time and a best-of-N timer."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from attnkit.core.loading import load_model
from attnkit.core.say import show

show()  # the library's progress lines on stderr, as the command line shows them


def build(model_name: str, device: str, dtype: torch.dtype):
    if model_name != "llama7b":
        model, _ = load_model(model_name, device=device, dtype=dtype)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=1_048_576)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def header(args) -> dict:
    on = getattr(args, "device", "cpu")
    device = torch.cuda.get_device_name() if on.startswith("cuda") else platform.processor() or "cpu"
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "model": getattr(args, "model", None),
            "dtype": getattr(args, "dtype", None)}


RESULTS = Path(__file__).resolve().parents[1] / "results" / "benchmarks"


def add_record_option(ap, name: str) -> None:
    """`--record FILE`: where the run's rows go as JSON lines, after a header line that says how and
    where they were measured (default results/benchmarks/NAME_MODEL_DEVICE.jsonl; `-` for none)."""
    ap.add_argument("--record", default=None, help=f"JSON-lines file for this run's header and rows (default "
                    f"results/benchmarks/{name}_MODEL_DEVICE.jsonl; '-': print only)")


class Record:
    """Prints each row and writes it to the record file; the file holds one run only (a rerun replaces
    it), so its rows never mix settings."""

    def __init__(self, args, name: str, extra: dict | None = None):
        import attnkit
        where = "cuda" if getattr(args, "device", "cpu").startswith("cuda") else "cpu"
        default = RESULTS / f"{name}_{getattr(args, 'model', 'all')}_{where}.jsonl"
        self.path = None if args.record == "-" else Path(args.record or default)
        script = Path(sys.argv[0]).resolve()
        script = script.relative_to(RESULTS.parents[1]) if RESULTS.parents[1] in script.parents else script
        self.header = {"kind": "header", "command": " ".join(["python", str(script), *sys.argv[1:]]), **header(args),
                       "attnkit": attnkit.__version__, "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(args),
                       "load_at_start": round(os.getloadavg()[0], 2), **(extra or {})}
        self.rows: list[dict] = []
        self.emit(self.header)

    def emit(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        if row is not self.header:
            self.rows.append(row)
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [self.header, *self.rows]))
        tmp.replace(self.path)


def machine(args) -> str:
    cores = os.cpu_count()
    if getattr(args, "device", "cpu").startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, {cores} CPU cores"
    return f"{platform.machine()} CPU, {cores} cores"
