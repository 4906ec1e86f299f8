"""Shapes of the models the auto-mapper places: parameter counts, bytes and FLOPs per token.

A `ModelSpec` is the few numbers of a Llama-shaped decoder the cost model needs (pure arithmetic,
no torch, no transformers). Per decoder layer, untied and without biases:

    attention  q: h x (a*hd)   k, v: h x (kv*hd) each   o: (a*hd) x h      (GQA when kv < a)
    MLP        gate, up: h x I each   down: I x h                            (SwiGLU)
    norms      2 x h                                                         (RMSNorm weights)

plus the embedding (V x h), the final norm (h) and the head: the LM head (h x V), or a scalar value
head (h x 1) for critics, reward and cost models (`value_head=True`). h = hidden size, I =
intermediate size, a / kv = attention / key-value heads, hd = head dim, V = vocabulary.

Checked against the published sizes: Llama-2 7B 6.74e9, 13B 13.0e9, 70B 69.0e9 parameters.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-shaped decoder, as far as cost and memory go."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    value_head: bool = False
    """Critic / reward / cost model: the LM head is replaced by a scalar head (h x 1)."""
    tie_word_embeddings: bool = False
    """The LM head shares the embedding's weight (counted once); ignored with a value head."""
    attention_head_dim: int = 0
    """Per-head size when the config sets it apart from hidden/heads (Qwen3, Mistral-Nemo); 0 = derive."""

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                      "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {self.name!r}: {field}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention needs it)")
        if not self.attention_head_dim and self.hidden_size % self.num_heads:
            raise ValueError(f"model {self.name!r}: hidden_size={self.hidden_size} is not a multiple "
                             f"of num_heads={self.num_heads}; set attention_head_dim")

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Size of one attention head (elements)."""
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def embedding_params(self) -> int:
        """Parameters of the input embedding (V x h): a lookup, not a matmul."""
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Parameters of the output head: h x V (LM head, 0 when tied) or h x 1 (value head)."""
        if self.value_head:
            return self.hidden_size
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention with GQA, SwiGLU MLP, two RMSNorms)."""
        h, attn = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return 2 * h * attn + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h

    @property
    def num_params(self) -> int:
        """Total parameters (count): embedding + layers + final norm + head."""
        return (self.embedding_params + self.num_layers * self.layer_params + self.hidden_size
                + self.head_params)

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (count): layers' projections + head.

        The embedding lookup and the RMSNorm weights do no multiply-adds worth counting; a tied LM
        head still multiplies (its weight is the embedding's).
        """
        head = self.head_params
        if self.tie_word_embeddings and not self.value_head:
            head = self.vocab_size * self.hidden_size
        return self.num_layers * (self.layer_params - 2 * self.hidden_size) + head

    def param_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of all parameters at `dtype_bytes` per element (2 = bf16)."""
        return self.num_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token occupies over the whole model: 2 (K, V) * layers * kv heads *
        head dim * dtype_bytes (e.g. Llama-2 7B in bf16: 512 KiB)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def flops_per_token(self, seq_len: int = 0) -> float:
        """Forward FLOPs of one token (multiply-add = 2 FLOPs) attending to `seq_len` positions:

            2 * matmul_params  +  2 * 2 * layers * (heads * head_dim) * seq_len

        The first term is every weight used once per token; the second is Q K^T and the
        attention-weighted sum of V, each 2 * (heads*head_dim) FLOPs per attended position per layer.
        This is PaLM's count (Chowdhery et al. 2022, App. B: training = 3x forward = 6N + 12 L H Q T),
        which does not halve the attention term for the causal mask. Forward + backward is 3x this.
        """
        attn = 4 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(2 * self.matmul_params + attn)

    def as_value_model(self) -> "ModelSpec":
        """The same backbone with a scalar value head (critic, reward or cost model)."""
        if self.value_head:
            return self
        return replace(self, name=f"{self.name}-value", value_head=True)

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "ModelSpec":
        """A built-in Llama-shaped size by name (case-insensitive): see `MODEL_SIZES`."""
        key = name.strip().lower()
        if key not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name!r}; expected one of {sorted(MODEL_SIZES)} "
                             f"or a local HF model folder / config.json")
        return MODEL_SIZES[key]

    @classmethod
    def from_hf_config(cls, path: str) -> "ModelSpec":
        """A model from a local HF `config.json` (or the folder holding it), read as plain JSON.

        Sequence/token-classification architectures (reward models, critics) get a value head.
        """
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"{path!r}: no config.json there; give a local HF model folder or the "
                             f"path of its config.json")
        with open(file) as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's config inside
        required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "vocab_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{file}: missing {missing}; a Llama-shaped decoder config needs "
                             f"{list(required)}")
        archs = cfg.get("architectures") or []
        value_head = any("SequenceClassification" in a or "TokenClassification" in a for a in archs)
        folder = os.path.basename(os.path.dirname(os.path.abspath(file)))
        return cls(
            name=folder or cfg.get("model_type", "model"),
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            value_head=value_head,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_head_dim=int(cfg.get("head_dim") or 0),
        )


def _llama(name: str, layers: int, hidden: int, inter: int, heads: int, kv_heads: int) -> ModelSpec:
    return ModelSpec(name, layers, hidden, inter, heads, kv_heads, vocab_size=32000)


MODEL_SIZES: dict[str, ModelSpec] = {
    # a Llama-shaped ~1.3B (1.35e9 parameters)
    "1.3b": _llama("1.3b", 24, 2048, 5504, 16, 16),
    # Llama-2 7B / 13B / 70B (Touvron et al. 2023, and their HF config.json files)
    "7b": _llama("7b", 32, 4096, 11008, 32, 32),
    "13b": _llama("13b", 40, 5120, 13824, 40, 40),
    # CodeLlama-34B's shape (GQA, 8 KV heads), with Llama-2's 32000-token vocabulary
    "34b": _llama("34b", 48, 8192, 22016, 64, 8),
    "70b": _llama("70b", 80, 8192, 28672, 64, 8),
}
"""Built-in Llama-shaped sizes, the paper's model family (HybridFlow §8: Llama 7B to 70B)."""
