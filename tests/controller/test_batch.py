"""Tests for hfrl.controller.batch.Batch: row/column operations, padding, serialisation."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrl.controller.batch import (
    Batch, batches_equal, buffer_nbytes, header_from_bytes, header_to_bytes,
)

FAST = settings(max_examples=50, deadline=None)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int8, torch.bool, torch.uint8]


def make_batch(n: int = 4) -> Batch:
    """Rows i hold x = [3i, 3i+1, 3i+2], ids = i, uid = "p{i}"."""
    return Batch(
        tensors={"x": torch.arange(3 * n, dtype=torch.float32).reshape(n, 3), "ids": torch.arange(n)},
        non_tensors={"uid": np.array([f"p{i}" for i in range(n)], dtype=object)},
        meta={"temperature": 0.7, "step": 3},
    )


def rows_of(b: Batch) -> list[int]:
    return b["ids"].tolist()


def random_tensor(shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    lo, hi = (0, 256) if dtype == torch.uint8 else (-100, 100)
    return torch.randint(lo, hi, shape, generator=gen).to(dtype)


@st.composite
def batches(draw, min_rows: int = 0, max_rows: int = 7) -> Batch:
    """Random small batches: 0-3 tensors of mixed dtypes (some non-contiguous), ids, a string column."""
    n = draw(st.integers(min_rows, max_rows))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors = {"ids": torch.arange(n)}
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        trailing = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
        t = random_tensor((n, *trailing, 2), dtype, gen)
        tensors[f"t{i}"] = t[..., 0] if draw(st.booleans()) else t  # [..., 0] is non-contiguous
    uid = np.array([f"row-{i}" * (i % 3) for i in range(n)], dtype=object)
    return Batch(tensors, {"uid": uid}, {"step": draw(st.integers(0, 9))})


# ------------------------------------------------------------------------ construction and access

def test_len_keys_getitem_contains():
    b = make_batch(4)
    assert len(b) == 4
    assert b.keys() == ["x", "ids", "uid"]
    assert "x" in b and "uid" in b and "nope" not in b
    assert torch.equal(b["ids"], torch.arange(4))
    assert b["uid"].tolist() == ["p0", "p1", "p2", "p3"]
    with pytest.raises(KeyError, match="nope"):
        b["nope"]


def test_constructor_rejects_mismatched_dim0():
    with pytest.raises(ValueError, match=r"dim 0 = 4 \(from column 'a'\).*'b': 3"):
        Batch({"a": torch.zeros(4), "b": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"'uid': 5"):
        Batch({"a": torch.zeros(4)}, {"uid": np.zeros(5)})
    with pytest.raises(ValueError, match=r"size=2.*'a': 4"):
        Batch({"a": torch.zeros(4)}, size=2)


def test_constructor_type_errors():
    with pytest.raises(TypeError, match="'a' must be a torch.Tensor, got ndarray"):
        Batch({"a": np.zeros(3)})
    with pytest.raises(TypeError, match="'a' must be a numpy array.*got Tensor; put tensors in tensors"):
        Batch(non_tensors={"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="0-d"):
        Batch({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"\['a'\] are in both"):
        Batch({"a": torch.zeros(3)}, {"a": np.zeros(3)})


def test_explicit_size_without_columns():
    assert len(Batch()) == 0
    b = Batch(meta={"step": 1}, size=5)
    assert len(b) == 5
    assert len(b.repeat(2)) == 10 and len(b[1:3]) == 2
    with pytest.raises(ValueError, match="has dim 0 = 4 but the Batch has 5 rows"):
        b["x"] = torch.zeros(4)
    b["x"] = torch.zeros(5)
    assert len(b) == 5


def test_list_non_tensor_becomes_one_object_per_row():
    b = Batch({"a": torch.zeros(2)}, {"tokens": [[1, 2], [3, 4]], "text": ("a", "longer")})
    assert b["tokens"].shape == (2,) and b["tokens"].dtype == object
    assert b["tokens"][1] == [3, 4]
    assert b["text"].tolist() == ["a", "longer"]


def test_setitem_validates_size_and_moves_kind():
    b = make_batch(3)
    with pytest.raises(ValueError, match="'y' has dim 0 = 2 but the Batch has 3 rows"):
        b["y"] = torch.zeros(2)
    b["x"] = ["a", "b", "c"]  # the key changes from a tensor to a non-tensor column
    assert "x" not in b.tensors and b["x"].tolist() == ["a", "b", "c"]
    empty = Batch()
    empty["z"] = torch.ones(6)  # a batch with no columns and no size takes the first column's
    assert len(empty) == 6


def test_nbytes_is_exact():
    b = Batch({"a": torch.zeros(4, 3), "b": torch.zeros(4, dtype=torch.bfloat16),
               "c": torch.zeros(4, 5, dtype=torch.bool)}, {"uid": np.arange(4)})
    assert b.nbytes == 4 * 3 * 4 + 4 * 2 + 4 * 5


# ------------------------------------------------------------------------------- row operations

def test_chunk_then_concat_round_trip():
    b = make_batch(6)
    parts = b.chunk(3)
    assert [rows_of(p) for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["uid"].tolist() for p in parts] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    assert all(p.meta == {"temperature": 0.7, "step": 3} for p in parts)
    assert batches_equal(Batch.concat(parts), b)


def test_chunk_not_divisible_suggests_padding():
    with pytest.raises(ValueError, match=r"7 rows into 2 equal chunks.*pad_to_multiple\(2\)"):
        make_batch(7).chunk(2)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        make_batch(4).chunk(0)


def test_split_sizes_and_values():
    parts = make_batch(7).split(3)
    assert [rows_of(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(parts[2]["x"], torch.tensor([[18.0, 19.0, 20.0]]))
    assert [len(p) for p in make_batch(0).split(3)] == [0]
    assert [len(p) for p in make_batch(6).split(6)] == [6]


def test_concat_with_different_keys_names_them():
    a, b = make_batch(2), make_batch(2)
    b.pop(["x"])
    b["y"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"batch 1 .*only in batch 0: \['x'\], only in batch 1: \['y'\]"):
        Batch.concat([a, b])
    with pytest.raises(ValueError, match="at least one Batch"):
        Batch.concat([])


def test_concat_meta_rule():
    a, b = make_batch(2), make_batch(2)
    b.meta["step"] = 4
    with pytest.raises(ValueError, match=r"meta of batch 1 differs from batch 0 in keys \['step'\]"):
        Batch.concat([a, b])
    out = Batch.concat([a, b], check_meta=False)
    assert out.meta == {"temperature": 0.7, "step": 3} and rows_of(out) == [0, 1, 0, 1]


def test_concat_dtype_mismatch():
    a, b = make_batch(2), make_batch(2)
    b["x"] = b["x"].double()
    with pytest.raises(ValueError, match="tensor 'x' is torch.float64 .* in batch 1 but torch.float32"):
        Batch.concat([a, b])


def test_repeat_interleave_and_tile_row_order():
    b = make_batch(3)
    inter = b.repeat(2, interleave=True)
    assert rows_of(inter) == [0, 0, 1, 1, 2, 2]
    assert inter["uid"].tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert torch.equal(inter["x"][2:4], torch.tensor([[3.0, 4.0, 5.0]] * 2))
    tile = b.repeat(2, interleave=False)
    assert rows_of(tile) == [0, 1, 2, 0, 1, 2]
    assert tile["uid"].tolist() == ["p0", "p1", "p2", "p0", "p1", "p2"]
    assert torch.equal(tile["x"], torch.cat([b["x"], b["x"]]))
    assert tile.meta == b.meta


def test_reorder():
    b = make_batch(4)
    r = b.reorder(torch.tensor([2, 0, 3, 1]))
    assert rows_of(r) == [2, 0, 3, 1] and r["uid"].tolist() == ["p2", "p0", "p3", "p1"]
    assert torch.equal(r["x"][0], torch.tensor([6.0, 7.0, 8.0]))
    assert rows_of(b.reorder([3, 3, -1, 0])) == [3, 3, 3, 0]
    assert rows_of(b.reorder(np.array([1]))) == [1]
    assert len(b.reorder([])) == 0
    with pytest.raises(IndexError, match=r"in \[-4, 4\), got min 0 max 4"):
        b.reorder([0, 4])
    with pytest.raises(TypeError, match="reorder takes a sequence"):
        b.reorder(slice(0, 2))
    with pytest.raises(TypeError, match="integers or bools, got torch.float32"):
        b.reorder(torch.tensor([0.0]))


def test_getitem_rows():
    b = make_batch(5)
    one = b[1]
    assert len(one) == 1 and one["x"].shape == (1, 3) and one["uid"].tolist() == ["p1"]
    assert rows_of(b[-1]) == [4]
    assert rows_of(b[1:4]) == [1, 2, 3]
    assert rows_of(b[::-2]) == [4, 2, 0]
    assert rows_of(b[torch.tensor([True, False, True, False, True])]) == [0, 2, 4]
    assert rows_of(b[[False] * 5]) == []
    assert rows_of(b[np.array([4, 0])]) == [4, 0]
    with pytest.raises(IndexError, match="row 5 is out of range for a Batch of 5 rows"):
        b[5]
    with pytest.raises(ValueError, match=r"bool mask needs one entry per row \(5\), got 2"):
        b[[True, False]]


def test_pad_to_multiple_and_unpad():
    for n in (1, 3, 7):
        for k in (2, 4):
            b = make_batch(n)
            padded, pad = b.pad_to_multiple(k)
            assert pad == (-n) % k and len(padded) == n + pad and len(padded) % k == 0
            # padded rows repeat rows from the start, wrapping around
            assert rows_of(padded) == list(range(n)) + [i % n for i in range(pad)]
            assert padded["uid"].tolist() == [f"p{i}" for i in rows_of(padded)]
            assert batches_equal(padded.unpad(pad), b)
            assert [len(c) for c in padded.chunk(k)] == [len(padded) // k] * k


def test_pad_exact_multiple_and_errors():
    padded, pad = make_batch(4).pad_to_multiple(4)
    assert pad == 0 and batches_equal(padded, make_batch(4))
    with pytest.raises(ValueError, match=r"cannot pad an empty Batch \(0 rows\)"):
        make_batch(0).pad_to_multiple(2)
    with pytest.raises(ValueError, match=r"pad_size must be an int in \[0, 4\].*got 5"):
        make_batch(4).unpad(5)


def test_methods_do_not_mutate_input():
    b = make_batch(4)
    snapshot = b.clone()
    b.chunk(2), b.split(3), b.repeat(3), b.repeat(2, interleave=False), b.reorder([3, 2, 1, 0])
    b.pad_to_multiple(3), b.select(["x"]), b.union(make_batch(4)), b.to("cpu"), b.to_buffer()
    assert batches_equal(b, snapshot)


# ---------------------------------------------------------------------------- column operations

def test_select():
    b = make_batch(3)
    s = b.select(["x"], non_tensor_keys=[], meta_keys="step")
    assert s.keys() == ["x"] and s.meta == {"step": 3} and len(s) == 3
    assert b.keys() == ["x", "ids", "uid"]  # unchanged
    assert batches_equal(b.select(), b)
    with pytest.raises(KeyError, match=r"tensor key\(s\) \['uid'\] not found"):
        b.select(["uid"])


def test_pop_removes_and_returns():
    b = make_batch(3)
    popped = b.pop(["x"], non_tensor_keys=["uid"], meta_keys=["step"])
    assert popped.keys() == ["x", "uid"] and popped.meta == {"step": 3}
    assert torch.equal(popped["x"], make_batch(3)["x"])
    assert b.keys() == ["ids"] and b.meta == {"temperature": 0.7}
    with pytest.raises(KeyError, match="nope"):
        b.pop(["ids", "nope"])
    assert b.keys() == ["ids"]  # a failed pop removes nothing
    b.pop("ids")
    assert b.keys() == [] and len(b) == 3  # the row count survives the last column


def test_union_merges_and_checks_overlap():
    b = make_batch(3)
    left, right = b.select(["x", "ids"], []), b.select(["ids"], ["uid"], meta_keys=[])
    right["reward"] = torch.tensor([1.0, float("nan"), 3.0])
    u = left.union(right)
    assert u.keys() == ["x", "ids", "reward", "uid"] and u.meta == b.meta
    assert torch.equal(u["reward"][[0, 2]], torch.tensor([1.0, 3.0]))
    assert left.union(right.clone()).keys() == u.keys()  # NaNs in both equal: no conflict
    other = make_batch(3)
    other["x"] = other["x"] + 1
    with pytest.raises(ValueError, match="tensor key 'x' is in both batches with different values"):
        b.union(other)
    other = make_batch(3)
    other.meta["step"] = 9
    with pytest.raises(ValueError, match="meta key 'step'"):
        b.union(other)
    with pytest.raises(ValueError, match="same rows, got 3 and 2"):
        b.union(make_batch(2))


def test_clone_is_independent_and_to_keeps_values():
    b = make_batch(3)
    b.meta["lst"] = [1]
    c = b.clone()
    c["x"][0, 0] = 99.0
    c["uid"][0] = "changed"
    c.meta["lst"].append(2)
    assert b["x"][0, 0] == 0.0 and b["uid"][0] == "p0" and b.meta["lst"] == [1]
    assert batches_equal(b.to(torch.device("cpu")), b)


def test_ops_keep_device():
    # The meta device stands in for an accelerator: nothing may fall back to CPU.
    b = make_batch(4).to("meta")
    results = [b.repeat(2), b.repeat(2, interleave=False), b.reorder([1, 0]), b[1], b[[True] * 4],
               Batch.concat(b.chunk(2)), b.pad_to_multiple(3)[0], b.clone()]
    buf, header = b.to_buffer()
    results.append(Batch.from_buffer(buf, header))
    assert buf.device.type == "meta"
    assert all(r["x"].device.type == "meta" for r in results)


# -------------------------------------------------------------------------------- serialisation

def test_to_buffer_exact_layout_and_bytes():
    n = 3
    b = Batch({"f": torch.arange(15, dtype=torch.float32).reshape(n, 5),    # 60 B -> 64
               "h": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),  # 6 B -> 16
               "m": torch.tensor([[True, False]] * n),                       # 6 B -> 16
               "i": torch.tensor([1, -2, 2**40])},                           # 24 B -> 32
              size=n)
    buf, header = b.to_buffer()
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.is_contiguous()
    assert buf.numel() == 64 + 16 + 16 + 32 == buffer_nbytes(header)
    assert [e["offset"] for e in header["tensors"]] == [0, 64, 80, 96]
    assert [e["nbytes"] for e in header["tensors"]] == [60, 6, 6, 24]
    for e, t in zip(header["tensors"], b.tensors.values()):
        # the slot holds the tensor's own bytes, unchanged
        assert torch.equal(buf[e["offset"]:e["offset"] + e["nbytes"]], t.reshape(-1).view(torch.uint8))
    assert buf[60:64].tolist() == [0] * 4  # alignment gaps are zeroed
    json.dumps(header)  # tensors only: the header is plain JSON
    assert b.to_buffer(alignment=64)[0].numel() == 4 * 64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False])
def test_buffer_round_trip_per_dtype(dtype, contiguous):
    gen = torch.Generator().manual_seed(0)
    if contiguous:
        t = random_tensor((5, 3, 4), dtype, gen)
    else:
        t = random_tensor((5, 4, 3), dtype, gen).transpose(1, 2)  # (5, 3, 4), non-contiguous
    assert t.is_contiguous() == contiguous
    b = Batch({"t": t, "empty": torch.zeros(5, 0, dtype=dtype)}, {"uid": list("abcde")}, {"k": 1})
    buf, header = b.to_buffer()
    assert buf.numel() == -(-t.numel() * t.element_size() // 16) * 16
    out = Batch.from_buffer(buf, header)
    assert out["t"].dtype == dtype and out["t"].shape == (5, 3, 4) and out["t"].is_contiguous()
    assert torch.equal(out["t"], t) and out["empty"].shape == (5, 0)
    assert batches_equal(out, b)


def test_buffer_round_trip_zero_rows_and_no_tensors():
    b = Batch({"x": torch.zeros(0, 7, dtype=torch.bfloat16), "y": torch.zeros(0, dtype=torch.int64)},
              {"uid": np.array([], dtype=object)}, {"step": 2})
    buf, header = b.to_buffer()
    assert buf.numel() == 0
    out = Batch.from_buffer(buf, header)
    assert out["x"].shape == (0, 7) and out["x"].dtype == torch.bfloat16 and batches_equal(out, b)
    only_meta = Batch(meta={"a": 1}, size=3)
    buf, header = only_meta.to_buffer()
    assert buf.numel() == 0 and len(Batch.from_buffer(buf, header)) == 3


def test_header_as_uint8_tensor_and_receive_into_empty():
    b = make_batch(4)
    b["obj"] = [{"a": 1}, None, [1, 2], "s"]
    b.meta["nested"] = {"t": torch.tensor([1.0])}
    buf, header = b.to_buffer()
    header_tensor = torch.frombuffer(bytearray(header_to_bytes(header)), dtype=torch.uint8)
    received_header = header_from_bytes(header_tensor)  # what a receiving rank does
    recv = torch.empty(buffer_nbytes(received_header), dtype=torch.uint8)
    recv.copy_(buf)
    out = Batch.from_buffer(recv, received_header)
    assert batches_equal(out, b)
    assert out["x"].data_ptr() == recv.data_ptr()  # a view into the received buffer, no copy


def test_from_buffer_misaligned_or_wrong_size():
    b = make_batch(3)
    buf, header = b.to_buffer()
    pool = torch.zeros(buf.numel() + 3, dtype=torch.uint8)
    pool[3:].copy_(buf)  # a slice that starts 3 bytes into its storage: copied to align
    assert batches_equal(Batch.from_buffer(pool[3:], header), b)
    with pytest.raises(ValueError, match=f"buf has {buf.numel() - 1} bytes but the header describes"):
        Batch.from_buffer(buf[:-1], header)
    with pytest.raises(TypeError, match="1-D torch.uint8"):
        Batch.from_buffer(buf.float(), header)
    with pytest.raises(ValueError, match="not a Batch header"):
        Batch.from_buffer(buf, {"version": 0})
    with pytest.raises(ValueError, match="positive power of two"):
        b.to_buffer(alignment=12)


# ------------------------------------------------------------------------------ property tests

@FAST
@given(batches())
def test_property_buffer_round_trip(b):
    buf, header = b.to_buffer()
    expected = sum(-(-t.numel() * t.element_size() // 16) * 16 for t in b.tensors.values())
    assert buf.dim() == 1 and buf.dtype == torch.uint8 and buf.numel() == expected
    out = Batch.from_buffer(buf.clone(), header_from_bytes(header_to_bytes(header)))
    assert batches_equal(out, b)
    assert all(out[k].dtype == t.dtype and out[k].shape == t.shape for k, t in b.tensors.items())


@FAST
@given(batches(), st.integers(1, 4))
def test_property_pad_chunk_concat_unpad(b, k):
    if len(b) == 0:
        assert [len(c) for c in b.chunk(k)] == [0] * k
        return
    padded, pad = b.pad_to_multiple(k)
    assert 0 <= pad < k and len(padded) % k == 0
    assert rows_of(padded) == list(range(len(b))) + [i % len(b) for i in range(pad)]
    assert batches_equal(Batch.concat(padded.chunk(k)).unpad(pad), b)


@FAST
@given(batches(), st.integers(1, 8))
def test_property_split_concat(b, size):
    parts = b.split(size)
    expected = [min(size, len(b) - s) for s in range(0, len(b), size)] or [0]
    assert [len(p) for p in parts] == expected
    assert batches_equal(Batch.concat(parts), b)


@FAST
@given(batches(max_rows=5), st.integers(1, 3), st.data())
def test_property_repeat_and_reorder_match_index_reference(b, n, data):
    ids = torch.arange(len(b))
    assert batches_equal(b.repeat(n), b.reorder(ids.repeat_interleave(n)))
    assert batches_equal(b.repeat(n, interleave=False), b.reorder(ids.repeat(n)))
    perm = data.draw(st.permutations(range(len(b))))
    r = b.reorder(list(perm))
    assert rows_of(r) == list(perm) and r["uid"].tolist() == [b["uid"][i] for i in perm]
    inverse = torch.argsort(torch.tensor(perm, dtype=torch.int64))
    assert batches_equal(r.reorder(inverse), b)
