"""Multi-LoRA: PEFT adapters on one base model, chosen per request (vLLM's LoRARequest).

  peft.py       the PEFT adapter folder, pure: its checks (``inspect``, JSON and the
                safetensors header only) and its tensors (``load``)
  config.py     vLLM's LoRA settings no backend honours, refused by name
  pool.py       the worker's host pool of adapters (max_cpu_loras, LRU, pins, users)
  admission.py  the scheduler's rule: at most max_loras adapters among the running and
                admitted requests, none held forever

The math lives with each backend: ``backends/cpu/lora.py`` (the CPU backend and the NxDI
simulator), NxDI's own LoRA modules on a device. The backend protocol's LoRA methods
(``init_lora``, ``prepare_adapter``, ``release_adapter``, ``adapter_indices``) are the only
way the runner reaches them.
"""
