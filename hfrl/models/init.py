"""Fresh models: a Llama of a given shape with random weights, written as a local HF checkpoint.

The built-in tasks train from scratch (nothing can be downloaded): the job writes such a model once
into its run directory and every role reads it like any other checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_random_llama(path: str | os.PathLike, *, vocab_size: int, hidden_size: int, num_layers: int,
                       num_heads: int, num_kv_heads: int, intermediate_size: int,
                       max_position_embeddings: int, seed: int = 0, bos_token_id: int | None = None,
                       eos_token_id: int | None = None, pad_token_id: int | None = None) -> Path:
    """A transformers Llama checkpoint (config.json + model.safetensors) at ``path``, seeded; kept as
    is when it exists with the same shape and seed (they give the same weights, so a resumed job's
    reference model is the original one), replaced otherwise. Written into a temporary folder and
    renamed: complete or absent."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    shape = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                 intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
    if (path / "config.json").is_file():
        written = json.loads((path / "config.json").read_text())
        if all(written.get(k) == v for k, v in shape.items()) and written.get("hfrl_init_seed") == seed:
            return path
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    config.hfrl_init_seed = seed   # kept in config.json: an existing folder is reused only if it matches
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).float()
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():   # another shape or seed: replaced
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
