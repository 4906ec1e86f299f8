"""Tiny transformers reference models for the model tests (random weights, fp32, no downloads)."""
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)

# name -> (config class, overrides). Each exercises one feature against transformers.
CASES = {
    "llama_gqa_tied": (LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3_rope": (LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen2_bias": (Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen2_sliding_layers": (Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral_window": (MistralConfig, dict(sliding_window=4)),  # shorter than the 12-token sequences
}
ROPE_CASES = {
    "llama_linear": (LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # sequences (12) longer than max_position_embeddings (8): dynamic NTK recomputes its frequencies
    "llama_dynamic": (LlamaConfig, dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama_yarn": (LlamaConfig, dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16})),
}


def hf_config(case: str, **overrides):
    cls, case_overrides = {**CASES, **ROPE_CASES}[case]
    return cls(**{**TINY, **case_overrides, **overrides})


def build_hf(case: str, model_cls=None, seed: int = 0, **overrides):
    """A transformers model of ``case`` with random weights (biases too, so they are tested)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(case, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config) if model_cls else AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # defaults are 0 / 1: make them matter
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model.eval()
