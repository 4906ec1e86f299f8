"""TrainEngine: one role's model trained on this rank's (pp, tp, dp) share, from a HF checkpoint.

    engine = TrainEngine(EngineConfig(model_path=path, optim=OptimConfig(lr=1e-6)), role_groups)
    metrics = engine.train_step(batch, loss_fn)   # batch: this DP replica's rows; same metrics on every rank
    log_probs = engine.compute_log_probs(batch)   # (B, T-1) on the last pipeline stage, None elsewhere

Building (every rank of the role runs it, in the same order):

1. read ``config.json`` and check the layout against the model (tp splits the heads, pp <= layers)
   before any collective, so a bad layout fails the same way on every rank;
2. this rank's pipeline stage, layers ``partition_layers(num_layers, pp)[pp_rank]``, built on the
   meta device, tensor-parallelised and filled with only this rank's slices of the checkpoint;
3. AdamW (bucketed DP all-reduce, or ZeRO-1) and the LR schedule; after loading, because ZeRO-1
   re-binds every parameter to a view of its flat buffer.

One step (``train_step``), as dataflow:

    loss tokens of this rank --all-reduce over DP--> global count G
    micro-batches (by count or token budget), loss weight_i = tokens_i / (G / dp)
    pipeline schedule: forward + backward of every micro-batch, loss_i * weight_i   (grads accumulate,
                       in fp32 accumulators under bf16: moved there after each backward)
    tied embedding: sum the two copies' grads (pp > 1)
    DP average -> global grad norm (TP, PP, ZeRO shards) -> clip -> skip if inf/NaN on any rank
        (with overlap_grad_reduce the DP average of each bucket starts inside the last micro-batch's
        backward, from gradient hooks; the tied copies' buckets wait for their sum and go last)
    AdamW step -> LR schedule step -> zero grads

Loss weighting. ``loss_fn`` returns the mean over its micro-batch's loss tokens. The weights make
sum_i weight_i * mean_i = dp * (this rank's token sum) / G, and the DP average of the gradients
divides by dp, so the step follows the global token mean over every DP rank's tokens, also when
the ranks hold different numbers of tokens (token-budget batches, ragged responses).

Outputs. ``loss_fn`` and ``forward``'s ``output_fn`` see the head's *local* outputs: vocab-sharded
logits (B, T, V_pad/tp) of a CausalLM (padded columns -inf), values (B, T) of a ValueModel; with
``pack_sequences`` (1, total, ...). ``token_log_probs`` / ``token_entropy`` turn local logits into
per-token values without gathering the vocabulary. A per-token RL loss is then a few lines:

    def ppo_loss(logits, mb):
        log_probs = engine.token_log_probs(logits, mb["input_ids"])           # (B, T-1)
        ratio = (log_probs - mb["old_log_probs"][:, 1:]).exp()
        mask = mb["loss_mask"][:, 1:]
        loss = -(torch.min(ratio * mb["advantages"][:, 1:], ...) * mask).sum() / mask.sum()
        return loss, {"ratio": (ratio * mask).sum() / mask.sum()}

Per-token tensors of the batch (shape (B, T, ...)) are cut, trimmed and packed with the batch; the
convention is that position t of a per-token tensor belongs to token t, so a loss over the T-1
predicted tokens uses ``[:, 1:]`` of masks and advantages.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hfrl.distributed.data_parallel import ZeroOneOptimizer, group_size_rank
from hfrl.distributed.grad_overlap import OverlappedGradReduce, overlapped_allreduce, overlapped_zero_one
from hfrl.distributed.parallel_dims import ParallelDims, RoleGroups
from hfrl.distributed.pipeline_parallel import PipelineSchedule, partition_layers
from hfrl.distributed.tensor_parallel import DUPLICATE_ATTR, vocab_parallel_entropy, vocab_parallel_log_probs
from hfrl.engine.config import DTYPE_NAMES, EngineConfig, OptimConfig  # noqa: F401 (re-exported)
from hfrl.engine.microbatch import MicroBatch, make_micro_batches, merge_micro_batch_outputs
from hfrl.engine.optim import build_optimizer, build_scheduler, clip_optimizer_grads, should_skip_step
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM, Decoder, ValueModel
from hfrl.models.parallelize import check_tp, gather_full_state_dict, parallelize_model, tp_from_pretrained

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
AXES = ("tp", "pp", "dp", "mp")
LossFn = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
CPU_OVERLAP_GRAD_REDUCE = True
"""EngineConfig.overlap_grad_reduce=None on CPU (gloo), from benchmarks/train_step.py on 2 shared cores
(median step time on / off, two runs): dp2 0.961 and 0.958; tp2_dp2 (4 ranks on 2 cores) 0.86 and 1.10,
within that run's noise. Overlap never lost beyond noise and won on dp2 both times."""


def token_log_probs(logits_shard: torch.Tensor, input_ids: torch.Tensor, tp_group: Any = None, *,
                    vocab_size: int | None = None) -> torch.Tensor:
    """log p(input_ids[:, t+1] | tokens <= t) from local logits: (B, T, V_pad/tp), (B, T) -> (B, T-1) fp32.

    Vocab-parallel (collective over ``tp_group``, never gathers the vocabulary) and differentiable.
    Packed rows (1, total) work too; positions at a sequence boundary predict the next sequence's
    first token and must be masked (a loss mask is 0 on every sequence's first token).
    """
    return vocab_parallel_log_probs(logits_shard[:, :-1], input_ids[:, 1:], tp_group, vocab_size=vocab_size)


def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of tokens that have a real token before them: the tokens a next-token loss predicts.

    It is ``attention_mask`` with each row's first real token zeroed (left or right padding).
    """
    mask = attention_mask.long()
    first = (mask.cumsum(1) == 1) & mask.bool()
    return mask.masked_fill(first, 0)


class TrainEngine:
    """This rank's pipeline stage of one role's model, its optimizer, and the step functions.

    ``role_groups`` is this rank's ``RoleGroups`` for the role; None means one process, no
    torch.distributed. Every rank of the role must call every method (they are collective over the
    role), each DP replica with its own rows; the TP and PP ranks of a replica with the same batch.

    ``model``: this rank's stage, already tensor-parallel and holding its starting weights, handed
    over in memory (hfrl.integrations.megatron); ``cfg.model_path`` then only supplies config.json
    and no weights are read. It must have exactly the shapes this rank's shard would have.
    """

    def __init__(self, cfg: EngineConfig, role_groups: RoleGroups | None = None,
                 device: torch.device | str | None = None, model: Decoder | None = None):
        cfg.validate()
        self.cfg = cfg
        self.model_config = ModelConfig.from_pretrained(cfg.model_path)
        if role_groups is not None and not role_groups.is_member:
            raise ValueError(f"this rank is not in role {role_groups.role!r}'s pool; build its engine only on "
                             f"the pool's ranks {role_groups.pool_ranks}")
        self.role_groups = role_groups
        self.dims = role_groups.dims if role_groups is not None else ParallelDims()
        check_layout(self.model_config, self.dims, cfg.model_path)
        coord = role_groups.coord if role_groups is not None else None
        self.pp_rank, self.tp_rank, self.dp_rank = (coord.pp, coord.tp, coord.dp) if coord else (0, 0, 0)
        self.groups: dict[str, Any] = {axis: (role_groups.groups.get(axis) if role_groups else None) for axis in AXES}
        self.layer_range = partition_layers(self.model_config.num_layers, self.dims.pp)[self.pp_rank]
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = DTYPES[cfg.dtype]

        if model is None:
            self.model = tp_from_pretrained(cfg.model_path, self.groups["tp"], cfg.value_head,
                                            layer_range=self.layer_range, dtype=self.dtype, device=self.device,
                                            init_missing_value_head=cfg.init_missing_value_head)
        else:
            self.model = self._given_model(model)
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        self._tag_tied_copy()
        if role_groups is not None:
            self.schedule = PipelineSchedule.from_groups(self.model, role_groups, schedule=cfg.pp_schedule)
        else:
            self.schedule = PipelineSchedule(self.model, schedule=cfg.pp_schedule)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, self.groups["dp"])
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.grad_reduce = self._overlapped_grad_reduce()
        """Hooks that start the DP gradient reduction during the last backward; None without overlap."""
        self.step = 0
        """train_step calls so far, skipped steps included (restored by load_checkpoint)."""
        self.skips_in_a_row = 0
        """The latest train_step calls skipped for a non-finite gradient norm (optim.max_consecutive_skips)."""
        self.in_generation = False
        """Set by hfrl.hybrid_engine.HybridEngine while the actor generates: no training step then."""

    def _given_model(self, model: Decoder) -> Decoder:
        """``model`` moved to the engine's device and dtype, once its class and every shape match this
        rank's shard (a meta-device model parallelized like ``tp_from_pretrained``'s)."""
        with torch.device("meta"):
            expected = (ValueModel if self.cfg.value_head else CausalLM)(self.model_config, self.layer_range)
        parallelize_model(expected, self.groups["tp"])
        want = {name: tuple(t.shape) for name, t in expected.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if type(model) is not type(expected) or want != got:
            wrong = sorted(set(want.items()) ^ set(got.items()))[:4]
            raise ValueError(f"the {type(model).__name__} handed to the engine is not this rank's shard of "
                             f"{self.cfg.model_path} (a {type(expected).__name__}, layers {self.layer_range}, "
                             f"tp={self.dims.tp}); first differing (name, shape) entries: {wrong}")
        return model.to(device=self.device, dtype=self.dtype)

    # ---- layout ---------------------------------------------------------------------------------

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_coordinator(self) -> bool:
        """The role's first rank (pp, tp, dp all 0): the one that finishes checkpoints."""
        return self.pp_rank == 0 and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def pool_position(self) -> int:
        """Position of this rank in the role's pool (Megatron order, see parallel_dims)."""
        return (self.pp_rank * self.dims.dp + self.dp_rank) * self.dims.tp + self.tp_rank

    def global_name(self, name: str) -> str:
        """A stage-local parameter name with its global layer index (``layers.{i + offset}...``)."""
        return re.sub(r"^layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + self.layer_range[0]}.", name)

    def stage_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This stage's full (TP-gathered, unpadded) tensors under global hfrl names. Collective over TP.

        Replicated entries (all of them at tp=1) are the live parameters, detached: clone to keep a copy.

        ``state``: other per-parameter tensors of the local shapes, by local name (see gather_full_state_dict).
        """
        full = gather_full_state_dict(self.model, self.groups["tp"], state)
        return {self.global_name(name): tensor for name, tensor in full.items()}

    def _overlapped_grad_reduce(self) -> OverlappedGradReduce | None:
        """DP reduction overlapped with backward (``hfrl.distributed.grad_overlap``) if configured and dp > 1.

        A tied embedding's copy (pp > 1) is reduced last, after its gradient is summed across stages.
        """
        enabled = self.cfg.overlap_grad_reduce
        if enabled is None:
            enabled = self.device.type == "cuda" or CPU_OVERLAP_GRAD_REDUCE
        if not enabled or self.dims.dp == 1:
            return None
        opt, bucket_mb = self.optimizer, self.cfg.optim.bucket_mb
        deferred = [p for p in self._tied_copies() if p.requires_grad]
        if isinstance(opt, ZeroOneOptimizer):
            return overlapped_zero_one(opt, bucket_mb, deferred, order=self.model.parameters())
        return overlapped_allreduce(opt.model_params, opt.master_params, opt.dp_group, bucket_mb, deferred,
                                    order=self.model.parameters())

    def _tied_copies(self) -> list[torch.Tensor]:
        """This stage's copy of a tied embedding matrix under pp > 1 (see sync_tied_embedding_grads)."""
        if self.dims.pp == 1 or not self.model_config.tie_word_embeddings or not hasattr(self.model, "lm_head"):
            return []
        return [m.weight for m in (self.model.embed_tokens, self.model.lm_head) if m is not None]

    def _tag_tied_copy(self) -> None:
        """Under pp > 1 a tied lm_head is a second copy of the embedding: the grad norm must skip it."""
        lm_head = getattr(self.model, "lm_head", None)
        if self.model_config.tie_word_embeddings and lm_head is not None and self.model.embed_tokens is None:
            setattr(lm_head.weight, DUPLICATE_ATTR, True)

    # ---- vocab-parallel helpers for loss functions --------------------------------------------------

    def token_log_probs(self, logits_shard: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V_pad/tp) local logits, (B, T) ids -> (B, T-1) log-probs of each next token (see module fn)."""
        return token_log_probs(logits_shard, input_ids, self.groups["tp"], vocab_size=self.model_config.vocab_size)

    def token_entropy(self, logits_shard: torch.Tensor) -> torch.Tensor:
        """(B, T, V_pad/tp) local logits -> (B, T-1) entropy of each next-token distribution, fp32."""
        return vocab_parallel_entropy(logits_shard[:, :-1], self.groups["tp"], vocab_size=self.model_config.vocab_size)

    # ---- training -------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any], loss_fn: LossFn, *, loss_mask_key: str = "loss_mask"
                   ) -> dict[str, float]:
        """One optimizer step on this DP replica's ``batch``; returns the same metrics on every rank.

        ``batch`` holds ``input_ids`` and ``attention_mask`` (B, T) and whatever ``loss_fn`` needs.
        ``loss_fn(outputs, micro_batch) -> (scalar loss, {name: scalar})`` runs on the last stage and
        must return the mean over the micro-batch's ``batch[loss_mask_key]`` tokens; that mask
        weights micro-batches and DP ranks. Without a ``loss_mask`` the engine adds
        ``target_mask(attention_mask)`` (every real token but each row's first).

        Metrics: ``loss`` and each of loss_fn's metrics as the global token-weighted mean,
        ``grad_norm`` (before clipping), ``lr`` (used by this step), ``num_tokens`` (global loss
        tokens), ``skipped`` (1.0 if the norm was not finite and no update was made).
        """
        if self.in_generation:
            raise RuntimeError("train_step inside HybridEngine.generation(): the generation weights are these "
                               "parameters (or copies gathered from them), and offloaded optimizer state is on the "
                               "host; leave generation() first")
        batch = self._prepare(batch)
        if loss_mask_key not in batch:
            if loss_mask_key != "loss_mask":
                raise ValueError(f"loss_mask_key={loss_mask_key!r} is not in the batch; keys: {sorted(batch)}")
            batch["loss_mask"] = target_mask(batch["attention_mask"])
        global_tokens = self._dp_sum(float(batch[loss_mask_key].sum()))
        if global_tokens == 0:
            raise ValueError(f"no loss tokens: batch[{loss_mask_key!r}] is 0 on every DP rank")
        micro_batches = self._micro_batches(batch, loss_mask_key, global_tokens / self.dims.dp)
        if self.grad_reduce is not None:
            self.grad_reduce.begin_step(len(micro_batches))
        result = self.schedule.train_step([mb.data for mb in micro_batches], loss_fn,
                                          [mb.loss_weight for mb in micro_batches],
                                          after_backward=self._after_backward())
        self.optimizer.accumulate_grads()
        self.schedule.sync_tied_embedding_grads(grad_of=self.optimizer.grad_of)
        metrics = self._dp_sum({**result.metrics, "loss": result.loss})
        metrics = {name: value / self.dims.dp for name, value in metrics.items()}
        grad_norm, skipped, lr = self._optimizer_step()
        self.step += 1
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "num_tokens": global_tokens, "skipped": float(skipped)}

    def _after_backward(self) -> Callable[[], None] | None:
        """What runs after each micro-batch's backward: under bf16 the grads move into fp32
        accumulators (so the sum over micro-batches is fp32; under fp32 .grad already is), and the
        overlapped reduction counts backwards to arm its hooks for the last one."""
        low_precision = self.dtype != torch.float32
        if self.grad_reduce is None:
            return self.optimizer.accumulate_grads if low_precision else None

        def after_backward() -> None:
            if low_precision:
                self.optimizer.accumulate_grads()
            self.grad_reduce.after_backward()
        return after_backward

    def _optimizer_step(self) -> tuple[float, bool, float]:
        opt, optim_cfg = self.optimizer, self.cfg.optim
        try:
            if self.grad_reduce is not None:
                self.grad_reduce.finish()  # launched during the last backward; the rest now
            else:
                opt.reduce_gradients()
            grad_norm = clip_optimizer_grads(opt, optim_cfg.grad_clip, self.groups["tp"], self.groups["pp"])
            skipped = should_skip_step(grad_norm, optim_cfg.skip_nonfinite, (self.groups["mp"], self.groups["dp"]))
            lr = float(opt.param_groups[0]["lr"])
            if not skipped:
                opt.step()
                self.scheduler.step()
        finally:
            opt.zero_grad()
        # the same on every rank of the role: should_skip_step reduced the flag over all of them
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        limit = optim_cfg.max_consecutive_skips
        if limit and self.skips_in_a_row >= limit:
            raise FloatingPointError(
                f"{self.skips_in_a_row} optimizer steps in a row had a non-finite gradient norm (the last: {grad_norm}) "
                f"and were skipped: the loss or the model produce inf/NaN (a bad reward, too high a learning rate, "
                f"bad data). Stopped at optim.max_consecutive_skips={limit}; resume from the last checkpoint with a "
                "fix, or set it to 0 to never stop")
        return grad_norm, skipped, lr

    # ---- forward only ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: dict[str, Any], output_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
                | None = None) -> torch.Tensor | None:
        """Forward-only pass over ``batch`` in micro-batches; outputs merged back into row order.

        ``output_fn(outputs, micro_batch)`` reduces the head's local outputs per micro-batch (e.g. to
        per-token log-probs) and must return per-token (n, t, ...) tensors ((1, total, ...) packed)
        or per-sequence (n, ...) ones. Returns (B, T, ...) / (B, ...) with 0 at trimmed padding on
        every rank of the last pipeline stage (all its TP ranks, identical when ``output_fn``
        reduces over TP as ``token_log_probs`` does), None on the other stages.
        """
        batch = self._prepare(batch)
        micro_batches = self._micro_batches(batch, "attention_mask", None)
        outputs = self.schedule.forward_only([mb.data for mb in micro_batches], output_fn)
        if outputs is None:
            return None
        B, T = batch["attention_mask"].shape
        return merge_micro_batch_outputs(outputs, micro_batches, B, T)

    def compute_log_probs(self, batch: dict[str, Any], temperature: float = 1.0) -> torch.Tensor | None:
        """(B, T-1) fp32: column t is log p(input_ids[:, t+1]) under logits / temperature; 0 where token
        t or t+1 is padding. On the last pipeline stage, None elsewhere (see ``forward``)."""
        if self.cfg.value_head:
            raise ValueError("compute_log_probs needs a CausalLM engine; this one has a value head")

        def output_fn(logits: torch.Tensor, mb: dict[str, Any]) -> torch.Tensor:
            if temperature != 1.0:
                logits = logits / temperature
            return F.pad(self.token_log_probs(logits, mb["input_ids"]), (0, 1))  # (n, t): t-th predicts t+1

        out = self.forward(batch, output_fn)
        if out is None:
            return None
        mask = batch["attention_mask"].to(out.device)
        return out[:, :-1] * (mask[:, 1:] * mask[:, :-1])

    def compute_values(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """(B, T) fp32 values of a ValueModel engine, 0 at padding; on the last stage, None elsewhere."""
        if not self.cfg.value_head:
            raise ValueError("compute_values needs an engine built with value_head=True")
        out = self.forward(batch, lambda values, mb: values.float())
        if out is None:
            return None
        return out * batch["attention_mask"].to(out.device)

    # ---- helpers --------------------------------------------------------------------------------

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        for key in ("input_ids", "attention_mask"):
            if key not in batch:
                raise ValueError(f"batch has no {key!r}; a batch needs input_ids and attention_mask (B, T), "
                                 f"got keys {sorted(batch)}")
        if batch["input_ids"].shape != batch["attention_mask"].shape or batch["input_ids"].dim() != 2:
            raise ValueError(f"input_ids {tuple(batch['input_ids'].shape)} and attention_mask "
                             f"{tuple(batch['attention_mask'].shape)} must both be (B, T)")
        if batch["input_ids"].shape[0] == 0:
            raise ValueError("empty batch: every DP rank needs at least one sequence")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _micro_batches(self, batch: dict[str, Any], loss_mask_key: str, total_tokens: float | None
                       ) -> list[MicroBatch]:
        cfg = self.cfg
        if cfg.max_tokens_per_micro_batch is not None:
            split = dict(max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch)
        else:  # at most one micro-batch per row (a derived count, not written back)
            split = dict(num_micro_batches=min(cfg.num_micro_batches or 1, batch["input_ids"].shape[0]))
        return make_micro_batches(batch, packed=cfg.pack_sequences, loss_mask_key=loss_mask_key,
                                  total_tokens=total_tokens, **split)

    def _dp_sum(self, values):
        """Sum a float, or a dict of floats (same keys on every rank), over the DP group."""
        group = self.groups["dp"]
        if group_size_rank(group)[0] == 1:
            return values
        names = sorted(values) if isinstance(values, dict) else None
        flat = [values[n] for n in names] if names is not None else [values]
        tensor = torch.tensor(flat, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor, group=group)
        summed = tensor.tolist()
        return dict(zip(names, summed)) if names is not None else summed[0]

    @property
    def collective_device(self) -> torch.device:
        """Where small tensors for collectives live: the engine's CUDA device under NCCL, else the CPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def check_layout(config: ModelConfig, dims: ParallelDims, where: str = "") -> None:
    """ValueError unless ``dims`` can train ``config``: tp splits heads and MLP, pp <= num_layers."""
    try:
        check_tp(config, dims.tp)
        partition_layers(config.num_layers, dims.pp)
    except ValueError as err:
        raise ValueError(f"{where + ': ' if where else ''}layout {dims.describe()}: {err}") from None


def _default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
