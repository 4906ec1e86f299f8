"""The rollout role: OpenRLHF's placement, generation on a pool of its own with a weight sync.

    build      the actor's model (its checkpoint, dtype) with tensor parallelism tg over this rank's
               replica, and a RolloutEngine over it (no optimizer, no gradients)
    generate   MICRO_DP_COMPUTE, as ActorWorker.generate (hfrl.workers.generation): same columns
    sync       after every actor update, ActorWorker.send_weights + receive_weights here:

               for each actor pipeline stage s (in order), over link group s = (sender, *rollout ranks):
                   sender (stage s, dp=0, tp=0) gathers the stage's full tensors over its TP group
                   broadcast the stage's header [(names, shape, dtype)], then each distinct tensor
                   every rollout rank copies its own TP shard of each tensor into its model

Weights travel actor rank -> rollout ranks over those groups (NCCL on GPUs), never through rank 0's
control channel. Every rollout rank receives every full tensor once: bytes per sync = the actor's
parameter bytes (each tied or shared tensor once) x the rollout pool's ranks, reported as
`rollout/sync_bytes` (a rollout rank at tg > 1 keeps 1/tg of them; sending shards instead would cut
the bytes by tg and is not done).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from hfrl.controller import ONE_TO_ALL, Worker, register
from hfrl.distributed.env import collective_device
from hfrl.workers.common import timed
from hfrl.workers.generation import ResponseGenerator


def broadcast_stage(full: dict[str, torch.Tensor], src: int, group) -> None:
    """Sender side: one stage's full tensors (global names) to every other member of `group`."""
    distinct: dict[tuple, list[str]] = {}
    tensors: dict[tuple, torch.Tensor] = {}
    for name, tensor in full.items():   # a tied lm_head shares the embedding's storage: sent once
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        distinct.setdefault(key, []).append(name)
        tensors[key] = tensor
    header = [(names, tuple(tensors[k].shape), tensors[k].dtype) for k, names in distinct.items()]
    dist.broadcast_object_list([header], src=src, group=group)
    for key in distinct:
        dist.broadcast(tensors[key].detach().contiguous(), src=src, group=group)


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
        from hfrl.models.weights import model_param_plan, shard_tensor

        specs = {spec.name: spec for spec in model_param_plan(self.model)}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        tp, tp_rank = self.ctx.dims.tp, self.ctx.coord.tp
        received, meta = 0, {}
        with timed(meta, "timing_s/weight_receive"), torch.no_grad():
            for link in links:
                group = self.ctx.runtime.cache.get(tuple(link))
                box = [None]
                dist.broadcast_object_list(box, src=link[0], group=group)
                for names, shape, dtype in box[0]:
                    full = torch.empty(shape, dtype=dtype, device=self.model.embed_tokens.weight.device)
                    dist.broadcast(full, src=link[0], group=group)
                    received += full.nbytes
                    for name in names:
                        local = shard_tensor(specs[name], full, tp_rank, tp, replicate_kv_heads=True)
                        params[name].copy_(local)
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
