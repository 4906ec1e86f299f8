"""Transfer protocols: how a call's Batch arguments are split over a pool and outputs collected.

A protocol (HybridFlow's Table 3) is plain data about a layout:

- `num_chunks(dims)`: how many pieces each Batch argument is cut into (after padding to a
  multiple, undone on the output);
- `chunk_of(dims, position)`: which piece the rank at that pool position receives (ranks of one
  DP replica, or of one generation replica, share a piece);
- `output_positions(dims)`: the positions whose outputs come back, in piece order;
- `join`: "concat" (Batches and tensors are concatenated; anything else stays a list) or "list".

| protocol          | pieces  | who gets piece i                     | outputs from                       |
|-------------------|---------|--------------------------------------|------------------------------------|
| ONE_TO_ALL        | 1       | everyone                             | everyone (list)                    |
| DP_COMPUTE        | dp      | every rank of DP replica i           | tp=0, pp=last of each replica      |
| MICRO_DP_COMPUTE  | dp * dg | every rank of generation replica i   | gen_tp=0, gen_pp=last of each      |
| PP_ONLY           | 1       | everyone                             | tp=0, dp=0 of each stage (list)    |
| ALL_TO_ALL        | world   | position i (args are per-rank lists) | everyone (list)                    |

`DP_COMPUTE_BALANCED` is DP_COMPUTE with pieces balanced by tokens (`balanced(protocol, key)`
makes such a variant of any protocol). Custom protocols are registered with `register_protocol`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hfrl.controller.batch import Batch
from hfrl.distributed.parallel_dims import ParallelDims


@dataclass(frozen=True)
class Protocol:
    name: str
    num_chunks: Callable[[ParallelDims], int]
    chunk_of: Callable[[ParallelDims, int], int]
    output_positions: Callable[[ParallelDims], list[int]]
    join: str = "concat"
    per_rank_args: bool = False
    """ALL_TO_ALL style: every argument is a list with one entry per pool position."""
    balance_key: str | None = None
    """Balance the pieces by tokens: rows are regrouped so every piece holds the same number of
    rows and near-equal totals of this (B, T) mask column (Karmarkar-Karp), and outputs are put
    back in input order. Applies to Batches rank 0 holds and to chained Futures (by the token
    counts their producers reported)."""


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    if protocol.join not in ("concat", "list"):
        raise ValueError(f"protocol {protocol.name!r}: join={protocol.join!r}, expected "
                         "'concat' or 'list'")
    if protocol.name in _PROTOCOLS and _PROTOCOLS[protocol.name] != protocol:
        raise ValueError(f"a different protocol named {protocol.name!r} is already registered")
    _PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    if name not in _PROTOCOLS:
        raise ValueError(f"unknown transfer protocol {name!r}; registered: {sorted(_PROTOCOLS)}")
    return _PROTOCOLS[name]


def _positions(dims: ParallelDims, keep: Callable, order: Callable) -> list[int]:
    coords = [(i, dims.coord(i)) for i in range(dims.world_size)]
    return [i for i, c in sorted(((i, c) for i, c in coords if keep(c)), key=lambda x: order(x[1]))]


ONE_TO_ALL = register_protocol(Protocol(
    "ONE_TO_ALL", num_chunks=lambda d: 1, chunk_of=lambda d, i: 0,
    output_positions=lambda d: list(range(d.world_size)), join="list"))

DP_COMPUTE = register_protocol(Protocol(
    "DP_COMPUTE", num_chunks=lambda d: d.dp, chunk_of=lambda d, i: d.coord(i).dp,
    output_positions=lambda d: _positions(d, lambda c: c.tp == 0 and c.pp == d.pp - 1,
                                          lambda c: c.dp)))

MICRO_DP_COMPUTE = register_protocol(Protocol(
    "MICRO_DP_COMPUTE", num_chunks=lambda d: d.num_gen_replicas,
    chunk_of=lambda d, i: d.coord(i).gen_replica(d.dg),
    output_positions=lambda d: _positions(d, lambda c: c.gen_tp == 0 and c.gen_pp == d.pg - 1,
                                          lambda c: c.gen_replica(d.dg))))

PP_ONLY = register_protocol(Protocol(
    "PP_ONLY", num_chunks=lambda d: 1, chunk_of=lambda d, i: 0,
    output_positions=lambda d: _positions(d, lambda c: c.tp == 0 and c.dp == 0, lambda c: c.pp),
    join="list"))

ALL_TO_ALL = register_protocol(Protocol(
    "ALL_TO_ALL", num_chunks=lambda d: d.world_size, chunk_of=lambda d, i: i,
    output_positions=lambda d: list(range(d.world_size)), join="list", per_rank_args=True))


def balanced(base: Protocol, key: str = "attention_mask") -> Protocol:
    """`base` with pieces balanced by the token count of mask column `key` (see balance_key)."""
    return register_protocol(dataclasses.replace(base, name=f"{base.name}[balance={key}]",
                                                 balance_key=key))


DP_COMPUTE_BALANCED = balanced(DP_COMPUTE)


@dataclass(frozen=True)
class Placement:
    """A protocol on one layout: the piece each pool position receives, and the positions
    whose outputs come back, in piece order."""

    chunks: tuple[int, ...]
    output_positions: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def placement(proto: Protocol, dims: ParallelDims) -> Placement:
    """Computed once per (protocol, layout), not on every call: coordinates cost a few
    microseconds per rank."""
    return Placement(tuple(proto.chunk_of(dims, i) for i in range(dims.world_size)),
                     tuple(proto.output_positions(dims)))


# ---------------------------------------------------------------------------------------------
# Splitting and joining


def balanced_order(batch: Batch, num_chunks: int, key: str) -> list[int]:
    """Padded row indices regrouped so consecutive runs of len/num_chunks rows (the pieces)
    have near-equal token totals of mask column `key`."""
    if key not in batch.tensors:
        raise ValueError(f"the protocol balances by column {key!r}, which the Batch lacks "
                         f"(columns: {batch.keys()}); add it or use the unbalanced protocol")
    return balanced_order_from_lengths(row_lengths(batch.tensors[key]), num_chunks)


def row_lengths(mask: torch.Tensor) -> list[int]:
    """Non-zero entries per row of a (B, ...) mask: the tokens each row holds."""
    return (mask.reshape(len(mask), -1) != 0).sum(-1).tolist()


def balanced_order_from_lengths(lengths: list[int], num_chunks: int) -> list[int]:
    """As `balanced_order`, from the token count of each (unpadded) row."""
    from hfrl.engine.microbatch import balance_across_dp

    if not lengths:
        raise ValueError("cannot dispatch an empty Batch: there is no row to give each of "
                         f"{num_chunks} workers; skip the call or pass at least one row")
    ranges, _ = chunk_row_ranges(len(lengths), num_chunks)
    padded = [lengths[r] for r in source_rows(range(ranges[-1][1]), len(lengths))]
    return [i for group in balance_across_dp(padded, num_chunks, equal_size=True) for i in group]


def ordered_chunks(batch: Batch, num_chunks: int, order: list[int]) -> tuple[list[Batch], int]:
    """Pad, then cut the rows taken in `order` into `num_chunks` equal pieces."""
    padded, pad = batch.pad_to_multiple(num_chunks)
    size = len(padded) // num_chunks
    return [padded[order[i * size:(i + 1) * size]] for i in range(num_chunks)], pad


def padded_chunks(batch: Batch, num_chunks: int) -> tuple[list[Batch], int]:
    """Pad to a multiple of `num_chunks` (repeating rows from the start) and chunk.

    Chunks are views of `batch` except those whose padding rows wrap around to the start, so
    padding a large batch copies at most a chunk's worth of rows.
    """
    if len(batch) == 0:
        raise ValueError("cannot dispatch an empty Batch: there is no row to give each of "
                         f"{num_chunks} workers; skip the call or pass at least one row")
    num_rows = len(batch)
    ranges, pad = chunk_row_ranges(num_rows, num_chunks)
    chunks = []
    for start, end in ranges:
        rows = source_rows(range(start, end), num_rows)
        if rows[-1] - rows[0] == len(rows) - 1:   # one run of rows (any piece of a small batch)
            chunks.append(batch[rows[0]:rows[-1] + 1])
        else:
            chunks.append(batch.reorder(rows))
    return chunks, pad


def chunk_row_ranges(num_rows: int, num_chunks: int) -> tuple[list[tuple[int, int]], int]:
    """Row ranges [start, end) of each piece of a padded batch, and the pad size."""
    padded = -(-num_rows // num_chunks) * num_chunks
    size = padded // num_chunks
    return [(i * size, (i + 1) * size) for i in range(num_chunks)], padded - num_rows


def source_rows(padded_rows: range, num_rows: int) -> list[int]:
    """Rows of the unpadded batch that padded rows come from (padding repeats from the start)."""
    return [r if r < num_rows else (r - num_rows) % num_rows for r in padded_rows]


def join_outputs(outputs: list[Any], join: str, pad: int, num_input_rows: int | None,
                 order: list[int] | None = None) -> Any:
    """Concatenate (restore the input order, unpad) or return the list, as the protocol says.

    `order[i]` is the padded input row that the i-th distributed row was (balanced protocols).
    """
    if join == "list" or not outputs:
        return outputs
    if all(isinstance(o, Batch) for o in outputs):
        def cat(values):
            return Batch.concat(values, check_meta=False)
    elif all(isinstance(o, torch.Tensor) and o.dim() > 0 for o in outputs):
        cat = torch.cat
    else:
        return outputs
    if order is not None:
        joined = cat(outputs)
        return _unpad(joined[_inverse(order, len(joined))], pad, num_input_rows)
    # Padding rows come last: drop them before concatenating (a small batch on many ranks
    # is mostly padding).
    return cat(_drop_padding(outputs, pad, num_input_rows))


def _inverse(order: list[int], num_out: int) -> torch.Tensor:
    """Indices that put outputs (k per distributed row, consecutive) back in input order."""
    if num_out % len(order):
        raise ValueError(f"cannot restore the input order: {num_out} output rows for "
                         f"{len(order)} input rows")
    k = num_out // len(order)
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    return (position[:, None] * k + torch.arange(k)).reshape(-1)


def _unpad(joined, pad: int, num_input_rows: int | None):
    """Drop the outputs of padded rows (see `_rows_to_keep`)."""
    if pad == 0 or num_input_rows is None:
        return joined
    return joined[: _rows_to_keep(len(joined), pad, num_input_rows)]


def _drop_padding(outputs: list, pad: int, num_input_rows: int | None) -> list:
    """The outputs, in order, without the rows of padded input rows (which come last)."""
    if pad == 0 or num_input_rows is None:
        return outputs
    left = _rows_to_keep(sum(len(o) for o in outputs), pad, num_input_rows)
    kept = []
    for output in outputs:
        kept.append(output if len(output) <= left else output[:left])
        left -= len(kept[-1])
        if left == 0:
            break
    return kept


def _rows_to_keep(num_output_rows: int, pad: int, num_input_rows: int) -> int:
    """Output rows of the unpadded input. An output with k rows per input row (n samples per
    prompt, interleaved) drops k * pad rows; any other shape cannot be unpadded safely."""
    padded_rows = num_input_rows + pad
    if num_output_rows % padded_rows:
        raise ValueError(f"cannot remove {pad} padding rows: the joined output has "
                         f"{num_output_rows} rows, not a multiple of the {padded_rows} padded "
                         "input rows; make the batch size divisible by the number of workers")
    return num_output_rows // padded_rows * num_input_rows
