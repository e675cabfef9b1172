"""LoRA test helpers: random PEFT adapters for a model folder, and HF + PEFT references.

Adapters are made by PEFT itself (``get_peft_model`` + ``save_pretrained``), with
``init_lora_weights=False`` so B is random, not zero: the adapter changes the tokens. The
reference is PEFT's own unmerged forward (``PeftModel.from_pretrained``), greedy, one
prompt at a time. Nothing reaches a hub: the model and the adapters are local folders.
"""

from __future__ import annotations

import torch

from vllm_neuronx.lora.peft import TARGETS


def make_peft_adapter(model_path: str, out, *, seed: int = 0, r: int = 8, alpha: float = 16,
                      targets=TARGETS, use_rslora: bool = False, b_scale: float = 1.0,
                      **config) -> str:
    """A random LoRA adapter for the model at ``model_path``, saved by PEFT into ``out``.

    ``targets``: module names, or PEFT's regex over the full module names (a string).
    ``b_scale`` multiplies every B (a large model's deltas may need damping to keep its
    outputs text-like); ``config``: more LoraConfig fields (e.g. layers_to_transform)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha,
                     target_modules=targets if isinstance(targets, str) else list(targets),
                     init_lora_weights=False, use_rslora=use_rslora, lora_dropout=0.0,
                     task_type="CAUSAL_LM", **config)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    if b_scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
    peft_model.save_pretrained(str(out))
    return str(out)


def peft_greedy(model_path: str, adapter: str | None, prompts: list[list[int]],
                steps: int | list[int], dtype=torch.float32, weights_in=None) -> list[list[int]]:
    """Greedy continuations from HF transformers with PEFT's unmerged adapter (None: the
    base model). ``weights_in``: round the base weights to this dtype first (the adapter's
    stay as saved), then compute in ``dtype``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    if weights_in is not None:
        model = model.to(weights_in).to(dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
        model = model.to(dtype)
    counts = steps if isinstance(steps, list) else [steps] * len(prompts)
    outs = []
    with torch.no_grad():
        for prompt, n in zip(prompts, counts, strict=True):
            ids = torch.tensor([prompt])
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
            )
            outs.append(gen[0, ids.shape[1]:].tolist())
    return outs
