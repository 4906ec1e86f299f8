"""The rollout role: OpenRLHF's placement, generation on a pool of its own with a weight sync.

    build      the actor's model (its checkpoint, dtype) with tensor parallelism tg over this rank's
               replica, and a RolloutEngine over it (no optimizer, no gradients)
    generate   MICRO_DP_COMPUTE, as ActorWorker.generate (hfrl.workers.generation): same columns
    sync       after every actor update, ActorWorker.send_weights + receive_weights here:

               for each actor pipeline stage s (in order), over link group s = (sender, *rollout ranks):
                   sender (stage s, dp=0, tp=0) gathers the stage's full tensors over its TP group
                   broadcast the stage's header [(names, kind, shape, dtype)], then per distinct tensor
                     a TP-split one (tg > 1): scatter, each rollout rank gets its own TP shard
                     a replicated one (norms; every tensor at tg = 1): broadcast
                   every rollout rank copies what it got into its model

Weights travel actor rank -> rollout ranks over those groups (NCCL on GPUs), never through rank 0's
control channel, and each rollout rank receives only what it keeps: bytes per sync = the actor's
parameter bytes (each tied or shared tensor once) x the rollout's replicas, plus the replicated
tensors (and the kv heads copied where tg exceeds the kv heads) x the other TP ranks, reported as
`rollout/sync_bytes`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from hfrl.controller import ONE_TO_ALL, Worker, register
from hfrl.distributed.env import collective_device
from hfrl.models.weights import ParamSpec, model_param_plan, shard_tensor
from hfrl.workers.common import timed
from hfrl.workers.generation import ResponseGenerator


def send_stage(full: dict[str, torch.Tensor], specs: dict[str, ParamSpec], link: tuple[int, ...], group,
               rollout_tp: tuple[int, ...], tg: int) -> None:
    """Sender side: one stage's full tensors (global names, ``specs`` their plan) to the rollout ranks
    ``link[1:]`` (TP ranks ``rollout_tp``) over ``group``: TP-split tensors as each rank's shard, the
    others whole."""
    src = link[0]
    distinct: dict[tuple, list[str]] = {}
    tensors: dict[tuple, torch.Tensor] = {}
    for name, tensor in full.items():   # a tied lm_head shares the embedding's storage: sent once
        spec = specs[name]
        kind = "full" if tg == 1 or spec.shard == "replicated" else "shard"
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, kind, spec.shard, spec.hf_shapes, spec.unit)
        distinct.setdefault(key, []).append(name)
        tensors[key] = tensor.detach()
    header = []
    for key, names in distinct.items():
        tensor, kind = tensors[key], key[3]
        if kind == "shard":   # its shape, from the plan alone
            shape = tuple(shard_tensor(specs[names[0]], tensor.to("meta"), 0, tg, replicate_kv_heads=True).shape)
        else:
            shape = tuple(tensor.shape)
        header.append((names, kind, shape, tensor.dtype))
    dist.broadcast_object_list([header], src=src, group=group)
    slot = {rank: dist.get_group_rank(group, rank) for rank in link}   # scatter lists go by group rank
    for (names, kind, shape, _), key in zip(header, distinct):
        tensor = tensors[key]
        if kind == "full":
            dist.broadcast(tensor.contiguous(), src=src, group=group)
            continue
        shards = [shard_tensor(specs[names[0]], tensor, r, tg, replicate_kv_heads=True).contiguous()
                  for r in range(tg)]
        own = torch.empty_like(shards[0])   # the sender's slot: it keeps nothing
        scatter = [own] * len(link)
        for rank, tp in zip(link[1:], rollout_tp):
            scatter[slot[rank]] = shards[tp]
        dist.scatter(own, scatter, src=src, group=group)


class RolloutWorker(Worker, ResponseGenerator):
    """A generation copy of the actor on the rollout pool (layout pp=1, tp=tg, dp=replicas)."""

    def __init__(self, engine_cfg, rollout_cfg, *, eos_token_id: int, pad_token_id: int):
        from hfrl.engine.train_engine import DTYPES, _default_device
        from hfrl.models.parallelize import tp_from_pretrained
        from hfrl.rollout import RolloutEngine

        self.rollout_cfg = rollout_cfg
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.tp_group = self.ctx.groups.groups["tp"]
        self.model = tp_from_pretrained(engine_cfg.model_path, self.tp_group, dtype=DTYPES[engine_cfg.dtype],
                                        device=_default_device())
        self.model.requires_grad_(False)
        self.rollout = RolloutEngine.from_config(self.model, rollout_cfg, self.tp_group)

    def generation_weights(self):
        return contextlib.nullcontext(self.model)   # the weights live here between syncs

    @register(protocol=ONE_TO_ALL)
    def receive_weights(self, links: tuple[tuple[int, ...], ...]) -> dict:
        """Receive every actor stage's weights (see the module docstring); {"rollout/sync_bytes":
        bytes received by the whole rollout pool}."""
        specs = {spec.name: spec for spec in model_param_plan(self.model)}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        tp, tp_rank = self.ctx.dims.tp, self.ctx.coord.tp
        received, meta = 0, {}
        with timed(meta, "timing_s/weight_receive"), torch.no_grad():
            for link in links:
                group = self.ctx.runtime.cache.get(tuple(link))
                box = [None]
                dist.broadcast_object_list(box, src=link[0], group=group)
                for names, kind, shape, dtype in box[0]:
                    got = torch.empty(shape, dtype=dtype, device=self.model.embed_tokens.weight.device)
                    if kind == "shard":   # this rank's TP shard
                        dist.scatter(got, None, src=link[0], group=group)
                    else:
                        dist.broadcast(got, src=link[0], group=group)
                    received += got.nbytes
                    for name in names:
                        params[name].copy_(got if kind == "shard" else
                                           shard_tensor(specs[name], got, tp_rank, tp, replicate_kv_heads=True))
        role = self.ctx.groups.groups["role"]
        total = torch.tensor([received], dtype=torch.float64, device=collective_device(role))
        dist.all_reduce(total, group=role)
        return {"rollout/sync_bytes": float(total.item()), **meta}

    @register(protocol=ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        """The weights the rollout generates with, as a merged HF checkpoint (replica 0 writes it)."""
        from hfrl.models.parallelize import save_tp_pretrained

        if self.ctx.coord.dp == 0:
            save_tp_pretrained(self.model, self.tp_group, path)
