"""The forward of one decode step: the model's own modules, with the glue around them cut down.

``Decoder.forward`` serves training, prefill and decode alike. In a decode step of a few rows its
matmuls are small, and the small ops around them (moving q/k/v to (B, heads, T, hd) and back,
computing RoPE's cos/sin from the positions in every step, rotating q and k apart, the module
calls) took as long as the matmuls on CPU. This walks the same modules in the same order, with
every activation kept as (rows, ...):

- RoPE's cos and sin come from a table built once per engine with the same float ops as
  ``RotaryEmbedding`` (so the same values), indexed by position once per step; q and k rotate
  together in four ops, giving bit for bit what ``Attention.forward`` gives: rotate_half(x) * sin is
  roll(x, hd / 2) * [-sin, sin] (IEEE negation is exact).
- A plain or column-parallel Linear is ``F.linear`` on its weight, without the module call around
  it. (``W @ x^T`` read back transposed was 1.3-1.7x faster than ``x @ W^T`` for these layer shapes
  at 4..64 rows on one earlier CPU host, and the decode step used it; on a later host it made the
  ragged rollout benchmark 12% slower end to end (4.67 s against 4.15 s, interleaved runs), and a
  per-shape choice timed in isolation picked the slower form there, so the standard form stays.)
- An RMSNorm is ``F.rms_norm`` (one call where the module makes six; bit for bit the same). The
  residual adds and SwiGLU's product run in place on fresh outputs.
- Attention is the backend's ``attend_rows`` on (rows, heads, hd).

Any other module (a row-parallel layer with its all-reduce, the hybrid engine's piece layers, the
embedding) is called as it is, so tensor parallelism and resharded weights work unchanged.

On the CPU in fp32, where ``hfrl_kernels.native`` is built, the step takes ``_compiled`` instead:
the same modules and matmuls, with the glue between them in C (one call per layer rotates q and k,
stores k and v and attends; RMSNorm and SwiGLU one call each; the residual adds inside ``addmm``)
and greedy rows' argmax and log-prob in one pass (``sampling.sample``). Some ten calls a layer
where the PyTorch step makes some sixty: the ragged rollout benchmark ran 1.25x faster end to end
(3.75 s against 4.69 s, interleaved, same tokens) before the C exp was vectorised, the step that
took the speedup over transformers from 2.4x to 3.1-3.2x. Its sums run in another order than
ATen's, so it agrees with the model's forward to float rounding (2e-5), not bit for bit.

``PackedLinear`` is the head's matmul on CPU: the weight reordered once per ``generate`` into
oneDNN's blocked layout (what inductor does to frozen fp32 linears), which made a whole decode
step 1.2-1.4x faster at 8..64 rows here than MKL's GEMM on the plain weight. The packed copy lives
for the call; a head larger than a quarter of the host's available memory is not packed.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from hfrl.distributed.tensor_parallel import ColumnParallelLinear
from hfrl.models.llama import CausalLM, RMSNorm
from hfrl.rollout.kv_cache import free_device_bytes
from hfrl_kernels import native

logger = logging.getLogger(__name__)


def plain_linear(module: nn.Module) -> bool:
    """A plain or column-parallel (not gathering) Linear: its forward is exactly x @ W^T + b without grad."""
    return type(module) is nn.Linear or (isinstance(module, ColumnParallelLinear) and not module.gather_output)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for x (rows, in): F.linear straight on the weight of a ``plain_linear``, else its
    forward."""
    if plain_linear(module):
        return F.linear(x, module.weight, module.bias)
    return module(x)


def rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; an fp32 RMSNorm through ``F.rms_norm``, which computes the module's formula in
    one call (bit for bit: checked in tests/rollout/test_engine.py)."""
    if type(module) is not RMSNorm or x.dtype != torch.float32:
        return module(x)
    return F.rms_norm(x, x.shape[-1:], module.weight, module.eps)


class PackedLinear:
    """x @ W^T with W reordered once into oneDNN's layout (CPU, fp32); ``of`` returns None where
    oneDNN is missing or the weight does not qualify, and the caller keeps its plain GEMM."""

    BATCH_HINT = 64  # the rows oneDNN tunes the layout for: 16..256 measured within 10% at 8..64 rows

    def __init__(self, packed: torch.Tensor):
        self.packed = packed

    @classmethod
    def of(cls, weight: torch.Tensor) -> "PackedLinear | None":
        if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2
                or not torch.backends.mkldnn.is_available()):
            return None
        if weight.numel() * weight.element_size() > free_device_bytes(weight.device) // 4:
            return None  # the copy would crowd the host: the plain GEMM needs no second copy
        try:
            return cls(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), cls.BATCH_HINT))
        except (RuntimeError, AttributeError) as err:  # a torch built without the op: the plain GEMM serves
            logger.warning("oneDNN weight packing unavailable (%s); the LM head uses the plain GEMM", err)
            return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


class DecodeForward:
    """``forward(tokens, positions, backend)``: (R,) token ids at (R,) positions -> (R, H) final
    hidden states (after the last norm), storing each layer's keys and values through ``backend``."""

    def __init__(self, model: CausalLM, max_len: int):
        self.model, self.max_len = model, max_len
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope_table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and [-sin, sin] (max_len, hd), with cos and sin as ``RotaryEmbedding.forward`` computes
        them per position."""
        if self._rope is None or self._rope[0].device != device or self._rope[0].dtype != dtype:
            rotary = self.model.rotary_emb
            positions = torch.arange(self.max_len, device=device).float()
            freqs = positions[:, None] * rotary.inv_freq.to(device)  # (L, hd/2): RotaryEmbedding's product
            cos = (freqs.cos() * rotary.attention_scaling).to(dtype)
            sin = (freqs.sin() * rotary.attention_scaling).to(dtype)
            self._rope = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return self._rope

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, backend) -> torch.Tensor:
        model = self.model
        x = model.embed_tokens(tokens)  # (R, H)
        rows = x.shape[0]
        if compiled_step(x, backend):
            return self._compiled(x, positions, backend)
        cos, sin = (t.index_select(0, positions)[:, None] for t in self.rope_table(x.device, x.dtype))
        for layer in model.layers:
            attn = layer.attn
            nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
            qkv = linear(attn.qkv_proj, rms_norm(layer.attn_norm, x))  # (R, (nh + 2 nkv) hd)
            qk = qkv[:, :(nh + nkv) * hd].view(rows, nh + nkv, hd)
            # Attention.forward's q * cos + rotate_half(q) * sin (same values)
            qk = (qk * cos).add_(qk.roll(hd // 2, dims=-1).mul_(sin))  # (R, nh + nkv, hd)
            v = qkv[:, (nh + nkv) * hd:].view(rows, nkv, hd)
            y = backend.attend_rows(attn.layer_idx, qk[:, :nh], qk[:, nh:], v, attn.sliding_window)  # (R, nh, hd)
            x = linear(attn.o_proj, y.reshape(rows, nh * hd)).add_(x)
            gate_up = linear(layer.mlp.gate_up_proj, rms_norm(layer.mlp_norm, x))
            inner = gate_up.shape[-1] // 2
            x = linear(layer.mlp.down_proj, F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:])).add_(x)
        return rms_norm(model.norm, x)

    def _compiled(self, x: torch.Tensor, positions: torch.Tensor, backend) -> torch.Tensor:
        """The CPU fp32 step with the compiled kernels (``hfrl_kernels.native``) between the matmuls: per
        layer two RMSNorm calls, one call that rotates q and k, stores k and v and attends, one SwiGLU
        call, and the four matmuls with the residual adds inside them (``addmm``): some ten calls where
        the PyTorch step makes some sixty. The same formulas in float32; the sums run in another order,
        so values agree to float rounding (tests/rollout/test_engine.py), not bit for bit."""
        model = self.model
        if not torch.equal(positions.to(torch.int64) + 1, backend.seq_lens.to(torch.int64)):
            # the kernel places each new token at seq_len - 1 (RoPE row and cache slot)
            raise ValueError(f"decode positions {positions.tolist()} are not the backend's seq_lens - 1 "
                             f"({(backend.seq_lens - 1).tolist()})")
        cos, sin = self.rope_table(x.device, x.dtype)
        for layer in model.layers:
            attn = layer.attn
            qkv = linear(attn.qkv_proj, compiled_norm(layer.attn_norm, x))  # (R, (nh + 2 nkv) hd)
            y = backend.attend_qkv(attn.layer_idx, qkv, attn.num_heads, attn.num_kv_heads, cos, sin,
                                   attn.sliding_window)  # (R, nh hd)
            x = linear_add(attn.o_proj, y, x)
            gate_up = linear(layer.mlp.gate_up_proj, compiled_norm(layer.mlp_norm, x))
            x = linear_add(layer.mlp.down_proj, swiglu(gate_up), x)
        return compiled_norm(model.norm, x)


def compiled_step(x: torch.Tensor, backend) -> bool:
    """Whether ``DecodeForward`` takes the compiled kernels' step: fp32 rows on the CPU, the native
    library built, and a backend whose cache ``attend_qkv`` reads (``DecodeAttention.takes_qkv``)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and native.available()
            and getattr(backend, "takes_qkv", None) is not None and backend.takes_qkv())


def compiled_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, an RMSNorm through the compiled kernel (which checks x: the step's rows always
    qualify)."""
    if type(module) is not RMSNorm:
        return module(x)
    return native.rms_norm(x, module.weight, module.eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of rows [gate | up], through the compiled kernel where it takes them."""
    if native.takes_rows(gate_up):
        return native.silu_mul(gate_up)
    inner = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:])


def linear_add(module: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``module(x) + residual``: one ``addmm`` for a plain or column-parallel Linear without bias (the
    GEMM adds the residual as it writes its output), else the module and an in-place add."""
    if plain_linear(module) and module.bias is None:
        return torch.addmm(residual, x, module.weight.t())
    return linear(module, x).add_(residual)
