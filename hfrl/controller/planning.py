"""Row planning for chained futures: which rows of which producer rank each consumer rank gets.

Pure arithmetic over row counts (no process group), so it is tested exhaustively in one process.

A producer call leaves its output on its output ranks in *distributed order*: the input was
padded to a multiple of the number of pieces (repeating rows from the start) and, for balanced
protocols, regrouped (`order[p]` is the padded input row at distributed position p); each
distributed row produced k consecutive output rows (n samples per prompt). The Future's value is
what `join_outputs` makes of that: concatenate, put back in input order, drop the padding.
`ProducerRows` maps each row of that value (a *logical* row) back to (output rank, local row),
so a consumer can be given exactly the rows it would get from the joined value, without the
rows passing through rank 0.

The consumer side is the ordinary split of a Batch of that many rows: pad, optionally regroup
(balanced), cut into pieces (`consumer_rows`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from hfrl.controller.dispatch import chunk_row_ranges, source_rows


@dataclass(frozen=True)
class ProducerRows:
    """Where the rows of a producer call's joined output live."""

    counts: tuple[int, ...]
    """Output rows on each output rank, in the protocol's output order."""
    num_input_rows: int | None
    """Rows of the producer's input Batch (None: no Batch argument, nothing to unpad)."""
    pad: int
    order: tuple[int, ...] | None
    """Balanced producers: the padded input row behind each distributed position."""
    what: str = "the producer"

    def __post_init__(self):
        starts, total = [], 0
        for c in self.counts:
            starts.append(total)
            total += c
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_total", total)
        object.__setattr__(self, "_per_row", self._rows_per_input())
        if self.order is not None:
            position = [0] * len(self.order)
            for p, row in enumerate(self.order):
                position[row] = p
            object.__setattr__(self, "_position", position)

    def _rows_per_input(self) -> int:
        """k output rows per distributed input row; the same checks as `join_outputs`."""
        total = self._total
        if self.num_input_rows is None or (self.pad == 0 and self.order is None):
            return 1
        padded = self.num_input_rows + self.pad
        if total % padded:
            raise ValueError(f"{self.what} returned {total} rows in all for {self.num_input_rows} "
                             f"input rows padded to {padded}: not a whole number of rows per "
                             "input row, so its padding cannot be removed nor its order restored; "
                             "return k rows per input row, or make the batch size divisible by "
                             "the number of workers")
        return total // padded

    def __len__(self) -> int:
        """Rows of the joined (unpadded, input-ordered) output."""
        if self.num_input_rows is None or (self.pad == 0 and self.order is None):
            return self._total
        return self.num_input_rows * self._per_row

    def locate(self, logical: int) -> tuple[int, int]:
        """(output rank index, local row) holding logical row `logical`."""
        distributed = logical
        if self.order is not None:
            k = self._per_row
            distributed = self._position[logical // k] * k + logical % k
        i = bisect.bisect_right(self._starts, distributed) - 1
        while self.counts[i] == 0:      # empty outputs share their start with the next rank
            i -= 1
        return i, distributed - self._starts[i]


def consumer_rows(num_rows: int, num_chunks: int, chunk: int,
                  order: list[int] | None = None) -> list[int]:
    """Logical rows (of a `num_rows`-row Batch) that piece `chunk` holds after padding to a
    multiple of `num_chunks` and, if given, regrouping by `order` (padded row per position)."""
    ranges, _ = chunk_row_ranges(num_rows, num_chunks)
    start, end = ranges[chunk]
    padded = range(start, end) if order is None else [order[p] for p in range(start, end)]
    return source_rows(padded, num_rows)


def runs(producer: ProducerRows, logical_rows: list[int]) -> list[tuple[int, int, int]]:
    """Group logical rows into (output rank index, local start, local end) runs, in order."""
    out: list[list[int]] = []
    for row in logical_rows:
        i, local = producer.locate(row)
        if out and out[-1][0] == i and out[-1][2] == local:
            out[-1][2] += 1
        else:
            out.append([i, local, local + 1])
    return [tuple(r) for r in out]
