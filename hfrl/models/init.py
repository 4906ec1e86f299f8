"""Fresh models: a Llama of a given shape with random weights, written as a local HF checkpoint.

The built-in tasks train from scratch (nothing can be downloaded): the job writes such a model once
into its run directory and every role reads it like any other checkpoint.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_random_llama(path: str | os.PathLike, *, vocab_size: int, hidden_size: int, num_layers: int,
                       num_heads: int, num_kv_heads: int, intermediate_size: int,
                       max_position_embeddings: int, seed: int = 0, bos_token_id: int | None = None,
                       eos_token_id: int | None = None, pad_token_id: int | None = None) -> Path:
    """A transformers Llama checkpoint (config.json + model.safetensors) at ``path``, seeded; kept as
    is when it exists already (same seed and shape give the same weights, so a resumed job's
    reference model is the original one). Written into a temporary folder and renamed: complete or
    absent."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).float()
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path
