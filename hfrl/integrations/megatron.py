"""Embed hfrl in a running megatron-core job: its process groups, its GPT model, no restart.

    # every rank of the Megatron job (torchrun / srun), after initialize_model_parallel(tp, pp):
    from hfrl.integrations import megatron as hfrl_megatron

    config = load_config("rl.yaml", hfrl_megatron.layout_overrides())   # actor/ref layout = the job's
    summary = hfrl_megatron.train(gpt_model, config)   # RL steps; the trained weights are in gpt_model
    ...                                                # Megatron goes on with them

What `train` does, on every rank:

    1. adopt the groups   read parallel_state's tp, pp, dp and model-parallel groups, gather every
                          rank's memberships (one all_gather_object), check they are exactly the
                          groups hfrl's arithmetic builds for (pp, tp, dp) (``ParallelDims``: tp
                          fastest, then dp, then pp, Megatron's default order "tp-cp-ep-dp-pp");
                          hfrl then uses Megatron's group objects for those rank sets and creates
                          only what Megatron lacks (generation TP and micro-DP groups, hfrl's control
                          and watchdog groups)
    2. the architecture   ``hfrl_model_config``: GPTModel -> hfrl ModelConfig, written with the task's
                          tokenizer as config.json into run_dir/megatron_model (no weights there)
    3. the weights        ``megatron_to_hfrl``: this rank's Megatron shard -> its hfrl shard, in memory
                          (vocab rows move between TP ranks; nothing is gathered to one rank)
    4. RL                 ``hfrl.run`` of the configured trainer; actor and reference start from the
                          shards (``hfrl.workers.common.MODEL_SOURCES``) instead of a checkpoint
    5. hand back          ``copy_into_megatron``: the actor's trained shard -> the GPTModel's own
                          parameters, in place (cast to their dtype, with a warning when it differs
                          from hfrl's), then ``optimizer.reload_model_params()`` when ``train`` is
                          given Megatron's optimizer (its fp32 main params would otherwise overwrite
                          the RL weights on its next step)

The vocabulary: hfrl trains over the true one (the tokenizer's); Megatron's padding rows are neither
read nor updated (megatron_weights' docstring).

Refused on every rank alike, with the value and the fix. Before any collective (from the degrees
every rank reads locally): context parallelism, expert parallelism, virtual pipeline stages, an hfrl
config whose actor/reference layout is not the job's, architectures hfrl's decoder lacks (see
megatron_weights). Right after the one gather of memberships, before hfrl creates a group: a rank
order hfrl cannot express. The weight conversion's checks depend on the stage (which weights a rank
holds): every rank converts, then one all-reduce of a failure flag over the world
(``agree_on_success``) makes every rank raise before ``hfrl.run`` if any rank failed. megatron-core
is an optional extra (``pip install hfrl[megatron]``), imported when these functions run.

CUDA: nothing here needs it. Megatron's own forward does, in two places (RoPE moves its frequencies
to ``torch.cuda.current_device()``; attention forks the CUDA RNG tracker); ``cpu_forward`` bypasses
both for CPU-only runs (tests, the example). ``model_parallel_cuda_manual_seed`` needs CUDA too.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hfrl.distributed.env import collective_device
from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, RoleGroups, build_groups
from hfrl.integrations.megatron_weights import (
    MEGATRON_NAMES, TE_NORM_NAMES, copy_into_megatron, hfrl_model_config, hfrl_to_megatron, megatron_to_hfrl,
    qkv_from_megatron, qkv_to_megatron, stage_model, vocab_row_moves,
)

__all__ = ["ADOPTED_AXES", "AdoptedGroups", "MEGATRON_NAMES", "MegatronLayout", "MegatronSizes", "ModelSource",
           "TE_NORM_NAMES", "adopt_parallel_state", "agree_on_success", "check_config", "check_layout", "check_sizes",
           "copy_into_megatron", "cpu_forward", "hfrl_model_config", "hfrl_to_megatron", "layout_overrides",
           "megatron_to_hfrl", "model_folder", "qkv_from_megatron", "qkv_to_megatron", "read_parallel_state",
           "read_sizes", "stage_model", "train", "vocab_row_moves", "write_model_folder"]

ADOPTED_AXES = {
    "tp": "get_tensor_model_parallel_group",
    "pp": "get_pipeline_model_parallel_group",
    "dp": "get_data_parallel_group",
    "mp": "get_model_parallel_group",
}
"""hfrl axis -> the megatron.core.parallel_state getter of the group with the same members (cp = ep = 1)."""
MODEL_FOLDER = "megatron_model"
"""Under trainer.run_dir: config.json (+ tokenizer) of the adopted model; its weights stay in memory."""
ADOPTING_ROLES = ("actor", "ref", "critic")
"""Roles that start from the Megatron weights when their engine.model_path is not set separately."""


# ---- 1. the groups -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MegatronSizes:
    """A Megatron job's degrees, read locally and the same on every rank (``read_sizes``)."""

    world_size: int
    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class MegatronLayout(MegatronSizes):
    """The degrees and every group of each adopted axis, gathered from every rank (``read_parallel_state``)."""

    groups: dict[str, tuple[tuple[int, ...], ...]]
    """hfrl axis (ADOPTED_AXES) -> every Megatron group of it, global ranks in group-rank order,
    ordered by first member."""


def check_sizes(world_size: int, tp: int, pp: int, dp: int, cp: int = 1, ep: int = 1,
                vpp: int | None = None) -> None:
    """ValueError naming every degree hfrl cannot adopt. Pure: every rank reads the same sizes."""
    problems = []
    if cp != 1:
        problems.append(f"context_parallel_size={cp}: hfrl's models attend over whole sequences on every rank; "
                        "initialize_model_parallel with context_parallel_size=1 to embed hfrl")
    if ep != 1:
        problems.append(f"expert_model_parallel_size={ep}: hfrl has no mixture-of-experts layers; use 1")
    if vpp not in (None, 1):
        problems.append(f"virtual_pipeline_model_parallel_size={vpp}: hfrl's pipeline holds one chunk of layers "
                        "per stage; use None")
    if tp * pp * dp * cp != world_size:
        problems.append(f"tp={tp} x pp={pp} x dp={dp} x cp={cp} != {world_size} ranks")
    if problems:
        raise ValueError("hfrl cannot adopt this Megatron layout: " + "; ".join(problems))


def read_sizes() -> MegatronSizes:
    """The job's degrees from ``megatron.core.parallel_state``, checked (``check_sizes``). No collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    if not dist.is_initialized() or not mps.model_parallel_is_initialized():
        raise ValueError("megatron.core.parallel_state is not initialised: call "
                         "torch.distributed.init_process_group and parallel_state.initialize_model_parallel first")
    sizes = MegatronSizes(world_size=dist.get_world_size(), tp=mps.get_tensor_model_parallel_world_size(),
                          pp=mps.get_pipeline_model_parallel_world_size(), dp=mps.get_data_parallel_world_size())
    check_sizes(sizes.world_size, sizes.tp, sizes.pp, sizes.dp, cp=mps.get_context_parallel_world_size(),
                ep=mps.get_expert_model_parallel_world_size(),
                vpp=mps.get_virtual_pipeline_model_parallel_world_size())
    return sizes


def read_parallel_state() -> MegatronLayout:
    """The job's layout: the degrees (``read_sizes``, checked on every rank alike), then one
    all_gather_object over the default group of every rank's group memberships, so every rank sees every
    group (and checks them all alike, ``check_layout``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    sizes = read_sizes()
    own = {axis: tuple(dist.get_process_group_ranks(getattr(mps, getter)())) for axis, getter in ADOPTED_AXES.items()}
    everyone: list[Any] = [None] * sizes.world_size
    dist.all_gather_object(everyone, own)
    groups = {axis: tuple(sorted({ranks[axis] for ranks in everyone})) for axis in ADOPTED_AXES}
    return MegatronLayout(**sizes.__dict__, groups=groups)


def check_layout(layout: MegatronLayout, *, pg: int | None = None, tg: int | None = None,
                 grouping: str = "hybridflow") -> ParallelDims:
    """hfrl's ParallelDims for the job, after checking that every group hfrl's arithmetic builds for its
    (pp, tp, dp) has exactly the members, in the same order, of Megatron's. Pure; ValueError otherwise.
    (pg, tg): the generation layout, whose groups hfrl derives."""
    dims = ParallelDims.create(layout.world_size, pp=layout.pp, tp=layout.tp, dp=layout.dp, pg=pg, tg=tg,
                               grouping=grouping, where="the Megatron job's layout")
    for axis in ADOPTED_AXES:
        ours = tuple(tuple(group) for group in dims.groups(axis))   # the pool is the world: positions = ranks
        theirs = layout.groups[axis]
        if ours != theirs:
            raise ValueError(
                f"Megatron's {axis} groups {_some(theirs)} are not hfrl's {_some(ours)} for pp={layout.pp}, "
                f"tp={layout.tp}, dp={layout.dp}: hfrl numbers ranks tp fastest, then dp, then pp (Megatron's "
                "default order 'tp-cp-ep-dp-pp'); initialize_model_parallel with that order to embed hfrl")
    return dims


def _some(groups) -> str:
    return str([list(g) for g in groups[:3]])[:-1] + (", ...]" if len(groups) > 3 else "]")


@dataclass
class AdoptedGroups:
    """The job's layout, hfrl's dims for it, and this rank's Megatron group per adopted axis."""

    layout: MegatronLayout
    dims: ParallelDims
    own: dict[str, Any]
    rank: int

    def pairs(self) -> list[tuple[tuple[int, ...], Any]]:
        """(ranks, group) for every adopted rank set, the same sets in the same order on every rank: this
        rank's Megatron group where it is a member, NON_GROUP_MEMBER elsewhere (what new_group gave it),
        and the default group for the whole world. For ``hfrl.run(adopted_groups=...)``."""
        import torch.distributed as dist

        pairs, seen = [], set()
        for axis in ADOPTED_AXES:
            for ranks in self.layout.groups[axis]:
                if ranks not in seen:   # tp and mp coincide when pp = 1: Megatron's tp group serves both
                    seen.add(ranks)
                    pairs.append((ranks, self.own[axis] if self.rank in ranks else dist.GroupMember.NON_GROUP_MEMBER))
        world = tuple(range(self.layout.world_size))
        if world not in seen:
            pairs.append((world, dist.group.WORLD))
        return pairs

    def role_groups(self, role: str = "actor", cache: GroupCache | None = None) -> RoleGroups:
        """This rank's groups of a role on the whole job with the adopted layout, outside ``hfrl.run``:
        Megatron's objects for its axes, new groups only for the generation axes. Collective."""
        cache = GroupCache() if cache is None else cache
        for ranks, group in self.pairs():
            cache.adopt(ranks, group)
        return build_groups(role, self.dims, tuple(range(self.layout.world_size)), self.rank, cache)


def adopt_parallel_state(*, pg: int | None = None, tg: int | None = None,
                         grouping: str = "hybridflow") -> AdoptedGroups:
    """Read and check the running job's groups (``read_parallel_state`` then ``check_layout``). Collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    layout = read_parallel_state()
    dims = check_layout(layout, pg=pg, tg=tg, grouping=grouping)
    own = {axis: getattr(mps, getter)() for axis, getter in ADOPTED_AXES.items()}
    return AdoptedGroups(layout=layout, dims=dims, own=own, rank=dist.get_rank())


# ---- Megatron's forward on CPU -------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_forward() -> Iterator[None]:
    """Run a megatron-core GPTModel forward/backward on CPU inside this block (tests, the CPU example).

    Megatron assumes CUDA in two places of its forward: RoPE moves its frequencies to
    ``torch.cuda.current_device()`` (made to answer "cpu"), and attention forks the CUDA RNG tracker
    (made a no-op: with dropout 0 it draws nothing). Both are restored on exit. Not for GPU jobs.
    """
    import torch
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved_device, saved_fork = torch.cuda.current_device, tracker.__dict__.get("fork")
    torch.cuda.current_device = lambda: "cpu"
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.current_device = saved_device
        if saved_fork is None:
            del tracker.fork
        else:
            tracker.fork = saved_fork


# ---- 2-5. RL on the model --------------------------------------------------------------------------------


def layout_overrides(sizes: MegatronSizes | None = None, roles: tuple[str, ...] = ADOPTING_ROLES) -> list[str]:
    """``section.key=value`` overrides giving ``roles`` the job's (pp, tp, dp) on one colocated pool.
    No collective (the degrees are read locally)."""
    sizes = sizes if sizes is not None else read_sizes()
    keys = ["placement.mode=colocate"]
    for role in roles:
        keys += [f"roles.{role}.pp={sizes.pp}", f"roles.{role}.tp={sizes.tp}", f"roles.{role}.dp={sizes.dp}"]
    return keys


def check_config(config: Any, sizes: MegatronSizes) -> None:
    """ValueError unless ``config`` runs every role that reads the Megatron weights in the job's layout.
    Pure: every rank raises the same error."""
    if config.placement.mode != "colocate":
        raise ValueError(f"placement.mode={config.placement.mode!r}: the Megatron model lives on every rank of the "
                         "job, so hfrl's roles must be colocated on them; set placement.mode=colocate")
    if config.engine.model_path:
        raise ValueError(f"engine.model_path={config.engine.model_path!r}: the actor starts from the Megatron "
                         "model handed to train(); leave engine.model_path empty")
    for role in ADOPTING_ROLES:
        cfg = getattr(config.roles, role)
        if not cfg.enabled or "model_path" in cfg.engine:
            continue
        for axis in ("pp", "tp", "dp"):
            value, theirs = getattr(cfg, axis), getattr(sizes, axis)
            if value != theirs and not (axis == "dp" and value == -1):
                raise ValueError(
                    f"roles.{role}.{axis}={value} but the Megatron job has {axis}={theirs}: roles.{role} starts "
                    f"from the job's weights, in its layout (pp={sizes.pp}, tp={sizes.tp}, dp={sizes.dp}); set "
                    f"roles.{role}.{axis}={theirs} (hfrl.integrations.megatron.layout_overrides gives every key)")


class ModelSource:
    """This rank's hfrl shard of the Megatron model, handed to each role's engine as a new model
    (``hfrl.workers.common.MODEL_SOURCES``); keeps the models it built, by role, for the hand-back."""

    def __init__(self, state: dict, config: Any, layer_range: tuple[int, int], dims: ParallelDims):
        self.state, self.config, self.layer_range, self.dims = state, config, layer_range, dims
        self.models: dict[str, Any] = {}

    def __call__(self, ctx: Any, engine_cfg: Any) -> Any:
        import torch

        from hfrl.models.llama import CausalLM, ValueModel

        layout = (ctx.dims.pp, ctx.dims.tp, ctx.dims.dp)
        if layout != (self.dims.pp, self.dims.tp, self.dims.dp):
            raise ValueError(f"role {ctx.name!r} has layout pp, tp, dp = {layout} but reads the Megatron model, "
                             f"whose layout is {(self.dims.pp, self.dims.tp, self.dims.dp)}")
        state = dict(self.state)
        if engine_cfg.value_head:
            if not engine_cfg.init_missing_value_head:
                raise ValueError(f"role {ctx.name!r} needs a value head, which the Megatron GPT model lacks; give "
                                 f"roles.{ctx.name}.engine.model_path a value model")
            state.pop("lm_head.weight", None)
        device = next(iter(state.values())).device
        model = stage_model(self.config, self.layer_range, ctx.groups.groups["tp"], device=device,
                            model_cls=ValueModel if engine_cfg.value_head else CausalLM)
        if engine_cfg.value_head and model.score is not None:
            # As hfrl.models.parallelize.load_tp_weights starts a missing value head: seeded, replicated.
            weight = torch.empty(model.score.weight.shape)
            torch.nn.init.kaiming_uniform_(weight, a=5 ** 0.5, generator=torch.Generator().manual_seed(0))
            state["score.weight"] = weight
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        self.models[ctx.name] = model
        return model


def write_model_folder(folder: Path, model_config: Any, tokenizer: Any | None) -> None:
    """config.json (and the tokenizer) of the adopted model. Every rank writes its own copy and renames it
    into place (the same bytes; no rank waits for another, shared file system or not)."""
    hf = model_config.to_hf()
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(hf, key, getattr(tokenizer, key))
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        hf.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        folder.mkdir(parents=True, exist_ok=True)
        for file in os.listdir(tmp):
            os.replace(tmp / file, folder / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(config: Any) -> Any:
    """The task's tokenizer (written into the model folder), or None when data.tokenizer_path names one."""
    from hfrl.workers.rule_reward import load_tokenizer_for

    if config.data.tokenizer_path is not None:
        return None   # the trainer reads it from there itself
    if config.data.task is None:
        raise ValueError("data.tokenizer_path is empty: give the Megatron job's tokenizer folder (or use a built-in "
                         "data.task, whose tokenizer is written next to the model's config.json)")
    return load_tokenizer_for({"task": config.data.task})


def _stage_layers(model: Any, adopted: AdoptedGroups, num_layers: int) -> tuple[int, int]:
    """This rank's layer range, hfrl's partition of the layers, after checking Megatron's agrees."""
    from hfrl.distributed.pipeline_parallel import partition_layers

    layout, cfg = adopted.layout, model.config
    if (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) != (layout.tp, layout.pp):
        raise ValueError(f"the model's TransformerConfig says tp={cfg.tensor_model_parallel_size}, "
                         f"pp={cfg.pipeline_model_parallel_size} but parallel_state has tp={layout.tp}, pp={layout.pp}")
    stage = adopted.dims.coord(adopted.rank).pp
    layer_range = partition_layers(num_layers, layout.pp)[stage]
    layers = model.decoder.layers
    first = layers[0].layer_number - 1   # Megatron numbers layers globally from 1
    if (first, first + len(layers)) != layer_range:
        raise ValueError(f"pipeline stage {stage} holds Megatron layers [{first}, {first + len(layers)}), hfrl's "
                         f"stage would hold {list(layer_range)}")
    return layer_range


def agree_on_success(error: BaseException | None, what: str) -> None:
    """One all-reduce over the world (the default group) of every rank's failure flag: when any rank
    failed, every rank raises, a failing one its own ``error``, the others a ValueError naming the failing
    ranks. Lets a rank-dependent check (a pipeline stage's weights) fail the job alike on every rank,
    before any rank enters the next collective. Collective."""
    import torch
    import torch.distributed as dist

    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=collective_device())
    failed[dist.get_rank()] = int(error is not None)
    dist.all_reduce(failed)
    ranks = [rank for rank, flag in enumerate(failed.tolist()) if flag]
    if error is not None:
        raise error
    if ranks:
        raise ValueError(f"{what} failed on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
                         "(their own error says why); every rank stops here")


def _warn_dtype(model: Any, actor: Any) -> None:
    """A warning when the hand-back casts: hfrl trained in another dtype than Megatron's parameters."""
    import logging

    theirs = next((p.dtype for p in model.parameters()), None)
    ours = next((p.dtype for p in actor.parameters()), None)
    if theirs is not None and ours is not None and theirs != ours:
        logging.getLogger(__name__).warning(
            "hfrl trained the actor in %s; its weights are cast to Megatron's parameter dtype %s on the hand-back "
            "(the RL update loses the precision %s keeps beyond %s)", ours, theirs, ours, theirs)


def train(model: Any, config: Any, *, vocab_size: int | None = None, adopted: AdoptedGroups | None = None,
          optimizer: Any | None = None) -> dict[str, Any] | None:
    """Run ``config``'s RL algorithm on ``model`` (this rank's stage and TP shard of a megatron-core GPTModel,
    unwrapped from DDP/Float16Module) with the job's groups, then write the trained actor weights into
    ``model``'s parameters. Collective: every rank of the job calls it. Returns the run's summary on
    rank 0 and None elsewhere; an error on any rank ends every rank non-zero, as in ``hfrl.run``.

    ``config``: an ``hfrl.config.Config`` whose actor/ref (and critic, if it reads the actor's weights) have
    the job's layout (``layout_overrides``) and no engine.model_path. Its trainer.run_dir holds the run's
    metrics and hfrl's own checkpoints; trainer.resume is turned off (the job's weights are the start).
    ``vocab_size``: the true vocabulary, default the tokenizer's (hfrl trains over it alone: Megatron's
    padded vocabulary rows are left untouched, see megatron_weights).

    ``optimizer``: Megatron's optimizer of ``model``, if any. The parameters change in place, but
    Megatron's mixed-precision and distributed optimizers keep fp32 main copies of them that their next
    step would copy back over the RL weights; ``optimizer.reload_model_params()`` is called after the
    hand-back (when it has one) so they start from the RL weights instead. Without it, call that yourself.
    """
    import hfrl
    from hfrl.config import resolve_for_run
    from hfrl.data import load_tokenizer
    from hfrl.trainers import run_trainer
    from hfrl.trainers.job import check_job
    from hfrl.workers.common import model_source

    # Every check that needs no other rank first, so a bad job fails alike everywhere before a collective.
    check_config(config, adopted.layout if adopted is not None else read_sizes())
    tokenizer = _tokenizer(config)
    if vocab_size is None:
        vocab_size = len(tokenizer if tokenizer is not None else
                         load_tokenizer(config.data.tokenizer_path, config.data.trust_remote_code))
    hf_config = hfrl_model_config(model, vocab_size)
    actor = config.roles.actor
    adopted = adopted or adopt_parallel_state(pg=actor.pg, tg=actor.tg, grouping=actor.grouping)
    layer_range = _stage_layers(model, adopted, hf_config.num_layers)
    folder = model_folder(config.trainer.run_dir)
    write_model_folder(folder, hf_config, tokenizer)
    run_config = resolve_for_run(config, [f"engine.model_path={folder}", "trainer.resume=false"], training=True)
    check_job(run_config, handed_models=[folder])   # its weights come from `model`, not from the folder

    # The conversion's checks depend on the stage (its weights): agree on them before hfrl.run's groups.
    tp_group, state, error = adopted.own["tp"], None, None
    try:
        state = megatron_to_hfrl(model.state_dict(), hf_config, layer_range, tp_group)
    except Exception as err:   # noqa: BLE001 - re-raised by agree_on_success, on this rank
        error = err
    agree_on_success(error, "converting the Megatron weights (megatron_to_hfrl)")
    source = ModelSource(state, hf_config, layer_range, adopted.dims)
    with model_source(folder, source):
        summary = hfrl.run(run_trainer, run_config, config=run_config, adopted_groups=adopted.pairs())
    trained = source.models["actor"]
    _warn_dtype(model, trained)
    copy_into_megatron(model, trained.state_dict(), hf_config, layer_range, tp_group)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()   # its fp32 main params <- the RL weights
    return summary


def model_folder(run_dir: str | os.PathLike) -> Path:
    """run_dir/megatron_model, spelled as MODEL_SOURCES keys it (``model_source_key``: the real path)."""
    from hfrl.workers.common import model_source_key

    return Path(model_source_key(Path(run_dir) / MODEL_FOLDER))
