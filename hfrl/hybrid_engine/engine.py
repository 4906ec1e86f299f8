"""HybridEngine: the actor's weights switched between its training and generation layouts (HybridFlow §5).

    hybrid = HybridEngine(train_engine)                  # mode="hybridflow": zero redundancy
    rollout = hybrid.rollout_engine(cfg.rollout)         # built once over the generation model
    with hybrid.generation():                            # all-gather inside each micro-DP group
        out = rollout.generate(prompts, params)
    # leaving: the gathered weights and the KV cache are released
    train_engine.train_step(batch, loss_fn)              # the next generation() carries the new weights
    hybrid.metrics()                                     # bytes moved and held, transition times

The generation model (``hybrid.model``) is a CausalLM of this rank's generation stage, tensor-parallel
over the ``gen_tp`` group; the rollout engine takes it and that group. Its weights exist only inside
``generation()``.

Modes (the same API, so benchmarks compare like for like; Table 2, ``hfrl.hybrid_engine.accounting``):

- ``hybridflow``: each rank's generation shard is the union of the G = (tp / tg) * (pp / pg) training
  shards of its micro-DP group (hybridflow grouping), its own among them. Entering generation packs
  the rank's shards of a bucket into one send buffer and all-gathers the buckets inside the micro-DP
  group; the generation layers (``hybrid_engine.layers``) compute on the pieces where they lie: the
  local ones *are* the training parameters, the others views of the receive buffers. Leaving drops
  the receive buffers. Nothing is stored twice; the only copy of a local shard is the transient send
  buffer of one bucket.
- ``hybridflow_v``: vanilla grouping; all-gather the whole model over the training model-parallel
  group (pp x tp ranks), then unpack this rank's generation shard (standard tg layout: a real
  permutation for fused q/k/v, gate/up and row-parallel weights) into its own buffer and free the rest.
- ``ds_chat``: DeepSpeed-Chat style: every rank of the role contributes 1/dp of its training shard (as
  ZeRO-3 would hold it), the whole model is all-gathered across the role, then sliced as above.

Offload (``offload_optimizer``): AdamW's moments (and bf16's fp32 master weights) move to host memory
for the generation phase and come back bit-exactly; on CPU the same path runs (copies into new host
tensors), for nothing but its test.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from hfrl.distributed.data_parallel import all_gather_flat
from hfrl.distributed.parallel_dims import Coord, RoleGroups
from hfrl.hybrid_engine import plan
from hfrl.hybrid_engine.accounting import MODE_GROUPING, MODES, default_mode
from hfrl.hybrid_engine.layers import (
    PieceColumnLinear, PieceEmbedding, PieceLMHead, PieceRowLinear, _PieceModule,
)
from hfrl.models.llama import Attention, CausalLM
from hfrl.models.parallelize import TP_PLAN, _style_for, check_tp, parallelize_model



@dataclass
class Transition:
    """Counters of the last transition into generation, per rank (bytes are real data unless noted)."""

    received: int = 0
    """Bytes of weights this rank received from others (padding excluded)."""
    sent: int = 0
    """Bytes this rank's data crossed to others: its contribution times the receivers."""
    wire: int = 0
    """Bytes received including the padding that equalises contributions."""
    peak: int = 0
    """Parameter bytes held at the transition's peak (training + generation + transient buffers)."""
    enter_s: float = 0.0
    exit_s: float = 0.0
    offloaded: int = 0


@dataclass
class _Bucket:
    specs: list[int]
    layouts: list[list[tuple[int, int, tuple[int, ...]]]]
    """Per micro-DP member: (spec index, element offset, shape) of each tensor it sends, in order."""
    size: int
    """Elements of every member's send buffer (the largest contribution)."""
    real: list[int] = field(default_factory=list)
    """Per member: elements of real data."""


def _gather(outs: list[torch.Tensor], ranks: list[int], group) -> int:
    """Every member's ``outs[j]`` onto every member: ``outs[me]`` holds this rank's contribution, the
    others receive. Returns the bytes of the collective's own staging buffer.

    NCCL with equal sizes: one all-gather (bandwidth-optimal; it stages the list in one flat buffer).
    Otherwise one broadcast per member at its own size: no padding when pipeline stages differ in size,
    and on gloo the faster way even for equal sizes (4 ranks x 50 MB on this 2-core VM: 0.63-0.86 s
    against 1.13-1.27 s for the list all-gather and 1.13-2.04 s into one flat tensor).
    """
    if len(outs) == 1:
        return 0
    sizes = {t.numel() for t in outs}
    if outs[0].is_cuda and len(sizes) == 1:
        # all_gather fills by group rank (ascending global rank), ``outs`` is in member order: the same
        # for the ascending pools resource_pool requires, matched by rank here all the same
        by_group_rank = sorted(range(len(ranks)), key=lambda j: dist.get_group_rank(group, ranks[j]))
        me = ranks.index(dist.get_rank())
        dist.all_gather([outs[j] for j in by_group_rank], outs[me], group=group)
        return sum(t.nbytes for t in outs)
    for j, tensor in enumerate(outs):
        dist.broadcast(tensor, src=ranks[j], group=group)
    return 0


class HybridEngine:
    """The train <-> generate switch for one actor ``TrainEngine`` (see module docstring)."""

    def __init__(self, engine, *, mode: str = "hybridflow", bucket_mb: float = 64.0,
                 offload_optimizer: bool = False, groups: RoleGroups | None = None):
        """``groups``: the role's groups with the generation layout to use, by default the engine's
        own; another (pg, tg) or grouping over the same training layout and pool is allowed (one
        TrainEngine, several generation layouts: benchmarks and tests)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if engine.cfg.value_head:
            raise ValueError("HybridEngine reshards an actor (CausalLM) engine; this one has a value head")
        if not isinstance(bucket_mb, (int, float)) or not math.isfinite(bucket_mb) or int(bucket_mb * 2**20) < 1024:
            raise ValueError(f"bucket_mb={bucket_mb!r} must be a finite number of MiB, at least 1 KiB (1/1024); "
                             "64 suits most models")
        rg = engine.role_groups if groups is None else groups
        if groups is not None:
            mine = engine.role_groups
            same = (mine is not None and (groups.dims.pp, groups.dims.tp, groups.dims.dp) ==
                    (mine.dims.pp, mine.dims.tp, mine.dims.dp) and groups.pool_ranks == mine.pool_ranks
                    and groups.coord is not None and (groups.coord.pp, groups.coord.tp, groups.coord.dp) ==
                    (mine.coord.pp, mine.coord.tp, mine.coord.dp))
            if not same:
                raise ValueError(f"groups with layout {groups.dims.describe()} on ranks {groups.pool_ranks} do not "
                                 "match the engine's training layout and pool; pass groups built for the same pool "
                                 "and (pp, tp, dp)")
        dims, config = (rg.dims if rg is not None else engine.dims), engine.model_config
        need = MODE_GROUPING.get(mode)
        if need is not None and dims.grouping != need:
            raise ValueError(f"mode={mode!r} needs the {need!r} generation grouping but the role's layout has "
                             f"grouping={dims.grouping!r}; set the role's grouping to {need!r} or pick another mode")
        dims.check_model(config.num_heads, config.num_kv_heads, "hybrid engine")
        check_tp(config, dims.tg)
        self.engine, self.mode, self.dims, self.config = engine, mode, dims, config
        self.offload_optimizer = offload_optimizer
        self._role_groups = rg
        self.coord = rg.coord if rg is not None else Coord(0, 0, 0, 0, 0, 0)
        self.groups = {axis: (rg.groups.get(axis) if rg is not None else None)
                       for axis in ("gen_tp", "micro_dp", "mp", "role")}
        self.gen_group = self.groups["gen_tp"]
        """The rollout engine's tensor-parallel group."""
        params = dict(engine.model.named_parameters(remove_duplicate=False))
        self._train = {engine.global_name(name): p for name, p in params.items()}
        first = next(iter(params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.element_size = first.element_size()
        self.specs = plan.generation_specs(config, dims, self.coord.gen_pp)
        self.layer_range = plan.generation_range(config, dims, self.coord.gen_pp)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.active = False
        self.last = Transition()
        self._received: list[torch.Tensor] = []
        self._gen_buffer: torch.Tensor | None = None
        self._offloaded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rollout = None
        self.resident_gen = self.redundant_gen = 0
        if mode == "hybridflow":
            self.model = self._pieces_model()
            self._plan_pieces()
        else:
            self.model = self._dense_model()
            self._plan_dense()
        self.model.eval()
        self._release()  # placeholders until the first generation()
        self.resident_train = self.resident_bytes()

    @classmethod
    def from_config(cls, engine, hybrid_cfg) -> "HybridEngine":
        """From ``hfrl.config.HybridConfig`` (the ``hybrid:`` section of a job's YAML); mode null follows
        the role's grouping (hybridflow, or hybridflow_v for vanilla)."""
        mode = hybrid_cfg.mode or default_mode(engine.dims.grouping)
        return cls(engine, mode=mode, bucket_mb=hybrid_cfg.bucket_mb, offload_optimizer=hybrid_cfg.offload_optimizer)

    # ---- public API -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def generation(self) -> Iterator[CausalLM]:
        """Inside: ``self.model`` holds this rank's generation weights (the training weights of now)."""
        self.enter()
        try:
            yield self.model
        finally:
            self.exit()

    def enter(self) -> None:
        """Switch to the generation layout (collective over the mode's group)."""
        if self.active:
            raise RuntimeError("already in generation: leave it (exit() or the end of generation()) first")
        start = time.perf_counter()
        self.last = Transition()
        try:
            self.last.offloaded = self._offload() if self.offload_optimizer else 0
            if self.mode == "hybridflow":
                self._enter_pieces()
            else:
                self._enter_dense()
        except BaseException:
            self._release()  # a failed entry leaves the training state as it found it
            raise
        self.active = True
        self.engine.in_generation = True
        self._sync()
        self.last.enter_s = time.perf_counter() - start

    def exit(self) -> None:
        """Back to the training layout: drop the gathered weights, free the KV cache, restore offloaded state."""
        if not self.active:
            return
        start = time.perf_counter()
        if self._rollout is not None:
            self._rollout.release()
        self._release()
        self.active = False
        self.engine.in_generation = False
        self._sync()
        self.last.exit_s = time.perf_counter() - start

    def _release(self) -> None:
        """Drop every generation weight (placeholders keep dtype and device), restore offloaded state."""
        for module in self.model.modules():
            if isinstance(module, _PieceModule):
                module.clear(self._placeholder())
        for gs in self.specs:
            module, attr = self._module_of(gs.local_name)
            if not isinstance(module, _PieceModule):
                module._parameters[attr] = nn.Parameter(self._placeholder(), requires_grad=False)
        if not isinstance(self.model.lm_head, _PieceModule):
            self.model.tie_weights()  # a tied head must not keep the gathered embedding alive
        self._received, self._gen_buffer = [], None
        self._restore()

    def _placeholder(self) -> torch.Tensor:
        """An empty tensor of the weights' dtype and device: what a layer holds outside generation."""
        return torch.empty(0, dtype=self.dtype, device=self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the transition's time includes its transfers

    def rollout_engine(self, rollout_cfg=None, **kwargs):
        """A RolloutEngine over the generation model and group, from ``hfrl.config.RolloutConfig`` or
        keyword arguments; built outside or inside ``generation()``, used inside; its KV cache is freed
        each time generation ends."""
        from hfrl.rollout import RolloutEngine

        # Outside generation the layers hold empty placeholders of the weights' dtype and device, all
        # that the engine reads when it is built.
        if rollout_cfg is not None:
            self._rollout = RolloutEngine.from_config(self.model, rollout_cfg, self.gen_group)
        else:
            self._rollout = RolloutEngine(self.model, tp_group=self.gen_group, **kwargs)
        return self._rollout

    def resident_bytes(self) -> int:
        """Bytes of parameter storage this rank holds now: training parameters and generation weights,
        each storage counted once (a view of a training parameter adds nothing)."""
        storages: dict[int, int] = {}
        for tensor in [*self._train.values(), *self.generation_tensors(), *self._received]:
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        if self._gen_buffer is not None:
            storages[self._gen_buffer.untyped_storage().data_ptr()] = self._gen_buffer.untyped_storage().nbytes()
        return sum(storages.values())

    def generation_tensors(self) -> list[torch.Tensor]:
        """Every weight tensor of the generation model now (pieces included)."""
        out = []
        for module in self.model.modules():
            if isinstance(module, _PieceModule):
                out += module.tensors()
            out += [p for p in module.parameters(recurse=False) if p.device.type != "meta"]
        return out

    def generation_weights(self) -> dict[str, list[torch.Tensor]]:
        """{global name: this rank's generation tensors of it}: the pieces (hybridflow; one per training
        shard, or one for a replicated tensor) or the one standard-tg-layout tensor (other modes)."""
        if not self.active:
            raise RuntimeError("generation weights exist only inside generation()")
        out = {}
        for gs in self.specs:
            module, attr = self._module_of(gs.local_name)
            if isinstance(module, _PieceModule):
                out[gs.spec.name] = module.weights if attr == "weight" else module.biases
            else:
                out[gs.spec.name] = [getattr(module, attr)]
        return out

    def metrics(self) -> dict[str, float]:
        """The last transition's counters, verl-style names (log them with the step's metrics)."""
        t = self.last
        return {"hybrid/received_bytes": float(t.received), "hybrid/sent_bytes": float(t.sent),
                "hybrid/wire_bytes": float(t.wire), "hybrid/peak_bytes": float(t.peak),
                "hybrid/resident_bytes_train": float(self.resident_train),
                "hybrid/resident_bytes_gen": float(self.resident_gen),
                "hybrid/redundant_bytes": float(self.redundant_gen),
                "hybrid/offloaded_bytes": float(t.offloaded),
                "timing_s/reshard_to_gen": t.enter_s, "timing_s/reshard_to_train": t.exit_s}

    # ---- hybridflow: pieces --------------------------------------------------------------------

    def _pieces_model(self) -> CausalLM:
        """The generation stage's CausalLM with piece layers (no weights yet) over the gen_tp group."""
        dims, config, t = self.dims, self.config, self.coord.gen_tp
        st = dims.tp // dims.tg
        with torch.device("meta"):
            model = CausalLM(config, self.layer_range)
        ranks = [t * st + u for u in range(st)]
        specs = {gs.local_name.rsplit(".", 1)[0]: gs.spec for gs in self.specs if gs.local_name.endswith("weight")}
        rows = math.ceil(config.vocab_size / dims.tp)
        for name, module in list(model.named_modules()):
            style = _style_for(name, TP_PLAN)
            if style is None:
                continue
            if style in ("colwise", "colwise_qkv"):
                spec = specs[name]
                rows_of = [plan.part_rows(spec, r, dims.tp) for r in ranks]  # per piece: (start, stop) per part
                parts = [stop - start for start, stop in rows_of[0]]
                # a part replicated over training ranks (kv heads fewer than tp) enters the output once
                take = [[u for u in range(st) if u == 0 or rows_of[u][p] != rows_of[u - 1][p]] for p in range(len(parts))]
                new = PieceColumnLinear(parts, take, self.gen_group)
            elif style == "rowwise":
                new = PieceRowLinear(self.gen_group)
            elif style == "vocab_embedding":
                new = PieceEmbedding(config.vocab_size, rows, t * st * rows, self.gen_group)
            else:
                new = PieceLMHead(config.vocab_size, rows, t * st * rows, self.gen_group)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        for module in model.modules():
            if isinstance(module, Attention):
                qkv = module.qkv_proj
                module.num_heads = len(qkv.take[0]) * qkv.parts[0] // config.head_dim
                module.num_kv_heads = len(qkv.take[1]) * qkv.parts[1] // config.head_dim
        model.rotary_emb.to_empty(device=self.device)
        return model

    def _plan_pieces(self) -> None:
        dims = self.dims
        st, sp = dims.tp // dims.tg, dims.pp // dims.pg
        self.num_members = st * sp
        self.member = self.coord.micro
        rg = self._role_groups
        self.member_ranks = list(rg.ranks["micro_dp"]) if rg is not None else [0]
        """Global ranks of the micro-DP group, in member (group-rank) order."""
        first_stage = self.coord.gen_pp * sp
        sizes = [sum(plan.numel(plan.shard_shape(gs.spec, 0, dims.tp)) for _ in range(st if gs.sharded else 1))
                 * self.element_size for gs in self.specs]
        self.buckets: list[_Bucket] = []
        self._where: dict[tuple[int, int], tuple[int, int, int]] = {}  # (spec, piece) -> (bucket, member, offset)
        for k, members in enumerate(plan.buckets(self.specs, sizes, self.bucket_bytes)):
            layouts, real = [], []
            for j in range(self.num_members):
                stage, u = first_stage + j // st, j % st
                layout, offset = [], 0
                for i in members:
                    gs = self.specs[i]
                    # a replicated tensor comes from one rank of its stage, and only if another stage needs it
                    if gs.stage != stage or (not gs.sharded and (u != 0 or sp == 1)):
                        continue
                    shape = plan.shard_shape(gs.spec, dims.tp // dims.tg * self.coord.gen_tp + u, dims.tp)
                    layout.append((i, offset, shape))
                    self._where[(i, u)] = (k, j, offset)
                    offset += plan.numel(shape)
                layouts.append(layout)
                real.append(offset)
            self.buckets.append(_Bucket(members, layouts, max(real), real))

    def _own(self, gs: plan.GenSpec) -> torch.Tensor:
        return self._train[gs.spec.name]

    def _enter_pieces(self) -> None:
        from hfrl_kernels import reshard

        dims, G, me = self.dims, self.num_members, self.member
        st = dims.tp // dims.tg
        group = self.groups["micro_dp"]
        views: dict[tuple[int, int], torch.Tensor] = {}
        transient = 0
        for bucket in self.buckets:
            if G == 1 or bucket.size == 0:
                continue
            send = torch.empty(bucket.real[me], dtype=self.dtype, device=self.device)
            reshard.pack([self._own(self.specs[i]).detach() for i, _, _ in bucket.layouts[me]], send)
            others = [j for j in range(G) if j != me]
            recv = torch.empty(sum(bucket.real[j] for j in others), dtype=self.dtype, device=self.device)
            outs, start = {me: send}, 0
            for j in others:
                outs[j] = recv[start:start + bucket.real[j]]
                start += bucket.real[j]
            staging = _gather([outs[j] for j in range(G)], self.member_ranks, group)
            transient = max(transient, send.nbytes + staging)
            del send, outs
            self._received.append(recv)
            start = 0
            for j in others:
                u = j % st
                for i, offset, shape in bucket.layouts[j]:
                    views[(i, u)] = recv[start + offset:start + offset + plan.numel(shape)].view(shape)
                start += bucket.real[j]
            self.last.received += sum(bucket.real[j] for j in others) * self.element_size
            self.last.sent += bucket.real[me] * (G - 1) * self.element_size
        self.last.wire = self.last.received
        my_stage = self.coord.pp
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
        for i, gs in enumerate(self.specs):
            if not gs.sharded and gs.stage == my_stage:
                tensors = [self._own(gs).detach()]  # every rank of the stage holds a replicated tensor
            else:
                count = st if gs.sharded else 1
                tensors = [views[(i, u)] if self._where[(i, u)][1] != me else self._own(gs).detach()
                           for u in range(count)]
            path, attr = gs.local_name.rsplit(".", 1)
            pieces.setdefault(path, {})[attr] = tensors
        self._install(pieces)
        self.resident_gen = self.resident_bytes()
        self.last.peak = self.resident_gen + transient
        self.redundant_gen = self._redundant()

    def _install(self, pieces: dict[str, dict[str, list[torch.Tensor]]]) -> None:
        for path, attrs in pieces.items():
            module = self.model.get_submodule(path)
            if isinstance(module, _PieceModule):
                module.set_pieces(attrs["weight"], attrs.get("bias"))
            else:
                for attr, (tensor,) in attrs.items():
                    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        head, embed = getattr(self.model, "lm_head", None), self.model.embed_tokens
        if self.config.tie_word_embeddings and head is not None and embed is not None:
            if isinstance(head, _PieceModule):
                head.set_pieces(embed.weights)
            else:
                self.model.tie_weights()

    def _redundant(self) -> int:
        """Bytes of training parameters the generation model does not use: held twice, or idle."""
        used = {t.untyped_storage().data_ptr() for t in self.generation_tensors()}
        return sum(p.untyped_storage().nbytes() for p in {id(p): p for p in self._train.values()}.values()
                   if p.untyped_storage().data_ptr() not in used)

    def _module_of(self, local_name: str) -> tuple[nn.Module, str]:
        path, attr = local_name.rsplit(".", 1)
        return self.model.get_submodule(path), attr

    # ---- baselines: gather everything, unpack a slice --------------------------------------------

    def _dense_model(self) -> CausalLM:
        """The generation stage's CausalLM with standard TP layers at tg (weights set on entering)."""
        with torch.device("meta"):
            model = CausalLM(self.config, self.layer_range)
        parallelize_model(model, self.gen_group)
        model.to(self.dtype)
        model.rotary_emb.to_empty(device=self.device)
        return model

    def _plan_dense(self) -> None:
        """The gather's layout (every member's flat training shard) and the unpack's segment tables."""
        from hfrl_kernels import reshard

        dims, config = self.dims, self.config
        tp = dims.tp
        dp = dims.dp if self.mode == "ds_chat" else 1
        self._stage_specs = [plan.training_specs(config, dims, s) for s in range(dims.pp)]
        offsets, flat_sizes = [], []
        for specs in self._stage_specs:
            table, offset = {}, 0
            for gs in specs:
                table[gs.spec.name] = offset
                offset += plan.numel(plan.shard_shape(gs.spec, 0, tp))
            offsets.append(table)
            flat_sizes.append(offset)
        self.flat_size = max(flat_sizes)
        self.chunk = math.ceil(self.flat_size / dp)
        self.num_members = dims.pp * tp * dp
        flat_pad = self.chunk * dp
        src, dst, lengths, gen_offset = [], [], [], 0
        self._gen_layout = []
        for gs in self.specs:
            module, attr = self._module_of(gs.local_name)
            shape = tuple(getattr(module, attr).shape)
            s = gs.stage
            flat = plan.dense_index(gs.spec, tp, [r * flat_pad + offsets[s][gs.spec.name] for r in range(tp)],
                                    self.coord.gen_tp, dims.tg)
            if flat.numel() != plan.numel(shape):
                raise AssertionError(f"{gs.spec.name}: index map of {flat.numel()} for a tensor of shape {shape}")
            real = flat >= 0
            r, f = flat // flat_pad, flat % flat_pad
            recv = ((s * dp + f // self.chunk) * tp + r) * self.chunk + f % self.chunk  # ds_chat order; dp=1: mp order
            index = torch.where(real, recv, torch.full_like(recv, -1))
            a, b, n = reshard.segments_from_index(index)
            src.append(a), dst.append(b + gen_offset), lengths.append(n)
            self._gen_layout.append((gs, gen_offset, shape))
            gen_offset += plan.numel(shape)
        self._segments = (torch.cat(src), torch.cat(dst), torch.cat(lengths))
        self.gen_numel = gen_offset
        self._flat_real = flat_sizes
        rg, coord = self._role_groups, self.coord
        self.dense_member = (coord.pp * dp + (coord.dp if dp > 1 else 0)) * tp + coord.tp
        """This rank's place in the gather group (role: pool order; mp: (pp, tp) order)."""
        self.dense_ranks = list(rg.ranks["role" if self.mode == "ds_chat" else "mp"]) if rg is not None else [0]

    def _enter_dense(self) -> None:
        from hfrl_kernels import reshard

        dims, tp, coord = self.dims, self.dims.tp, self.coord
        dp = dims.dp if self.mode == "ds_chat" else 1
        group = self.groups["role" if self.mode == "ds_chat" else "mp"]
        flat = torch.zeros(self.chunk * dp, dtype=self.dtype, device=self.device)
        reshard.pack([self._own(gs).detach() for gs in self._stage_specs[coord.pp]], flat)
        mine = flat[coord.dp * self.chunk:(coord.dp + 1) * self.chunk] if dp > 1 else flat
        recv = torch.empty(self.num_members * self.chunk, dtype=self.dtype, device=self.device)
        n, me = self.num_members, self.dense_member
        if self.device.type == "cuda" and n > 1 and self.dense_ranks == sorted(self.dense_ranks):
            all_gather_flat(recv, mine, group)   # group rank order is member order here
        else:  # the broadcasts read this rank's contribution from its own slot
            recv[me * self.chunk:(me + 1) * self.chunk].copy_(mine)
            _gather(list(recv.split(self.chunk)), self.dense_ranks, group)
        transient = flat.nbytes + recv.nbytes
        del flat, mine
        gen = torch.zeros(self.gen_numel, dtype=self.dtype, device=self.device)
        reshard.copy_segments(recv, gen, *self._segments)
        peak = self.resident_bytes() + gen.nbytes + transient
        del recv
        self._gen_buffer = gen
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
        for gs, offset, shape in self._gen_layout:
            path, attr = gs.local_name.rsplit(".", 1)
            pieces.setdefault(path, {})[attr] = [gen[offset:offset + plan.numel(shape)].view(shape)]
        self._install(pieces)
        # what reached this rank from the others: every member's real data but its own
        real = [min(self.chunk, max(0, self._flat_real[s] - d * self.chunk)) if dp > 1 else self._flat_real[s]
                for s in range(dims.pp) for d in range(dp) for _ in range(tp)]
        me = self.dense_member
        self.last.received = (sum(real) - real[me]) * self.element_size
        self.last.wire = (self.num_members - 1) * self.chunk * self.element_size
        self.last.sent = real[me] * (self.num_members - 1) * self.element_size
        self.last.peak = peak
        self.resident_gen = self.resident_bytes()
        self.redundant_gen = self._redundant()

    # ---- offload ----------------------------------------------------------------------------------

    def _offload_candidates(self) -> list[torch.Tensor]:
        """AdamW's moments, separate fp32 masters and gradients (ZeRO-1's flat fp32 gradient, any live
        ``.grad``); the DP reduction's scratch buffers are dropped instead (rebuilt on the next step)."""
        opt = self.engine.optimizer
        out = [getattr(opt, name) for name in ("exp_avg", "exp_avg_sq", "grad_buffer", "grad_shard")
               if torch.is_tensor(getattr(opt, name, None))]
        master_shard = getattr(opt, "master_shard", None)
        if torch.is_tensor(master_shard) and master_shard.untyped_storage().data_ptr() != \
                opt.param_buffer.untyped_storage().data_ptr():
            out.append(master_shard)  # ZeRO-1 under bf16: a separate fp32 shard
        for state in opt.state.values():
            out += [v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v)]
        masters = [master for _, master in getattr(opt, "_low_precision", [])]
        out += masters
        out += [t.grad for t in (*self._train.values(), *masters) if t.grad is not None]
        return out

    def _offload(self) -> int:
        """Copy each candidate's storage to host memory and shrink it to nothing. Storages, not
        tensors: views of them (ZeRO-1's per-parameter gradients and masters) stay valid."""
        moved, pin = 0, self.device.type == "cuda"
        storages = {}
        for tensor in self._offload_candidates():
            storages.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage())
        for storage in storages.values():
            if storage.nbytes() == 0:
                continue
            raw = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin)
            host.copy_(raw, non_blocking=pin)
            self._offloaded.append((storage, host))
            moved += storage.nbytes()
        if pin:
            torch.cuda.current_stream(self.device).synchronize()
        for storage, _ in self._offloaded:
            storage.resize_(0)
        for bucketer in self._bucketers():  # scratch buffers of the DP all-reduce, rebuilt at the next step
            moved += sum(b.nbytes for b in bucketer._buffers if b is not None)
            bucketer._buffers = [None] * len(bucketer._buffers)
        return moved

    def _bucketers(self) -> list:
        """The GradBucketers of the engine's DP reduction: the optimizer's, and the overlapped one's."""
        from hfrl.distributed.data_parallel import GradBucketer

        found = [getattr(self.engine.optimizer, "_bucketer", None),
                 getattr(getattr(self.engine.grad_reduce, "_launch", None), "__self__", None)]
        return list({id(b): b for b in found if isinstance(b, GradBucketer)}.values())

    def _restore(self) -> None:
        for storage, host in self._offloaded:
            storage.resize_(host.numel())
            raw = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
            raw.copy_(host, non_blocking=self.device.type == "cuda")
        if self._offloaded and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._offloaded = []
