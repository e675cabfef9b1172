"""Tiny random models of each family the CPU backend serves, made on the fly with
transformers (the family's special features switched on), for tests against HF."""

from __future__ import annotations

import torch

# family -> (transformers config and model class prefix, config switches of its own)
FAMILIES = {
    "llama": ("Llama", {}),
    "qwen2": ("Qwen2", {}),  # q, k, v biases: always on in Qwen2
    "qwen3": ("Qwen3", {"head_dim": 24}),  # q/k norms always on; head_dim its own
    # 4 experts, 2 per token, renormalised over the chosen two.
    "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # Layer 0 dense, layer 1 of 4 experts (2 per token, not renormalised), q/k norms.
    "qwen3_moe": ("Qwen3Moe", {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 24,
                               "moe_intermediate_size": 48, "norm_topk_prob": False,
                               "mlp_only_layers": [0]}),
}


def make_tiny(path, family: str, *, seed: int = 0, tie: bool = False, **overrides) -> str:
    """A random ``family`` model of 2 layers, GQA (4 query heads on 2 KV heads), small
    enough to build and run in a second; weights spread so greedy choices are not ties."""
    import transformers

    prefix, own = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **own)
    cfg.update(overrides)
    model = getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}Config")(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif name.endswith("bias"):  # HF initialises biases to 0: make them count
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return str(path)
