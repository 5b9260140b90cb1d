"""Helpers shared by the benchmark scripts: the models they time and a best-of-N timer."""

from __future__ import annotations

import platform
import time

import torch
import transformers

from attnkit.core.loading import load_model


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
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "model": args.model, "dtype": args.dtype}
