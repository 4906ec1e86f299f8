"""hfrl's Triton kernels, installed as ``hfrl_kernels`` (not ``kernels``: that name belongs to a PyPI
package transformers probes for).

Each kernel lives in its own module with a PyTorch reference beside it; its public function picks
the Triton kernel for CUDA tensors when Triton is importable and the reference otherwise. On the
CPU, ``native`` holds the rollout engine's compiled decode kernels (C in ``csrc/``, built on first
use with the host's compiler; the PyTorch paths serve where none is available). Triton is
optional: this package imports without it. Tests run the kernels on CPU under the Triton
interpreter, which must be switched on before the kernel modules are imported
(``TRITON_INTERPRET=1`` in the environment).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it may import without a GPU)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install must not break hfrl
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor: on CUDA, or on CPU under the interpreter."""
    if not triton_available():
        return False
    return tensor.is_cuda or (interpreting() and tensor.device.type == "cpu")


def keys_dim_major(k_cache: torch.Tensor) -> bool:
    """Whether ``k_cache`` (num_blocks, block_size, num_kv_heads, head_dim) is a view of contiguous
    (num_blocks, num_kv_heads, head_dim, block_size) storage: each block's keys dimension by dimension,
    the layout the CPU decode kernels read (``decode_attention.empty_key_cache(..., "dim")`` makes one)."""
    if k_cache.dim() != 4:
        return False
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    return k_cache.stride() == (num_kv_heads * head_dim * block_size, 1, head_dim * block_size, block_size)
