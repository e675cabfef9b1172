"""Worker side: the vLLM worker, its model runner, and the KV line pool."""
