"""What the train -> generate transition moves: pure arithmetic over the layouts, the same on every rank.

Every rank can compute what every other rank holds (its stage's layers, its TP shard's shapes) from
the model config and ``ParallelDims`` alone, so the send and receive layouts of every all-gather are
known on all ranks without a message. Names are global (``layers.{i}...``, see hfrl.models.weights).

- ``GenSpec``: one tensor of a generation stage's model: the parameter spec, the training stage that
  holds it, and its name inside the generation model (layers renumbered from the stage's first).
- ``generation_specs``: the tensors of generation stage ``gen_pp``. Generation stage g is the union
  of training stages [g*sp, (g+1)*sp) (sp = pp / pg); a tied lm_head is left out when the embedding
  is in the same stage (the generation model ties them).
- ``training_specs``: what one training stage holds, in its send order (a tied lm_head once).
- ``shard_shape``: the local shape of a spec on training TP rank r of tp.
- ``buckets``: consecutive generation specs grouped to about ``bucket_bytes``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.distributed.pipeline_parallel import partition_layers
from hfrl.models.config import ModelConfig
from hfrl.models.weights import ParamSpec, merge_shards, param_plan, shard_slices, shard_tensor

_LAYER = re.compile(r"layers\.(\d+)\.(.*)")


@dataclass(frozen=True)
class GenSpec:
    spec: ParamSpec
    stage: int
    """Training pipeline stage holding this tensor."""
    local_name: str
    """Name inside the generation stage's model."""

    @property
    def sharded(self) -> bool:
        return self.spec.shard != "replicated"


def layer_of(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def stage_of(spec: ParamSpec, stages: list[tuple[int, int]]) -> int:
    """The training stage holding ``spec``: its layer's; the embedding on the first, norm and head on the last."""
    layer = layer_of(spec.name)
    if layer is None:
        return 0 if spec.name.startswith("embed_tokens") else len(stages) - 1
    return next(s for s, (lo, hi) in enumerate(stages) if lo <= layer < hi)


def generation_range(config: ModelConfig, dims: ParallelDims, gen_pp: int) -> tuple[int, int]:
    """Layers [lo, hi) of generation stage ``gen_pp``: the union of its sp training stages."""
    stages = partition_layers(config.num_layers, dims.pp)
    sp = dims.pp // dims.pg
    return stages[gen_pp * sp][0], stages[gen_pp * sp + sp - 1][1]


def _rename(spec: ParamSpec, offset: int) -> str:
    layer = layer_of(spec.name)
    return spec.name if layer is None else f"layers.{layer - offset}.{_LAYER.match(spec.name).group(2)}"


def generation_specs(config: ModelConfig, dims: ParallelDims, gen_pp: int) -> list[GenSpec]:
    """The tensors of generation stage ``gen_pp``'s model, in ``param_plan`` order."""
    stages = partition_layers(config.num_layers, dims.pp)
    lo, hi = generation_range(config, dims, gen_pp)
    has_embed, has_head = lo == 0, hi == config.num_layers
    out = []
    for spec in param_plan(config):
        layer = layer_of(spec.name)
        if layer is not None:
            keep = lo <= layer < hi
        elif spec.name.startswith("embed_tokens"):
            keep = has_embed
        else:  # norm, lm_head
            keep = has_head and not (spec.name == "lm_head.weight" and config.tie_word_embeddings and has_embed)
        if keep:
            out.append(GenSpec(spec, stage_of(spec, stages), _rename(spec, lo)))
    return out


def training_specs(config: ModelConfig, dims: ParallelDims, stage: int) -> list[GenSpec]:
    """What training stage ``stage`` holds, in send order; ``local_name`` is the stage model's name."""
    stages = partition_layers(config.num_layers, dims.pp)
    out = []
    for spec in param_plan(config):
        if stage_of(spec, stages) != stage:
            continue
        if spec.name == "lm_head.weight" and config.tie_word_embeddings and dims.pp == 1:
            continue  # the same parameter as the embedding
        out.append(GenSpec(spec, stage, _rename(spec, stages[stage][0])))
    return out


def shard_shape(spec: ParamSpec, tp_rank: int, tp: int) -> tuple[int, ...]:
    """Shape of training TP rank ``tp_rank``'s shard (vocab shards padded to ceil(V / tp) rows)."""
    if spec.shard == "replicated" or tp == 1:
        return spec.shape
    if spec.shard == "vocab":
        return (math.ceil(spec.shape[0] / tp), *spec.shape[1:])
    if spec.shard == "row":
        return (spec.shape[0], spec.shape[1] // tp)
    return (sum(stop - start for start, stop in part_rows(spec, tp_rank, tp)), *spec.shape[1:])


def part_rows(spec: ParamSpec, tp_rank: int, tp: int) -> list[tuple[int, int]]:
    """[start, stop) rows of each fused part (q, k, v or gate, up) that a column shard takes from it."""
    out = []
    for (_, index), shape in zip(shard_slices(spec, tp_rank, tp, replicate_kv_heads=True), spec.hf_shapes):
        start, stop, _ = index[0].indices(shape[0])
        out.append((start, stop))
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def buckets(specs: list[GenSpec], sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``specs`` grouped into all-gather buckets of about ``bucket_bytes`` (``sizes`` in bytes).

    With the generation stage spanning several training stages, each rank contributes only its own
    stage's tensors to a bucket, and the all-gather pads every contribution to the largest. So every
    stage's specs are cut into the same number of consecutive chunks of near-equal bytes, and bucket k
    is every stage's k-th chunk: contributions stay balanced to within about one spec. A spec larger
    than a chunk goes alone.
    """
    stages: dict[int, list[int]] = {}
    for i, gs in enumerate(specs):
        stages.setdefault(gs.stage, []).append(i)
    # no more buckets than the smallest stage has specs: every stage contributes to every bucket
    count = max(1, min(math.ceil(sum(sizes) / bucket_bytes), *(len(m) for m in stages.values())))
    chunks = []
    for members in stages.values():
        target = sum(sizes[i] for i in members) / count
        groups, current, filled = [], [], 0
        for i in members:
            if current and filled + sizes[i] / 2 > target * (len(groups) + 1) and len(groups) < count - 1:
                groups.append(current)
                current = []
            current.append(i)
            filled += sizes[i]
        groups.append(current)
        chunks.append(groups)
    return [[i for groups in chunks if k < len(groups) for i in groups[k]] for k in range(count)
            if any(k < len(groups) for groups in chunks)]


def dense_index(spec: ParamSpec, tp: int, offsets: list[int], gen_rank: int, tg: int) -> torch.Tensor:
    """Flat index map of generation TP rank ``gen_rank``'s shard (the standard tg layout) of ``spec``:
    element j takes gathered element ``out[j]``, -1 for vocab padding (left zero).

    ``offsets[r]`` is where training TP rank r's shard of ``spec`` starts in the gathered buffer (flat,
    row-major): the map is built by sharding index tensors exactly as the weights are sharded.
    """
    if spec.shard == "replicated":
        full = offsets[0] + torch.arange(numel(spec.shape), dtype=torch.int64).view(spec.shape)
    else:
        shards = [offsets[r] + torch.arange(numel(shard_shape(spec, r, tp)), dtype=torch.int64)
                  .view(shard_shape(spec, r, tp)) for r in range(tp)]
        full = merge_shards(spec, shards, replicate_kv_heads=True)
    if spec.shard == "replicated":
        return full.reshape(-1)
    return (shard_tensor(spec, full + 1, gen_rank, tg, replicate_kv_heads=True) - 1).reshape(-1)


def model_bytes_of(specs: list[GenSpec], tp: int, element_size: int) -> tuple[int, int]:
    """(sharded, replicated) bytes one training replica holds of ``specs``: the sharded tensors summed
    over its tp shards (vocab padding, and kv heads replicated over TP, included), replicated ones once.
    This is the M of the transition formulas (``accounting``)."""
    sharded = replicated = 0
    for gs in specs:
        if gs.sharded:
            sharded += sum(numel(shard_shape(gs.spec, r, tp)) for r in range(tp)) * element_size
        else:
            replicated += numel(gs.spec.shape) * element_size
    return sharded, replicated
