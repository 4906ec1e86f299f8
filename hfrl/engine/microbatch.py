"""Splitting a batch into micro-batches, balancing sequences over DP ranks, packing.

A batch is a dict of tensors with ``attention_mask`` (B, T) (1 = real token, any padding side).
Tensors whose first two dims are (B, T) are per-token: they are row-selected, column-trimmed and
packed together with the mask. Other tensors with first dim B are per-sequence and only
row-selected; everything else is passed to every micro-batch unchanged.

Gradient accumulation reproduces the full-batch mean loss when each micro-batch's loss is the
token mean over its own tokens and is scaled by ``MicroBatch.loss_weight`` = (loss tokens in the
micro-batch) / (loss tokens in the batch) before backward:

    full_mean = sum_all(l * m) / sum_all(m) = sum_i (sum_i(m) / sum_all(m)) * mean_i

Under DP the gradients are then averaged over ranks, which is the global token mean only if every
rank has the same number of loss tokens; otherwise pass ``total_tokens`` = (global loss tokens) / dp.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class MicroBatch:
    data: dict[str, Any]
    """Model inputs and per-token tensors: padded (n, t) with t trimmed, or packed (1, total) with
    ``cu_seqlens`` (n + 1,) and ``position_ids`` (1, total) and no ``attention_mask``."""
    indices: list[int]
    """Rows of the full batch in this micro-batch, in the order of ``data``."""
    attention_mask: torch.Tensor
    """(n, t) real-token mask of these rows after trimming (to unpack packed outputs)."""
    columns: tuple[int, int]
    """[start, end) columns of the full batch kept by trimming."""
    loss_weight: float
    """Loss tokens here / loss tokens in the batch (or ``total_tokens``): scale the loss by it."""
    num_tokens: int
    """Loss tokens (sum of the loss mask) in this micro-batch."""
    packed: bool
    """Whether ``data`` is packed (one row, ``cu_seqlens``)."""


# ---- partitions of sequence indices ---------------------------------------------------------------

def partition_by_count(num_items: int, num_parts: int) -> list[list[int]]:
    """Contiguous index ranges of near-equal size (the first ``num_items % num_parts`` get one more)."""
    if num_parts < 1 or num_parts > num_items:
        raise ValueError(f"cannot split {num_items} sequences into num_micro_batches={num_parts}: "
                         f"expected 1 <= num_micro_batches <= {num_items}")
    size, extra = divmod(num_items, num_parts)
    parts, start = [], 0
    for i in range(num_parts):
        end = start + size + (i < extra)
        parts.append(list(range(start, end)))
        start = end
    return parts


def partition_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: bins of indices whose lengths sum to at most ``max_tokens``.

    A sequence longer than the budget gets a bin of its own (nothing else fits next to it). Bins
    come in creation order (longest sequences first); indices inside a bin are ascending.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch={max_tokens!r} must be a positive number of tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def balance_across_dp(lengths: Sequence[int], dp: int, equal_size: bool = True) -> list[list[int]]:
    """Partition sequence indices into ``dp`` groups of near-equal total length (Karmarkar-Karp).

    Largest differencing method for k-way partitions: start from one partial solution per item
    (or, with ``equal_size``, per run of dp consecutive items in sorted order, one item per
    group), then repeatedly merge the two partial solutions with the largest spread, pairing the
    heaviest groups of one with the lightest of the other. A merge never increases the spread
    beyond that of its inputs, so max - min of the group totals is at most max(lengths) (with
    ``equal_size``, at most the largest gap inside one run). ``equal_size`` gives every group
    len(lengths) / dp sequences. Returns group r for DP rank r, indices ascending.
    """
    n = len(lengths)
    if dp < 1:
        raise ValueError(f"dp={dp!r} must be a positive integer")
    if equal_size and n % dp:
        raise ValueError(f"{n} sequences cannot be split into dp={dp} groups of equal size; pad the batch "
                         "to a multiple of dp or pass equal_size=False")
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    # A partial solution: dp groups as (total, indices), kept sorted by total.
    if equal_size:
        starts = [[(lengths[i], [i]) for i in order[c:c + dp]] for c in range(0, n, dp)]
    else:
        starts = [[(lengths[i], [i])] + [(0, []) for _ in range(dp - 1)] for i in order]
    heap: list[tuple[int, int, list]] = []
    for tiebreak, state in enumerate(starts):
        state.sort(key=lambda g: g[0])
        heapq.heappush(heap, (-(state[-1][0] - state[0][0]), tiebreak, state))
    tiebreak = len(starts)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = sorted(((ta + tb, ia + ib) for (ta, ia), (tb, ib) in zip(a, reversed(b))), key=lambda g: g[0])
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), tiebreak, merged))
        tiebreak += 1
    groups = [sorted(ix) for _, ix in heap[0][2]] if heap else [[] for _ in range(dp)]
    return sorted(groups, key=lambda g: (not g, g[:1]))  # deterministic: by first index, empty last


# ---- trimming and packing ------------------------------------------------------------------------

def real_column_span(attention_mask: torch.Tensor) -> tuple[int, int]:
    """[start, end) from the first to the last column holding any real token.

    A contiguous span (not every all-pad column) keeps un-trimming a plain slice; with left-padded
    prompts and right-padded responses all all-pad columns are at the two edges anyway.
    """
    cols = attention_mask.bool().any(0).nonzero().flatten()
    if cols.numel() == 0:
        return 0, min(1, attention_mask.shape[1])
    return int(cols[0]), int(cols[-1]) + 1


def pack_sequences(data: dict[str, Any], attention_mask: torch.Tensor) -> dict[str, Any]:
    """Padded (n, t) rows -> one packed row of their real tokens.

    Per-token tensors (n, t, ...) become (1, total, ...) in row order; ``cu_seqlens`` (n + 1,)
    int32 holds the cumulative lengths and ``position_ids`` (1, total) restart at 0 per sequence
    (unless ``data`` brings its own). ``attention_mask`` is dropped: the model takes either one.
    """
    real = attention_mask.bool()  # (n, t)
    n, t = real.shape
    lengths = real.sum(1)  # (n,)
    cu_seqlens = torch.zeros(n + 1, dtype=torch.int32, device=real.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    packed = {}
    for key, value in data.items():
        if key == "attention_mask":
            continue
        if _is_per_token(value, n, t):
            packed[key] = value[real][None]  # (1, total, ...)
        else:
            packed[key] = value
    packed["cu_seqlens"] = cu_seqlens
    if "position_ids" not in packed:
        total = int(cu_seqlens[-1])
        seq_ids = torch.repeat_interleave(torch.arange(n, device=real.device), lengths)  # (total,)
        packed["position_ids"] = (torch.arange(total, device=real.device) - cu_seqlens[seq_ids])[None]
    return packed


def unpack_sequences(packed: torch.Tensor, attention_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(1, total, ...) outputs of a packed row -> (n, t, ...) padded like ``attention_mask``."""
    real = attention_mask.bool()
    out = packed.new_full((*real.shape, *packed.shape[2:]), fill)
    out[real] = packed[0]
    return out


def _is_per_token(value: Any, batch_size: int, seq_len: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch_size, seq_len)


# ---- the split ------------------------------------------------------------------------------------

def make_micro_batches(batch: dict[str, Any], *, num_micro_batches: int | None = None,
                       max_tokens_per_micro_batch: int | None = None, trim_padding: bool = True,
                       packed: bool = False, loss_mask_key: str = "attention_mask",
                       total_tokens: int | None = None) -> list[MicroBatch]:
    """Split ``batch`` by count (contiguous rows) or by token budget (first-fit decreasing).

    Give exactly one of ``num_micro_batches`` and ``max_tokens_per_micro_batch``; the budget
    bounds the real tokens of a micro-batch (a longer sequence goes alone). ``trim_padding`` drops
    the all-pad column span edges of each micro-batch, ``packed`` turns it into one packed row.
    Loss weights count ``batch[loss_mask_key]`` (e.g. a response mask) and sum to 1 over the
    micro-batches unless ``total_tokens`` overrides the denominator (see the module docstring).
    """
    if "attention_mask" not in batch:
        raise ValueError(f"batch has no 'attention_mask' (B, T); keys: {sorted(batch)}")
    if loss_mask_key not in batch:
        raise ValueError(f"loss_mask_key={loss_mask_key!r} is not in the batch; keys: {sorted(batch)}")
    mask = batch["attention_mask"]
    B, T = mask.shape
    if (num_micro_batches is None) == (max_tokens_per_micro_batch is None):
        raise ValueError("pass exactly one of num_micro_batches and max_tokens_per_micro_batch, got "
                         f"{num_micro_batches!r} and {max_tokens_per_micro_batch!r}")
    if num_micro_batches is not None:
        parts = partition_by_count(B, num_micro_batches)
    else:
        parts = partition_by_token_budget(mask.sum(1).tolist(), max_tokens_per_micro_batch)
    total = int(batch[loss_mask_key].sum()) if total_tokens is None else total_tokens
    micro_batches = []
    for indices in parts:
        rows = torch.tensor(indices, dtype=torch.long, device=mask.device)
        data = {k: (v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B
                    else v) for k, v in batch.items()}
        start, end = real_column_span(data["attention_mask"]) if trim_padding else (0, T)
        data = {k: (v[:, start:end] if _is_per_token(batch[k], B, T) else v) for k, v in data.items()}
        mb_mask = data["attention_mask"]
        num_tokens = int(data[loss_mask_key].sum())
        if packed:
            data = pack_sequences(data, mb_mask)
        micro_batches.append(MicroBatch(data=data, indices=indices, attention_mask=mb_mask, columns=(start, end),
                                        loss_weight=num_tokens / total if total else 0.0,
                                        num_tokens=num_tokens, packed=packed))
    return micro_batches


def merge_micro_batch_outputs(outputs: Sequence[torch.Tensor], micro_batches: Sequence[MicroBatch],
                              batch_size: int, seq_len: int, fill: float = 0.0) -> torch.Tensor:
    """Per-micro-batch outputs -> one tensor in the full batch's row order.

    Per-token outputs ((n, t, ...) padded, or (1, total, ...) packed) come back as (B, T, ...) with
    ``fill`` in trimmed columns and at padding; per-sequence outputs (n, ...) as (B, ...).
    """
    result = None
    for out, mb in zip(outputs, micro_batches):
        n, t = mb.attention_mask.shape
        if mb.packed and out.dim() >= 2 and out.shape[:2] == (1, int(mb.attention_mask.sum())):
            out = unpack_sequences(out, mb.attention_mask, fill)
        per_token = out.dim() >= 2 and tuple(out.shape[:2]) == (n, t)
        if result is None:
            shape = (batch_size, seq_len, *out.shape[2:]) if per_token else (batch_size, *out.shape[1:])
            result = out.new_full(shape, fill)
        rows = torch.tensor(mb.indices, dtype=torch.long, device=out.device)
        if per_token:
            result[rows, mb.columns[0]:mb.columns[1]] = out
        else:
            result[rows] = out
    if result is None:
        raise ValueError("no outputs to merge")
    return result
