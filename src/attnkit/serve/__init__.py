"""`attnkit serve`: an OpenAI-compatible server over a local model (plain, Attention Buckets or the
retrieval-head KV cache), or a System 2 Attention proxy in front of another server."""
