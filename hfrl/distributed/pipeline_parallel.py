"""Pipeline parallelism: layer partitioning, activation transport and the 1F1B / GPipe schedules.

A pipeline of ``pp`` stages runs one model split by layers (``partition_layers``); stage ``s`` holds
a model built with ``layer_range=partition_layers(num_layers, pp)[s]`` (see ``hfrl.models.llama``).
Every rank of the pipeline calls the same ``PipelineSchedule`` method with the *same* micro-batches
(the data loader gives all stages of a replica the same chunk): stage 0 embeds ``input_ids``, the
others receive hidden states (B, T, H) from the stage before, and the last stage applies the head
and the user's ``loss_fn`` (training) or ``output_fn`` (forward only).

    schedule = PipelineSchedule.from_groups(stage_model, role_groups, schedule="1f1b")
    result = schedule.train_step(micro_batches, loss_fn)          # grads accumulate in .grad
    log_probs = schedule.forward_only(micro_batches, output_fn)   # list on the last stage, else None

Shapes. Nothing but activations and their gradients crosses the wire: the receiver computes the
shape itself as ``(*micro_batch["input_ids"].shape, hidden_size)``, because every stage holds the
micro-batch's ``input_ids`` (padded (B, T) or packed (1, total)). Ragged micro-batches (a different
T each) therefore cost no shape header and no extra latency. The price is that the stages must be
given identical micro-batches; ``train_step``/``forward_only`` compare the count and every
micro-batch's shapes with one tiny all-reduce over the pipeline before the first transfer, so a
mismatch raises the same ValueError on every stage at once instead of hanging in a receive.

Communication. Between two consecutive compute ops of a stage, the sends the first op produced and
the receive the second op needs are posted together as one ``batch_isend_irecv`` and waited. In
1F1B's steady state that pairs "send activation i to s+1, receive gradient j from s+1" on one stage
with the mirror pair on the next, as Megatron's ``send_forward_recv_backward`` does; this is what
keeps NCCL, which serialises a pair's transfers on one stream, out of deadlock. The transfers go
over the pipeline group to the global ranks in ``RoleGroups.ranks["pp"]``; under tensor parallelism
that group joins the ranks with the same TP coordinate, and each sends the full (B, T, H) tensor.

This module holds no model code: a stage model is any module called as
``model(input_ids, **kwargs)`` on stage 0 and ``model(hidden_states=h, **kwargs)`` elsewhere,
returning hidden states (B, T, H) except on the last stage, where it returns the head's output.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

SCHEDULES = ("1f1b", "gpipe")
MODEL_INPUT_KEYS = ("position_ids", "attention_mask", "cu_seqlens")
"""Micro-batch keys passed to every stage's forward (``input_ids`` goes to stage 0 only)."""

MicroBatch = dict[str, Any]
LossFn = Callable[[Any, MicroBatch], tuple[torch.Tensor, dict[str, Any]]]
OutputFn = Callable[[Any, MicroBatch], Any]


def partition_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Split ``num_layers`` decoder layers over ``pp`` stages: ``[(a, b), ...]`` half-open, in order.

    Rule: every stage gets ``num_layers // pp`` layers; the ``num_layers % pp`` extra layers go
    first to the middle stages (1 .. pp-2, lowest first), then to stage 0, then to the last stage.
    So when the split is uneven, the first and last stages are the ones left one layer short:
    they also run the embedding (stage 0) and the head plus loss (last stage, the costlier of the
    two, hence served last). 4 layers on 3 stages -> 1, 2, 1; 5 on 2 -> 3, 2; 8 on 4 -> 2 each.
    """
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp={pp!r} must be a positive integer")
    if pp > num_layers:
        raise ValueError(f"pp={pp} pipeline stages but the model has {num_layers} layers: every stage "
                         f"needs at least one layer; pick pp <= {num_layers}")
    counts = [num_layers // pp] * pp
    priority = list(range(1, pp - 1)) + ([0, pp - 1] if pp > 1 else [0])
    for stage in priority[:num_layers % pp]:
        counts[stage] += 1
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def pipeline_ops(schedule: str, num_stages: int, stage: int, num_micro_batches: int) -> list[tuple[str, int]]:
    """The compute ops of one stage in execution order: ``("F", i)`` forward / ``("B", i)`` backward.

    "gpipe": all forwards, then all backwards. "1f1b": ``num_stages - stage - 1`` warmup forwards
    (fewer if there are fewer micro-batches), then one forward + one backward at a time, then the
    remaining backwards; a stage holds at most ``num_stages - stage`` micro-batches' activations.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    assert 0 <= stage < num_stages and num_micro_batches >= 1, (stage, num_stages, num_micro_batches)
    M = num_micro_batches
    if schedule == "gpipe":
        return [("F", i) for i in range(M)] + [("B", i) for i in range(M)]
    warmup = min(num_stages - stage - 1, M)
    ops = [("F", i) for i in range(warmup)]
    for i in range(M - warmup):  # steady state: forward i + warmup, backward i
        ops += [("F", i + warmup), ("B", i)]
    return ops + [("B", i) for i in range(M - warmup, M)]


@dataclass
class PipelineResult:
    """What a training step reports. On stages other than the last, both fields are filled only
    when the step broadcast them (``train_step(broadcast=True)``), else ``loss`` is None."""

    loss: float | None
    """sum_i loss_scales[i] * loss_i: with the default scales, the mean over micro-batches."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Each metric of ``loss_fn``, combined over micro-batches with the same weights as the loss."""


class PipelineSchedule:
    """Runs micro-batches through one pipeline stage; see the module docstring.

    ``executed_ops`` lists the compute ops of the last call in the order they ran, for inspection.
    Gradients accumulate into ``.grad`` (nothing is zeroed); with tied embeddings call
    ``sync_tied_embedding_grads`` once per optimizer step, after the last ``train_step``.
    """

    def __init__(self, model: torch.nn.Module, *, stage: int = 0, num_stages: int = 1, group=None,
                 ranks: Sequence[int] | None = None, schedule: str = "1f1b", hidden_size: int | None = None,
                 activation_dtype: torch.dtype | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage={stage} outside [0, num_stages={num_stages})")
        if num_stages > 1 and (ranks is None or len(ranks) != num_stages):
            raise ValueError(f"a pipeline of {num_stages} stages needs the global rank of every stage "
                             f"(RoleGroups.ranks['pp']), got {ranks}")
        param = next(model.parameters())
        self.model = model
        self.stage, self.num_stages = stage, num_stages
        self.group, self.ranks = group, tuple(ranks) if ranks is not None else None
        self.schedule = schedule
        self.hidden_size = hidden_size if hidden_size is not None else model.config.hidden_size
        self.activation_dtype = activation_dtype or param.dtype
        self.device = param.device
        self.executed_ops: list[tuple[str, int]] = []

    @classmethod
    def from_groups(cls, model: torch.nn.Module, role_groups, schedule: str = "1f1b",
                    **kwargs) -> "PipelineSchedule":
        """Schedule for this rank's stage of a role's layout (a ``RoleGroups``)."""
        if not role_groups.is_member:
            raise ValueError(f"this rank is not in role {role_groups.role!r}'s pool; only its ranks run its pipeline")
        return cls(model, stage=role_groups.coord.pp, num_stages=role_groups.dims.pp,
                   group=role_groups.groups["pp"], ranks=role_groups.ranks["pp"], schedule=schedule, **kwargs)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    # ---- public steps ---------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn,
                   loss_scales: float | Sequence[float] | None = None, *, broadcast: bool = True,
                   model_kwargs: dict[str, Any] | None = None,
                   after_backward: Callable[[], None] | None = None) -> PipelineResult:
        """Forward and backward every micro-batch with the configured schedule.

        ``loss_fn(outputs, micro_batch) -> (scalar loss, {name: scalar})`` runs on the last stage on
        the head's outputs (logits (B, T, V) or values (B, T)). Micro-batch i's loss is multiplied by
        ``loss_scales[i]`` (one float for all; default 1 / num_micro_batches) before its backward.
        ``broadcast`` sends the loss and metrics from the last stage to every stage of the pipeline.
        ``after_backward()`` runs after each micro-batch's backward (the engine moves bf16 grads
        into fp32 accumulators there).
        """
        try:
            scales, scales_error = self._loss_scales(loss_scales, len(micro_batches)), None
        except ValueError as err:   # raised on every stage by the check below, not here alone
            scales, scales_error = None, err
        self._check_micro_batches(micro_batches, scales_error)  # collective: same outcome everywhere
        state = _StepState(training=True, loss_fn=loss_fn, scales=scales, model_kwargs=model_kwargs or {},
                           after_backward=after_backward)
        self._run(pipeline_ops(self.schedule, self.num_stages, self.stage, len(micro_batches)), micro_batches, state)
        result = state.result() if self.is_last else PipelineResult(None)
        if broadcast and self.num_stages > 1:
            payload = [(result.loss, result.metrics)]
            dist.broadcast_object_list(payload, src=self.ranks[-1], group=self.group)
            result = PipelineResult(*payload[0])
        return result

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[MicroBatch], output_fn: OutputFn | None = None, *,
                     model_kwargs: dict[str, Any] | None = None) -> list | None:
        """Forward every micro-batch (no autograd graph, nothing kept for a backward).

        Returns, on the last stage, ``[output_fn(outputs, micro_batch) for each micro-batch]`` (the raw
        head outputs when ``output_fn`` is None), so e.g. per-token log-probs can be kept instead of
        full logits; None on the other stages.
        """
        self._check_micro_batches(micro_batches)
        state = _StepState(training=False, output_fn=output_fn, model_kwargs=model_kwargs or {})
        self._run([("F", i) for i in range(len(micro_batches))], micro_batches, state)
        return state.outputs if self.is_last else None

    def sync_tied_embedding_grads(self, grad_of: Callable[[torch.Tensor], torch.Tensor] | None = None
                                  ) -> None:
        """Sum the gradients of the embedding (stage 0) and its tied copy ``lm_head`` (last stage).

        Under pp > 1 a tied model keeps two copies of the matrix, one per end of the pipeline; they
        start equal (the loader fills ``lm_head`` from the embedding) and stay equal if both get the
        summed gradient. Call once per optimizer step, before the data-parallel reduction or after
        it (the sum is linear), never per micro-batch step: grads accumulated over several
        ``train_step`` calls would be added twice. A no-op for untied models, value models and pp=1.
        Under TP both ends hold the same vocabulary shard, so each TP rank pairs with its own.
        ``grad_of(param)`` returns the tensor holding a parameter's accumulated gradient, to be
        summed in place (default: ``param.grad``; the engine passes the optimizer's fp32
        accumulator under bf16).
        """
        config = self.model.config
        # ValueModel has no lm_head attribute at all; a CausalLM stage without the head has None.
        if self.num_stages == 1 or not config.tie_word_embeddings or not hasattr(self.model, "lm_head"):
            return
        if not (self.is_first or self.is_last):
            return
        weight = self.model.embed_tokens.weight if self.is_first else self.model.lm_head.weight
        peer = self.ranks[-1] if self.is_first else self.ranks[0]
        if grad_of is not None:
            grad = grad_of(weight)
            other = torch.empty_like(grad)
            self._exchange([(grad.contiguous(), peer)], [(other, peer)])
            grad.add_(other)
            return
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        other = torch.empty_like(grad)
        self._exchange([(grad.contiguous(), peer)], [(other, peer)])
        weight.grad = grad + other

    # ---- execution ------------------------------------------------------------------------------

    def _run(self, ops: list[tuple[str, int]], micro_batches: Sequence[MicroBatch], state: "_StepState") -> None:
        """Execute ``ops``; the sends of each op travel together with the receive of the next."""
        self.executed_ops = []
        sends: list[tuple[torch.Tensor, int]] = []
        for op, i in ops:
            recvs = []
            if op == "F" and not self.is_first:
                recvs.append((self._buffer(micro_batches[i]), self._prev_rank))
            elif op == "B" and not self.is_last:
                recvs.append((self._buffer(micro_batches[i]), self._next_rank))
            self._exchange(sends, recvs)
            received = recvs[0][0] if recvs else None
            if op == "F":
                out = self._forward(i, micro_batches[i], received, state)
                sends = [] if self.is_last else [(out.detach().contiguous(), self._next_rank)]
            else:
                grad_in = self._backward(i, received, state)
                sends = [] if self.is_first else [(grad_in.contiguous(), self._prev_rank)]
            self.executed_ops.append((op, i))
        self._exchange(sends, [])

    def _forward(self, i: int, mb: MicroBatch, received: torch.Tensor | None, state: "_StepState"):
        kwargs = {key: mb[key] for key in MODEL_INPUT_KEYS if key in mb}
        kwargs.update(state.model_kwargs)
        if self.is_first:
            out = self.model(mb["input_ids"], **kwargs)
        else:
            if state.training:
                received.requires_grad_(True)
                state.inputs[i] = received
            out = self.model(hidden_states=received, **kwargs)
        if not self.is_last:
            if state.training:
                state.outputs_for_backward[i] = out
            return out  # (B, T, H)
        if not state.training:
            state.outputs.append(state.output_fn(out, mb) if state.output_fn is not None else out)
            return out
        loss, metrics = state.loss_fn(out, mb)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor as its loss, got {type(loss).__name__} "
                             f"of shape {getattr(loss, 'shape', None)}")
        state.outputs_for_backward[i] = loss * state.scales[i]
        state.add(loss, metrics, state.scales[i])
        return out

    def _backward(self, i: int, grad_out: torch.Tensor | None, state: "_StepState") -> torch.Tensor | None:
        out = state.outputs_for_backward.pop(i)
        if self.is_last:
            torch.autograd.backward(out)  # the scaled scalar loss
        else:
            torch.autograd.backward(out, grad_tensors=grad_out)
        if state.after_backward is not None:
            state.after_backward()
        if self.is_first:
            return None
        received = state.inputs.pop(i)
        return received.grad  # (B, T, H): the gradient the previous stage backpropagates

    # ---- communication --------------------------------------------------------------------------

    @property
    def _prev_rank(self) -> int:
        return self.ranks[self.stage - 1]

    @property
    def _next_rank(self) -> int:
        return self.ranks[self.stage + 1]

    def _buffer(self, mb: MicroBatch) -> torch.Tensor:
        """Receive buffer for micro-batch ``mb``'s activation or its gradient, sized from its input_ids."""
        if "input_ids" not in mb:
            raise ValueError("every pipeline stage needs each micro-batch's input_ids: stages size the hidden "
                             "states they receive as (*input_ids.shape, hidden_size)")
        shape = (*mb["input_ids"].shape, self.hidden_size)  # (B, T, H), or (1, total, H) packed
        return torch.empty(shape, dtype=self.activation_dtype, device=self.device)

    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Post ``sends`` and ``recvs`` (tensor, global peer rank) as one batch and wait for all of them."""
        if not sends and not recvs:
            return
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def _check_micro_batches(self, micro_batches: Sequence[MicroBatch],
                             local_error: ValueError | None = None) -> None:
        """ValueError on every stage unless all stages were given micro-batches of the same shapes.

        The receives are sized from each micro-batch's input_ids, so a stage given other shapes
        would wait forever (or read garbage). One all-reduce of (count, digest of the per-micro-batch
        shapes) runs identically on every stage; only when they disagree do the stages exchange
        their shape lists, again all of them, so every stage raises the same message.
        `local_error` (e.g. bad loss scales on this stage) is raised on every stage the same way.
        """
        if self.num_stages > 1:  # first, so that a stage given none does not leave the others waiting
            shapes = [_micro_batch_shapes(mb) for mb in micro_batches]
            digest = int.from_bytes(hashlib.sha256(repr(shapes).encode()).digest()[:7], "big")  # < 2**56
            local = torch.tensor([len(shapes), digest], dtype=torch.int64, device=self.device)
            failed = torch.tensor([int(local_error is not None)], dtype=torch.int64, device=self.device)
            both = torch.cat([local, -local, failed])
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
            if both[:2].tolist() != (-both[2:4]).tolist():
                per_stage: list[Any] = [None] * self.num_stages
                dist.all_gather_object(per_stage, shapes, group=self.group)
                raise ValueError(_disagreement(per_stage))
            if both[4].item() and local_error is None:
                raise ValueError("another stage of this pipeline was given invalid loss scales (it "
                                 "raised the reason); every stage must be given the same loss_scales")
        if local_error is not None:
            raise local_error
        if len(micro_batches) == 0:
            raise ValueError("no micro-batches given: a pipeline step needs at least one")

    @staticmethod
    def _loss_scales(loss_scales, num_micro_batches: int) -> list[float]:
        if loss_scales is None:
            return [1.0 / max(num_micro_batches, 1)] * num_micro_batches
        if isinstance(loss_scales, (int, float)):
            return [float(loss_scales)] * num_micro_batches
        scales = [float(s) for s in loss_scales]
        if len(scales) != num_micro_batches:
            raise ValueError(f"got {len(scales)} loss scales for {num_micro_batches} micro-batches; "
                             "pass one per micro-batch, a single float, or None for 1/num_micro_batches")
        return scales


def _micro_batch_shapes(mb: MicroBatch) -> tuple:
    """What the stages must agree on: the shape of input_ids and of each model input, by key."""
    keys = ("input_ids", *MODEL_INPUT_KEYS)
    return tuple((key, tuple(mb[key].shape)) for key in keys if isinstance(mb.get(key), torch.Tensor))


def _disagreement(per_stage: list[list[tuple]]) -> str:
    """The message every stage raises: the first micro-batch on which two stages differ."""
    counts = [len(shapes) for shapes in per_stage]
    if len(set(counts)) > 1:
        detail = ", ".join(f"stage {s} has {n} micro-batches" for s, n in enumerate(counts))
    else:
        i = next(i for i in range(counts[0]) if len({shapes[i] for shapes in per_stage}) > 1)
        detail = f"micro-batch {i} has " + ", ".join(
            f"{', '.join(f'{key} {shape}' for key, shape in shapes[i]) or 'no tensors'} on stage {s}"
            for s, shapes in enumerate(per_stage))
    return (f"pipeline stages disagree on their micro-batches: {detail}. Every stage of a pipeline must be "
            "given the same micro-batches (same count, same shapes, same order): stages size the activations "
            "they receive from them")


@dataclass
class _StepState:
    """Per-call bookkeeping of one stage: what the backward needs and what the last stage reports."""

    training: bool
    loss_fn: LossFn | None = None
    output_fn: OutputFn | None = None
    scales: list[float] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    after_backward: Callable[[], None] | None = None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Received hidden states by micro-batch, until their backward has filled ``.grad``."""
    outputs_for_backward: dict[int, torch.Tensor] = field(default_factory=dict)
    """Stage outputs (or the last stage's scaled loss) by micro-batch, until their backward."""
    outputs: list = field(default_factory=list)
    weighted: dict[str, Any] = field(default_factory=dict)
    """Running sums of scale * value, kept as tensors so the GPU is not synced per micro-batch."""

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], scale: float) -> None:
        for name, value in (("__loss__", loss), *metrics.items()):
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.weighted[name] = self.weighted.get(name, 0.0) + value * scale

    def result(self) -> PipelineResult:
        values = {name: float(value) for name, value in self.weighted.items()}
        return PipelineResult(loss=values.pop("__loss__"), metrics=values)
