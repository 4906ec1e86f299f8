"""Batch: the one data type passed between RL roles.

A Batch holds named tensors sharing dim 0 (the rows: one per prompt or per sample), non-tensor
columns as numpy arrays with the same dim 0 (strings, ids, Python objects), and a small ``meta``
dict (temperature, global step, ...). Tensor and non-tensor keys share one namespace, so
``batch["key"]`` finds either kind.

Every method returns a new Batch; only ``pop`` and ``batch[key] = value`` change the batch they are
called on. A result's columns may share memory with the input (slices are views, ``select`` does
not copy): use ``clone()`` for an independent copy.

For transfer between ranks a Batch becomes ONE contiguous ``uint8`` buffer plus a small header
(``to_buffer`` / ``from_buffer``), so a send is a single tensor message whose size the receiver
knows in advance from the header (``buffer_nbytes``).
"""
from __future__ import annotations

import copy
import math
import pickle
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

__all__ = ["Batch", "batches_equal", "buffer_nbytes", "header_from_bytes", "header_to_bytes"]

HEADER_VERSION = 1
# Bytes between tensor starts in a buffer: a multiple of every item size (complex128 is 16), so
# each tensor can be a dtype view of the uint8 buffer without a copy.
DEFAULT_ALIGNMENT = 16

# dtypes a header may name. Parsing is a lookup in this table, never getattr(torch, name).
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "bool",
                 "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float8_e4m3fn", "float8_e5m2")
    if isinstance(getattr(torch, name, None), torch.dtype)
}

# What selects rows: an int (gives a 1-row Batch), a slice, an int sequence or a bool mask.
RowIndex = int | slice | torch.Tensor | np.ndarray | Sequence[int] | Sequence[bool]
Keys = Sequence[str] | str


class Batch:
    """Named columns sharing dim 0, plus ``meta``.

    Args:
        tensors: name -> tensor of shape (N, ...). Any dtype and device.
        non_tensors: name -> numpy array of shape (N, ...). A list or tuple becomes a 1-D object
            array with one element per row (so nested lists and strings stay as they are).
        meta: small JSON-able or picklable values that describe the whole batch.
        size: N for a batch with no columns; if given with columns it must match them.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None,
                 non_tensors: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None, size: int | None = None):
        self.tensors = {k: _as_tensor(k, v) for k, v in (tensors or {}).items()}
        self.non_tensors = {k: _as_non_tensor(k, v) for k, v in (non_tensors or {}).items()}
        self.meta = dict(meta or {})
        both = self.tensors.keys() & self.non_tensors.keys()
        if both:
            raise ValueError(f"keys {sorted(both)} are in both tensors and non_tensors; "
                             "a key names one column, rename one of them")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ValueError(f"size must be a non-negative int or None, got {size!r}")
        sizes = {k: int(col.shape[0]) for k, col in self._columns()}
        source = f"size={size}" if size is not None else f"column {next(iter(sizes), None)!r}"
        expected = size if size is not None else next(iter(sizes.values()), None)
        wrong = {k: n for k, n in sizes.items() if n != expected}
        if wrong:
            raise ValueError(f"every column must have dim 0 = {expected} (from {source}), but these "
                             f"differ (column: dim 0): {wrong}; give every column one row per sample")
        self._size = expected  # only read while the batch has no columns (e.g. all were popped)

    # ------------------------------------------------------------ columns and dict-like access

    def _columns(self) -> Iterator[tuple[str, torch.Tensor | np.ndarray]]:
        yield from self.tensors.items()
        yield from self.non_tensors.items()

    def __len__(self) -> int:
        for col in self.tensors.values():
            return col.shape[0]
        for col in self.non_tensors.values():
            return col.shape[0]
        return self._size or 0

    def keys(self) -> list[str]:
        """Tensor keys, then non-tensor keys."""
        return [*self.tensors, *self.non_tensors]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors or key in self.non_tensors

    def __getitem__(self, key: str | RowIndex) -> Batch | torch.Tensor | np.ndarray:
        """``batch["name"]`` -> that column; an int, slice, int index or bool mask -> a Batch of
        those rows. An int gives a 1-row Batch (dim 0 kept)."""
        if isinstance(key, str):
            if key in self:
                return self.tensors[key] if key in self.tensors else self.non_tensors[key]
            raise KeyError(f"no column {key!r}; this Batch has {self.keys()}")
        return self._take(_normalize_index(key, len(self)))

    def __setitem__(self, key: str, value: Any) -> None:
        """Set a column: a tensor goes to ``tensors``, anything else to ``non_tensors``."""
        if not isinstance(key, str):
            raise TypeError(f"column names are str, got {type(key).__name__}; rows cannot be assigned")
        if isinstance(value, torch.Tensor):
            col, target, other = _as_tensor(key, value), self.tensors, self.non_tensors
        else:
            col, target, other = _as_non_tensor(key, value), self.non_tensors, self.tensors
        expected = len(self) if self.keys() else self._size
        if expected is not None and col.shape[0] != expected:
            raise ValueError(f"column {key!r} has dim 0 = {col.shape[0]} but the Batch has "
                             f"{expected} rows; give one row per sample")
        other.pop(key, None)  # the key may change kind; it must not stay in both dicts
        target[key] = col

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}: {str(c.dtype).removeprefix('torch.')}{list(c.shape)}"
                         for k, c in self._columns())
        return f"Batch(len={len(self)}, columns={{{cols}}}, meta_keys={list(self.meta)})"

    def _map(self, tensor_fn: Callable, array_fn: Callable, size: int) -> Batch:
        """A Batch of ``size`` rows with tensor_fn / array_fn applied to each column; same meta.

        The functions keep each column's kind and give it ``size`` rows, so the result is not
        validated again (that was most of the cost of slicing a small batch)."""
        out = Batch.__new__(Batch)
        out.tensors = {k: tensor_fn(t) for k, t in self.tensors.items()}
        out.non_tensors = {k: array_fn(a) for k, a in self.non_tensors.items()}
        out.meta = dict(self.meta)
        out._size = size
        assert all(col.shape[0] == size for _, col in out._columns()), "a column lost its rows"
        return out

    # ---------------------------------------------------------------------------- row selection

    def _take(self, index: slice | torch.Tensor) -> Batch:
        """Rows by a slice (views) or a 1-D int64 CPU index tensor (copies)."""
        if isinstance(index, slice):
            return self._map(lambda t: t[index], lambda a: a[index], len(range(*index.indices(len(self)))))
        idx_np = index.numpy()
        return self._map(lambda t: t.index_select(0, index.to(t.device)), lambda a: a[idx_np], index.numel())

    def reorder(self, indices: torch.Tensor | np.ndarray | Sequence[int] | Sequence[bool]) -> Batch:
        """Rows ``indices`` in that order: a permutation, repeats or a subset (int or bool mask)."""
        if isinstance(indices, (int, np.integer, slice)):
            raise TypeError(f"reorder takes a sequence of row indices, got {type(indices).__name__}; "
                            "use batch[i] or batch[i:j] for an int or a slice")
        return self._take(_normalize_index(indices, len(self)))

    def chunk(self, n: int) -> list[Batch]:
        """Split into ``n`` equal batches of len(self) // n rows (views of this one)."""
        _check_positive_int("n", n)
        if len(self) % n:
            raise ValueError(f"cannot chunk a Batch of {len(self)} rows into {n} equal chunks "
                             f"({len(self)} % {n} = {len(self) % n}); pad first with "
                             f"`padded, pad = batch.pad_to_multiple({n})` and unpad(pad) the result")
        rows = len(self) // n
        return [self._take(slice(i * rows, (i + 1) * rows)) for i in range(n)]

    def split(self, size: int) -> list[Batch]:
        """Batches of ``size`` rows, the last one smaller if needed. A 0-row batch gives one 0-row
        batch (as torch.split does), so concat(split(b)) equals b for every b."""
        _check_positive_int("size", size)
        starts = range(0, len(self), size) if len(self) else [0]
        return [self._take(slice(s, s + size)) for s in starts]

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Every row ``n`` times, len(self) * n rows: interleave=True gives a a b b (n samples per
        prompt), False tiles the whole batch, a b a b."""
        _check_positive_int("n", n)
        if interleave:
            return self._map(lambda t: t.repeat_interleave(n, dim=0), lambda a: np.repeat(a, n, axis=0),
                             len(self) * n)
        return self._map(lambda t: t.repeat(n, *[1] * (t.dim() - 1)), lambda a: np.concatenate([a] * n),
                         len(self) * n)

    def pad_to_multiple(self, k: int) -> tuple[Batch, int]:
        """Pad to a multiple of ``k`` rows by repeating rows from the start (0, 1, 2, ..., wrapping
        around), so padded rows are valid data a worker can compute on.

        Returns (padded batch, pad_size); ``padded.unpad(pad_size)`` gives the rows back.
        """
        _check_positive_int("k", k)
        n = len(self)
        if n == 0:
            raise ValueError("cannot pad an empty Batch (0 rows): padding repeats existing rows and "
                             "there are none; make sure the batch has rows before dispatching it")
        pad = -n % k
        if pad == 0:
            return self._take(slice(None)), 0
        return Batch.concat([self, self._take(torch.arange(pad) % n)], check_meta=False), pad

    def unpad(self, pad_size: int) -> Batch:
        """Drop the last ``pad_size`` rows (the ones pad_to_multiple added)."""
        if not isinstance(pad_size, int) or not 0 <= pad_size <= len(self):
            raise ValueError(f"pad_size must be an int in [0, {len(self)}] (the rows of this Batch), "
                             f"got {pad_size!r}; pass the pad size pad_to_multiple returned")
        return self._take(slice(0, len(self) - pad_size))

    # ------------------------------------------------------------------------- column selection

    def select(self, keys: Keys | None = None, non_tensor_keys: Keys | None = None,
               meta_keys: Keys | None = None) -> Batch:
        """Only the named tensor, non-tensor and meta keys (None: all of that kind). Not copied."""
        return Batch(_pick(self.tensors, keys, "tensor"),
                     _pick(self.non_tensors, non_tensor_keys, "non-tensor"),
                     _pick(self.meta, meta_keys, "meta"), size=len(self))

    def pop(self, keys: Keys = (), non_tensor_keys: Keys = (), meta_keys: Keys = ()) -> Batch:
        """Remove the named keys (as in select) from this Batch and return them as a new Batch of
        the same rows. All names are checked first, so a KeyError leaves self unchanged."""
        out = self.select(keys, non_tensor_keys, meta_keys)
        self._size = len(self)  # keep the row count if every column goes
        for popped, own in ((out.tensors, self.tensors), (out.non_tensors, self.non_tensors),
                            (out.meta, self.meta)):
            for k in popped:
                del own[k]
        return out

    def union(self, other: Batch) -> Batch:
        """Columns and meta of both. A key in both must hold equal values (dtype, shape, values)."""
        if len(self) != len(other):
            raise ValueError(f"union needs batches of the same rows, got {len(self)} and {len(other)}")
        cross = ((self.tensors.keys() & other.non_tensors.keys())
                 | (self.non_tensors.keys() & other.tensors.keys()))
        if cross:
            raise ValueError(f"keys {sorted(cross)} are a tensor in one batch and a non-tensor in the other")
        return Batch(_merge(self.tensors, other.tensors, "tensor"),
                     _merge(self.non_tensors, other.non_tensors, "non-tensor"),
                     _merge(self.meta, other.meta, "meta"), size=len(self))

    @staticmethod
    def concat(batches: Sequence[Batch], *, check_meta: bool = True) -> Batch:
        """Rows of all batches in order. Keys must match exactly; a tensor must have one dtype and
        the same dims after 0 in every batch. Meta comes from batches[0]; with check_meta=True
        every batch's meta must equal it, with False the others' meta is ignored."""
        batches = list(batches)
        if not batches:
            raise ValueError("concat needs at least one Batch, got none")
        first = batches[0]
        for i, b in enumerate(batches[1:], 1):
            diffs = [f"{what} keys only in batch 0: {sorted(x.keys() - y.keys())}, only in batch {i}: "
                     f"{sorted(y.keys() - x.keys())}" for what, x, y in
                     (("tensor", first.tensors, b.tensors), ("non-tensor", first.non_tensors, b.non_tensors))
                     if x.keys() != y.keys()]
            if diffs:
                raise ValueError(f"concat: batch {i} has other keys than batch 0 ({'; '.join(diffs)}); "
                                 "select the same keys on every batch first")
            if check_meta and not _values_equal(first.meta, b.meta):
                diff = sorted(k for k in first.meta.keys() | b.meta.keys()
                              if not _values_equal(first.meta.get(k, _MISSING), b.meta.get(k, _MISSING)))
                raise ValueError(f"concat: meta of batch {i} differs from batch 0 in keys {diff}; make "
                                 "them equal, or pass check_meta=False to keep batch 0's meta")
        for k, t0 in first.tensors.items():
            for i, t in enumerate(b.tensors[k] for b in batches):
                if t.dtype != t0.dtype or t.shape[1:] != t0.shape[1:]:
                    raise ValueError(f"concat: tensor {k!r} is {t.dtype} {list(t.shape)} in batch {i} "
                                     f"but {t0.dtype} {list(t0.shape)} in batch 0; the dtype and the "
                                     "dims after 0 must match")
        return Batch({k: torch.cat([b.tensors[k] for b in batches]) for k in first.tensors},
                     {k: np.concatenate([b.non_tensors[k] for b in batches]) for k in first.non_tensors},
                     first.meta, size=sum(len(b) for b in batches))

    # ------------------------------------------------------------------------ devices and copies

    def to(self, device: torch.device | str) -> Batch:
        """Tensors moved to ``device``; non-tensor columns and meta are shared."""
        return self._map(lambda t: t.to(device), lambda a: a, len(self))

    def clone(self) -> Batch:
        """A deep copy: tensors cloned on their device, non-tensors and meta deep-copied."""
        out = self._map(torch.clone, copy.deepcopy, len(self))
        out.meta = copy.deepcopy(self.meta)
        return out

    @property
    def nbytes(self) -> int:
        """Exact bytes of tensor data (numel * element size); non-tensors are not counted."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ----------------------------------------------------------------------------- serialisation

    def to_buffer(self, alignment: int = DEFAULT_ALIGNMENT,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, dict]:
        """Every tensor's bytes back to back in one contiguous buffer, plus a header describing them.

        Each tensor starts at a multiple of ``alignment`` bytes and its size is rounded up to one,
        so buf.numel() == sum(round_up(t.nbytes, alignment)). Non-contiguous tensors are copied
        into their slot in one pass. ``device`` defaults to the tensors' (one) device, or CPU.

        Returns:
            buf: (nbytes,) torch.uint8 on ``device``.
            header: {"version", "num_rows", "alignment", "nbytes", "tensors": [{"name", "dtype",
                "shape", "offset", "nbytes"}, ...], "non_tensors": {name: np.ndarray}, "meta"}:
                plain ints, strs and lists apart from non_tensors and meta, so it is picklable,
                and JSON-able when those two are. Send it with header_to_bytes.
        """
        header = self.buffer_header(alignment)
        device = self.device if device is None else device
        buf = torch.empty(header["nbytes"], dtype=torch.uint8, device=device)
        self.write_buffer(buf, header)
        return buf, header

    def buffer_header(self, alignment: int = DEFAULT_ALIGNMENT) -> dict:
        """The header `to_buffer` returns, without the buffer: lets a caller place the buffer
        inside a larger one (a message) and fill it with `write_buffer`, one copy per tensor."""
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a positive power of two, got {alignment!r}")
        entries, offset = [], 0
        for name, t in self.tensors.items():
            if t.element_size() > alignment:
                raise ValueError(f"tensor {name!r} has {t.element_size()}-byte items, more than "
                                 f"alignment={alignment}; pass alignment >= {t.element_size()}")
            nbytes = t.numel() * t.element_size()
            entries.append({"name": name, "dtype": _dtype_name(name, t.dtype), "shape": list(t.shape),
                            "offset": offset, "nbytes": nbytes})
            offset += -(-nbytes // alignment) * alignment
        return {"version": HEADER_VERSION, "num_rows": len(self), "alignment": alignment,
                "nbytes": offset, "tensors": entries, "non_tensors": dict(self.non_tensors),
                "meta": dict(self.meta)}

    def write_buffer(self, buf: torch.Tensor, header: dict) -> None:
        """Copy every tensor into its slot of ``buf`` (uint8, header["nbytes"], from
        `buffer_header` of this batch) and zero the alignment gaps: stale memory must not reach
        other ranks, and equal batches must serialise to equal bytes. (Only the gaps: a full
        memset costs as much as the copy.) Non-contiguous tensors are copied in one pass."""
        alignment = header["alignment"]
        for entry, t in zip(header["tensors"], self.tensors.values()):
            if entry["nbytes"]:
                # A tensor that requires grad must not pull buf into its graph. (detach, not
                # no_grad: entering a context costs more than this copy of a small tensor.)
                _view(buf, entry).copy_(t.detach() if t.requires_grad else t)
            end = entry["offset"] + entry["nbytes"]
            if end % alignment:
                buf[end:-(-end // alignment) * alignment].zero_()

    @staticmethod
    def from_buffer(buf: torch.Tensor, header: dict) -> Batch:
        """The Batch that to_buffer described. Tensors are views into ``buf`` (on its device) with
        the exact dtype and shape recorded; non-tensor columns and meta come from the header.

        Args:
            buf: (buffer_nbytes(header),) torch.uint8, e.g. received into torch.empty.
        """
        expected = buffer_nbytes(header)
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
            got = f"{buf.dtype} {list(buf.shape)}" if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise TypeError(f"buf must be a 1-D torch.uint8 tensor, got {got}")
        if buf.numel() != expected:
            raise ValueError(f"buf has {buf.numel()} bytes but the header describes {expected}; "
                             "allocate torch.empty(buffer_nbytes(header), dtype=torch.uint8)")
        if not buf.is_contiguous() or buf.storage_offset() % header["alignment"]:
            # A dtype view needs a dense buffer whose start is aligned to the item size.
            buf = buf.clone(memory_format=torch.contiguous_format)
        tensors = {e["name"]: _view(buf, e) for e in header["tensors"]}
        return Batch(tensors, header["non_tensors"], header["meta"], size=header["num_rows"])

    @property
    def device(self) -> torch.device:
        """The one device of the tensors (CPU when there are none); ValueError if several."""
        devices = {t.device for t in self.tensors.values()}
        if len(devices) > 1:
            raise ValueError(f"tensors are on several devices {sorted(map(str, devices))}; "
                             "pass to_buffer(device=...) or move them with batch.to(device)")
        return devices.pop() if devices else torch.device("cpu")


# ---------------------------------------------------------------------------------- headers

def buffer_nbytes(header: dict) -> int:
    """Bytes of the buffer a header describes: allocate this much before receiving it.
    Also checks the header is one this version of to_buffer wrote."""
    if not isinstance(header, dict) or header.get("version") != HEADER_VERSION:
        got = header.get("version") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"not a Batch header of version {HEADER_VERSION} (got {got!r}); "
                         "build it with Batch.to_buffer on a rank running the same hfrl")
    for e in header["tensors"]:
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None or e["nbytes"] != math.prod(e["shape"]) * dtype.itemsize:
            raise ValueError(f"header entry {e} has an unknown dtype or a size that does not match its shape")
        if e["offset"] % header["alignment"] or e["offset"] + e["nbytes"] > header["nbytes"]:
            raise ValueError(f"header entry {e} is misaligned or ends past the buffer "
                             f"({header['nbytes']} bytes, alignment {header['alignment']})")
    return header["nbytes"]


def header_to_bytes(header: dict) -> bytes:
    """Pickle a header (it holds numpy and Python objects) to send to another rank of this job.

    Wrap the result as a tensor with ``torch.frombuffer(bytearray(b), dtype=torch.uint8)``.
    """
    return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)


def header_from_bytes(data: bytes | bytearray | memoryview | torch.Tensor) -> dict:
    """The header in ``data``: bytes from header_to_bytes, or a 1-D uint8 tensor holding them.

    SECURITY: this unpickles, and unpickling runs code chosen by whoever wrote the bytes. Only pass
    bytes that another rank of this same job sent over its own process group. Never load these
    bytes from a file, a socket or any other source; hfrl deliberately has no API that reads a
    Batch from a file.
    """
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"a header tensor must be 1-D torch.uint8, got {data.dtype} {list(data.shape)}")
        data = data.cpu().numpy().tobytes()
    header = pickle.loads(data)
    buffer_nbytes(header)  # validates
    return header


def batches_equal(a: Batch, b: Batch) -> bool:
    """True if both have the same rows, keys, dtypes, shapes, values (NaN equals NaN) and meta."""
    return (len(a) == len(b) and _values_equal(a.tensors, b.tensors)
            and _values_equal(a.non_tensors, b.non_tensors)
            and _values_equal(a.meta, b.meta))


# ---------------------------------------------------------------------------------- helpers

_MISSING = object()  # a meta key absent from one side


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"tensor column {name!r} must be a torch.Tensor, got {type(value).__name__}; "
                        "put numpy arrays, strings and objects in non_tensors")
    if value.dim() == 0:
        raise ValueError(f"tensor column {name!r} is 0-d and has no dim 0; put scalars in meta")
    return value


def _as_non_tensor(name: str, value: Any) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        # Filled one by one: np.asarray would turn equal-length nested lists into a 2-D array,
        # fail on ragged ones, and give strings a fixed width.
        arr = np.empty(len(value), dtype=object)
        for i, v in enumerate(value):
            arr[i] = v
        return arr
    if not isinstance(value, np.ndarray):
        hint = "; put tensors in tensors" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"non-tensor column {name!r} must be a numpy array, list or tuple, "
                        f"got {type(value).__name__}{hint}")
    if value.ndim == 0:
        raise ValueError(f"non-tensor column {name!r} is 0-d and has no dim 0; put scalars in meta")
    return value


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normalize_index(index: Any, n: int) -> slice | torch.Tensor:
    """An int, slice, bool mask or int sequence -> a slice or a 1-D int64 CPU tensor in [0, n)."""
    if isinstance(index, slice):
        if index.step is not None and index.step < 0:  # tensors only take positive-step slices
            return torch.arange(*index.indices(n))
        return index
    if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for a Batch of {n} rows")
        return slice(int(index) % n, int(index) % n + 1)
    if isinstance(index, torch.Tensor):
        idx = index.detach().cpu()
    elif isinstance(index, (np.ndarray, list, tuple, range)):
        arr = np.asarray(index)
        # An empty list parses as float64; it selects no rows.
        idx = torch.as_tensor(arr) if arr.size else torch.zeros(0, dtype=torch.int64)
    else:
        raise TypeError("rows are chosen by an int, slice, bool mask or int sequence, "
                        f"got {type(index).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"a row index must be 1-D, got shape {list(idx.shape)}")
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise ValueError(f"a bool mask needs one entry per row ({n}), got {idx.numel()}")
        return idx.nonzero().flatten()
    if idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"row indices must be integers or bools, got {idx.dtype}")
    idx = idx.to(torch.int64)
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"row indices must be in [-{n}, {n}), got min {int(idx.min())} max {int(idx.max())}")
    return torch.where(idx < 0, idx + n, idx)


def _pick(d: dict, keys: Keys | None, what: str) -> dict:
    if keys is None:
        return dict(d)
    keys = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in keys if k not in d]
    if missing:
        raise KeyError(f"{what} key(s) {missing} not found; the {what} keys are {list(d)}")
    return {k: d[k] for k in keys}


def _merge(ours: dict, theirs: dict, what: str) -> dict:
    out = dict(ours)
    for k, v in theirs.items():
        if k in out and not _values_equal(out[k], v):
            raise ValueError(f"union: {what} key {k!r} is in both batches with different values; "
                             "drop it from one side first (pop or select)")
        out.setdefault(k, v)
    return out


def _values_equal(a: Any, b: Any) -> bool:
    """Exact equality of columns and meta values: tensors and arrays by dtype, shape and values
    (NaN equals NaN, so a batch equals its own round trip), containers element by element."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) \
                or a.dtype != b.dtype or a.shape != b.shape:
            return False
        b = b.to(a.device)
        # torch.equal says NaN != NaN: fall back to comparing the bytes.
        return torch.equal(a, b) or torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                                b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) \
                or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == object:
            return all(map(_values_equal, a.ravel(), b.ravel()))
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_values_equal, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. objects whose == gives no single truth value
        return False


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype}, which to_buffer cannot send; "
                         f"supported: {sorted(_DTYPES)}; convert it with .to(...)")
    return dtype_name


def _view(buf: torch.Tensor, entry: dict) -> torch.Tensor:
    """The tensor a header entry describes, as a view of its bytes in ``buf``: entry["shape"]."""
    start = entry["offset"]
    return buf[start:start + entry["nbytes"]].view(_DTYPES[entry["dtype"]]).view(entry["shape"])
