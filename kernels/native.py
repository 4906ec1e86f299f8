"""hfrl's compiled CPU kernels (``csrc/cpu_decode.c``): the rollout engine's decode step in fp32.

Made of PyTorch ops, the CPU decode step spent most of its time outside arithmetic: some sixty ops
a layer (index arrays, two embedding bags and a masked softmax for attention, six ops an RMSNorm,
four a RoPE), and (N, V) intermediates for sampling. These functions do the same work in one call
each, reading the paged cache where it lies:

    native.available()                  # compiled and loaded (or why not: reason())
    native.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    native.attend_qkv(qkv, nh, nkv, cos, sin, k_cache, v_cache, block_tables, seq_lens, scale, window)
                                        # RoPE + cache write + attention from the fused projection
    native.write_kv(k_cache, v_cache, slots, k, v)
    native.rms_norm(x, weight, eps); native.silu_mul(gate_up)
    native.greedy(logits); native.sample(logits, temperature, uniforms)

The C source is compiled on first use with the host's C compiler (``$CC``, else ``cc`` or ``gcc``;
``-O3 -march=native -fopenmp``) into ``$HFRL_KERNEL_CACHE`` (default ``~/.cache/hfrl/kernels``),
named by a hash of the source, the compiler and the CPU's flags, so a cluster's nodes sharing a
home folder each get a build for their own CPU; the build is written to a temporary name and
renamed, so concurrent ranks never load a half-written library. OpenMP threads come from the
runtime torch already loaded (same ``libgomp.so.1``), sized by ``torch.get_num_threads()``.

Where no compiler works, or with ``HFRL_NATIVE_KERNELS=0``, ``available()`` is False, the reason is
logged once, and callers keep the PyTorch path (``decode_attention.py``), which computes the same
values to float rounding. Only fp32 CPU tensors in the layouts below are taken (``supports``,
``writes``, ``takes_rows``); every entry point checks its tensors and raises ValueError on others.

Layouts (one layer): ``k_cache`` a dim-major key cache (``empty_key_cache(..., "dim")``: storage
(num_blocks, num_kv_heads, head_dim, block_size)), ``v_cache`` contiguous (num_blocks, block_size,
num_kv_heads, head_dim); block tables and lengths int32 or int64 (copied to int32 here).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hfrl_kernels import keys_dim_major

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_decode.c"
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())  # x86-only option
_ERRORS = {2: "a block id outside the cache", 3: "out of memory for the kernel's scratch"}  # 1 (a length): _check_attention

_c_i64, _c_ptr = ctypes.c_int64, ctypes.c_void_p
_reason: str | None = None


def enabled() -> bool:
    return os.environ.get("HFRL_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("HFRL_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hfrl" / "kernels"


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` split as a shell would (``ccache gcc``), else cc or gcc."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: list[str]) -> tuple[Path, bool]:
    """The compiled library's path and whether it has OpenMP, building it first if this host has
    none. An OpenMP build is preferred; where the compiler has no OpenMP, a one-thread build is
    made and kept under its own name (so installing OpenMP later builds the threaded one)."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), " ".join(compiler), version, " ".join(FLAGS),
                                    _cpu_flags(), platform.machine())).encode()).hexdigest()[:16]
    folder = cache_dir()
    errors = []
    for openmp in (("-fopenmp",), ()):
        target = folder / f"cpu_decode-{key}-{'omp' if openmp else 'serial'}.so"
        if target.exists():
            return target, bool(openmp)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        cmd = [*compiler, *FLAGS, *openmp, str(SOURCE), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: another rank sees the whole file or none
                return target, bool(openmp)
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded library, or None (``reason()`` says why; logged once)."""
    global _reason
    if not enabled():
        _reason = "switched off by HFRL_NATIVE_KERNELS"
        return None
    if sys.platform != "linux" and sys.platform != "darwin":
        _reason = f"no build recipe for {sys.platform}"
        return None
    compiler = _compiler()
    if compiler is None:
        _reason = "no C compiler found (set CC, or install gcc)"
    else:
        try:
            path, threaded = _build(compiler)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _reason = f"building {SOURCE.name} with {' '.join(compiler)} failed: {err}"
        else:
            if not threaded:
                logger.warning("hfrl native CPU kernels built without OpenMP (%s has none): one thread each; "
                               "install OpenMP (libgomp) for the threaded build", " ".join(compiler))
            lib.hfrl_decode_attention_f32.restype = ctypes.c_int
            lib.hfrl_decode_attention_f32.argtypes = [
                _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_i64,
                _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, ctypes.c_float, _c_ptr, ctypes.c_int, _c_ptr]
            lib.hfrl_decode_attention_qkv_f32.restype = ctypes.c_int
            lib.hfrl_decode_attention_qkv_f32.argtypes = [
                _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_i64,
                _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, ctypes.c_float, _c_ptr, ctypes.c_int, _c_ptr]
            lib.hfrl_rms_norm_f32.restype = None
            lib.hfrl_rms_norm_f32.argtypes = [_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, ctypes.c_float, _c_ptr,
                                              ctypes.c_int]
            lib.hfrl_silu_mul_f32.restype = None
            lib.hfrl_silu_mul_f32.argtypes = [_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, ctypes.c_int]
            lib.hfrl_greedy_f32.restype = None
            lib.hfrl_greedy_f32.argtypes = [_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, ctypes.c_int]
            lib.hfrl_sample_f32.restype = ctypes.c_int
            lib.hfrl_sample_f32.argtypes = [_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_ptr,
                                            ctypes.c_int]
            lib.hfrl_write_kv_f32.restype = ctypes.c_int
            lib.hfrl_write_kv_f32.argtypes = [_c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_ptr,
                                              _c_i64, _c_i64, _c_i64, _c_i64, _c_ptr]
            return lib
    logger.warning("hfrl native CPU kernels unavailable, using the PyTorch path: %s", _reason)
    return None


def available() -> bool:
    return library() is not None


def reason() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return _reason


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether ``decode_attention`` takes these tensors (else the caller uses the PyTorch path)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and v_cache.dtype == torch.float32 and q.dim() == 3 and q.stride(2) == 1
            and q.stride(1) == q.shape[2] and keys_dim_major(k_cache)
            and v_cache.is_contiguous() and available())


_INT32_MAX = 2 ** 31 - 1


def _int32(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as contiguous int32; int64 values outside int32 are refused rather than wrapped."""
    if t.dtype == torch.int32:
        return t.contiguous()
    if t.numel() and (int(t.max()) > _INT32_MAX or int(t.min()) < -_INT32_MAX - 1):
        raise ValueError(f"{name} holds values outside int32 ([{int(t.min())}, {int(t.max())}]): "
                         "block ids and lengths that large cannot address a KV cache")
    return t.to(torch.int32).contiguous()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """``hfrl_kernels.decode_attention`` for tensors ``supports`` accepts: q (B, nh, hd) -> (B, nh, hd).

    Block ids and lengths are checked in C before anything is read: a bad one raises ValueError."""
    if not (supports(q, k_cache, v_cache) and q.shape[2] == k_cache.shape[3] and v_cache.shape == k_cache.shape
            and q.shape[1] % k_cache.shape[2] == 0 and block_tables.dim() == 2
            and block_tables.shape[0] == seq_lens.shape[0] == q.shape[0]):
        raise ValueError(f"native decode_attention takes fp32 CPU q (B, nh, hd) with heads hd apart, a dim-major "
                         f"fp32 key cache and a contiguous value cache of kv heads dividing nh, and B rows of block "
                         f"tables and lengths; got q {tuple(q.shape)} strides {q.stride()} {q.dtype}, k_cache "
                         f"{tuple(k_cache.shape)} strides {k_cache.stride()}, v_cache {tuple(v_cache.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)}")
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    tables, lens = _int32(block_tables, "block_tables"), _int32(seq_lens, "seq_lens")
    out = torch.empty(batch, num_heads, head_dim)
    if batch == 0:
        return out
    bad = ctypes.c_int64(0)
    code = library().hfrl_decode_attention_f32(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
        tables.data_ptr(), tables.shape[1], lens.data_ptr(), sliding_window or 0, batch, num_heads,
        num_kv_heads, head_dim, block_size, scale, out.data_ptr(), torch.get_num_threads(), ctypes.byref(bad))
    _check_attention(code, bad, tables, lens, block_size, num_blocks)
    return out


def _check_attention(code: int, bad: ctypes.c_int64, tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                     num_blocks: int, rope_rows: int | None = None) -> None:
    """Raise the ValueError for an attention kernel's error code (nothing was read or written)."""
    if code == 1:  # the PyTorch path's message (decode_attention._validate_lengths), plus the RoPE table
        bound = f"max_blocks_per_seq * block_size = {tables.shape[1] * block_size}"
        if rope_rows is not None:
            bound = f"min({bound}, RoPE table rows = {rope_rows})"
        raise ValueError(f"seq_lens must lie in [1, {bound}], got values in [{int(lens.min())}, {int(lens.max())}]")
    if code:
        row = int(bad.value)
        raise ValueError(f"decode attention: {_ERRORS.get(code, f'error {code}')} in sequence {row} "
                         f"(seq_len {int(lens[row])}, block_tables row {tables[row].tolist()}; the cache has "
                         f"{num_blocks} blocks)")


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store k, v (T, nkv, hd) (fp32, heads hd apart) at flat ``slots`` (T,) int64 of one layer's
    caches, laid out as ``decode_attention`` reads them. A slot outside the cache raises ValueError
    before anything is written."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if not (writes(k_cache, v_cache, k, v) and v_cache.shape == k_cache.shape and k.shape == v.shape
            and k.shape[1:] == (num_kv_heads, head_dim) and slots.shape == (k.shape[0],)):
        raise ValueError(f"write_kv takes fp32 CPU k, v (T, nkv, hd) with heads hd apart, T slots, a dim-major fp32 "
                         f"key cache and a contiguous value cache; got k {tuple(k.shape)} strides {k.stride()}, v "
                         f"{tuple(v.shape)}, slots {tuple(slots.shape)}, k_cache {tuple(k_cache.shape)} strides "
                         f"{k_cache.stride()}")
    slots = slots if slots.dtype == torch.int64 and slots.is_contiguous() else slots.to(torch.int64).contiguous()
    bad = ctypes.c_int64(0)
    code = library().hfrl_write_kv_f32(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                                       v_cache.data_ptr(), num_blocks, slots.data_ptr(), slots.numel(),
                                       num_kv_heads, head_dim, block_size, ctypes.byref(bad))
    if code:
        raise ValueError(f"KV cache write: slot {int(slots[int(bad.value)])} of token {int(bad.value)} lies "
                         f"outside the cache's {num_blocks} blocks of {block_size}")


def writes(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``write_kv`` takes these tensors."""
    return (k_cache.device.type == "cpu" and k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
            and k.dtype == torch.float32 and v.dtype == torch.float32 and k.dim() == 3 and v.dim() == 3
            and k.stride(2) == 1 and v.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]
            and keys_dim_major(k_cache) and v_cache.is_contiguous() and available())


def _rows_f32(x: torch.Tensor) -> bool:
    """(rows, n) fp32 on the CPU with unit stride along n."""
    return x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def takes_rows(x: torch.Tensor) -> bool:
    """Whether ``rms_norm``, ``silu_mul`` and ``greedy`` take x: fp32 CPU rows (R, n), unit stride along
    n, no autograd, and the library built."""
    return _rows_f32(x) and not x.requires_grad and available()


def attend_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """A decode step's attention for one layer from its fused projection, in one call: qkv (B, (nh + 2
    nkv) hd) unrotated -> (B, nh hd). Each sequence's new token sits at position seq_lens - 1: its q
    and k are rotated with row ``seq_lens - 1`` of the tables cos = [c, c], sin = [-s, s] (max_len, hd),
    its k and v stored in the caches (``write_kv``'s layout), then it attends as ``decode_attention``.
    Lengths, block ids and table rows are checked before anything is read or written."""
    batch = qkv.shape[0]
    num_blocks, block_size, _, head_dim = k_cache.shape
    if not (_rows_f32(qkv) and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and _rows_f32(cos)
            and cos.is_contiguous() and sin.shape == cos.shape and sin.is_contiguous() and cos.shape[1] == head_dim
            and sin.dtype == torch.float32 and keys_dim_major(k_cache) and v_cache.is_contiguous()
            and k_cache.dtype == v_cache.dtype == torch.float32 and k_cache.shape[2] == num_kv_heads
            and block_tables.shape[0] == seq_lens.shape[0] == batch and block_tables.dim() == 2):
        raise ValueError(f"attend_qkv takes fp32 CPU rows qkv (B, (nh + 2 nkv) hd), contiguous fp32 RoPE tables "
                         f"(max_len, hd), a dim-major fp32 cache of nkv heads and B rows of block tables and "
                         f"lengths; got nh={num_heads}, nkv={num_kv_heads}, qkv {tuple(qkv.shape)} {qkv.dtype}, "
                         f"cos {tuple(cos.shape)} {cos.dtype}, sin {tuple(sin.shape)} {sin.dtype}, k_cache "
                         f"{tuple(k_cache.shape)} strides {k_cache.stride()}, block_tables "
                         f"{tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)}")
    tables, lens = _int32(block_tables, "block_tables"), _int32(seq_lens, "seq_lens")
    out = torch.empty(batch, num_heads * head_dim)
    if batch == 0:
        return out
    bad = ctypes.c_int64(0)
    code = library().hfrl_decode_attention_qkv_f32(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), cos.shape[0], k_cache.data_ptr(),
        v_cache.data_ptr(), num_blocks, tables.data_ptr(), tables.shape[1], lens.data_ptr(), sliding_window or 0,
        batch, num_heads, num_kv_heads, head_dim, block_size, scale, out.data_ptr(), torch.get_num_threads(),
        ctypes.byref(bad))
    _check_attention(code, bad, tables, lens, block_size, num_blocks, rope_rows=cos.shape[0])
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of rows x (R, n) (fp32, unit stride along n): weight * (x * rsqrt(mean(x^2) + eps))."""
    rows, n = x.shape
    if weight.dtype != torch.float32 or weight.shape != (n,) or not weight.is_contiguous() or not _rows_f32(x):
        raise ValueError(f"rms_norm takes fp32 CPU rows (R, n) and a contiguous fp32 weight (n,); got x "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}, weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty(rows, n)
    library().hfrl_rms_norm_f32(x.data_ptr(), x.stride(0), rows, n, weight.data_ptr(), eps, out.data_ptr(),
                                torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product of rows [gate | up] (R, 2 I) (fp32, unit stride): silu(gate) * up, (R, I)."""
    rows, width = gate_up.shape
    if not _rows_f32(gate_up) or width % 2:
        raise ValueError(f"silu_mul takes fp32 CPU rows (R, 2 I) with unit stride; got {tuple(gate_up.shape)} "
                         f"{gate_up.dtype} strides {gate_up.stride()}")
    out = torch.empty(rows, width // 2)
    library().hfrl_silu_mul_f32(gate_up.data_ptr(), gate_up.stride(0), rows, width // 2, out.data_ptr(),
                                torch.get_num_threads())
    return out


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (R,) int64 (the first maximum) and their log-softmax values (R,) fp32 of logits
    (R, V) (fp32, unit stride), in one pass over each row after its maximum."""
    rows, vocab = logits.shape
    if not _rows_f32(logits) or vocab < 1:
        raise ValueError(f"greedy takes fp32 CPU logits (R, V >= 1) with unit stride; got {tuple(logits.shape)} "
                         f"{logits.dtype} strides {logits.stride()}")
    tokens, log_probs = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    library().hfrl_greedy_f32(logits.data_ptr(), logits.stride(0), rows, vocab, tokens.data_ptr(),
                              log_probs.data_ptr(), torch.get_num_threads())
    return tokens, log_probs


def sample(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling without top-k/top-p filtering: per row of logits (R, V) (fp32, unit stride), the token
    drawn by inverse CDF over softmax(logits / temperature) in id order with the row's uniform in
    [0, 1) (R,) float64, and its log-softmax value at that temperature. temperature (R,) must be >= 1e-5
    (greedy rows go to ``greedy``)."""
    rows, vocab = logits.shape
    if not _rows_f32(logits) or vocab < 1 or temperature.shape != (rows,) or uniforms.shape != (rows,):
        raise ValueError(f"sample takes fp32 CPU logits (R, V >= 1) with unit stride and (R,) temperatures and "
                         f"uniforms; got logits {tuple(logits.shape)} {logits.dtype} strides {logits.stride()}, "
                         f"temperature {tuple(temperature.shape)}, uniforms {tuple(uniforms.shape)}")
    temperature = temperature.to(torch.float32).contiguous()
    uniforms = uniforms.to(torch.float64).contiguous()
    tokens, log_probs = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    if library().hfrl_sample_f32(logits.data_ptr(), logits.stride(0), rows, vocab, temperature.data_ptr(),
                                 uniforms.data_ptr(), tokens.data_ptr(), log_probs.data_ptr(),
                                 torch.get_num_threads()):
        raise MemoryError(f"sample: no memory for the chunk sums of {rows} rows of {vocab}")
    return tokens, log_probs
