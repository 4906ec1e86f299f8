"""Generation-layout layers whose weights are the training shards where they already live.

Under the zero-redundancy grouping a generation TP rank's shard of every sharded weight is the union
of ``G = tp / tg`` consecutive training shards: its own and G - 1 gathered from its micro-DP group.
Concatenating them into one tensor would copy the local shard (storing it twice) and would tie the
gathered part to an allocation that also holds the training shard, so it could not be released on
leaving generation. These layers keep the G pieces apart instead: the local piece *is* the training
parameter, the others are views into the all-gather's receive buffer, and each layer computes on
the pieces. Their outputs are exactly those of the generation-layout TP layers
(``hfrl.distributed.tensor_parallel``) over the same rows:

    PieceColumnLinear   pieces [p0_u; p1_u; ...] (fused parts, e.g. [q_u; k_u; v_u] or [gate_u; up_u])
                        -> output [p0_0 .. p0_G-1 ; p1_0 .. ; ...], part by part, as
                        QKVParallelLinear / ColumnParallelLinear at tg would give it; a part
                        replicated over training ranks (kv heads fewer than tp) is taken once
    PieceRowLinear      pieces W_u (out, in_u): y = sum_u x[..., u-th block] @ W_u^T, all-reduced
    PieceEmbedding      pieces of consecutive vocabulary rows; ids outside give 0 before the all-reduce
    PieceLMHead         local logits = [h @ W_0^T, ..., h @ W_G-1^T] over the rank's vocabulary rows

One GEMM per piece instead of one per layer: the price of never storing a weight twice (on CPU the
weights stream at the same rate either way). Weights are plain tensors, not parameters: a
generation model has nothing to train and must not show up in ``parameters()``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hfrl.distributed.tensor_parallel import reduce_from_tp_region, tp_rank, tp_world_size


class _PieceModule(nn.Module):
    """A layer computing on a list of weight pieces, set (and cleared) by the hybrid engine."""

    def __init__(self, group: dist.ProcessGroup | None):
        super().__init__()
        self.group, self.tp, self.tp_rank = group, tp_world_size(group), tp_rank(group)
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] | None = None
        self.placeholder: torch.Tensor | None = None

    def set_pieces(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None) -> None:
        self.weights, self.biases = list(weights), (list(biases) if biases is not None else None)

    def clear(self, placeholder: torch.Tensor | None = None) -> None:
        """Drop the pieces; ``placeholder`` (an empty tensor) keeps the weights' dtype and device."""
        self.weights, self.biases, self.placeholder = [], None, placeholder

    def tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *(self.biases or [])]

    @property
    def weight(self) -> torch.Tensor:
        """The first piece (outside generation the empty placeholder): what callers read a layer's dtype
        and device from."""
        if self.weights:
            return self.weights[0]
        if self.placeholder is None:
            raise RuntimeError(f"{type(self).__name__} has no weights: use it inside HybridEngine.generation()")
        return self.placeholder

    def extra_repr(self) -> str:
        return f"pieces={len(self.weights)}, tp={self.tp}, rank={self.tp_rank}"


class PieceColumnLinear(_PieceModule):
    """Column-parallel over pieces; ``parts`` are the fused parts' rows in every piece, ``take[p]`` the
    pieces whose part ``p`` enters the output (all of them, except replicated kv heads: once)."""

    def __init__(self, parts: list[int], take: list[list[int]], group: dist.ProcessGroup | None):
        super().__init__(group)
        self.parts, self.take = list(parts), [list(t) for t in take]
        bounds, start = [], 0
        for rows in self.parts:
            bounds.append((start, start + rows))
            start += rows
        self.bounds = bounds
        # one part taken from every piece in order: the pieces' outputs side by side
        self._plain = len(self.parts) == 1 and self.take[0] == list(range(len(self.take[0])))

    @property
    def local_out_features(self) -> int:
        return sum(rows * len(t) for rows, t in zip(self.parts, self.take))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = self.biases or [None] * len(self.weights)
        if len(self.weights) == 1 and all(t == [0] for t in self.take):
            return F.linear(x, self.weights[0], biases[0])
        ys = [F.linear(x, w, b) for w, b in zip(self.weights, biases)]
        if self._plain and len(ys) == len(self.take[0]):
            return torch.cat(ys, dim=-1)
        return torch.cat([ys[u][..., lo:hi] for (lo, hi), take in zip(self.bounds, self.take) for u in take], dim=-1)


class PieceRowLinear(_PieceModule):
    """Row-parallel over pieces: input columns split as the pieces' widths; the bias (replicated) is
    ``biases[0]``, added once after the all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, start = None, 0
        for w in self.weights:
            width = w.shape[1]
            part = F.linear(x[..., start:start + width], w)
            y = part if y is None else y.add_(part)
            start += width
        y = reduce_from_tp_region(y, self.group)
        return y if not self.biases else y + self.biases[0]


class PieceEmbedding(_PieceModule):
    """Vocab-parallel embedding over pieces of ``rows`` consecutive ids each, this rank's first id
    ``vocab_start``; ids of other ranks (and padding) give 0 before the all-reduce."""

    def __init__(self, vocab_size: int, rows: int, vocab_start: int, group: dist.ProcessGroup | None):
        super().__init__(group)
        self.vocab_size, self.rows, self.vocab_start = vocab_size, rows, vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = None
        for u, w in enumerate(self.weights):
            start = self.vocab_start + u * self.rows
            end = min(start + self.rows, self.vocab_size)
            outside = (input_ids < start) | (input_ids >= end)
            x = F.embedding((input_ids - start).masked_fill(outside, 0), w).masked_fill(outside[..., None], 0.0)
            out = x if out is None else out.add_(x)
        return reduce_from_tp_region(out, self.group) if self.tp > 1 else out


class PieceLMHead(_PieceModule):
    """Vocab-parallel head over pieces: local logits (..., G * rows), columns past the vocabulary -inf."""

    def __init__(self, vocab_size: int, rows: int, vocab_start: int, group: dist.ProcessGroup | None):
        super().__init__(group)
        self.vocab_size, self.rows, self.vocab_start = vocab_size, rows, vocab_start

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, G * rows) logits of this rank's vocabulary rows, padding included (not masked)."""
        return torch.cat([torch.mm(w, hidden.t()) for w in self.weights], dim=0).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([F.linear(x, w) for w in self.weights], dim=-1)
        real = max(0, min(logits.shape[-1], self.vocab_size - self.vocab_start))
        if real < logits.shape[-1]:
            padding = torch.arange(logits.shape[-1], device=logits.device) >= real
            logits = logits.masked_fill(padding, float("-inf"))
        return logits
