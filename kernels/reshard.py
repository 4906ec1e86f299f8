"""Copy kernels on flat 1-D buffers for resharding weights (the 3D-HybridEngine's transition).

Around the all-gather that moves weights from the training layout to the generation layout:

    pack(tensors, out)            # out[:total] = cat(t.flatten() for t in tensors); the rest is padding
    copy_segments(src, dst, src_starts, dst_starts, lengths)
                                  # dst[d_i : d_i + n_i] = src[s_i : s_i + n_i] for every segment i
    segments_from_index(index)    # planning, once: dst[j] = src[index[j]] as maximal runs

``pack`` lays each tensor out row-major, one after another, in argument order. Its inputs may be
views: any tensor whose dims after the first are contiguous (a 2-D tensor with last stride 1, such as
a column block ``w[:, a:b]``; any contiguous tensor) is read in place; other layouts are copied to
contiguous first on the Triton path. ``copy_segments``'s segments must not overlap in dst, and src
and dst must not share memory.

Both copies have two implementations, picked by ``hfrl_kernels.use_triton``:

- Triton: one launch of ``_copy_runs_kernel`` over a flattened work list. Each copy is a "run":
  a row of a table (source element offset from a base pointer, numel, cols, row stride, destination
  offset, first work item). The run is split into work items of BLOCK * ITERS elements and program p
  copies work item p of run ``work[p]``, so a large tensor spreads over many programs and a small one
  costs one. Triton takes no list of pointers, so pack's tensors are addressed by their element
  offset from the lowest-addressed one. Elements are copied as integers of the same width: bits,
  for any 1/2/4/8-byte dtype.
- PyTorch references: ``torch.cat`` for pack; for copy_segments, a gather/scatter of element
  indices built with repeat_interleave, at most ~8M elements at a time (no loop over segments).
"""
from __future__ import annotations

from typing import Sequence

import torch

from hfrl_kernels import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

BLOCK = 1024        # elements per vector load/store
ITERS = 4           # blocks per program: one work item is BLOCK * ITERS elements
_WORK = BLOCK * ITERS
_FIELDS = 6         # run table columns: src offset, numel, cols, row stride, dst offset, first work item
REFERENCE_CHUNK = 1 << 22   # copy_segments_reference builds indices for < 2 * this many elements at once
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- pack -------------------------------------------------------------------------------------------

def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Write the row-major flattening of each tensor, concatenated, into ``out[:total]``; return out.

    tensors: any shapes, one dtype and device with ``out``. out: 1-D contiguous, numel >= total =
    sum of the tensors' numels; ``out[total:]`` is left as it was.
    """
    total = _validate_pack(tensors, out)
    if total and use_triton(out) and out.element_size() in _BITS:
        _pack_triton(tensors, out)
    elif total:
        _pack_reference(tensors, out, total)
    return out


def pack_reference(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``pack`` in PyTorch: one ``torch.cat`` into ``out[:total]`` (a non-contiguous input is first
    reshaped, which copies it)."""
    total = _validate_pack(tensors, out)
    if total:
        _pack_reference(tensors, out, total)
    return out


def _pack_reference(tensors, out, total: int) -> None:
    torch.cat([t.reshape(-1) for t in tensors], out=out[:total])


def _validate_pack(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> int:
    """Dtype, device and size checks; returns the total element count."""
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or not out.is_contiguous():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a 1-D contiguous tensor, got {shape}")
    total = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype != out.dtype or t.device != out.device:
            raise ValueError(f"tensors[{i}] (shape {tuple(t.shape)}) is {t.dtype} on {t.device}, but out "
                             f"is {out.dtype} on {out.device}: every tensor must match out")
        total += t.numel()
    if total > out.numel():
        sizes = ", ".join(f"{i}: {tuple(t.shape)}" for i, t in enumerate(tensors))
        raise ValueError(f"out has {out.numel()} elements but the tensors need {total} ({sizes}); "
                         f"allocate out with at least {total}")
    return total


def _row_layout(t: torch.Tensor) -> tuple[int, int] | None:
    """(cols, row stride) when t is rows of contiguous elements evenly spaced in memory, else None.

    A contiguous tensor is one row; a tensor whose dims after the first are contiguous (a column
    block ``w[:, a:b]``) has size(0) rows of numel / size(0) elements, stride(0) apart."""
    if t.is_contiguous():
        return t.numel(), t.numel()
    if t.dim() >= 2 and t[0].is_contiguous():
        return t.numel() // t.shape[0], t.stride(0)
    return None


def _pack_triton(tensors, out) -> None:
    """Build the run table on the host (no device-to-host copy) and launch once."""
    runs = []      # (index, tensor or its contiguous copy, numel, cols, row stride, dst offset)
    dst = 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if n:
            layout = _row_layout(t)
            if layout is None:
                t = t.contiguous()   # held in runs until the launch
                layout = (n, n)
            runs.append((i, t, n, *layout, dst))
        dst += n
    base = min((run[1] for run in runs), key=lambda t: t.data_ptr())
    size = out.element_size()
    rows = []
    for i, t, n, cols, row_stride, dst in runs:
        gap = t.data_ptr() - base.data_ptr()
        if gap % size:
            raise ValueError(f"tensors[{i}] (shape {tuple(t.shape)}, {t.dtype}) starts {gap} bytes after "
                             f"the lowest-addressed tensor, not a multiple of its element size {size}")
        rows.append((gap // size, n, cols, row_stride, dst))
    table = torch.tensor(rows, dtype=torch.int64)
    two_d = bool((table[:, 1] != table[:, 2]).any())   # some run has more than one row
    _launch(base, out, table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4], two_d)


# ---- copy_segments ---------------------------------------------------------------------------------

def copy_segments(src: torch.Tensor, dst: torch.Tensor, src_starts, dst_starts, lengths) -> None:
    """For each segment i: ``dst[dst_starts[i] : dst_starts[i] + lengths[i]] = src[src_starts[i] : ...]``.

    src, dst: 1-D contiguous, one dtype and device, not sharing memory. src_starts, dst_starts,
    lengths: 1-D integer tensors (or sequences) of one length, on any device. Segments must not
    overlap in dst. Checking the tables reads them on the host (one synchronisation on a GPU).
    """
    src_starts, dst_starts, lengths = _validate_segments(src, dst, src_starts, dst_starts, lengths)
    if use_triton(src) and src.element_size() in _BITS:
        _launch(src, dst, src_starts, lengths, lengths, lengths, dst_starts, two_d=False)
    else:
        _copy_segments_reference(src, dst, src_starts, dst_starts, lengths)


def copy_segments_reference(src: torch.Tensor, dst: torch.Tensor, src_starts, dst_starts,
                            lengths) -> None:
    """``copy_segments`` in PyTorch (same arguments)."""
    tables = _validate_segments(src, dst, src_starts, dst_starts, lengths)
    _copy_segments_reference(src, dst, *tables)


def _copy_segments_reference(src, dst, src_starts, dst_starts, lengths) -> None:
    """Strided block copies when the segments form few evenly spaced groups (the resharding maps do:
    a row-parallel shard is one group of rows), else element-index copies."""
    order = torch.argsort(src_starts, stable=True)  # interleaved blocks (row-parallel) are strided in src order
    groups = strided_groups(src_starts[order], dst_starts[order], lengths[order])
    if groups is None:
        _copy_indexed(src, dst, src_starts, dst_starts, lengths)
        return
    for s, d, n, count, s_step, d_step in groups.tolist():
        if n == 0:
            continue
        dst.as_strided((count, n), (d_step, 1), d).copy_(src.as_strided((count, n), (s_step, 1), s))


def strided_groups(src_starts: torch.Tensor, dst_starts: torch.Tensor, lengths: torch.Tensor,
                   max_groups: int | None = None) -> torch.Tensor | None:
    """Consecutive segments of one length at constant src and dst steps, as (N, 6) int64 rows
    (src_start, dst_start, length, count, src_step, dst_step); None if that takes more than
    ``max_groups`` rows (default max(64, segments // 8)) or needs a step that is not positive.

    Segment t starts a group unless its length and its steps from t-1 equal t-1's; where steps change,
    the first segment after the change is moved into the group that continues with its step.
    """
    n = lengths.numel()
    if n == 0:
        return torch.zeros(0, 6, dtype=torch.int64)
    if max_groups is None:
        max_groups = max(64, n // 8)
    keys = torch.stack([lengths[1:], src_starts[1:] - src_starts[:-1],
                        dst_starts[1:] - dst_starts[:-1]], dim=1)          # (n-1, 3): transition t = row t-1
    joins = lengths[1:] == lengths[:-1]                                  # segment t may extend t-1's group
    starts = torch.ones(n, dtype=torch.bool, device=lengths.device)
    starts[1:] = ~joins
    if n > 2:
        same = (keys[1:] == keys[:-1]).all(dim=1)                        # t's step equals t-1's (t >= 2)
        starts[2:] |= ~same
        # where a group's step changes, segment t starts alone and t + 1 starts again; t + 1 belongs to
        # t's group instead when the group continuing from t + 1 keeps t -> t + 1's step
        merge = starts[1:-1] & starts[2:].clone() & joins[1:] & torch.cat([~starts[3:] & same[1:], same.new_zeros(1)])
        starts[2:] &= ~merge
    first = starts.nonzero().view(-1)
    if first.numel() > max_groups:
        return None
    count = torch.diff(first, append=torch.tensor([n], device=first.device))
    step_src = torch.where(count > 1, src_starts[(first + 1).clamp(max=n - 1)] - src_starts[first], 1)
    step_dst = torch.where(count > 1, dst_starts[(first + 1).clamp(max=n - 1)] - dst_starts[first], 1)
    if bool(((step_src <= 0) | (step_dst <= 0)).any()):
        return None
    return torch.stack([src_starts[first], dst_starts[first], lengths[first], count, step_src, step_dst],
                       dim=1).cpu()


def _copy_indexed(src, dst, src_starts, dst_starts, lengths) -> None:
    """Cut segments into pieces of <= REFERENCE_CHUNK elements, batch the pieces that start in the
    same REFERENCE_CHUNK-wide window of the concatenated pieces (< 2 * REFERENCE_CHUNK elements a
    batch), and copy each batch with one index_select and one index_copy_."""
    chunk = REFERENCE_CHUNK
    device = lengths.device
    counts = (lengths + chunk - 1) // chunk                         # pieces per segment
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    offset = (torch.arange(seg.numel(), device=device) - first[seg]) * chunk   # piece start in its segment
    piece_len = torch.minimum(lengths[seg] - offset, torch.full_like(offset, chunk))
    piece_src, piece_dst = src_starts[seg] + offset, dst_starts[seg] + offset
    piece_end = torch.cumsum(piece_len, 0)
    piece_start = piece_end - piece_len                             # in the concatenation of all pieces
    total = int(piece_end[-1]) if piece_end.numel() else 0
    bounds = torch.searchsorted(piece_start, torch.arange(0, total + chunk, chunk, device=device))
    bounds = bounds.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo == hi:
            continue
        lens = piece_len[lo:hi]
        n = int(piece_end[hi - 1] - piece_start[lo])
        which = torch.repeat_interleave(torch.arange(hi - lo, device=device), lens, output_size=n)
        pos = torch.arange(n, device=device) - (piece_start[lo:hi] - piece_start[lo])[which]
        src_index = piece_src[lo:hi][which] + pos
        dst_index = piece_dst[lo:hi][which] + pos
        dst.index_copy_(0, dst_index, src.index_select(0, src_index))


def _validate_segments(src, dst, src_starts, dst_starts, lengths):
    """Checks; returns the three tables as int64 on src's device."""
    for name, t in (("src", src), ("dst", dst)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_contiguous():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D contiguous tensor, got {shape}")
    if dst.dtype != src.dtype or dst.device != src.device:
        raise ValueError(f"dst is {dst.dtype} on {dst.device} but src is {src.dtype} on {src.device}")
    tables = []
    for name, t in (("src_starts", src_starts), ("dst_starts", dst_starts), ("lengths", lengths)):
        t = torch.as_tensor(t, device=src.device)
        if t.dim() != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex
                                           or t.dtype == torch.bool)):
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(t.shape)}, {t.dtype}")
        tables.append(t.long())
    src_starts, dst_starts, lengths = tables
    if not src_starts.numel() == dst_starts.numel() == lengths.numel():
        raise ValueError(f"src_starts, dst_starts and lengths have {src_starts.numel()}, "
                         f"{dst_starts.numel()} and {lengths.numel()} entries; they must have one length")
    bad = ((lengths < 0) | (src_starts < 0) | (dst_starts < 0)
           | (src_starts + lengths > src.numel()) | (dst_starts + lengths > dst.numel()))
    if lengths.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        s, d, n = int(src_starts[i]), int(dst_starts[i]), int(lengths[i])
        raise ValueError(f"segment {i} (src [{s}, {s + n}), dst [{d}, {d + n}), length {n}) does not lie "
                         f"inside src ({src.numel()} elements) and dst ({dst.numel()} elements), or "
                         f"has a negative start or length")
    return src_starts, dst_starts, lengths


# ---- planning ----------------------------------------------------------------------------------

def segments_from_index(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run-length encode a gather map: ``index[j]`` is the src element dst element j takes, -1 none.

    Returns (src_starts, dst_starts, lengths), int64 on index's device: the maximal runs of valid
    entries where consecutive dst positions take consecutive src positions, in dst order, so that
    ``copy_segments(src, dst, *segments_from_index(index))`` does ``dst[m] = src[index[m]]`` for
    m = index >= 0.
    """
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype.is_floating_point \
            or index.dtype.is_complex or index.dtype == torch.bool:
        desc = f"shape {tuple(index.shape)}, {index.dtype}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"index must be a 1-D integer tensor, got {desc}")
    index = index.long()
    if index.numel() and int(index.min()) < -1:
        raise ValueError(f"index entries must be >= -1 (-1: not written), got {int(index.min())} at "
                         f"position {int(index.argmin())}")
    valid = index >= 0
    follows = torch.zeros_like(valid)            # j continues the run of j - 1
    follows[1:] = valid[1:] & valid[:-1] & (index[1:] == index[:-1] + 1)
    starts = valid & ~follows
    ends = valid.clone()                         # j is the last element of its run
    ends[:-1] &= ~follows[1:]
    dst_starts = starts.nonzero().view(-1)
    lengths = ends.nonzero().view(-1) - dst_starts + 1
    return index[dst_starts], dst_starts, lengths


# ---- Triton ----------------------------------------------------------------------------------------

def _launch(base, out, src_offsets, numels, cols, row_strides, dst_offsets, two_d: bool) -> None:
    """Copy run r: element e < numels[r] of ``base + src_offsets[r]``, at row e // cols[r], column
    e % cols[r] (rows row_strides[r] apart) to ``out[dst_offsets[r] + e]``. One launch, one program
    per work item of _WORK elements; every table is a 1-D int64 tensor on any device."""
    numels = numels.to(torch.int64)
    items = (numels + _WORK - 1) // _WORK                         # work items per run
    first = torch.cumsum(items, 0) - items
    table = torch.stack([src_offsets, numels, cols, row_strides, dst_offsets, first], dim=1)
    table = table.to(device=out.device, dtype=torch.int64).contiguous()
    num_items = int(items.sum())                                  # synchronises if on a GPU
    if not num_items:
        return
    work = torch.repeat_interleave(torch.arange(items.numel(), device=items.device), items,
                                   output_size=num_items).to(out.device)
    bits = _BITS[out.element_size()]
    _copy_runs_kernel[(num_items,)](base.view(bits), out.view(bits), table, work,
                                    FIELDS=_FIELDS, TWO_D=two_d, BLOCK=BLOCK, ITERS=ITERS)


if triton_available():

    @triton.jit
    def _copy_runs_kernel(base_ptr, out_ptr, table_ptr, work_ptr, FIELDS: tl.constexpr,
                          TWO_D: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """Work item p: elements [k * BLOCK * ITERS, (k + 1) * BLOCK * ITERS) of run work[p], k its
        index among that run's items; lanes past the run's numel do nothing."""
        pid = tl.program_id(0)
        row = table_ptr + tl.load(work_ptr + pid) * FIELDS
        src = base_ptr + tl.load(row)
        numel = tl.load(row + 1)
        dst = out_ptr + tl.load(row + 4)
        start = (pid - tl.load(row + 5)) * (BLOCK * ITERS)       # int64: runs may exceed 2**31
        if TWO_D:
            cols = tl.load(row + 2)
            row_stride = tl.load(row + 3)
        for i in tl.static_range(ITERS):
            e = start + i * BLOCK + tl.arange(0, BLOCK)
            mask = e < numel
            if TWO_D:
                offs = e // cols * row_stride + e % cols
            else:
                offs = e
            tl.store(dst + e, tl.load(src + offs, mask=mask), mask=mask)
