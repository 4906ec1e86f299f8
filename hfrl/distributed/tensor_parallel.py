"""Megatron-style tensor parallelism: communication with autograd, parallel layers, vocab-parallel log-softmax.

Every function takes the TP ``group`` (a torch ProcessGroup, e.g. ``RoleGroups.groups["tp"]``);
``group=None`` or a group of size 1 means no TP and does no communication.

Communication, each the other's transpose (Megatron's names, f and g of its paper):

    copy_to_tp_region       identity          | all-reduce grad     (input of a column-parallel layer)
    reduce_from_tp_region   all-reduce        | identity            (output of a row-parallel layer)
    gather_from_tp_region   all-gather last   | keep own chunk      (sharded -> full activations)
    scatter_to_tp_region    keep own chunk    | all-gather last     (full -> sharded activations)

Layers hold only their local shard; which rows/columns that is (fused q/k/v and gate/up parts each
split separately) is decided by the loader (``hfrl.models.weights.shard_slices``), not here.
Sharded parameters carry ``param.hfrl_shard`` = "column" | "row" | "vocab"; replicated ones carry
nothing, so gradient-norm code counts each shard once and each replicated parameter once (see
``tp_local_sq_norm``). The tag survives ``.to()``/``.to_empty()`` (the layers re-tag in ``_apply``).

Vocabulary: V is padded to ``V_pad = ceil(V / tp) * tp`` (Megatron pads likewise, to a multiple of
tp); rank r holds rows ``[r * V_pad/tp, (r+1) * V_pad/tp)``. Padded embedding rows are never looked
up; padded logit columns are -inf, so they get probability 0 and their weight rows no gradient.
``vocab_parallel_log_probs``/``vocab_parallel_entropy`` never materialise the full vocab dim: they
all-reduce a max, a sum of exps and one more sum per token.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SHARD_ATTR = "hfrl_shard"
"""Attribute naming how a sharded parameter is split: "column", "row" or "vocab"."""
REPLICATED_ROWS_ATTR = "hfrl_replicated_rows"
"""(start, stop, num_replicas): rows of a column shard that num_replicas TP ranks hold identically
(k/v heads when num_kv_heads < tp)."""
DUPLICATE_ATTR = "hfrl_duplicate"
"""True on a parameter that is an exact copy of one another pipeline stage holds (the last stage's
tied lm_head, kept equal to stage 0's embedding by ``sync_tied_embedding_grads``): gradient-norm
code skips it so the pair counts once. Set by the training engine."""


# ---- groups ----------------------------------------------------------------------------------------


def tp_world_size(group: dist.ProcessGroup | None) -> int:
    """Size of the TP group; 1 for ``None`` (no TP)."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index inside the TP group; 0 for ``None``."""
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """V rounded up to a multiple of tp, as Megatron pads its vocabulary."""
    return math.ceil(vocab_size / tp) * tp


_padding_logged: set[tuple[int, int]] = set()


def _log_vocab_padding(vocab_size: int, group: dist.ProcessGroup | None) -> int:
    """Padded V for ``group``; TP rank 0 says so once per process when padding is needed."""
    tp = tp_world_size(group)
    padded = padded_vocab_size(vocab_size, tp)
    if padded != vocab_size and tp_rank(group) == 0 and (vocab_size, tp) not in _padding_logged:
        _padding_logged.add((vocab_size, tp))
        logger.warning("vocab padded from %d to %d to split it evenly over tp=%d (padded logits are -inf)",
                       vocab_size, padded, tp)
    return padded


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce (inputs may be saved by autograd)."""
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _own_chunk_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    tp = tp_world_size(group)
    if x.shape[-1] % tp:
        raise ValueError(f"last dim {x.shape[-1]} of shape {tuple(x.shape)} is not divisible by tp={tp}")
    return x.chunk(tp, dim=-1)[tp_rank(group)].contiguous()


# ---- communication with autograd ------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk_last_dim(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (the input of a column-parallel layer)."""
    return x if tp_world_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (the output of a row-parallel layer)."""
    return x if tp_world_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(..., D/tp) -> (..., D) concatenated in TP-rank order; backward keeps this rank's chunk."""
    return x if tp_world_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(..., D) -> this rank's chunk (..., D/tp); backward all-gathers the gradient."""
    return x if tp_world_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_vocab_logits(logits_shard: torch.Tensor, group: dist.ProcessGroup | None,
                        vocab_size: int) -> torch.Tensor:
    """Local logits (..., V_pad/tp) -> full logits (..., V), padding dropped (differentiable)."""
    return gather_from_tp_region(logits_shard, group)[..., :vocab_size]


class _SyncReplicatedRowsGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient of rows [start, stop) over the ranks holding them.

    Ranks r with the same ``r // num_replicas`` hold the same rows (a replicated kv head). Each rank
    writes its rows' gradient into its slot of a (tp / num_replicas)-slot buffer and the whole TP
    group all-reduces it, so no sub-group has to be created.
    """

    @staticmethod
    def forward(ctx, weight, start, stop, num_replicas, group):
        ctx.rows, ctx.num_replicas, ctx.group = (start, stop), num_replicas, group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        start, stop = ctx.rows
        tp, rank = tp_world_size(ctx.group), tp_rank(ctx.group)
        slots = grad.new_zeros(tp // ctx.num_replicas, stop - start, *grad.shape[1:])
        slots[rank // ctx.num_replicas] = grad[start:stop]
        slots = _all_reduce(slots, ctx.group)
        grad = grad.clone()
        grad[start:stop] = slots[rank // ctx.num_replicas]
        return grad, None, None, None, None


# ---- layers ----------------------------------------------------------------------------------------


class _TPModule(nn.Module):
    """Base of the TP layers: knows its group and re-tags its parameters after every ``_apply``."""

    shard_kinds: dict[str, str] = {}  # parameter name -> shard kind (absent: replicated)

    def _tag(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            kind = self.shard_kinds.get(name)
            if kind is not None:
                setattr(param, SHARD_ATTR, kind)
            elif hasattr(param, SHARD_ATTR):
                delattr(param, SHARD_ATTR)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._tag()  # meta -> real (to_empty) creates new Parameter objects without our attributes
        return self

    def extra_repr(self) -> str:
        return f"tp={self.tp}, rank={self.tp_rank}"


class ColumnParallelLinear(_TPModule):
    """y_local = x @ W_local^T + b_local, with W split on its output dim (rows). Output stays sharded.

    ``out_features`` is the global width, split evenly; a fused layer whose local width is not
    out_features / tp (replicated kv heads) passes ``local_out_features``. ``gather_output=True``
    all-gathers the output to (..., out_features) (only for evenly split layers).
    """

    shard_kinds = {"weight": "column", "bias": "column"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, *, gather_output: bool = False,
                 local_out_features: int | None = None, device=None, dtype=None):
        super().__init__()
        self.group, self.tp, self.tp_rank = group, tp_world_size(group), tp_rank(group)
        if local_out_features is None:
            if out_features % self.tp:
                raise ValueError(f"ColumnParallelLinear: out_features={out_features} is not divisible by "
                                 f"tp={self.tp}; pass local_out_features for an uneven fused layer")
            local_out_features = out_features // self.tp
        self.in_features, self.out_features = in_features, out_features
        self.local_out_features, self.gather_output = local_out_features, gather_output
        self.weight = nn.Parameter(torch.empty(local_out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local_out_features, device=device, dtype=dtype)) if bias else None
        self._tag()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)  # (..., out/tp)
        return gather_from_tp_region(y, self.group) if self.gather_output else y


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection; local rows ``[q_r; k_r; v_r]`` (whole heads).

    With num_kv_heads < tp each rank holds the one kv head its query heads use, shared by
    tp / num_kv_heads ranks; those replicas' k/v gradients are summed in backward so they stay equal
    and equal the single-process gradient (rows tagged by ``hfrl_replicated_rows``).
    """

    def __init__(self, in_features: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, *, device=None, dtype=None):
        tp = tp_world_size(group)
        check_head_split(num_heads, num_kv_heads, tp)
        local_heads, local_kv_heads = num_heads // tp, max(1, num_kv_heads // tp)
        local_rows = (local_heads + 2 * local_kv_heads) * head_dim
        # plain attributes, set before Module.__init__ because its _tag() reads them
        self.local_num_heads, self.local_num_kv_heads = local_heads, local_kv_heads
        self.kv_replicas = max(1, tp // num_kv_heads)
        self.kv_rows = (local_heads * head_dim, local_rows)  # [k_r; v_r] rows of the local shard
        super().__init__(in_features, (num_heads + 2 * num_kv_heads) * head_dim, bias, group,
                         local_out_features=local_rows, device=device, dtype=dtype)

    def _tag(self) -> None:
        super()._tag()
        for param in self.parameters(recurse=False):
            if self.kv_replicas > 1:
                setattr(param, REPLICATED_ROWS_ATTR, (*self.kv_rows, self.kv_replicas))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.kv_replicas > 1:
            weight = _SyncReplicatedRowsGrad.apply(weight, *self.kv_rows, self.kv_replicas, self.group)
            if bias is not None:
                bias = _SyncReplicatedRowsGrad.apply(bias, *self.kv_rows, self.kv_replicas, self.group)
        return F.linear(copy_to_tp_region(x, self.group), weight, bias)  # (..., local_rows)


class RowParallelLinear(_TPModule):
    """y = all_reduce(x_local @ W_local^T) + b, with W split on its input dim; x arrives sharded.

    The bias is replicated and added once, after the reduce.
    """

    shard_kinds = {"weight": "row"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, *, input_is_parallel: bool = True, device=None, dtype=None):
        super().__init__()
        self.group, self.tp, self.tp_rank = group, tp_world_size(group), tp_rank(group)
        if in_features % self.tp:
            raise ValueError(f"RowParallelLinear: in_features={in_features} is not divisible by tp={self.tp}")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.tp, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._tag()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)  # (..., out)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(_TPModule):
    """Rows [start, start + V_pad/tp) of the embedding; ids outside them give 0 before the all-reduce."""

    shard_kinds = {"weight": "vocab"}

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup | None = None, *,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.tp, self.tp_rank = group, tp_world_size(group), tp_rank(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = _log_vocab_padding(num_embeddings, group)
        per = self.padded_num_embeddings // self.tp
        self.vocab_start = self.tp_rank * per
        self.vocab_end = min(self.vocab_start + per, num_embeddings)  # real ids only: padding is never looked up
        self.weight = nn.Parameter(torch.empty(per, embedding_dim, device=device, dtype=dtype))
        self._tag()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)  # (B, T, H) partial
        return reduce_from_tp_region(x, self.group)


class VocabParallelLMHead(ColumnParallelLinear):
    """Column-parallel LM head over the padded vocab: (..., H) -> local logits (..., V_pad/tp).

    Padded columns are -inf, so softmax gives them 0 and their (zero) weight rows get no gradient.
    Concatenating the ranks' logits in rank order and dropping the last V_pad - V columns gives the
    full logits (``gather_vocab_logits``).
    """

    shard_kinds = {"weight": "vocab"}

    def __init__(self, hidden_size: int, vocab_size: int, group: dist.ProcessGroup | None = None, *,
                 device=None, dtype=None):
        padded = _log_vocab_padding(vocab_size, group)
        super().__init__(hidden_size, padded, bias=False, group=group, device=device, dtype=dtype)
        self.vocab_size, self.padded_vocab_size = vocab_size, padded
        self.vocab_start = self.tp_rank * self.local_out_features
        self.num_real = max(0, min(self.local_out_features, vocab_size - self.vocab_start))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)  # (..., V_pad/tp)
        if self.num_real < self.local_out_features:
            padding = torch.arange(self.local_out_features, device=logits.device) >= self.num_real
            logits = logits.masked_fill(padding, float("-inf"))
        return logits


# ---- vocab-parallel log-softmax ---------------------------------------------------------------------


def _shifted_logits(logits_shard: torch.Tensor, group, vocab_size: int | None) -> torch.Tensor:
    """fp32 logits minus the global per-token max, padded columns (global index >= vocab_size) -inf."""
    z = logits_shard.float()
    if vocab_size is not None:
        start = tp_rank(group) * z.shape[-1]
        if start + z.shape[-1] > vocab_size:
            padding = torch.arange(start, start + z.shape[-1], device=z.device) >= vocab_size
            z = z.masked_fill(padding, float("-inf"))
    z_max = z.max(dim=-1, keepdim=True).values  # (B, T, 1)
    if tp_world_size(group) > 1:
        z_max = _all_reduce(z_max, group, dist.ReduceOp.MAX)
    return z - z_max


def _log_sum_exp(z: torch.Tensor, group) -> torch.Tensor:
    """log sum_v exp z over the whole vocab, (B, T, 1); z already shifted (max 0)."""
    sum_exp = z.exp().sum(dim=-1, keepdim=True)
    if tp_world_size(group) > 1:
        sum_exp = _all_reduce(sum_exp, group)
    return sum_exp.log()


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_shard, labels, group, vocab_size):
        z = _shifted_logits(logits_shard, group, vocab_size)  # (B, T, V/tp) fp32
        log_probs = z - _log_sum_exp(z, group)  # (B, T, V/tp) local log-softmax
        start = tp_rank(group) * z.shape[-1]
        in_shard = (labels >= start) & (labels < start + z.shape[-1])  # (B, T)
        local_labels = (labels - start).masked_fill(~in_shard, 0)
        picked = log_probs.gather(-1, local_labels[..., None]).squeeze(-1).masked_fill(~in_shard, 0.0)
        if tp_world_size(group) > 1:
            picked = _all_reduce(picked, group)  # exactly one rank holds each label
        ctx.save_for_backward(log_probs, local_labels, in_shard)
        ctx.input_dtype = logits_shard.dtype
        return picked  # (B, T) fp32

    @staticmethod
    def backward(ctx, grad):
        log_probs, local_labels, in_shard = ctx.saved_tensors
        # d log p_y / d z_v = 1[v = y] - p_v
        grad_logits = log_probs.exp().mul_(-grad[..., None])  # (B, T, V/tp)
        grad_logits.scatter_add_(-1, local_labels[..., None], (grad * in_shard)[..., None])
        return grad_logits.to(ctx.input_dtype), None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_shard, group, vocab_size):
        z = _shifted_logits(logits_shard, group, vocab_size)
        log_probs = z - _log_sum_exp(z, group)  # (B, T, V/tp)
        probs = log_probs.exp()
        p_log_p = torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1)  # (B, T); -inf columns give 0
        if tp_world_size(group) > 1:
            p_log_p = _all_reduce(p_log_p, group)
        entropy = -p_log_p
        ctx.save_for_backward(log_probs, entropy)
        ctx.input_dtype = logits_shard.dtype
        return entropy  # (B, T) fp32

    @staticmethod
    def backward(ctx, grad):
        log_probs, entropy = ctx.saved_tensors
        # d H / d z_v = -p_v (log p_v + H); zero where p_v = 0 (padding), where log p_v is -inf
        probs = log_probs.exp()
        grad_logits = torch.where(probs > 0, -probs * (log_probs + entropy[..., None]), 0.0) * grad[..., None]
        return grad_logits.to(ctx.input_dtype), None, None


def vocab_parallel_log_probs(logits_shard: torch.Tensor, labels: torch.Tensor,
                             group: dist.ProcessGroup | None = None, *, vocab_size: int | None = None
                             ) -> torch.Tensor:
    """log softmax(logits)[labels] without gathering the vocab: (B, T, V_pad/tp), (B, T) -> (B, T) fp32.

    ``labels`` are global token ids in [0, V); an id outside gives -logsumexp (mask such positions).
    ``vocab_size`` masks padded columns when the logits do not already hold -inf there.
    """
    return _VocabParallelLogProbs.apply(logits_shard, labels, group, vocab_size)


def vocab_parallel_entropy(logits_shard: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                           vocab_size: int | None = None) -> torch.Tensor:
    """Entropy -sum_v p_v log p_v of softmax(logits) without gathering the vocab: (B, T, V_pad/tp) -> (B, T) fp32."""
    return _VocabParallelEntropy.apply(logits_shard, group, vocab_size)


# ---- checks and norms ------------------------------------------------------------------------------


def check_head_split(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """ValueError unless tp splits the query heads evenly and the kv heads evenly or by replication."""
    if not _splits(num_heads, num_kv_heads, tp):
        raise ValueError(
            f"tp={tp} cannot split attention with num_heads={num_heads}, num_kv_heads={num_kv_heads}: tp must "
            f"divide num_heads, and divide num_kv_heads or be a multiple of it (then kv heads are replicated); "
            f"choose tp among {[t for t in range(1, num_heads + 1) if _splits(num_heads, num_kv_heads, t)]}")


def _splits(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    return num_heads % tp == 0 and (num_kv_heads % tp == 0 if num_kv_heads >= tp else tp % num_kv_heads == 0)


def tp_local_sq_norm(tensor: torch.Tensor, param: nn.Parameter, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's share of ||tensor||^2 (tensor: ``param`` or its grad) so that a SUM all-reduce over
    the TP group gives the global squared norm: sharded parameters count fully, replicated ones 1/tp,
    replicated kv rows 1/num_replicas. fp32 scalar."""
    sq = tensor.float().pow(2)
    if getattr(param, SHARD_ATTR, None) is None:
        return sq.sum() / tp_world_size(group)
    rows = getattr(param, REPLICATED_ROWS_ATTR, None)
    if rows is None:
        return sq.sum()
    start, stop, num_replicas = rows
    return sq.sum() - sq[start:stop].sum() * (1 - 1 / num_replicas)
