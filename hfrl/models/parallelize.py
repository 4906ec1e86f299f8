"""Apply Megatron-style tensor parallelism to an hfrl model from outside (the model files stay pure).

The plan is data: ``TP_PLAN`` maps module-name patterns to a parallel style, as torchtune does:

    embed_tokens            vocab_embedding   rows [r * V_pad/tp, (r+1) * V_pad/tp) of the padded vocab
    layers.*.attn.qkv_proj  colwise_qkv       local [q_r; k_r; v_r] (kv heads replicated if fewer than tp)
    layers.*.attn.o_proj    rowwise           input columns of the local heads, output all-reduced
    layers.*.mlp.gate_up_proj colwise         local [gate_r; up_r]
    layers.*.mlp.down_proj  rowwise
    lm_head                 vocab_head        column-parallel head: the model returns local logits (B, T, V_pad/tp)

Everything else (norms, row-parallel biases, the value head ``score``) stays replicated.

    model = tp_from_pretrained(path, groups.groups["tp"])     # reads only this rank's slices
    logits = model(input_ids)                                  # (B, T, V_pad/tp), padded columns -inf
    log_probs = vocab_parallel_log_probs(logits, labels, groups.groups["tp"])   # (B, T)
    save_tp_pretrained(model, groups.groups["tp"], out_dir)    # merged HF checkpoint from TP rank 0

This is the only file of hfrl.models that imports torch.distributed.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from hfrl.distributed.tensor_parallel import (
    ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
    _TPModule, check_head_split, tp_rank, tp_world_size,
)
from hfrl.models.config import ModelConfig
from hfrl.models.llama import Attention, CausalLM, Decoder, ValueModel
from hfrl.models.weights import (
    check_checkpoint, check_finite, merge_shards, model_param_plan, open_safetensors, pad_rows, save_pretrained,
    shard_slices, shard_tensor,
)

TP_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.attn.qkv_proj": "colwise_qkv",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.gate_up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}


def _kwargs(module: nn.Module) -> dict:
    weight = module.weight
    return dict(device=weight.device, dtype=weight.dtype)


STYLES: dict[str, Callable[[nn.Module, dist.ProcessGroup | None, ModelConfig], nn.Module]] = {
    "colwise": lambda m, group, config: ColumnParallelLinear(
        m.in_features, m.out_features, m.bias is not None, group, **_kwargs(m)),
    "colwise_qkv": lambda m, group, config: QKVParallelLinear(
        m.in_features, config.num_heads, config.num_kv_heads, config.head_dim, m.bias is not None, group,
        **_kwargs(m)),
    "rowwise": lambda m, group, config: RowParallelLinear(
        m.in_features, m.out_features, m.bias is not None, group, **_kwargs(m)),
    "vocab_embedding": lambda m, group, config: VocabParallelEmbedding(
        m.num_embeddings, m.embedding_dim, group, **_kwargs(m)),
    "vocab_head": lambda m, group, config: VocabParallelLMHead(m.in_features, m.out_features, group, **_kwargs(m)),
}
"""Parallel style -> builder of the TP module replacing a plain one (weights are copied separately)."""


def check_tp(config: ModelConfig, tp: int) -> None:
    """ValueError naming tp and the model's sizes unless ``tp`` can split this model."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got tp={tp}")
    check_head_split(config.num_heads, config.num_kv_heads, tp)
    if config.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={config.intermediate_size}; "
                         "choose a tp that divides it")


def _style_for(name: str, plan: dict[str, str]) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def parallelize_model(model: Decoder, tp_group: dist.ProcessGroup | None,
                      plan: dict[str, str] | None = None) -> Decoder:
    """Convert ``model`` (a full CausalLM/ValueModel or a pipeline stage) to tensor parallelism in place.

    Modules named in ``plan`` (default ``TP_PLAN``) become TP layers; attention head counts shrink to
    the local ones. Real weights are sliced to this rank's shard; a model on the meta device stays
    on it (load with ``load_tp_weights`` after ``to_empty``). Returns ``model``.
    """
    plan = TP_PLAN if plan is None else plan
    tp, rank = tp_world_size(tp_group), tp_rank(tp_group)
    check_tp(model.config, tp)
    if any(isinstance(m, _TPModule) for m in model.modules()):
        raise ValueError("model is already tensor-parallel; parallelize_model must be called once")
    specs = {spec.name: spec for spec in model_param_plan(model)}
    for name, module in list(model.named_modules()):
        style = _style_for(name, plan)
        if style is None:
            continue
        if style not in STYLES:
            raise ValueError(f"TP plan gives {name} the unknown style {style!r}; known: {sorted(STYLES)}")
        new = STYLES[style](module, tp_group, model.config)
        for param_name, param in new.named_parameters(recurse=False):
            old = getattr(module, param_name)
            param.requires_grad_(old.requires_grad)
            if not old.is_meta:
                local = shard_tensor(specs[f"{name}.{param_name}"], old.detach(), rank, tp, replicate_kv_heads=True)
                with torch.no_grad():
                    param.copy_(local)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.qkv_proj, QKVParallelLinear):
            module.num_heads = module.qkv_proj.local_num_heads
            module.num_kv_heads = module.qkv_proj.local_num_kv_heads
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the swap gave embed_tokens and a tied lm_head separate parameters
    return model


def load_tp_weights(model: Decoder, path: str | os.PathLike, tp_group: dist.ProcessGroup | None,
                    init_missing_value_head: bool = False) -> None:
    """Fill a parallelized ``model`` with this rank's slices of a HF checkpoint, read by ``get_slice``.

    No rank reads more than its own shard (plus the replicated tensors).
    """
    tp, rank = tp_world_size(tp_group), tp_rank(tp_group)
    files = check_checkpoint(path, model.config, isinstance(model, ValueModel))  # headers: same on every rank
    params = dict(model.named_parameters(remove_duplicate=False))  # tied: both names
    specs = model_param_plan(model)
    if isinstance(model, ValueModel) and model.score is not None and "score.weight" not in files:
        if not init_missing_value_head:
            raise ValueError(f"{path} has no score.weight (not a ...ForSequenceClassification checkpoint); pass "
                             "init_missing_value_head=True to start the value head from random weights")
        # Seeded, so every rank (TP and DP alike) starts from the same replicated head.
        with torch.no_grad():
            weight = torch.empty(model.score.weight.shape)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
            model.score.weight.copy_(weight)
        specs = [spec for spec in specs if spec.name != "score.weight"]
    with contextlib.ExitStack() as stack:
        handles = {}
        for spec in specs:
            pieces = []
            for name, index in shard_slices(spec, rank, tp, replicate_kv_heads=True):
                if name not in files:
                    raise ValueError(f"checkpoint {path} has no tensor {name} (needed for {spec.name})")
                if files[name] not in handles:
                    handles[files[name]] = stack.enter_context(open_safetensors(files[name]))
                tensor_slice = handles[files[name]].get_slice(name)
                expected = spec.hf_shapes[spec.hf_names.index(name)]
                if tuple(tensor_slice.get_shape()) != expected:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor_slice.get_shape())} but "
                                     f"the config expects {expected}; does config.json belong to these weights?")
                pieces.append(check_finite(tensor_slice[index], name, files[name]))  # this rank's slice
            local = torch.cat(pieces, dim=0)
            param = params[spec.name]
            if spec.shard == "vocab":
                local = pad_rows(local, param.shape[0])
            if local.shape != param.shape:
                raise ValueError(f"{spec.name}: slice of shape {tuple(local.shape)} for a local parameter of "
                                 f"shape {tuple(param.shape)} (tp={tp}, rank={rank})")
            with torch.no_grad():
                param.copy_(local)
    model.tie_weights()


def tp_from_pretrained(path: str | os.PathLike, tp_group: dist.ProcessGroup | None, value_head: bool = False, *,
                       layer_range: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", init_missing_value_head: bool = False
                       ) -> CausalLM | ValueModel:
    """A tensor-parallel CausalLM (or ValueModel) holding only this rank's shard of a local HF checkpoint.

    Built on the meta device, parallelized, then materialised and filled slice by slice: no rank ever
    holds the full model. ``layer_range`` builds one pipeline stage.
    """
    config = ModelConfig.from_pretrained(path)
    check_tp(config, tp_world_size(tp_group))  # before building anything: fails the same way on every rank
    with torch.device("meta"):
        model = (ValueModel if value_head else CausalLM)(config, layer_range)
    parallelize_model(model, tp_group)
    model.to(dtype).to_empty(device=device)
    load_tp_weights(model, path, tp_group, init_missing_value_head)
    return model


def gather_full_state_dict(model: Decoder, tp_group: dist.ProcessGroup | None,
                           state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The full (unpadded) hfrl state dict of a TP model, on every TP rank (one all-gather per sharded tensor).

    Names are the model's own (a pipeline stage keeps its local layer numbers). Replicated entries are
    the model's tensors, detached; sharded ones new tensors. ``state`` replaces ``model.state_dict()``
    with other per-parameter tensors of the same local shapes (e.g. ``{name: param.grad}``) to
    reassemble those instead. Collective over ``tp_group``.
    """
    tp = tp_world_size(tp_group)
    state = model.state_dict() if state is None else state
    merged: dict[int, torch.Tensor] = {}  # data_ptr -> full tensor: a tied lm_head is gathered once
    out = {}
    for spec in model_param_plan(model):
        local = state[spec.name]
        if spec.shard == "replicated" or tp == 1:
            out[spec.name] = merge_shards(spec, [local])
            continue
        key = local.data_ptr()
        if key not in merged:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
            merged[key] = merge_shards(spec, shards, replicate_kv_heads=True)
        out[spec.name] = merged[key]
    return out


def save_tp_pretrained(model: Decoder, tp_group: dist.ProcessGroup | None, path: str | os.PathLike) -> None:
    """Write a merged HF checkpoint (``save_pretrained``'s format) of a full TP model from TP rank 0.

    Collective over ``tp_group``; returns on every rank after the files are written.
    """
    if model.layer_offset != 0 or model.norm is None or not model.has_head or model.embed_tokens is None:
        raise ValueError("save_tp_pretrained needs the full model, not a pipeline stage; gather the stages first")
    state = gather_full_state_dict(model, tp_group)
    if tp_rank(tp_group) == 0:
        with torch.device("meta"):
            full = type(model)(model.config)
        full.load_state_dict(state, assign=True)
        full.tie_weights()
        save_pretrained(full, path)
    if tp_world_size(tp_group) > 1:
        dist.barrier(group=tp_group)
