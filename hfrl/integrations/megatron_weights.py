"""megatron-core GPTModel <-> hfrl weights, per rank and in place: each rank converts only its own
TP shard of its own pipeline stage; nothing is gathered onto one rank.

The name map is data (``MEGATRON_NAMES``) over hfrl's own plan (``hfrl.models.weights.param_plan``);
how a rank's two local tensors relate follows from the plan's shard kind, because hfrl partitions
its layers exactly as Megatron does:

    column, row, replicated   the same local tensor ([gate_r; up_r] of linear_fc1 included: Megatron's
                              MLP also chunks its local fc1 output into gate, then up)
    column q/k/v (3 parts)    the same rows, regrouped: Megatron holds the rank's query groups one after
                              another, each as [its q heads; k; v] (``qkv_from_megatron``); hfrl holds
                              [q_r; k_r; v_r]
    vocab                     rows re-blocked over the TP group: Megatron splits its padded vocabulary
                              V_meg (a multiple of tp, ``GPTModel.vocab_size``) into V_meg/tp rows per
                              rank; hfrl splits the true vocabulary V <= V_meg into ceil(V/tp) rows per
                              rank (zero rows past V). Rows move point to point between the TP ranks
                              that hold them (``vocab_row_moves``); Megatron's padding rows (>= V) never
                              leave Megatron and come back unchanged, so a round trip is bit-identical.

What hfrl trains on the vocabulary: the true one. hfrl's log-probs (and so its RL losses, KL and
entropy) normalise over the V true rows only; Megatron's loss normalises over all V_meg rows, its
padding rows (random at initialisation, never a target) included. hfrl neither reads nor updates
those rows: they come back from the hand-back exactly as they were, and keep what Megatron's own
softmax gives them (a small probability mass that hfrl's policy does not see). A token sampled by
hfrl is always < V.

``hfrl_model_config`` reads the architecture off a GPTModel and refuses, naming every field, its value
and the accepted ones, anything hfrl's Llama-family decoder would compute differently: the check is
inverted, every forward-changing TransformerConfig field is listed (``FORWARD_FIELDS``, name ->
accepted values) or mapped (``MAPPED_FIELDS``: sizes, biases, epsilon, scale, sliding window), so a
setting that adds no weights (a layer without RoPE, an off-by-one softmax, ...) cannot slip through.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hfrl.distributed.tensor_parallel import padded_vocab_size, tp_rank, tp_world_size
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM, Decoder
from hfrl.models.parallelize import parallelize_model
from hfrl.models.weights import ParamSpec, model_param_plan

MEGATRON_NAMES: dict[str, str] = {
    # hfrl parameter ({i}: stage-local layer)   megatron-core GPTModel parameter (local layer spec)
    "embed_tokens.weight":                      "embedding.word_embeddings.weight",
    "layers.{i}.attn_norm.weight":              "decoder.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.qkv_proj.weight":          "decoder.layers.{i}.self_attention.linear_qkv.weight",
    "layers.{i}.attn.qkv_proj.bias":            "decoder.layers.{i}.self_attention.linear_qkv.bias",
    "layers.{i}.attn.o_proj.weight":            "decoder.layers.{i}.self_attention.linear_proj.weight",
    "layers.{i}.attn.o_proj.bias":              "decoder.layers.{i}.self_attention.linear_proj.bias",
    "layers.{i}.mlp_norm.weight":               "decoder.layers.{i}.pre_mlp_layernorm.weight",
    "layers.{i}.mlp.gate_up_proj.weight":       "decoder.layers.{i}.mlp.linear_fc1.weight",
    "layers.{i}.mlp.gate_up_proj.bias":         "decoder.layers.{i}.mlp.linear_fc1.bias",
    "layers.{i}.mlp.down_proj.weight":          "decoder.layers.{i}.mlp.linear_fc2.weight",
    "layers.{i}.mlp.down_proj.bias":            "decoder.layers.{i}.mlp.linear_fc2.bias",
    "norm.weight":                              "decoder.final_layernorm.weight",
    "lm_head.weight":                           "output_layer.weight",
}
"""hfrl name -> Megatron name. Both sides number a stage's layers from 0 (Megatron's state dict uses the
ModuleList index, hfrl's ``layers.{i}`` is stage-local too)."""
TE_NORM_NAMES: dict[str, str] = {
    "layers.{i}.attn_norm.weight": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
    "layers.{i}.mlp_norm.weight": "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
}
"""Transformer Engine's layer spec (CUDA only) fuses each norm into the linear layer after it; a state
dict holding these names is read with them instead (untested here: Transformer Engine needs a GPU)."""
IGNORED_SUFFIXES = ("_extra_state",)
"""State-dict entries of Megatron modules that are not weights (FP8 metadata, None on CPU)."""


# ---- the architecture --------------------------------------------------------------------------------


FORWARD_FIELDS: dict[str, tuple[Any, ...]] = {
    # TransformerConfig field                   the values hfrl's decoder computes the same forward for
    "normalization":                            ("RMSNorm",),
    "layernorm_zero_centered_gamma":            (False,),
    "apply_residual_connection_post_layernorm": (False,),
    "gated_linear_unit":                        (True,),
    "activation_func":                          (F.silu,),
    "glu_linear_offset":                        (0.0,),
    "activation_func_clamp_value":              (None,),
    "rotary_interleaved":                       (False,),
    "no_rope_freq":                             (None,),
    "mrope_section":                            (None,),
    "softmax_type":                             ("vanilla",),
    "qk_layernorm":                             (False,),
    "qk_l2_norm":                               (False,),
    "attention_output_gate":                    (False,),
    "multi_latent_attention":                   (False,),
    "experimental_attention_variant":           (None,),
    "linear_attention_freq":                    (None,),
    "num_moe_experts":                          (None, 0),
    "mtp_num_layers":                           (None, 0),
    "heterogeneous_block_specs":                (False,),
    "is_hybrid_model":                          (False,),
    "num_layers_in_first_pipeline_stage":       (None,),
    "num_layers_in_last_pipeline_stage":        (None,),
    "pipeline_model_parallel_layout":           (None,),
    "account_for_embedding_in_pipeline_split":  (False,),
    "account_for_loss_in_pipeline_split":       (False,),
}
"""Every TransformerConfig field that changes what the model computes (or where its layers sit) and that
hfrl does not map: each must hold one of these values (the first is Megatron's default, or hfrl's
Llama-style choice), else ``hfrl_model_config`` refuses. A field missing from an older megatron-core
counts as its default."""
MAPPED_FIELDS: tuple[str, ...] = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "layernorm_epsilon", "add_bias_linear", "add_qkv_bias", "softmax_scale", "window_size", "window_attn_skip_freq",
    "apply_query_key_layer_scaling",   # divides the scale by the layer number, multiplies it back: no change
)
"""Forward-changing fields hfrl reads into its ModelConfig (or checks against it) instead."""
NUMERICS_FIELDS: tuple[str, ...] = (
    "params_dtype", "bf16", "fp16", "fp32_residual_connection", "attention_softmax_in_fp32", "fp8", "fp4",
    "first_last_layers_bf16", "hidden_dropout", "attention_dropout",
)
"""Precision and dropout: how Megatron computes the same function, not which one. hfrl trains in its own
engine's precision and without dropout, whatever these say."""
FIX = ("build the GPTModel Llama-style (RMSNorm, SwiGLU, RoPE, vanilla softmax; get_gpt_layer_local_spec or "
       "the Transformer Engine spec) to embed hfrl")


def _value(value: Any) -> str:
    return getattr(value, "__name__", None) or repr(value)


def _accepted(value: Any, accepted: tuple[Any, ...]) -> bool:
    # booleans by identity (False must not pass for 0, nor 1 for True); functions by identity
    return any(value is a or (not callable(a) and not isinstance(a, bool) and not isinstance(value, bool)
                              and value == a) for a in accepted)


def _window(cfg: Any, num_layers: int, problems: list[str]) -> tuple[int | None, tuple[str, ...] | None]:
    """hfrl's (sliding_window, layer_types) for Megatron's window_size = (left, right) and
    window_attn_skip_freq. Megatron's sliding mask lets query i see keys i - left .. i + right (it replaces
    the causal mask): causal needs right = 0, and hfrl's window (a query sees itself and the window - 1
    keys before it) is left + 1."""
    window = getattr(cfg, "window_size", None)
    if not window:
        return None, None
    left, right = window
    if right != 0 or left < 0:
        problems.append(f"window_size={tuple(window)} (hfrl's sliding window is causal: use (left >= 0, 0))")
        return None, None
    skip = getattr(cfg, "window_attn_skip_freq", None)   # megatron.core.transformer.utils.is_layer_window_attention
    if skip is None:
        sliding = [True] * num_layers
    elif isinstance(skip, int):
        sliding = [(i + 1) % skip != 0 for i in range(num_layers)]
    else:
        sliding = [bool(s) for s in skip]
    return left + 1, tuple("sliding_attention" if s else "full_attention" for s in sliding)


def hfrl_model_config(model: Any, vocab_size: int | None = None, **token_ids: int | None) -> ModelConfig:
    """The hfrl ModelConfig of a megatron-core GPTModel (any pipeline stage: the same on every rank).

    ``vocab_size``: the true vocabulary (the tokenizer's); Megatron's ``model.vocab_size`` is usually
    padded past it. None takes Megatron's as is. ``token_ids``: pad/bos/eos_token_id for config.json.
    Pure (no collective): every rank raises alike. ValueError naming every field and value hfrl cannot
    represent (``FORWARD_FIELDS`` off their accepted values, unmappable windows, positions, splits).
    """
    cfg = model.config
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    for key, accepted in FORWARD_FIELDS.items():
        value = getattr(cfg, key, accepted[0])
        need(_accepted(value, accepted), f"{key}={_value(value)} (hfrl needs {' or '.join(map(_value, accepted))})")
    need(getattr(model, "position_embedding_type", None) == "rope",
         f"position_embedding_type={getattr(model, 'position_embedding_type', None)!r} (hfrl uses RoPE: 'rope')")
    need(getattr(model, "rotary_percent", 1.0) == 1.0,
         f"rotary_percent={getattr(model, 'rotary_percent', 1.0)} (hfrl rotates whole heads: 1.0)")
    need(not getattr(model, "rotary_scaling", False), "rope_scaling=True (Llama-3.1 RoPE scaling is not mapped yet)")
    rotary = getattr(model, "rotary_pos_emb", None)
    need(getattr(rotary, "seq_len_interpolation_factor", None) is None, "seq_len_interpolation_factor is set")
    need(cfg.softmax_scale is None or math.isclose(cfg.softmax_scale, cfg.kv_channels ** -0.5),
         f"softmax_scale={cfg.softmax_scale} (hfrl scales by 1/sqrt(head_dim): None)")
    pp = cfg.pipeline_model_parallel_size
    need(cfg.num_layers % pp == 0, f"num_layers={cfg.num_layers} is not a multiple of pipeline parallel {pp}")
    meg_vocab = model.vocab_size
    vocab_size = meg_vocab if vocab_size is None else vocab_size
    need(0 < vocab_size <= meg_vocab, f"vocab_size={vocab_size}: the true vocabulary must be 1..{meg_vocab} "
                                      "(GPTModel.vocab_size, the padded one)")
    num_heads = cfg.num_attention_heads
    head_dim = cfg.kv_channels
    qkv_bias, linear_bias = cfg.add_qkv_bias or cfg.add_bias_linear, cfg.add_bias_linear
    model_type = "qwen2" if qkv_bias and not linear_bias else "llama"
    need(model_type != "qwen2" or head_dim * num_heads == cfg.hidden_size,
         "add_qkv_bias without add_bias_linear (Qwen2) needs kv_channels * num_attention_heads == hidden_size")
    sliding_window, layer_types = _window(cfg, cfg.num_layers, problems)
    if sliding_window is not None:
        if model_type == "llama" and not qkv_bias and all(t == "sliding_attention" for t in layer_types):
            model_type = "mistral"   # config.json keeps a window only for Mistral and Qwen2
        elif model_type != "qwen2":
            problems.append(f"window_size={tuple(cfg.window_size)} with window_attn_skip_freq="
                            f"{cfg.window_attn_skip_freq} and add_bias_linear={cfg.add_bias_linear}: hfrl's model "
                            "folder can hold a window on every layer without biases (Mistral) or with q/k/v "
                            "biases only (Qwen2); use window_size=None or one of those")
    if problems:
        raise ValueError("this megatron-core GPTModel has features hfrl's decoder does not: "
                         + "; ".join(problems) + f". To embed hfrl, {FIX}")
    return ModelConfig(
        model_type=model_type, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_layers=cfg.num_layers, num_heads=num_heads,
        num_kv_heads=cfg.num_query_groups or num_heads, head_dim=head_dim, rms_norm_eps=cfg.layernorm_epsilon,
        rope_theta=float(model.rotary_base), max_position_embeddings=model.max_sequence_length,
        tie_word_embeddings=bool(model.share_embeddings_and_output_weights), attention_bias=qkv_bias,
        o_proj_bias=linear_bias, mlp_bias=linear_bias, sliding_window=sliding_window, layer_types=layer_types,
        pad_token_id=token_ids.get("pad_token_id"))


def stage_model(config: ModelConfig, layer_range: tuple[int, int], tp_group: Any, *, device: Any = "meta",
                model_cls: type[Decoder] = CausalLM) -> Decoder:
    """An empty tensor-parallel hfrl stage (meta device: shapes and names only; else uninitialised memory)."""
    with torch.device("meta"):
        model = model_cls(config, layer_range)
    parallelize_model(model, tp_group)
    return model if str(device) == "meta" else model.to_empty(device=device)


# ---- the local tensors -------------------------------------------------------------------------------


def megatron_name(hfrl_name: str, available: Mapping[str, Any] | None = None) -> str:
    """Megatron's name for a stage-local hfrl parameter name (TE's norm names when ``available`` has them)."""
    parts = hfrl_name.split(".")
    layer = parts[1] if parts[0] == "layers" else None
    key = ".".join(["layers", "{i}", *parts[2:]]) if layer is not None else hfrl_name
    if key not in MEGATRON_NAMES:
        raise KeyError(f"hfrl parameter {hfrl_name!r} has no Megatron counterpart in MEGATRON_NAMES")
    name = MEGATRON_NAMES[key]
    if available is not None and key in TE_NORM_NAMES and name.format(i=layer) not in available:
        name = TE_NORM_NAMES[key]
    return name.format(i=layer)


def relation(spec: ParamSpec) -> str:
    """How a rank's Megatron tensor relates to its hfrl one: "vocab", "qkv" or "same" (module docstring)."""
    if spec.shard == "vocab":
        return "vocab"
    if spec.shard == "column" and len(spec.hf_names) == 3:
        return "qkv"
    return "same"


def qkv_from_megatron(local: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """A rank's linear_qkv rows (weight or bias), query group by query group [q heads of the group; k; v],
    -> hfrl's [q_r; k_r; v_r]. Pure row regrouping: bit-exact."""
    groups, per_group = num_kv_heads // tp, num_heads // num_kv_heads
    x = local.reshape(groups, per_group + 2, head_dim, *local.shape[1:])  # (g, q/g + 2, hd, ...)
    q = x[:, :per_group].reshape(groups * per_group * head_dim, *local.shape[1:])
    k = x[:, per_group].reshape(groups * head_dim, *local.shape[1:])
    v = x[:, per_group + 1].reshape(groups * head_dim, *local.shape[1:])
    return torch.cat([q, k, v], dim=0)


def qkv_to_megatron(local: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """Inverse of ``qkv_from_megatron``."""
    groups, per_group = num_kv_heads // tp, num_heads // num_kv_heads
    rest = local.shape[1:]
    q, k, v = local.split([groups * per_group * head_dim, groups * head_dim, groups * head_dim], dim=0)
    x = torch.cat([q.reshape(groups, per_group, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
                   v.reshape(groups, 1, head_dim, *rest)], dim=1)  # (g, q/g + 2, hd, ...)
    return x.reshape(local.shape)


def vocab_row_moves(vocab_size: int, src_rows: int, dst_rows: int, tp: int) -> list[tuple[int, int, int, int]]:
    """(source rank, destination rank, first row, end row) of every block of the true vocabulary's rows
    [0, vocab_size) when TP rank r holds global rows [r * src_rows, (r+1) * src_rows) and must end up
    holding [r * dst_rows, (r+1) * dst_rows). Pure; the same list on every rank."""
    moves = []
    for src in range(tp):
        for dst in range(tp):
            lo = max(src * src_rows, dst * dst_rows)
            hi = min((src + 1) * src_rows, (dst + 1) * dst_rows, vocab_size)
            if lo < hi:
                moves.append((src, dst, lo, hi))
    return moves


def move_vocab_rows(local: torch.Tensor, out: torch.Tensor, vocab_size: int, group: Any) -> torch.Tensor:
    """Fill this rank's rows of ``out`` (its (dst_rows, ...) block) with the true-vocabulary rows that the
    ranks' ``local`` (src_rows, ...) blocks hold; rows past ``vocab_size`` keep what ``out`` had. Point to
    point over the TP ``group``, only between ranks whose blocks overlap; returns ``out``."""
    tp, me = tp_world_size(group), tp_rank(group)
    src_rows, dst_rows = local.shape[0], out.shape[0]
    ops, received = [], []
    for src, dst, lo, hi in vocab_row_moves(vocab_size, src_rows, dst_rows, tp):
        rows = slice(lo - src * src_rows, hi - src * src_rows)
        at = slice(lo - dst * dst_rows, hi - dst * dst_rows)
        if src == me and dst == me:
            out[at] = local[rows]
        elif src == me:
            ops.append(dist.P2POp(dist.isend, local[rows].contiguous(), dist.get_global_rank(group, dst), group))
        elif dst == me:
            buffer = torch.empty_like(out[at])
            ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, src), group))
            received.append((at, buffer))
    if tp > 1:  # every rank: batched P2P as a group's first collective needs all of them (NCCL's lazy init)
        dist.barrier(group=group)
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for at, buffer in received:
        out[at] = buffer
    return out


def _plan(config: ModelConfig, layer_range: tuple[int, int], tp_group: Any) -> tuple[list[ParamSpec], dict]:
    model = stage_model(config, layer_range, tp_group)
    return model_param_plan(model), {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _tied_here(config: ModelConfig, spec: ParamSpec, plan: list[ParamSpec]) -> bool:
    """A tied lm_head on a stage that also holds the embedding: it is the embedding, not a tensor of its own."""
    return (spec.name == "lm_head.weight" and config.tie_word_embeddings
            and any(s.name == "embed_tokens.weight" for s in plan))


def megatron_to_hfrl(megatron_state: Mapping[str, torch.Tensor], config: ModelConfig, layer_range: tuple[int, int],
                     tp_group: Any) -> dict[str, torch.Tensor]:
    """This rank's hfrl state dict (stage-local names, local TP shards: what ``stage_model`` holds) from its
    Megatron state dict. New tensors (clones); collective over ``tp_group`` for the vocab-parallel rows.

    Every weight of ``megatron_state`` must be used: an unmapped one (qk-norm, position embeddings, an
    adapter) raises instead of being dropped.
    """
    tp = tp_world_size(tp_group)
    plan, shapes = _plan(config, layer_range, tp_group)
    weights = {k: v for k, v in megatron_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    # The names first, before the vocab rows' collective: a stage-dependent mismatch raises here on its own.
    names = {spec.name: megatron_name(spec.name, weights) for spec in plan if not _tied_here(config, spec, plan)}
    missing = {ours: theirs for ours, theirs in names.items() if theirs not in weights}
    if missing:
        ours, theirs = next(iter(missing.items()))
        raise ValueError(f"the Megatron state dict has no {theirs!r} (for hfrl's {ours}; {len(missing)} missing); "
                         f"its weights: {sorted(weights)[:8]}...")
    unused = sorted(set(weights) - set(names.values()))
    if unused:
        raise ValueError(f"Megatron weights {unused[:6]} have no place in hfrl's decoder (MEGATRON_NAMES); "
                         "converting would drop them")
    out = {}
    for spec in plan:
        if _tied_here(config, spec, plan):
            out[spec.name] = out["embed_tokens.weight"]
            continue
        name = names[spec.name]
        local = weights[name].detach()
        kind = relation(spec)
        if kind == "qkv":
            local = qkv_from_megatron(local, config.num_heads, config.num_kv_heads, config.head_dim, tp)
        elif kind == "vocab":
            out_rows = padded_vocab_size(config.vocab_size, tp) // tp
            local = move_vocab_rows(local, local.new_zeros(out_rows, *local.shape[1:]), config.vocab_size, tp_group)
        else:
            local = local.clone()
        if tuple(local.shape) != shapes[spec.name]:
            raise ValueError(f"Megatron's {name} has local shape {tuple(weights[name].shape)}, which does not give "
                             f"hfrl's {spec.name} of shape {shapes[spec.name]} (tp={tp}, layers {layer_range})")
        out[spec.name] = local
    return out


def hfrl_to_megatron(hfrl_state: Mapping[str, torch.Tensor], megatron_state: Mapping[str, torch.Tensor],
                     config: ModelConfig, layer_range: tuple[int, int], tp_group: Any) -> dict[str, torch.Tensor]:
    """Inverse of ``megatron_to_hfrl``: new Megatron local tensors (in ``megatron_state``'s dtypes) from this
    rank's hfrl shards. ``megatron_state`` supplies the names and the padded vocab rows (>= V), which hfrl
    does not hold and which come back unchanged. Collective over ``tp_group`` for the vocab rows."""
    tp = tp_world_size(tp_group)
    plan, _ = _plan(config, layer_range, tp_group)
    weights = {k: v for k, v in megatron_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    out = {}
    for spec in plan:
        if _tied_here(config, spec, plan):
            continue
        name = megatron_name(spec.name, weights)
        target, local = weights[name].detach(), hfrl_state[spec.name].detach()
        kind = relation(spec)
        if kind == "qkv":
            local = qkv_to_megatron(local, config.num_heads, config.num_kv_heads, config.head_dim, tp)
        elif kind == "vocab":
            local = move_vocab_rows(local.to(target.dtype), target.clone(), config.vocab_size, tp_group)
        if local.shape != target.shape:
            raise ValueError(f"hfrl's {spec.name} of shape {tuple(hfrl_state[spec.name].shape)} does not fit "
                             f"Megatron's {name} of local shape {tuple(target.shape)}")
        out[name] = local.to(target.dtype, copy=True)
    return out


@torch.no_grad()
def copy_into_megatron(model: Any, hfrl_state: Mapping[str, torch.Tensor], config: ModelConfig,
                       layer_range: tuple[int, int], tp_group: Any) -> None:
    """Write this rank's hfrl shards into the GPTModel's own parameters (``param.copy_``: the same tensors,
    so optimizers and DDP buffers that hold them see the new values). Collective over ``tp_group``."""
    params = dict(model.named_parameters())
    new = hfrl_to_megatron(hfrl_state, model.state_dict(), config, layer_range, tp_group)
    for name, tensor in new.items():
        params[name].copy_(tensor)
