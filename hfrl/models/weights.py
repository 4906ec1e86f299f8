"""HF checkpoint <-> hfrl state dict, as plain data plus small pure functions.

The plan (``param_plan``) lists, for every hfrl parameter, the HF tensors it is made of and how it is
split under Megatron-style tensor parallelism. A ``ParamSpec`` reads:

    ParamSpec(name="layers.3.attn.qkv_proj.weight",
              hf_names=("model.layers.3.self_attn.q_proj.weight",
                        "model.layers.3.self_attn.k_proj.weight",
                        "model.layers.3.self_attn.v_proj.weight"),   # concatenated on dim 0
              hf_shapes=((nh*hd, H), (nkv*hd, H), (nkv*hd, H)),
              shard="column", unit=hd)

``shard`` is one of:

- "column": dim 0 split; *each fused part separately*, so TP rank i holds ``[q_i; k_i; v_i]``
  (``[gate_i; up_i]``). ``unit`` is the granularity of the split (head_dim for attention: whole heads).
- "row": dim 1 split (o_proj, down_proj weights).
- "vocab": dim 0 split over the vocabulary (embed_tokens, lm_head), ceil(V / tp) rows per rank, the
  last rank short when tp does not divide V (the TP layer pads it).
- "replicated": every rank holds all of it (norms, row-parallel biases, the value head).

``shard_slices(spec, tp_rank, tp_size)`` turns a spec into the slice of each HF tensor one rank
needs, ready for safetensors' ``get_slice``; concatenating the slices on dim 0 gives the local
tensor (``replicate_kv_heads=True``: k/v heads fewer than tp are replicated, vLLM style).
``shard_tensor``/``merge_shards`` do the same split and its inverse on in-memory hfrl tensors
(vocab shards zero-padded to ceil(V / tp) rows); ``hfrl.models.parallelize`` uses all three. Names in ``param_plan`` are global (``layers.{i}``); ``model_param_plan(model)`` renames them
to a pipeline stage's own ``layers.{i - layer_offset}`` and keeps only what the stage holds.

Tied embeddings: HF omits ``lm_head.weight``; the plan then reads ``lm_head.weight`` from
``model.embed_tokens.weight``, so a last pipeline stage without the embedding still gets it.
Value heads load from ``...ForSequenceClassification`` checkpoints (num_labels=1, ``score.weight``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM, Decoder, ValueModel

SHARD_KINDS = ("column", "row", "vocab", "replicated")
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    """hfrl state-dict name."""
    hf_names: tuple[str, ...]
    """HF tensors, concatenated on dim 0 in this order."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """Expected shape of each HF tensor."""
    shard: str
    """One of SHARD_KINDS."""
    unit: int = 1
    """Column split granularity in rows (head_dim for q/k/v)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(s[0] for s in self.hf_shapes), *self.hf_shapes[0][1:])


def param_plan(config: ModelConfig, value_head: bool = False) -> list[ParamSpec]:
    """Every parameter of the full model (global layer names), in state-dict order."""
    H, V, I, hd = config.hidden_size, config.vocab_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_heads * hd, config.num_kv_heads * hd
    plan = [ParamSpec("embed_tokens.weight", ("model.embed_tokens.weight",), ((V, H),), "vocab")]
    for i in range(config.num_layers):
        hf, qkv = f"model.layers.{i}.", ("q_proj", "k_proj", "v_proj")
        hf_attn, hf_mlp = hf + "self_attn.", hf + "mlp."
        plan += [
            ParamSpec(f"layers.{i}.attn_norm.weight", (hf + "input_layernorm.weight",), ((H,),), "replicated"),
            ParamSpec(f"layers.{i}.attn.qkv_proj.weight", tuple(f"{hf_attn}{p}.weight" for p in qkv),
                      ((q_rows, H), (kv_rows, H), (kv_rows, H)), "column", unit=hd),
        ]
        if config.attention_bias:
            plan.append(ParamSpec(f"layers.{i}.attn.qkv_proj.bias", tuple(f"{hf_attn}{p}.bias" for p in qkv),
                                  ((q_rows,), (kv_rows,), (kv_rows,)), "column", unit=hd))
        plan.append(ParamSpec(f"layers.{i}.attn.o_proj.weight", (hf_attn + "o_proj.weight",), ((H, q_rows),), "row"))
        if config.o_proj_bias:
            plan.append(ParamSpec(f"layers.{i}.attn.o_proj.bias", (hf_attn + "o_proj.bias",), ((H,),), "replicated"))
        plan += [
            ParamSpec(f"layers.{i}.mlp_norm.weight", (hf + "post_attention_layernorm.weight",), ((H,),),
                      "replicated"),
            ParamSpec(f"layers.{i}.mlp.gate_up_proj.weight", (hf_mlp + "gate_proj.weight", hf_mlp + "up_proj.weight"),
                      ((I, H), (I, H)), "column"),
        ]
        if config.mlp_bias:
            plan.append(ParamSpec(f"layers.{i}.mlp.gate_up_proj.bias", (hf_mlp + "gate_proj.bias",
                                                                       hf_mlp + "up_proj.bias"), ((I,), (I,)), "column"))
        plan.append(ParamSpec(f"layers.{i}.mlp.down_proj.weight", (hf_mlp + "down_proj.weight",), ((H, I),), "row"))
        if config.mlp_bias:
            plan.append(ParamSpec(f"layers.{i}.mlp.down_proj.bias", (hf_mlp + "down_proj.bias",), ((H,),), "replicated"))
    plan.append(ParamSpec("norm.weight", ("model.norm.weight",), ((H,),), "replicated"))
    if value_head:
        plan.append(ParamSpec("score.weight", ("score.weight",), ((1, H),), "replicated"))
    else:
        source = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        plan.append(ParamSpec("lm_head.weight", (source,), ((V, H),), "vocab"))
    return plan


def model_param_plan(model: Decoder) -> list[ParamSpec]:
    """The plan of what ``model`` (possibly one pipeline stage) holds, under its own state-dict names."""
    full = param_plan(model.config, value_head=isinstance(model, ValueModel))
    own = set(model.state_dict().keys())
    plan = []
    for spec in full:
        match = re.match(r"layers\.(\d+)\.(.*)", spec.name)
        name = spec.name
        if match:
            name = f"layers.{int(match.group(1)) - model.layer_offset}.{match.group(2)}"
        if name in own:
            plan.append(dataclasses.replace(spec, name=name))
    return plan


def shard_slices(spec: ParamSpec, tp_rank: int, tp_size: int, *, replicate_kv_heads: bool = False
                 ) -> list[tuple[str, tuple[slice, ...]]]:
    """(HF name, index) pairs making up TP rank ``tp_rank``'s shard; concatenate the pieces on dim 0.

    ``replicate_kv_heads``: a column part with fewer blocks than ``tp_size`` (k/v of GQA with
    num_kv_heads < tp), tp being a multiple of them, is replicated: rank r takes block
    ``r // (tp_size // blocks)``, the kv head its query heads use. Off, such a part raises ValueError.
    """
    if spec.shard not in SHARD_KINDS:
        raise ValueError(f"{spec.name}: unknown shard kind {spec.shard!r}; expected one of {SHARD_KINDS}")
    if spec.shard == "replicated" or tp_size == 1:
        return [(n, tuple(slice(None) for _ in s)) for n, s in zip(spec.hf_names, spec.hf_shapes)]
    if spec.shard == "vocab":
        (name,), (shape,) = spec.hf_names, spec.hf_shapes
        per = math.ceil(shape[0] / tp_size)
        start = min(tp_rank * per, shape[0])  # tiny vocabularies: trailing ranks may hold only padding
        return [(name, (slice(start, min((tp_rank + 1) * per, shape[0])),))]
    dim = 0 if spec.shard == "column" else 1
    pieces = []
    for name, shape in zip(spec.hf_names, spec.hf_shapes):
        units = shape[dim] // spec.unit
        if replicate_kv_heads and dim == 0 and 0 < units < tp_size and tp_size % units == 0:
            block = tp_rank // (tp_size // units)
            rows = slice(block * spec.unit, (block + 1) * spec.unit)
            pieces.append((name, (rows, *[slice(None)] * (len(shape) - 1))))
            continue
        if units % tp_size:
            raise ValueError(f"{spec.name}: {name} has {units} blocks of {spec.unit} along dim {dim}, "
                             f"not divisible by tp={tp_size} (for q/k/v: heads must divide evenly)")
        per = shape[dim] // tp_size
        index = [slice(None)] * len(shape)
        index[dim] = slice(tp_rank * per, (tp_rank + 1) * per)
        pieces.append((name, tuple(index)))
    return pieces


def _part_replicas(spec: ParamSpec, part: int, tp_size: int, replicate_kv_heads: bool) -> int:
    """How many TP ranks hold the same block of fused part ``part`` of a column spec (1 unless replicated)."""
    units = spec.hf_shapes[part][0] // spec.unit
    if replicate_kv_heads and spec.shard == "column" and 0 < units < tp_size and tp_size % units == 0:
        return tp_size // units
    return 1


def shard_tensor(spec: ParamSpec, full: torch.Tensor, tp_rank: int, tp_size: int, *,
                 replicate_kv_heads: bool = False) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of the full hfrl tensor ``full`` (what ``shard_slices`` reads from HF).

    Vocab shards are zero-padded to ``ceil(V / tp)`` rows, so every rank's shard has the same shape.
    """
    if tuple(full.shape) != spec.shape:
        raise ValueError(f"{spec.name} has shape {tuple(full.shape)}, expected {spec.shape}")
    parts = dict(zip(spec.hf_names, full.split([s[0] for s in spec.hf_shapes], dim=0)))
    pieces = shard_slices(spec, tp_rank, tp_size, replicate_kv_heads=replicate_kv_heads)
    local = torch.cat([parts[name][index] for name, index in pieces], dim=0)
    if spec.shard == "vocab":
        local = pad_rows(local, math.ceil(spec.shape[0] / tp_size))
    return local


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` rows (the padding of a vocab shard)."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])], dim=0)


def merge_shards(spec: ParamSpec, shards: list[torch.Tensor], *, replicate_kv_heads: bool = False) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full (unpadded) hfrl tensor from every TP rank's shard, in rank order."""
    tp_size = len(shards)
    if spec.shard == "replicated" or tp_size == 1:
        return shards[0][:spec.shape[0]] if spec.shard == "vocab" else shards[0]
    if spec.shard == "vocab":
        return torch.cat(shards, dim=0)[:spec.shape[0]]
    if spec.shard == "row":
        return torch.cat(shards, dim=1)
    # column: each rank holds [part0_r; part1_r; ...]; regroup part by part
    sizes = [[index[0].stop - index[0].start for _, index in shard_slices(spec, r, tp_size,
                                                                          replicate_kv_heads=replicate_kv_heads)]
             for r in range(tp_size)]
    per_rank = [shard.split(size, dim=0) for shard, size in zip(shards, sizes)]
    merged = []
    for part in range(len(spec.hf_names)):
        replicas = _part_replicas(spec, part, tp_size, replicate_kv_heads)
        merged += [per_rank[r][part] for r in range(0, tp_size, replicas)]  # one copy of each block
    return torch.cat(merged, dim=0)


# ---- reading and converting ------------------------------------------------------------------------


def _checkpoint_files(path: str | os.PathLike) -> dict[str, list[str] | None]:
    """{safetensors file: tensor names in it (None = all)}; raises naming any missing file."""
    single, index = os.path.join(path, SAFE_WEIGHTS_NAME), os.path.join(path, SAFE_INDEX_NAME)
    if os.path.isfile(single):
        return {single: None}
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} "
                                "(hfrl reads safetensors checkpoints only)")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a JSON {type(weight_map).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with a \"weight_map\" object of "
                         f"tensor name -> file): {type(err).__name__}: {err}") from err
    files: dict[str, list[str] | None] = {}
    for name, file in weight_map.items():
        files.setdefault(os.path.join(path, file), []).append(name)
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"shard {file} listed in {index} is missing")
    return files


@contextlib.contextmanager
def open_safetensors(file: str) -> Iterator[Any]:
    """``safe_open(file)``, with a ValueError naming ``file`` if it is empty, truncated or not safetensors.

    (safetensors checks at open that the header parses and that its tensors cover the file exactly.)
    """
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}): it is empty, truncated or "
                         "not safetensors at all; copy or save it again") from err
    with handle as f:
        yield f


@dataclass(frozen=True)
class TensorEntry:
    """Where a checkpoint tensor lives and what its header says (read without loading any data)."""

    file: str
    dtype: str
    """safetensors dtype name: "F32", "BF16", "I64", ..."""
    shape: tuple[int, ...]


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """{HF tensor name: TensorEntry} of a checkpoint folder, from the headers of all its files.

    Every file is opened (headers only), so an unreadable one is named here, before any load.
    """
    out = {}
    for file, listed in _checkpoint_files(path).items():
        with open_safetensors(file) as f:
            keys = set(f.keys())
            absent = sorted(set(listed or ()) - keys)
            if absent:
                raise ValueError(f"{file} lacks tensors {absent[:5]} that {SAFE_INDEX_NAME} places in it; "
                                 "the index and the shards do not belong together")
            for name in sorted(keys if listed is None else listed):
                tensor_slice = f.get_slice(name)
                out[name] = TensorEntry(file, tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()))
    return out


def tensor_files(path: str | os.PathLike) -> dict[str, str]:
    """{HF tensor name: safetensors file holding it} of a checkpoint folder (reads headers only)."""
    return {name: entry.file for name, entry in inspect_checkpoint(path).items()}


IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|lm_head\.weight|score\.(weight|bias)")
"""Tensors a HF checkpoint may hold beyond the model's: the RoPE buffer older transformers saved, a
tied lm_head saved anyway (HF ignores it too), and the head of the other kind of model (a causal LM
loaded from a reward checkpoint ignores ``score``, a value model started from an actor ``lm_head``)."""


def check_checkpoint(path: str | os.PathLike, config: ModelConfig, value_head: bool = False) -> dict[str, str]:
    """Refuse a checkpoint whose tensors do not fit the model ``config`` describes; {name: file} if they do.

    Headers only: every file readable, no model tensor the config does not use (a checkpoint with
    more layers than ``num_hidden_layers``, say, would otherwise load with the extra layers
    silently dropped), every model weight floating point. Values are checked as they are loaded
    (``check_finite``). Missing tensors and wrong shapes are reported by the loaders.
    """
    entries = inspect_checkpoint(path)
    expected = {name for spec in param_plan(config, value_head) for name in spec.hf_names}
    unexpected = [name for name in entries if name not in expected and not IGNORED_HF_TENSORS.fullmatch(name)]
    if unexpected:
        by_file: dict[str, list[str]] = {}
        for name in unexpected:
            by_file.setdefault(entries[name].file, []).append(name)
        listing = "; ".join(f"{file}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                            for file, names in by_file.items())
        raise ValueError(f"{listing}: {len(unexpected)} tensors that the model {os.path.join(path, 'config.json')} "
                         f"describes (num_hidden_layers={config.num_layers}, "
                         f"{'value head' if value_head else 'causal LM'}) does not use; the checkpoint holds more "
                         "than its config says (more layers?). Fix config.json or remove those tensors")
    for name in sorted(expected & entries.keys()):
        entry = entries[name]
        if not entry.dtype.startswith(("F", "BF")):
            raise ValueError(f"{entry.file}: tensor {name} has dtype {entry.dtype}; model weights must be floating "
                             "point (F32, BF16, F16, ...). The file is corrupt or not these model's weights")
    return {name: entry.file for name, entry in entries.items()}


def check_finite(tensor: torch.Tensor, name: str, file: str) -> torch.Tensor:
    """``tensor`` (read from ``file`` as ``name``), or a ValueError if it holds NaN or inf."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise ValueError(f"{file}: tensor {name} holds {int((~finite).sum())} non-finite values (NaN or inf) "
                         f"out of {tensor.numel()}; the checkpoint is corrupt or comes from a diverged run")
    return tensor


def load_hf_state_dict(path: str | os.PathLike, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a HF safetensors checkpoint folder (single file or sharded index); only ``names`` if given.

    Each tensor is checked to be finite as it is read (ValueError naming file and tensor).
    """
    out = {}
    for file, file_names in _checkpoint_files(path).items():
        if names is not None and file_names is not None and names.isdisjoint(file_names):
            continue  # a shard holding nothing this caller needs (e.g. another pipeline stage's layers)
        with open_safetensors(file) as f:
            for name in f.keys():
                if names is None or name in names:
                    out[name] = check_finite(f.get_tensor(name), name, file)
    return out


def hf_to_hfrl(hf_sd: dict[str, torch.Tensor], config: ModelConfig, value_head: bool = False,
               plan: list[ParamSpec] | None = None) -> dict[str, torch.Tensor]:
    """HF state dict -> hfrl state dict (fusing q/k/v and gate/up), checking every shape."""
    sd = {}
    for spec in plan if plan is not None else param_plan(config, value_head):
        parts = []
        for name, expected in zip(spec.hf_names, spec.hf_shapes):
            if name not in hf_sd:
                raise ValueError(f"checkpoint has no tensor {name} (needed for {spec.name})")
            if tuple(hf_sd[name].shape) != expected:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(hf_sd[name].shape)} but the config "
                                 f"expects {expected}; does config.json belong to these weights?")
            parts.append(hf_sd[name])
        sd[spec.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return sd


def hfrl_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig, value_head: bool = False,
               plan: list[ParamSpec] | None = None) -> dict[str, torch.Tensor]:
    """hfrl state dict -> HF state dict (views into ``sd``); a tied lm_head is left out, as HF does."""
    hf_sd = {}
    for spec in plan if plan is not None else param_plan(config, value_head):
        tensor = sd[spec.name]
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{spec.name} has shape {tuple(tensor.shape)}, expected {spec.shape}")
        pieces = tensor.split([s[0] for s in spec.hf_shapes], dim=0)
        for name, piece in zip(spec.hf_names, pieces):
            hf_sd.setdefault(name, piece)  # tied lm_head maps onto embed_tokens: keep the first
    return hf_sd


# ---- models ----------------------------------------------------------------------------------------


def load_hf_weights(model: Decoder, path: str | os.PathLike, init_missing_value_head: bool = False) -> None:
    """Load a HF checkpoint into ``model`` (a full model or one pipeline stage), reading only its tensors."""
    plan = model_param_plan(model)
    check_checkpoint(path, model.config, isinstance(model, ValueModel))
    hf_sd = load_hf_state_dict(path, names={n for spec in plan for n in spec.hf_names})
    missing_head = isinstance(model, ValueModel) and model.score is not None and "score.weight" not in hf_sd
    if missing_head and init_missing_value_head:
        plan = [spec for spec in plan if spec.name != "score.weight"]
        model.score.reset_parameters()
    elif missing_head:
        raise ValueError(f"{path} has no score.weight (not a ...ForSequenceClassification checkpoint); pass "
                         "init_missing_value_head=True to start the value head from random weights")
    sd = hf_to_hfrl(hf_sd, model.config, plan=plan)
    model.tie_weights()
    model.load_state_dict(sd, strict=not missing_head)


def from_pretrained(path: str | os.PathLike, value_head: bool = False, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", layer_range: tuple[int, int] | None = None,
                    init_missing_value_head: bool = False) -> CausalLM | ValueModel:
    """Build a CausalLM (or ValueModel) from a local HF checkpoint folder, without a random init pass."""
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):
        model = (ValueModel if value_head else CausalLM)(config, layer_range)
    model.to_empty(device=device)
    load_hf_weights(model, path, init_missing_value_head)
    return model.to(dtype)


def save_pretrained(model: Decoder, path: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers' from_pretrained loads.

    Atomic: everything is written into a temp folder next to ``path``, which is renamed to ``path``;
    if ``path`` exists, each file is moved in with ``os.replace`` and other files there are kept.
    """
    if model.layer_offset != 0 or model.norm is None or not model.has_head or model.embed_tokens is None:
        raise ValueError("save_pretrained needs the full model, not a pipeline stage; gather the stages first")
    value_head = isinstance(model, ValueModel)
    config = model.config
    hf_sd = hfrl_to_hf(model.state_dict(), config, value_head)
    # clone: split views share storage, which safetensors refuses to write
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in hf_sd.items()}
    hf_config = config.to_hf()
    hf_config.architectures = [config.hf_architecture(value_head)]
    if value_head:
        hf_config.num_labels = 1
    setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", next(iter(tensors.values())).dtype)

    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        hf_config.to_json_file(os.path.join(tmp, "config.json"))
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: str, path: str) -> None:
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    for file in os.listdir(tmp):
        os.replace(os.path.join(tmp, file), os.path.join(path, file))
    index = os.path.join(path, SAFE_INDEX_NAME)
    if os.path.isfile(index):  # an older sharded save: its index would describe stale weights
        with open(index) as f:
            stale = set(json.load(f)["weight_map"].values()) - {SAFE_WEIGHTS_NAME}
        for file in [*stale, SAFE_INDEX_NAME]:
            if os.path.isfile(os.path.join(path, file)):
                os.remove(os.path.join(path, file))
