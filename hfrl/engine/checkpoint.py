"""Checkpoints of a TrainEngine: merged HF exports and layout-independent training state.

``save_hf(engine, path)`` writes what ``transformers.AutoModelForCausalLM.from_pretrained`` (or
``...ForSequenceClassification``) loads: ``config.json``, ``model.safetensors.index.json`` and one
``model-0000s-of-0000p.safetensors`` per pipeline stage. Each stage's TP shards are gathered onto
its TP rank 0 of DP replica 0, which writes that stage's file; nothing is gathered across stages.

``save_checkpoint(engine, dir)`` / ``load_checkpoint(engine, dir)`` hold everything to resume:

    dir/meta.json                     format, version, step, layout (pp, tp, dp, zero_stage, dtype), file list
    dir/model/                        the weights: a HF checkpoint exactly as save_hf writes it
    dir/optim/stage-0000s.safetensors Adam moments per HF tensor: "exp_avg.<hf name>", "exp_avg_sq.<hf name>",
                                      and "master.<hf name>" (fp32 master weights) when training in bf16
    dir/trainer_state.pt              LR scheduler state, optimizer step count
    dir/rng/rank-0000i.pt             RNG states (torch, CUDA, python) per pool position

Weights and moments are stored as full tensors under HF names (global layer indices; q/k/v and
gate/up unfused), so they are layout-independent: loading reads only this rank's TP slices of its
own stage's tensors (safetensors ``get_slice``), under any (pp, tp, dp) and either ZeRO stage.
ZeRO-1 moments are all-gathered over DP before saving and re-sliced to the new DP shard on load.
RNG states are restored only under the same layout (they are per rank); otherwise a notice says so.

Both saves are atomic: ranks write into ``.<name>.tmp`` next to the target, the coordinator (pp,
tp, dp all 0) writes ``config.json`` or ``meta.json`` last (each by one rename: the completion
marker) and renames the folder into place, so a checkpoint is complete or absent. An old one at the
same path is replaced by two renames (old -> ``.<name>.old``, tmp -> path); a kill between them
leaves no folder at the path, so ``load_checkpoint`` then loads the newest complete one of
``.<name>.tmp`` and ``.<name>.old`` and the next save moves it back into place. A folder without
``meta.json`` or with a listed file missing is refused with an error naming it. Every function is
collective over the role. Each phase (prepare, write, publish; load) ends with a role-wide
agreement, so an error on one rank (a full disk, a missing file) is raised on every rank instead of
leaving the others waiting in the next collective.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hfrl.distributed.data_parallel import ZeroOneOptimizer, all_gather_flat, group_size_rank
from hfrl.distributed.pipeline_parallel import partition_layers
from hfrl.engine.train_engine import TrainEngine
from hfrl.models.config import ModelConfig
from hfrl.models.parallelize import load_tp_weights
from hfrl.models.weights import (
    SAFE_INDEX_NAME, ParamSpec, check_finite, hfrl_to_hf, model_param_plan, open_safetensors, pad_rows, param_plan,
    shard_slices,
)

logger = logging.getLogger(__name__)

FORMAT = "hfrl-train-state"
FORMAT_VERSION = 1
META_NAME = "meta.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


# ---- save_hf -----------------------------------------------------------------------------------------


def save_hf(engine: TrainEngine, path: str | os.PathLike) -> None:
    """Merged HF checkpoint of the engine's model (all stages, all TP shards) at ``path``. Collective.

    The folder is replaced atomically; files of an existing ``path`` that are not weights or the
    model config (a tokenizer, generation_config.json, a README) are carried over.
    """
    def finish(tmp: str) -> None:
        _carry_over_foreign_files(os.path.abspath(os.fspath(path)), tmp)
        _write_hf_index(engine, tmp)  # config.json last: it marks the folder complete

    _atomic_save(engine, path, lambda tmp: _write_hf_stage(engine, tmp), finish, is_complete=_hf_complete)


_MODEL_FILES = re.compile(r"(.*\.safetensors|.*\.bin|.*\.index\.json|config\.json)$")


def _carry_over_foreign_files(path: str, tmp: str) -> None:
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        source = os.path.join(path, name)
        if _MODEL_FILES.fullmatch(name) or os.path.exists(os.path.join(tmp, name)):
            continue
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(tmp, name))
        else:
            shutil.copy2(source, os.path.join(tmp, name))


def stage_plan(config: ModelConfig, value_head: bool, layer_range: tuple[int, int]) -> list[ParamSpec]:
    """The specs (global names) whose HF tensors the stage holding ``layer_range`` writes.

    A tied lm_head is left out: HF stores only ``model.embed_tokens.weight`` (written by stage 0).
    """
    start, end = layer_range
    plan = []
    for spec in param_plan(config, value_head):
        match = re.match(r"layers\.(\d+)\.", spec.name)
        if match:
            keep = start <= int(match.group(1)) < end
        elif spec.name == "embed_tokens.weight":
            keep = start == 0
        elif spec.name == "lm_head.weight" and config.tie_word_embeddings:
            keep = False
        else:  # norm, lm_head, score
            keep = end == config.num_layers
        if keep:
            plan.append(spec)
    return plan


def _stage_file(stage: int, num_stages: int) -> str:
    return f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"


def _stage_hf_tensors(engine: TrainEngine, state: dict[str, torch.Tensor] | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """This stage's HF tensors (from the model, or per-parameter ``state``), on TP rank 0; None elsewhere.

    Collective over TP; call on DP replica 0 only.
    """
    full = engine.stage_state_dict(state)
    if engine.tp_rank != 0:
        return None
    plan = stage_plan(engine.model_config, engine.cfg.value_head, engine.layer_range)
    hf = hfrl_to_hf(full, engine.model_config, plan=plan)
    # clone: split views share storage, which safetensors refuses to write
    return {name: t.detach().to("cpu", dtype or t.dtype, copy=True).contiguous() for name, t in hf.items()}


def _write_hf_stage(engine: TrainEngine, folder: str) -> None:
    if engine.dp_rank != 0:
        return
    tensors = _stage_hf_tensors(engine)
    if tensors is not None:
        save_file(tensors, os.path.join(folder, _stage_file(engine.pp_rank, engine.dims.pp)),
                  metadata={"format": "pt"})


def _write_hf_index(engine: TrainEngine, folder: str) -> None:
    """config.json and the index, from the plan alone (the coordinator knows every stage's names)."""
    config, value_head, pp = engine.model_config, engine.cfg.value_head, engine.dims.pp
    element_size = torch.empty((), dtype=engine.dtype).element_size()
    weight_map, total = {}, 0
    for stage, layer_range in enumerate(partition_layers(config.num_layers, pp)):
        for spec in stage_plan(config, value_head, layer_range):
            for name, shape in zip(spec.hf_names, spec.hf_shapes):
                weight_map[name] = _stage_file(stage, pp)
                total += element_size * int(torch.Size(shape).numel())
    _write_atomically(os.path.join(folder, SAFE_INDEX_NAME), lambda f: json.dump(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2))
    hf_config = config.to_hf()
    hf_config.architectures = [config.hf_architecture(value_head)]
    if value_head:
        hf_config.num_labels = 1
    setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", engine.dtype)
    _write_atomically(os.path.join(folder, "config.json"), lambda f: f.write(hf_config.to_json_string()))


def _hf_complete(folder: str) -> bool:
    """Whether a save_hf folder was finished: config.json (written last) and every indexed shard present."""
    try:
        with open(os.path.join(folder, SAFE_INDEX_NAME)) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    names = ["config.json", *shards]
    return all(os.path.isfile(os.path.join(folder, name)) for name in names)


# ---- training state: save ----------------------------------------------------------------------------


def save_checkpoint(engine: TrainEngine, path: str | os.PathLike) -> None:
    """Everything needed to resume (see the module docstring) at ``path``. Collective over the role."""
    def write(tmp: str) -> None:
        _write_hf_stage(engine, os.path.join(tmp, "model"))
        _write_optimizer_stage(engine, os.path.join(tmp, "optim"))
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank-{engine.pool_position:05d}.pt"))

    def finish(tmp: str) -> None:
        _write_hf_index(engine, os.path.join(tmp, "model"))
        torch.save({"scheduler": engine.scheduler.state_dict(), "optimizer_steps": _optimizer_steps(engine)},
                   os.path.join(tmp, "trainer_state.pt"))
        files = sorted(os.path.relpath(os.path.join(root, name), tmp)
                       for root, _, names in os.walk(tmp) for name in names)
        expected = _expected_files(engine.dims.pp, engine.dims.world_size)
        missing = sorted(set(expected) - set(files))
        if missing:
            raise RuntimeError(f"checkpoint files {missing} were not written; not publishing {path}")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": engine.step,
                "optimizer_steps": _optimizer_steps(engine), "layout": _layout(engine),
                "value_head": engine.cfg.value_head, "model_type": engine.model_config.model_type,
                "num_layers": engine.model_config.num_layers, "files": files}
        _write_atomically(os.path.join(tmp, META_NAME), lambda f: json.dump(meta, f, indent=2))  # last: the marker

    _atomic_save(engine, path, write, finish, subdirs=("model", "optim", "rng"), is_complete=_state_complete)


def _expected_files(pp: int, num_ranks: int) -> list[str]:
    files = ["model/config.json", f"model/{SAFE_INDEX_NAME}", "trainer_state.pt"]
    files += [f"model/{_stage_file(s, pp)}" for s in range(pp)]
    files += [f"optim/stage-{s:05d}.safetensors" for s in range(pp)]
    files += [f"rng/rank-{i:05d}.pt" for i in range(num_ranks)]
    return files


def _layout(engine: TrainEngine) -> dict[str, Any]:
    dims = engine.dims
    return {"pp": dims.pp, "tp": dims.tp, "dp": dims.dp, "zero_stage": engine.cfg.optim.zero_stage,
            "dtype": engine.cfg.dtype}


def _optimizer_steps(engine: TrainEngine) -> int:
    return int(engine.scheduler.last_epoch)  # the scheduler steps exactly when the optimizer does


def _param_names(engine: TrainEngine) -> dict[int, list[str]]:
    """id(parameter) -> its local names (a tied parameter has two at pp=1)."""
    names: dict[int, list[str]] = {}
    for name, p in engine.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _optimizer_tensors(engine: TrainEngine) -> dict[str, dict[int, torch.Tensor]]:
    """{kind: {id(param): local tensor}} for kind in exp_avg, exp_avg_sq (and master under bf16).

    ZeRO-1 shards are all-gathered over DP first (collective over DP, on every DP rank).
    """
    opt = engine.optimizer
    kinds = MOMENTS + (("master",) if engine.dtype != torch.float32 else ())
    out: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in kinds}
    if isinstance(opt, ZeroOneOptimizer):
        sources = {"exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq, "master": opt.master_shard}
        for kind in kinds:
            flat = sources[kind].contiguous()
            if opt.dp > 1:
                full = flat.new_empty(opt.shard_numel * opt.dp)
                all_gather_flat(full, flat, opt.dp_group)
                flat = full
            offset = 0
            for p in opt.params:
                out[kind][id(p)] = flat[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
        return out
    for p, master in zip(opt.model_params, opt.master_params):
        state = opt.state.get(master, {})
        for kind in MOMENTS:
            out[kind][id(p)] = state[kind] if kind in state else torch.zeros_like(master)
        if "master" in out:
            out["master"][id(p)] = master.detach()
    return out


def _write_optimizer_stage(engine: TrainEngine, folder: str) -> None:
    per_kind = _optimizer_tensors(engine)
    if engine.dp_rank != 0:
        return
    names = _param_names(engine)
    tensors = {}
    for kind, by_param in per_kind.items():
        state = {name: t for pid, t in by_param.items() for name in names[pid]}
        stage = _stage_hf_tensors(engine, state, dtype=torch.float32)
        if stage is not None:
            tensors.update({f"{kind}.{name}": t for name, t in stage.items()})
    if engine.tp_rank == 0:
        save_file(tensors, os.path.join(folder, f"stage-{engine.pp_rank:05d}.safetensors"),
                  metadata={"format": "pt"})


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


# ---- training state: load ----------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The folder holding the checkpoint published at ``path``.

    That is ``path`` itself, except after a save killed between the two renames that replace an
    existing checkpoint: then ``path`` is gone, the previous checkpoint is ``.<name>.old`` and the
    new one ``.<name>.tmp``, and the newest complete one of the two is returned (``.tmp`` unless it
    lacks its ``meta.json``, written last, or a file it lists). With neither complete, ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        return path
    for candidate in (_sibling(path, "tmp"), _sibling(path, "old")):
        if _state_complete(candidate):
            logger.warning("%s is missing: a save was interrupted while replacing it; using the complete "
                           "checkpoint %s (the next save to %s moves it back into place)", path, candidate, path)
            return candidate
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a training checkpoint, after checking it is complete (every listed file present).

    ``path`` is read as given; ``load_checkpoint`` first resolves it with ``resolve_checkpoint``.
    """
    path = os.fspath(path)
    meta_file = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{path} is not a complete hfrl checkpoint: it has no {META_NAME} (an interrupted "
                                "save leaves none; published checkpoints always have one)")
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                         f"this hfrl reads {FORMAT!r} version {FORMAT_VERSION}")
    missing = [name for name in meta["files"] if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {missing} listed in {META_NAME} are missing")
    return meta


def _state_complete(folder: str) -> bool:
    """Whether a save_checkpoint folder was finished (``read_meta`` accepts it)."""
    try:
        read_meta(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def load_checkpoint(engine: TrainEngine, path: str | os.PathLike) -> dict[str, Any]:
    """Restore weights, optimizer state, LR schedule, step (and RNG under the same layout) from ``path``.

    Works under any (pp, tp, dp) and ZeRO stage; optimizer hyperparameters (betas, eps, weight
    decay) come from the engine's config, the LR schedule's position from the checkpoint. Returns
    the checkpoint's ``meta.json``. Collective over the role.
    """
    path = resolve_checkpoint(path)
    meta: dict[str, Any] = {}

    def load() -> None:
        meta.update(read_meta(path))
        if meta["value_head"] != engine.cfg.value_head:
            raise ValueError(f"{path} holds a {'value' if meta['value_head'] else 'causal LM'} model, the engine "
                             f"was built with value_head={engine.cfg.value_head}")
        load_tp_weights(engine.model, os.path.join(path, "model"), engine.groups["tp"])
        _load_optimizer(engine, os.path.join(path, "optim"), meta["optimizer_steps"])
        trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
        engine.scheduler.load_state_dict(trainer_state["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr()):
            group["lr"] = lr
        engine.step = int(meta["step"])
        saved = {k: meta["layout"][k] for k in ("pp", "tp", "dp")}
        if saved == {"pp": engine.dims.pp, "tp": engine.dims.tp, "dp": engine.dims.dp}:
            _set_rng_state(torch.load(os.path.join(path, "rng", f"rank-{engine.pool_position:05d}.pt"),
                                      weights_only=True))
        elif engine.is_coordinator:
            logger.info("%s was saved under %s; RNG states are per rank and were not restored under %s",
                        path, meta["layout"], _layout(engine))

    _collectively(engine, load)
    return meta


def _load_optimizer(engine: TrainEngine, folder: str, steps: int) -> None:
    files = {}
    for name in sorted(os.listdir(folder)):
        with open_safetensors(os.path.join(folder, name)) as f:
            files.update(dict.fromkeys(f.keys(), os.path.join(folder, name)))
    specs = {spec.name: spec for spec in model_param_plan(engine.model)}
    names = _param_names(engine)
    kinds = MOMENTS + (("master",) if any(k.startswith("master.") for k in files) else ())
    opt = engine.optimizer
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def read(kind: str, p: torch.Tensor) -> torch.Tensor:
            spec = specs[names[id(p)][0]]
            return _read_local(stack, handles, files, folder, kind, spec, engine, p.shape)

        if isinstance(opt, ZeroOneOptimizer):
            _load_zero(opt, read, kinds, steps)
        else:
            for p, master in zip(opt.model_params, opt.master_params):
                state = opt.state[master]
                state["step"] = torch.tensor(float(steps), dtype=torch.float32)
                for kind in MOMENTS:
                    state[kind] = read(kind, p).to(master.device, master.dtype)
                if "master" in kinds:
                    with torch.no_grad():
                        master.copy_(read("master", p))
                        p.copy_(master)
            if "master" not in kinds:
                opt.sync_master_from_params()  # bf16 parameters loaded from model/: masters follow them


@torch.no_grad()
def _load_zero(opt: ZeroOneOptimizer, read: Callable[[str, torch.Tensor], torch.Tensor], kinds: tuple[str, ...],
               steps: int) -> None:
    """Fill this DP rank's slices of the flat moments (and masters) from per-parameter tensors."""
    lo = opt.dp_rank * opt.shard_numel
    targets = {"exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq, "master": opt.master_shard}
    for kind in kinds:
        flat = torch.zeros(opt.shard_numel * opt.dp, dtype=torch.float32)
        offset = 0
        for p in opt.params:
            flat[offset:offset + p.numel()] = read(kind, p).reshape(-1)
            offset += p.numel()
        targets[kind].copy_(flat[lo:lo + opt.shard_numel])
    if "master" in kinds:  # the parameters: every rank fills its whole buffer, no collective needed
        for p in opt.params:
            p.copy_(read("master", p))
    else:
        opt.sync_master_from_params()  # bf16 parameters loaded from model/: masters follow them
    opt.step_count = steps


def _read_local(stack: contextlib.ExitStack, handles: dict[str, Any], files: dict[str, str], folder: str,
                kind: str, spec: ParamSpec, engine: TrainEngine, shape: torch.Size) -> torch.Tensor:
    """This TP rank's slice of ``kind.<hf names of spec>`` (fp32), padded like the local parameter."""
    tp, rank = engine.dims.tp, engine.tp_rank
    pieces = []
    for name, index in shard_slices(spec, rank, tp, replicate_kv_heads=True):
        key = f"{kind}.{name}"
        if key not in files:
            raise ValueError(f"{folder}: no tensor {key} (needed for {spec.name}); the checkpoint is incomplete "
                             "or belongs to another model")
        if files[key] not in handles:
            handles[files[key]] = stack.enter_context(open_safetensors(files[key]))
        pieces.append(check_finite(handles[files[key]].get_slice(key)[index], key, files[key]))
    local = torch.cat(pieces, dim=0)
    if spec.shard == "vocab":
        local = pad_rows(local, shape[0])
    if local.shape != shape:
        raise ValueError(f"{folder}: {kind} of {spec.name} gives a slice of shape {tuple(local.shape)} for a local "
                         f"parameter of shape {tuple(shape)}; the checkpoint belongs to another model")
    return local.float()


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- atomic folders and role-wide agreement ----------------------------------------------------------


def _atomic_save(engine: TrainEngine, path: str | os.PathLike, write: Callable[[str], None],
                 finish: Callable[[str], None], subdirs: tuple[str, ...] = (),
                 is_complete: Callable[[str], bool] = lambda folder: False) -> None:
    """tmp folder (coordinator) -> ``write`` (every rank) -> ``finish`` + rename (coordinator).

    ``finish`` writes the folder's completion marker last; ``is_complete(folder)`` checks for it,
    to recover from a save killed mid-replacement (see ``_replace_dir``).
    """
    path = os.path.abspath(os.fspath(path))
    tmp = _sibling(path, "tmp")

    def prepare() -> None:
        if engine.is_coordinator:
            _finish_interrupted_replace(path, is_complete)
            shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
            for sub in ("", *subdirs):
                os.makedirs(os.path.join(tmp, sub))

    def publish() -> None:
        if engine.is_coordinator:
            finish(tmp)
            _replace_dir(tmp, path)

    try:
        _collectively(engine, prepare)
        _collectively(engine, lambda: write(tmp))
        _collectively(engine, publish)
    finally:
        if engine.is_coordinator and os.path.exists(path):  # else tmp may be all there is: keep it
            shutil.rmtree(tmp, ignore_errors=True)


def _sibling(path: str, kind: str) -> str:
    """``.<name>.<kind>`` next to ``path``: the folder a save writes ("tmp") or replaces ("old")."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}")


def _replace_dir(tmp: str, path: str) -> None:
    """Move the finished ``tmp`` to ``path``; an existing ``path`` is replaced (never left half-written).

    Replacing takes two renames (POSIX cannot swap two folders in one): ``path`` -> ``.<name>.old``,
    then ``tmp`` -> ``path``. A kill between them leaves no ``path`` but two complete folders;
    ``resolve_checkpoint`` loads the newer (``tmp``) and the next save moves it into place.
    """
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = _sibling(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _finish_interrupted_replace(path: str, is_complete: Callable[[str], bool]) -> None:
    """Complete a replacement that a kill cut between its two renames: newest complete folder -> ``path``."""
    old = _sibling(path, "old")
    if not os.path.exists(path):
        for candidate in (_sibling(path, "tmp"), old):
            if is_complete(candidate):
                logger.warning("%s was missing after an interrupted save; restoring it from %s", path, candidate)
                os.replace(candidate, path)
                break
    shutil.rmtree(old, ignore_errors=True)


def _write_atomically(file: str, write: Callable[[Any], Any]) -> None:
    """``write(f)`` into ``file`` by way of a temp name and one rename: a reader sees all of it or nothing."""
    part = f"{file}.part"
    with open(part, "w") as f:
        write(f)
    os.replace(part, file)


def _collectively(engine: TrainEngine, fn: Callable[[], None]) -> None:
    """Run ``fn`` on every rank, then agree: if it raised anywhere, raise on every rank (a role-wide barrier)."""
    error = None
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        error = err
    failed = _role_any(engine, error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("checkpoint operation failed on another rank of the role (see its error)")


def _role_any(engine: TrainEngine, flag: bool) -> bool:
    """Max of ``flag`` over the role: over DP, then over the replica (mp); also a full barrier."""
    flag_tensor = torch.tensor([float(flag)], device=engine.collective_device)
    for axis in ("dp", "mp"):
        group = engine.groups[axis]
        if group_size_rank(group)[0] > 1:
            dist.all_reduce(flag_tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(flag_tensor.item())
