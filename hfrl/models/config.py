"""ModelConfig: the architecture of an hfrl decoder, read from a transformers config.

One flat dataclass covers the Llama family hfrl implements (Llama 2/3, Qwen2/2.5, Mistral). It is
built from a transformers config (``ModelConfig.from_hf``) or a checkpoint folder's ``config.json``
(``ModelConfig.from_pretrained``), and turned back into one for saving (``ModelConfig.to_hf``).

RoPE: transformers 5.x keeps theta and scaling together in ``config.rope_parameters``; 4.x kept
``rope_theta`` and ``rope_scaling`` apart. Both are read here into ``rope_theta`` + ``rope_scaling``.
The inverse frequencies themselves are computed by transformers' own ``ROPE_INIT_FUNCTIONS``
(see ``hfrl.models.llama.rope_inv_freq``), which take a transformers config: ``hf_config`` keeps the
one this config came from, and ``to_hf()`` rebuilds one when there is none.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# "longrope" switches between two frequency sets by sequence length and "proportional"/"axial" belong
# to other families; the rest are a fixed function of the config (dynamic: of the sequence length).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

_HF_CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder. Field names follow hfrl's conventions, not HF's."""

    model_type: str = "llama"
    """One of SUPPORTED_MODEL_TYPES; picks the HF config class when saving."""
    vocab_size: int = 32000
    """Rows of the embedding and the LM head."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Width of each of the MLP's gate and up projections."""
    num_layers: int = 32
    """Decoder layers in the full model (a pipeline stage holds a subset)."""
    num_heads: int = 32
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA); None means num_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling parameters with a "rope_type" key ("linear", "dynamic", "yarn", "llama3"), as in
    HF's rope_parameters minus rope_theta; None for plain RoPE."""
    max_position_embeddings: int = 4096
    """Context length the model was trained for (used by dynamic/llama3/yarn RoPE)."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix (HF checkpoints then omit lm_head.weight)."""
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2: True; Llama's attention_bias also sets o_proj_bias)."""
    o_proj_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Bias on gate/up/down projections (Llama's mlp_bias)."""
    sliding_window: int | None = None
    """Mistral/Qwen2 sliding window: a query sees itself and the sliding_window - 1 tokens before it.
    None disables it."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "full_attention" or "sliding_attention"; None means every layer slides when
    sliding_window is set (Mistral) and none otherwise. Qwen2 slides only from max_window_layers on."""
    pad_token_id: int | None = None
    """Padding token id of the tokenizer, if the config names one."""
    hf_config: Any = field(default=None, repr=False, compare=False)
    """The transformers config this came from (kept for RoPE init functions and for saving)."""
    hf_fields: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """The config.json fields this came from, when read without transformers: ``to_hf`` rebuilds the
    transformers config from them, so a saved checkpoint keeps every field (token ids, ...)."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported by hfrl; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "GQA needs every key/value head shared by the same number of query heads"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            rope_type = self.rope_scaling.setdefault("rope_type", self.rope_scaling.pop("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type == "default":
                self.rope_scaling = None
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = (kind,) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(
                f"layer_types must list {self.num_layers} entries from {LAYER_TYPES}, got {self.layer_types}"
            )

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """Sliding window of global layer ``layer_idx``, None for full attention."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    # ---- transformers interop -------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Build from a transformers ``LlamaConfig``/``Qwen2Config``/``MistralConfig`` (4.x or 5.x)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} ({type(hf_config).__name__}) is not supported by hfrl; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_act = getattr(hf_config, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; hfrl's MLP is SwiGLU ('silu')")
        num_heads = hf_config.num_attention_heads
        rope_theta, rope_scaling = _read_rope(hf_config)
        if model_type == "llama":
            qkv_bias = o_bias = bool(getattr(hf_config, "attention_bias", False))
        else:
            qkv_bias, o_bias = model_type == "qwen2", False
        sliding_window = getattr(hf_config, "sliding_window", None)
        if model_type == "llama" or (model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False)):
            sliding_window = None
        layer_types = None
        if model_type == "qwen2" and sliding_window is not None:
            layer_types = getattr(hf_config, "layer_types", None) or [
                "sliding_attention" if i >= hf_config.max_window_layers else "full_attention"
                for i in range(hf_config.num_hidden_layers)
            ]
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            sliding_window=sliding_window,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            hf_config=hf_config,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``config.json`` of a local checkpoint folder (no downloads)."""
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file} not found: expected a HF checkpoint folder with config.json")
        with open(config_file) as f:
            text = f.read()
        try:
            fields = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{config_file} is not valid JSON ({err}); expected a transformers config "
                             "(a JSON object with model_type, hidden_size, ...)") from err
        if not isinstance(fields, dict):
            raise ValueError(f"{config_file} holds a JSON {type(fields).__name__}, but a config must be a JSON "
                             "object (model_type, hidden_size, ...)")
        model_type = fields.get("model_type")
        # Checked before AutoConfig so an unknown type gets hfrl's message, not transformers'.
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{config_file}: model_type {model_type!r} is not supported by hfrl; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        fast = _from_complete_json(cls, fields)
        if fast is not None:
            return fast
        from transformers import AutoConfig

        return cls.from_hf(AutoConfig.from_pretrained(os.fspath(path), local_files_only=True))

    def to_hf(self) -> Any:
        """A transformers config of the matching class. Returns a copy of ``hf_config`` if present."""
        if self.hf_config is not None:
            return self.hf_config.__class__.from_dict(self.hf_config.to_dict())
        import transformers

        if self.hf_fields is not None:
            return getattr(transformers, f"{_HF_CLASS_PREFIX[self.model_type]}Config").from_dict(dict(self.hf_fields))

        if self.model_type == "llama" and self.attention_bias != self.o_proj_bias:
            raise ValueError("LlamaConfig has one attention_bias for q/k/v/o; attention_bias != o_proj_bias")
        if self.model_type != "llama" and (self.o_proj_bias or self.mlp_bias or
                                           self.attention_bias != (self.model_type == "qwen2")):
            raise ValueError(f"biases {self.attention_bias, self.o_proj_bias, self.mlp_bias} cannot be "
                             f"expressed in a {self.model_type} config")
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id, rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
        )
        if self.model_type == "llama":
            kwargs.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, head_dim=self.head_dim)
        elif self.model_type == "mistral":
            kwargs.update(sliding_window=self.sliding_window, head_dim=self.head_dim)
        else:
            if self.head_dim != self.hidden_size // self.num_heads:
                raise ValueError("Qwen2Config has no head_dim: it must be hidden_size // num_heads")
            sliding = [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
            kwargs.update(use_sliding_window=bool(sliding), sliding_window=self.sliding_window,
                          max_window_layers=sliding[0] if sliding else self.num_layers)
            if sliding:
                kwargs["layer_types"] = list(self.layer_types)
        return getattr(transformers, f"{_HF_CLASS_PREFIX[self.model_type]}Config")(**kwargs)

    def hf_architecture(self, value_head: bool = False) -> str:
        """HF class name of a checkpoint of this config, e.g. "LlamaForCausalLM"."""
        suffix = "ForSequenceClassification" if value_head else "ForCausalLM"
        return _HF_CLASS_PREFIX[self.model_type] + suffix

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with fields changed (drops hf_config and hf_fields, which would no longer match)."""
        return dataclasses.replace(self, hf_config=None, hf_fields=None, **changes)


# The keys ``from_hf`` reads of each family, all of which transformers 5.x writes to config.json (it saves
# every field). When all are there and RoPE is plain, the file is read without transformers: importing
# it costs seconds in every process (each rank of a job), for nothing its config class would change.
_COMMON_KEYS = ("hidden_act", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "rope_parameters")
_COMPLETE_KEYS = {
    "llama": (*_COMMON_KEYS, "head_dim", "attention_bias", "mlp_bias"),
    "mistral": (*_COMMON_KEYS, "head_dim", "sliding_window"),
    "qwen2": (*_COMMON_KEYS, "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
}


def _from_complete_json(cls, fields: dict[str, Any]) -> "ModelConfig | None":
    """``from_hf`` over the JSON fields themselves when they are complete (see _COMPLETE_KEYS), else None.

    The result has no ``hf_config``: plain RoPE needs none, and ``to_hf()`` builds one for saving.
    """
    keys = _COMPLETE_KEYS[fields["model_type"]]
    rope = fields.get("rope_parameters")
    if any(key not in fields for key in keys) or not isinstance(rope, dict):
        return None
    if rope.get("rope_type", "default") != "default" or any(isinstance(v, dict) for v in rope.values()):
        return None
    from types import SimpleNamespace

    return dataclasses.replace(cls.from_hf(SimpleNamespace(**fields)), hf_config=None, hf_fields=dict(fields))


def _read_rope(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a 5.x ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:  # transformers 5.x: one dict holding theta and scaling
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", getattr(hf_config, "default_theta", 10000.0))
    else:  # transformers 4.x
        theta = getattr(hf_config, "rope_theta", 10000.0)
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling
