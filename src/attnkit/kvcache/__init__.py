"""The retrieval-head KV cache: full cache for retrieval heads, sink + window (+ a token budget) for the rest.

Everything of this technique lives here, in reading order:

* `config`: `HeadKVConfig`, the torch-free settings record (what each head keeps; sizes in bytes);
* `layer`, `attention`, `select`: one layer's stores and trim, its attention function, token budgets;
* `cache`: `HeadKVCache` (a transformers `Cache`), `head_kv(model, config)`, the session;
* `plan`: scores -> which KV heads keep the full cache, token budgets, a memory target;
* `fork`: one prompt prefilled once, shared among many caches;
* `compare`, `sinks`: `attnkit kv compare` and `attnkit kv sinks`;
* `technique`: the registry entry (`--technique kv-cache`), `cli`: the `attnkit kv` commands;
* `vllm_plugin`, `vllm_form`, `vllm_engine`: the same cache inside vLLM (the entry point; the plan's form both
  sides share; the vLLM classes, imported only in vLLM's venv).
"""
