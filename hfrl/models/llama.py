"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral) as plain nn.Modules.

Numerically this is transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM: GQA,
RoPE (theta, linear/dynamic/yarn/llama3 scaling through transformers' own init functions), RMSNorm,
SwiGLU, tied or untied embeddings, q/k/v biases (Qwen2) and sliding-window attention (Mistral).
The layout is Megatron's, ready for tensor parallelism applied from outside (``parallelize.py``):

- ``attn.qkv_proj`` is one fused Linear with output rows ``[q (nh*hd); k (nkv*hd); v (nkv*hd)]``
  and ``attn.o_proj`` its output; ``mlp.gate_up_proj`` is one Linear with rows ``[gate; up]`` and
  ``mlp.down_proj`` its output. Attention splits its projection by its *own* ``num_heads`` and
  ``num_kv_heads`` attributes and the MLP splits gate/up by halves of its own output, so a TP
  shard holding ``[q_i; k_i; v_i]`` (``[gate_i; up_i]``) only has to shrink those attributes.
- ``embed_tokens`` and the head (``lm_head`` of CausalLM, ``score`` of ValueModel) are separate
  modules, so they can be swapped for vocab-parallel versions.

Pipeline contract. A model built with ``layer_range=(a, b)`` holds global layers [a, b) in the
ModuleList ``layers`` (``layers[j]`` is global layer ``a + j``; ``layer_offset == a``). It owns
``embed_tokens`` only if a == 0, and ``norm`` and the head only if b == num_layers; any of them may
also be set to None afterwards. ``forward`` then takes

- ``input_ids`` (B, T) when the model has ``embed_tokens``, else ``hidden_states`` (B, T, H) from the
  previous stage;
- the same ``position_ids``/``attention_mask``/``cu_seqlens`` on every stage (masks are rebuilt per
  stage; they are cheap next to the layers);

and returns the head's output when it has a head, else the hidden states after its last layer
(after ``norm`` if it has one). ``return_hidden=True`` returns the normed hidden states instead of
the head's output, so log-probs can be computed chunk-wise from ``lm_head`` without full logits.

Sequences come either padded, with ``attention_mask`` (B, T) (1 = real token, left or right
padding), or packed, as ``input_ids`` (1, total) with ``cu_seqlens`` (num_seqs + 1,) cumulative
lengths (flash-attn style; tokens after ``cu_seqlens[-1]`` form one more sequence): each sequence
attends only within itself and, by default, its positions restart at 0. Padded rows attend with
``scaled_dot_product_attention`` and a boolean (B, 1, T, T) mask. A packed row never builds a mask
over the whole pack: attention runs per sequence (block-diagonal), one causal SDPA call on each
sequence's own (L_i, L_i) block, so memory is linear in the pack length (a sliding window longer
than a sequence adds an (L_i, L_i) mask for that sequence only). The sequence boundaries are read
on the host once per forward; a varlen flash kernel can replace the loop on GPU without changing
this interface.

With ``attention=<AttentionBackend>`` the forward reads and writes a KV cache instead (generation,
``hfrl.rollout``): the batch is one packed row of new tokens with explicit ``position_ids``, and the
backend, which knows which sequence each token belongs to, stores each layer's keys and values and
computes the attention over the cache.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hfrl.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig, seq_len: torch.Tensor | int | None = None,
                  device: torch.device | str | None = None, hf_config=None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (head_dim // 2,) fp32 and the cos/sin scale, as transformers computes them.

    ``seq_len`` only matters for "dynamic" scaling (None = max_position_embeddings).
    """
    if config.rope_type == "default":  # not in ROPE_INIT_FUNCTIONS in transformers 5.x; same formula
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (config.rope_theta ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = hf_config or config.hf_config or config.to_hf()
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[config.rope_type](hf_config, device, seq_len=seq_len)
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """position_ids (B, T) -> cos, sin (B, T, hd). Holds no parameters; every pipeline stage has one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._hf_config = config.hf_config or (config.to_hf() if config.rope_type != "default" else None)
        # Computed on CPU even under a meta-device context, so meta-initialised models get real values.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = rope_inv_freq(config, hf_config=self._hf_config)
        self._inv_freq_fp32 = inv_freq  # plain attribute: the master copy _apply restores from
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # model.to(bf16) would round the frequencies and to_empty() would wipe them; angles need fp32.
        self.inv_freq = self._inv_freq_fp32.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.config.rope_type == "dynamic":
            # Stateless version of HF's dynamic NTK: frequencies for this batch's longest position.
            # (HF caches the largest length seen so far; both agree whenever lengths only grow.)
            seq_len = position_ids.max() + 1
            inv_freq, _ = rope_inv_freq(self.config, seq_len, position_ids.device, self._hf_config)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class AttentionBackend(abc.ABC):
    """Attention that reads keys and values from somewhere other than this forward's tokens (a KV cache).

    ``Decoder.forward(..., attention=backend)`` hands every layer's rotated q (1, nh, T, hd) and new k, v
    (1, nkv, T, hd) of a packed row to ``backend.attend``, which stores k and v (e.g. into a paged cache)
    and returns the attention output (1, nh, T, hd). The rollout engine implements it; the model itself
    knows nothing of caches or devices beyond this call.
    """

    @abc.abstractmethod
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sliding_window: int | None) -> torch.Tensor:
        """Store k, v of this forward's tokens for layer ``layer_idx`` and return their attention output."""


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # global: the KV cache's layer under pipeline parallelism too
        # Local head counts: a TP wrapper divides these by tp and keeps [q_i; k_i; v_i] rows.
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.layer_sliding_window(layer_idx)
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_rows, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: "torch.Tensor | PackedAttention | AttentionBackend | None") -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(attn_mask, AttentionBackend):
            y = attn_mask.attend(self.layer_idx, q, k, v, self.sliding_window)  # (1, nh, T, hd)
        elif isinstance(attn_mask, PackedAttention):
            y = attn_mask.attend(q, k, v, enable_gqa=nh != nkv)  # (1, nh, T, hd)
        else:
            gqa = nh != nkv
            if gqa and attn_mask is not None and q.is_cuda:
                # CUDA runs GQA only in the flash and math kernels, and flash takes no mask: with a mask
                # that would be the math kernel's (B, nh, T, T) fp32 scores. Shared kv heads repeated,
                # the memory-efficient kernel takes the mask (same values).
                k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               enable_gqa=gqa)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y)  # (B, T, H); row-parallel under TP: partial sums before the all-reduce


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each (I local under TP)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # global index, also under pipeline parallelism
        self.activation_checkpointing_enabled = False
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: "torch.Tensor | PackedAttention | None") -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


def build_attention_mask(seq_len: int, device: torch.device, *, attention_mask: torch.Tensor | None = None,
                         sliding_window: int | None = None) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, T) mask of a padded batch, True = may attend; None when plain causal suffices.

    attention_mask: (B, T) 1 for real tokens. (Packed rows use ``PackedAttention`` instead.)
    """
    if attention_mask is None and sliding_window is None:
        return None
    idx = torch.arange(seq_len, device=device)
    q_idx, k_idx = idx[:, None], idx[None, :]
    allowed = k_idx <= q_idx  # (T, T)
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        # A padding query may have no key left; letting it see itself keeps SDPA finite (no NaN grads).
        allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=device)
    return allowed


def packed_spans(cu_seqlens: torch.Tensor, total: int) -> list[tuple[int, int]]:
    """[start, end) of each sequence of a packed row of ``total`` tokens; empty sequences dropped.

    Tokens after ``cu_seqlens[-1]`` form one more sequence (flash-attn style).
    """
    bounds = [int(b) for b in cu_seqlens.tolist()]  # one host read per forward
    if any(b > a for a, b in zip(bounds[1:], bounds)) or (bounds and not 0 <= bounds[-1] <= total):
        raise ValueError(f"cu_seqlens {bounds} must be non-decreasing cumulative lengths within the packed "
                         f"row of {total} tokens")
    edges = [0, *bounds[1:], total]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@dataclass(frozen=True)
class PackedAttention:
    """Block-diagonal causal attention over a packed row (B = 1): each span attends only within itself.

    ``masks[i]`` is None (plain causal) or, when a sliding window is shorter than span i, its
    (L_i, L_i) boolean window mask. Built once per forward and sliding window, used by every layer.
    """

    spans: tuple[tuple[int, int], ...]
    masks: tuple[torch.Tensor | None, ...]

    @classmethod
    def build(cls, spans: list[tuple[int, int]], device: torch.device,
              sliding_window: int | None = None) -> "PackedAttention":
        masks = []
        for start, end in spans:
            length = end - start
            if sliding_window is None or length <= sliding_window:
                masks.append(None)
                continue
            idx = torch.arange(length, device=device)
            masks.append((idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < sliding_window))
        return cls(tuple(spans), tuple(masks))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        """q (1, nh, T, hd), k and v (1, nkv, T, hd) -> (1, nh, T, hd): one SDPA call per span."""
        out = [q[:, :, :0]]  # an empty row stays empty
        for (start, end), mask in zip(self.spans, self.masks):
            out.append(F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=mask,
                is_causal=mask is None, enable_gqa=enable_gqa))  # (1, nh, L_i, hd)
        return torch.cat(out, dim=2)


class Decoder(nn.Module):
    """embed_tokens -> layers[a, b) -> norm, shared by CausalLM and ValueModel (see module docstring)."""

    def __init__(self, config: ModelConfig, layer_range: tuple[int, int] | None = None):
        super().__init__()
        start, end = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= start <= end <= config.num_layers:
            raise ValueError(f"layer_range {layer_range} must satisfy 0 <= a <= b <= {config.num_layers}")
        self.config = config
        self.layer_offset = start
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if start == 0 else None
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(start, end))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if end == config.num_layers else None
        self.rotary_emb = RotaryEmbedding(config)

    @property
    def has_head(self) -> bool:
        return False

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """A bare decoder has no head: its output is the hidden states (B, T, H)."""
        return hidden_states

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Toggle checkpointing on every layer (or set ``layers[j].activation_checkpointing_enabled``)."""
        for layer in self.layers:
            layer.activation_checkpointing_enabled = enabled

    def forward(self, input_ids: torch.Tensor | None = None, *, hidden_states: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, return_hidden: bool = False,
                attention: AttentionBackend | None = None) -> torch.Tensor:
        x = self._embed(input_ids, hidden_states)  # (B, T, H)
        B, T, _ = x.shape
        if attention is not None:  # a KV cache: the backend knows the sequences, positions come given
            if position_ids is None or attention_mask is not None or cu_seqlens is not None:
                raise ValueError("attention=<backend> takes position_ids and no attention_mask/cu_seqlens")
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed), not both")
        spans = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got input of shape {(B, T)}")
            spans = packed_spans(cu_seqlens, T)
            if position_ids is None:  # (1, T), restarting at 0 per sequence
                position_ids = torch.cat([torch.arange(0, device=x.device),
                                          *(torch.arange(b - a, device=x.device) for a, b in spans)])[None]
        if position_ids is None:
            if attention_mask is not None:  # real tokens count from 0 under left padding too
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            else:
                position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B, T, hd) each
        masks = {}  # one mask (or PackedAttention) per distinct sliding window among this stage's layers
        for layer in self.layers:
            window = layer.attn.sliding_window
            if window in masks:
                continue
            if attention is not None:
                masks[window] = attention
            elif spans is not None:
                masks[window] = PackedAttention.build(spans, x.device, window)
            else:
                masks[window] = build_attention_mask(T, x.device, attention_mask=attention_mask,
                                                     sliding_window=window)
        for layer in self.layers:
            mask = masks[layer.attn.sliding_window]
            if layer.activation_checkpointing_enabled and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        if self.norm is not None:
            x = self.norm(x)
        if return_hidden or not self.has_head:
            return x
        return self.head(x)

    def _embed(self, input_ids: torch.Tensor | None, hidden_states: torch.Tensor | None) -> torch.Tensor:
        if self.embed_tokens is not None:
            if input_ids is None or hidden_states is not None:
                raise ValueError("this model has embed_tokens: pass input_ids (B, T), not hidden_states")
            return self.embed_tokens(input_ids)
        if hidden_states is None:
            raise ValueError(f"this pipeline stage (layers from {self.layer_offset}) has no embed_tokens: "
                             "pass hidden_states (B, T, H) from the previous stage")
        return hidden_states


class CausalLM(Decoder):
    """Returns logits (B, T, V), or the final normed hidden states with ``return_hidden=True``."""

    def __init__(self, config: ModelConfig, layer_range: tuple[int, int] | None = None):
        super().__init__(config, layer_range)
        has_head = self.norm is not None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if has_head else None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when the config ties them and both live in this model.

        Call again after anything that replaces parameters (``to_empty``, ``load_state_dict(assign=True)``).
        """
        if self.config.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)  # (B, T, V)


class ValueModel(Decoder):
    """Critic / reward / cost model: one scalar per token, (B, T), from ``score`` on the normed states."""

    def __init__(self, config: ModelConfig, layer_range: tuple[int, int] | None = None):
        super().__init__(config, layer_range)
        self.score = nn.Linear(config.hidden_size, 1, bias=False) if self.norm is not None else None

    def tie_weights(self) -> None:
        """No tied weights in a value model; present so loaders can call it on any hfrl model."""

    @property
    def has_head(self) -> bool:
        return self.score is not None

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.score(hidden_states).squeeze(-1)  # (B, T)
