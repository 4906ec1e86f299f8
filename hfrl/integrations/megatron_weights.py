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

``hfrl_model_config`` reads the architecture off a GPTModel and refuses, naming every one, the
features hfrl's Llama-family decoder does not have (MoE, MLA, qk-norm, LayerNorm, non-gated MLPs,
learned positions, interleaved or scaled RoPE, uneven pipeline splits, ...).
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


def hfrl_model_config(model: Any, vocab_size: int | None = None, **token_ids: int | None) -> ModelConfig:
    """The hfrl ModelConfig of a megatron-core GPTModel (any pipeline stage: the same on every rank).

    ``vocab_size``: the true vocabulary (the tokenizer's); Megatron's ``model.vocab_size`` is usually
    padded past it. None takes Megatron's as is. ``token_ids``: pad/bos/eos_token_id for config.json.
    ValueError listing every feature hfrl cannot represent.
    """
    cfg = model.config
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(getattr(model, "position_embedding_type", None) == "rope",
         f"position_embedding_type={getattr(model, 'position_embedding_type', None)!r} (hfrl uses RoPE: 'rope')")
    need(getattr(model, "rotary_percent", 1.0) == 1.0, f"rotary_percent={model.rotary_percent} (hfrl rotates whole heads: 1.0)")
    need(not getattr(model, "rotary_scaling", False), "rope_scaling=True (Llama-3.1 RoPE scaling is not mapped yet)")
    rotary = getattr(model, "rotary_pos_emb", None)
    need(getattr(rotary, "seq_len_interpolation_factor", None) is None, "seq_len_interpolation_factor is set")
    need(not cfg.rotary_interleaved, "rotary_interleaved=True (hfrl rotates halves, as HF Llama does)")
    need(cfg.normalization == "RMSNorm", f"normalization={cfg.normalization!r} (hfrl uses 'RMSNorm')")
    need(not cfg.layernorm_zero_centered_gamma, "layernorm_zero_centered_gamma=True")
    need(cfg.gated_linear_unit and cfg.activation_func is F.silu,
         "the MLP is not SwiGLU (needs gated_linear_unit=True, activation_func=F.silu)")
    need(not cfg.qk_layernorm, "qk_layernorm=True")
    need(not cfg.multi_latent_attention, "multi_latent_attention=True")
    need(not cfg.num_moe_experts, f"num_moe_experts={cfg.num_moe_experts} (hfrl has no MoE layers)")
    need(not getattr(cfg, "mtp_num_layers", None), f"mtp_num_layers={getattr(cfg, 'mtp_num_layers', None)}")
    need(not cfg.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm=True")
    need(cfg.softmax_scale is None or math.isclose(cfg.softmax_scale, cfg.kv_channels ** -0.5),
         f"softmax_scale={cfg.softmax_scale} (hfrl scales by 1/sqrt(head_dim))")
    for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout"):
        need(getattr(cfg, key, None) is None, f"{key}={getattr(cfg, key, None)} (hfrl splits layers evenly)")
    for key in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        need(not getattr(cfg, key, False), f"{key}=True (hfrl splits layers evenly)")
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
    if problems:
        raise ValueError("this megatron-core GPTModel has features hfrl's decoder does not: "
                         + "; ".join(problems) + ". Build the model Llama-style (RMSNorm, SwiGLU, RoPE) to embed hfrl")
    return ModelConfig(
        model_type=model_type, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_layers=cfg.num_layers, num_heads=num_heads,
        num_kv_heads=cfg.num_query_groups or num_heads, head_dim=head_dim, rms_norm_eps=cfg.layernorm_epsilon,
        rope_theta=float(model.rotary_base), max_position_embeddings=model.max_sequence_length,
        tie_word_embeddings=bool(model.share_embeddings_and_output_weights), attention_bias=qkv_bias,
        o_proj_bias=linear_bias, mlp_bias=linear_bias, pad_token_id=token_ids.get("pad_token_id"))


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
    out, used = {}, set()
    for spec in plan:
        if _tied_here(config, spec, plan):
            out[spec.name] = out["embed_tokens.weight"]
            continue
        name = megatron_name(spec.name, weights)
        if name not in weights:
            raise ValueError(f"the Megatron state dict has no {name!r} (for hfrl's {spec.name}); its weights: "
                             f"{sorted(weights)[:8]}...")
        used.add(name)
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
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"Megatron weights {unused[:6]} have no place in hfrl's decoder (MEGATRON_NAMES); "
                         "converting would drop them")
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
