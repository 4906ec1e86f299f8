"""Chained-future row planning against the direct path, in one process (no process group).

The direct path is what rank 0 does with a Future's value: split the input over the producer's
pieces (padding, balancing), join the outputs (`join_outputs`: restore order, unpad), then split
that Batch for the consumer. The chained path must hand every consumer piece exactly the same
rows, read straight from the producer ranks' outputs.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrl.controller import DP_COMPUTE, DP_COMPUTE_BALANCED, MICRO_DP_COMPUTE, Batch, ParallelDims
from hfrl.controller.batch import batches_equal
from hfrl.controller.dispatch import (balanced, balanced_order, balanced_order_from_lengths,
                                      join_outputs, ordered_chunks, padded_chunks, row_lengths)
from hfrl.controller.planning import ProducerRows, consumer_rows, runs

MICRO_BALANCED = balanced(MICRO_DP_COMPUTE)
PROTOCOLS = [DP_COMPUTE, DP_COMPUTE_BALANCED, MICRO_DP_COMPUTE, MICRO_BALANCED]
LAYOUTS = [ParallelDims(dp=1), ParallelDims(dp=2), ParallelDims(dp=3), ParallelDims(tp=2, dp=2),
           ParallelDims(pp=2, dp=2), ParallelDims(tp=4, tg=2), ParallelDims(tp=2, tg=1, dp=3),
           ParallelDims(pp=2, tp=2, tg=1, pg=1)]


def split(batch, proto, dims):
    """Rank 0's split of a Batch argument: (pieces, pad, order)."""
    n = proto.num_chunks(dims)
    if proto.balance_key:
        order = balanced_order(batch, n, proto.balance_key)
        pieces, pad = ordered_chunks(batch, n, order)
        return pieces, pad, order
    pieces, pad = padded_chunks(batch, n)
    return pieces, pad, None


def produce(batch, proto, dims, k):
    """Run a producer that returns k rows per input row (ids i*k+s): per-output outputs and
    the joined value, as rank 0 would see it."""
    pieces, pad, order = split(batch, proto, dims)
    outputs = []
    for position in proto.output_positions(dims):
        piece = pieces[proto.chunk_of(dims, position)]
        ids = (piece["id"][:, None] * k + torch.arange(k)).reshape(-1)
        outputs.append(Batch({"id": ids,
                              "attention_mask": piece["attention_mask"].repeat_interleave(k, 0)}))
    joined = join_outputs(outputs, "concat", pad, len(batch), order)
    return outputs, pad, order, joined


cases = st.tuples(st.lists(st.integers(1, 9), min_size=1, max_size=13),
                  st.sampled_from(PROTOCOLS), st.sampled_from(LAYOUTS), st.integers(1, 3),
                  st.sampled_from(PROTOCOLS), st.sampled_from(LAYOUTS))


@settings(max_examples=300, deadline=None)
@given(cases)
def test_chained_rows_equal_the_direct_split(case):
    lengths, p_proto, p_dims, k, c_proto, c_dims = case
    n = len(lengths)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    batch = Batch({"id": torch.arange(n), "attention_mask": mask})
    outputs, pad, order, joined = produce(batch, p_proto, p_dims, k)
    rows = ProducerRows(tuple(len(o) for o in outputs), n, pad,
                        None if order is None else tuple(order))
    assert len(rows) == len(joined) == n * k
    located = [outputs[i]["id"][local].item() for i, local in map(rows.locate, range(len(rows)))]
    assert located == joined["id"].tolist()

    # The consumer: its pieces of the joined value, direct vs chained. A balanced consumer
    # regroups by the token counts the producers report.
    direct, _, direct_order = split(joined, c_proto, c_dims)
    chained_order = None
    if c_proto.balance_key:
        per_rank = [row_lengths(o["attention_mask"]) for o in outputs]
        chained_order = balanced_order_from_lengths(
            [per_rank[i][local] for i, local in map(rows.locate, range(len(rows)))],
            c_proto.num_chunks(c_dims))
    assert chained_order == direct_order
    for chunk, piece in enumerate(direct):
        logical = consumer_rows(len(rows), c_proto.num_chunks(c_dims), chunk, chained_order)
        got = [outputs[i]["id"][lo:hi].tolist() for i, lo, hi in runs(rows, logical)]
        assert sum(got, []) == piece["id"].tolist()


def test_a_row_count_that_does_not_divide_is_refused_not_rounded():
    # 3 input rows padded to 4 over 2 ranks; the producer returned 5 rows in all: the padding
    # cannot be removed (join_outputs refuses too), so the plan must not round down.
    import pytest

    with pytest.raises(ValueError, match="not a whole number of rows per input row"):
        ProducerRows((3, 2), num_input_rows=3, pad=1, order=None, what="actor.generate")
    with pytest.raises(ValueError, match="cannot remove 1 padding rows"):
        join_outputs([Batch({"x": torch.zeros(3)}), Batch({"x": torch.zeros(2)})], "concat",
                     1, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 13), st.integers(1, 5), st.integers(0, 3))
def test_split_and_join_equal_the_batch_reference(num_rows, num_chunks, k):
    """padded_chunks is pad_to_multiple + chunk, with pieces that are one run of rows left as
    views; join_outputs (padding dropped before concatenating) is concat + unpad."""
    batch = Batch({"id": torch.arange(num_rows), "x": torch.randn(num_rows, 3)}, meta={"m": 1})
    pieces, pad = padded_chunks(batch, num_chunks)
    padded, expected_pad = batch.pad_to_multiple(num_chunks)
    assert pad == expected_pad
    for piece, expected in zip(pieces, padded.chunk(num_chunks), strict=True):
        assert batches_equal(piece, expected)
        ids = piece["id"].tolist()
        if ids == list(range(ids[0], ids[0] + len(ids))):
            assert piece["x"].data_ptr() == batch["x"][ids[0]].data_ptr()   # a view
    outputs = [Batch({"id": (p["id"][:, None] * 10 + torch.arange(k)).reshape(-1)},
                     meta={"rank": i}) for i, p in enumerate(pieces)]
    expected = Batch.concat(outputs, check_meta=False)[:num_rows * k]
    joined = join_outputs(outputs, "concat", pad, num_rows)
    assert batches_equal(joined, expected) and joined.meta == {"rank": 0}
    tensors = join_outputs([o["id"] for o in outputs], "concat", pad, num_rows)
    assert torch.equal(tensors, expected["id"])
