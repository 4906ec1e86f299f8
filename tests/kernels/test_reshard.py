"""reshard: the PyTorch references against torch.cat and a per-segment loop, segments_from_index
against a masked gather, the Triton kernel (interpreted on CPU) against the references, and input
validation.

The ``test_triton_*`` tests run only where TRITON_INTERPRET=1 was set from process start; elsewhere
tests/kernels/test_interpreter.py runs them in a fresh pytest process with the flag set.
"""
import pytest
import torch

import hfrl_kernels
from hfrl_kernels import reshard as rs
from tests.kernels._interpreter import require_interpreter



def make_tensors(dtype, seed=0):
    """Odd shapes and layouts: a column block of a 2-D weight (row stride 13), a 3-D contiguous
    tensor, a scalar, an empty tensor, a transposed (neither contiguous nor rows) view, and a strided
    block of more than one kernel work item (70 x 65 > BLOCK * ITERS elements)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(9, 13, generator=gen).to(dtype)
    big = torch.randn(70, 80, generator=gen).to(dtype)
    return [torch.randn(7, generator=gen).to(dtype), w[:, 3:8], torch.randn(2, 3, 5, generator=gen).to(dtype),
            torch.tensor(1.5, dtype=dtype), torch.empty(0, dtype=dtype), w[2:5].t(),
            torch.randn(300, generator=gen).to(dtype), big[:, 10:75], torch.randn(1000, generator=gen).to(dtype)]


def flat_cat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def random_segments(src_len, dst_len, lengths, seed=0):
    """Segments of the given lengths at random non-overlapping dst places and random src places."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    order = torch.randperm(lengths.numel(), generator=gen)
    gaps = torch.randint(0, 5, (lengths.numel(),), generator=gen)
    dst_starts = torch.empty_like(lengths)
    dst_starts[order] = torch.cumsum(lengths[order] + gaps, 0) - lengths[order]
    assert int((dst_starts + lengths).max()) <= dst_len
    src_starts = (torch.rand(lengths.numel(), generator=gen) * (src_len - lengths + 1)).long()
    return src_starts, dst_starts, lengths


def loop_copy(src, dst, src_starts, dst_starts, lengths):
    for s, d, n in zip(src_starts.tolist(), dst_starts.tolist(), lengths.tolist()):
        dst[d:d + n] = src[s:s + n]


def holey_permutation(n, num_src, seed=0):
    """index[j]: a src element or -1 (about a quarter), with long consecutive stretches."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(n) % num_src
    cuts = torch.randint(0, n, (n // 20,), generator=gen)
    index[cuts] = torch.randint(0, num_src, (cuts.numel(),), generator=gen)
    index[torch.rand(n, generator=gen) < 0.25] = -1
    return index


SEGMENT_LENGTHS = [1, 7, 300, 1000, 0, 4099, 0, 3]


# ---- PyTorch references ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_reference_equals_cat(dtype):
    tensors = make_tensors(dtype)
    total = sum(t.numel() for t in tensors)
    out = torch.full((total + 11,), -3.0, dtype=dtype)
    assert rs.pack_reference(tensors, out) is out
    assert torch.equal(out[:total], flat_cat(tensors))
    assert torch.equal(out[total:], torch.full((11,), -3.0, dtype=dtype))   # padding untouched


def test_pack_empty_list_leaves_out():
    out = torch.arange(4.0)
    assert torch.equal(rs.pack([], out), torch.arange(4.0))


def test_cpu_dispatches_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tensors = make_tensors(torch.float32)
    out = torch.empty(sum(t.numel() for t in tensors))
    assert not hfrl_kernels.use_triton(out)
    assert torch.equal(rs.pack(tensors, out), flat_cat(tensors))


@pytest.mark.parametrize("chunk", [rs.REFERENCE_CHUNK, 64])   # 64: long segments cut into pieces
def test_copy_segments_reference_equals_loop(monkeypatch, chunk):
    monkeypatch.setattr(rs, "REFERENCE_CHUNK", chunk)
    src = torch.randn(6000, generator=torch.Generator().manual_seed(1))
    segments = random_segments(src.numel(), 6000, SEGMENT_LENGTHS)
    dst, expected = torch.zeros(6000), torch.zeros(6000)
    rs.copy_segments_reference(src, dst, *segments)
    loop_copy(src, expected, *segments)
    assert torch.equal(dst, expected)


def test_copy_segments_reference_block_transpose_and_scattered():
    """A row-parallel unpack (blocks of rows interleaved) takes few strided groups; scattered short
    segments take the element-index path. Both equal the loop."""
    src = torch.randn(4 * 30 * 8, generator=torch.Generator().manual_seed(2))
    # src: 4 shards of (30 rows, 8 cols); dst: (30 rows, 32 cols), shard r in columns [8r, 8r + 8)
    rows = torch.arange(30).repeat(4)
    shard = torch.arange(4).repeat_interleave(30)
    tables = (shard * 240 + rows * 8, rows * 32 + shard * 8, torch.full((120,), 8))
    groups = rs.strided_groups(*tables)
    assert groups is not None and groups.shape[0] == 4  # one per shard: (start, start, 8, 30, 8, 32)
    assert groups[1].tolist() == [240, 8, 8, 30, 8, 32]
    dst, expected = torch.zeros(960), torch.zeros(960)
    rs.copy_segments_reference(src, dst, *tables)
    loop_copy(src, expected, *tables)
    assert torch.equal(dst, expected) and torch.equal(dst.view(30, 32)[:, 8:16], src[240:480].view(30, 8))
    lengths = torch.randint(1, 9, (700,), generator=torch.Generator().manual_seed(3)).tolist()
    scattered = random_segments(src.numel(), 7000, lengths, seed=4)
    assert rs.strided_groups(*scattered) is None
    dst, expected = torch.zeros(7000), torch.zeros(7000)
    rs.copy_segments_reference(src, dst, *scattered)
    loop_copy(src, expected, *scattered)
    assert torch.equal(dst, expected)


def test_copy_segments_empty_tables():
    dst = torch.zeros(3)
    empty = torch.empty(0, dtype=torch.int64)
    rs.copy_segments(torch.ones(3), dst, empty, empty, [])
    assert torch.equal(dst, torch.zeros(3))


def test_segments_from_index_maximal_runs():
    index = torch.tensor([5, 6, 7, -1, -1, 2, 3, 9, 10, -1, 0, 0])
    src_starts, dst_starts, lengths = rs.segments_from_index(index)
    assert src_starts.tolist() == [5, 2, 9, 0, 0]
    assert dst_starts.tolist() == [0, 5, 7, 10, 11]
    assert lengths.tolist() == [3, 2, 2, 1, 1]
    assert all(t.dtype == torch.int64 for t in (src_starts, dst_starts, lengths))
    assert [t.numel() for t in rs.segments_from_index(torch.full((4,), -1))] == [0, 0, 0]


def test_segments_from_index_round_trip(monkeypatch):
    monkeypatch.setattr(rs, "REFERENCE_CHUNK", 100)
    index = holey_permutation(3000, 2500)
    src = torch.randn(2500, generator=torch.Generator().manual_seed(2))
    mask = index >= 0
    expected = torch.zeros(3000)
    expected[mask] = src[index[mask]]
    segments = rs.segments_from_index(index)
    assert 100 < segments[0].numel() < int(mask.sum())                  # runs, not single elements
    dst = torch.zeros(3000)
    rs.copy_segments_reference(src, dst, *segments)
    assert torch.equal(dst, expected)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tensors,out,match", [
    ([torch.zeros(3), torch.zeros(2, 2)], torch.zeros(6), r"out has 6 elements but the tensors need 7 \(0: \(3,\), 1: \(2, 2\)\)"),
    ([torch.zeros(3), torch.zeros(2, dtype=torch.bfloat16)], torch.zeros(6), r"tensors\[1\] \(shape \(2,\)\) is torch.bfloat16"),
    ([torch.zeros(3)], torch.zeros(2, 3), r"out must be a 1-D contiguous tensor, got \(2, 3\)"),
    ([torch.zeros(3)], torch.zeros(12)[::2], "out must be a 1-D contiguous"),
])
def test_pack_bad_input(tensors, out, match):
    for fn in (rs.pack, rs.pack_reference):
        with pytest.raises(ValueError, match=match):
            fn(tensors, out)


def _tables(*rows):
    return [torch.tensor(col, dtype=torch.int64) for col in zip(*rows)]


@pytest.mark.parametrize("src,dst,tables,match", [
    (torch.zeros(10), torch.zeros(10), _tables((0, 0, 5), (6, 5, 5)), r"segment 1 \(src \[6, 11\)"),
    (torch.zeros(10), torch.zeros(8), _tables((0, 0, 5), (0, 5, 2), (2, 6, 3)), r"segment 2 .*dst \[6, 9\)"),
    (torch.zeros(10), torch.zeros(10), _tables((0, 0, 5), (3, 3, -1)), r"segment 1 .*length -1"),
    (torch.zeros(10), torch.zeros(10), _tables((-1, 0, 1)), "segment 0"),
    (torch.zeros(10), torch.zeros(10, dtype=torch.float16), _tables((0, 0, 1)), "dst is torch.float16"),
    (torch.zeros(10), torch.zeros(10), [torch.zeros(2, dtype=torch.int64)] * 2 + [torch.ones(3, dtype=torch.int64)],
     "have 2, 2 and 3 entries"),
    (torch.zeros(10), torch.zeros(10), [torch.zeros(1, 1, dtype=torch.int64)] * 3, "src_starts must be a 1-D integer"),
    (torch.zeros(10), torch.zeros(10), [torch.zeros(2, dtype=torch.int64)] * 2 + [torch.ones(2)], "lengths must be a 1-D integer"),
    (torch.zeros(2, 5), torch.zeros(10), _tables((0, 0, 1)), "src must be a 1-D contiguous"),
])
def test_copy_segments_bad_input(src, dst, tables, match):
    for fn in (rs.copy_segments, rs.copy_segments_reference):
        with pytest.raises(ValueError, match=match):
            fn(src, dst, *tables)


def test_segments_from_index_bad_input():
    with pytest.raises(ValueError, match=r"must be >= -1 \(-1: not written\), got -2 at position 1"):
        rs.segments_from_index(torch.tensor([0, -2, 3]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        rs.segments_from_index(torch.zeros(3))


# ---- Triton kernel under the interpreter ---------------------------------------------------------

@pytest.fixture
def interpreted():
    """The kernel module, when this process runs Triton kernels in the interpreter."""
    return require_interpreter(rs, "_copy_runs_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [True, False])   # False: contiguous inputs only (the 1-D kernel)
def test_triton_pack_equals_reference(interpreted, dtype, strided):
    tensors = make_tensors(dtype, seed=3)
    if not strided:
        tensors = [t for t in tensors if t.is_contiguous()]
    total = sum(t.numel() for t in tensors)
    out = torch.full((total + 5,), 9.0, dtype=dtype)
    expected = rs.pack_reference(tensors, out.clone())
    assert interpreted.use_triton(out)
    assert torch.equal(interpreted.pack(tensors, out), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_copy_segments_equals_reference(interpreted, dtype):
    src = torch.randn(6000, generator=torch.Generator().manual_seed(4)).to(dtype)
    segments = random_segments(src.numel(), 6000, SEGMENT_LENGTHS, seed=5)
    dst, expected = torch.full((6000,), 2.0, dtype=dtype), torch.full((6000,), 2.0, dtype=dtype)
    interpreted.copy_segments(src, dst, *segments)
    rs.copy_segments_reference(src, expected, *segments)
    assert torch.equal(dst, expected)
