"""decode_attention: the PyTorch path against a per-sequence loop, the Triton kernel (interpreted on
CPU) against the PyTorch path, and input validation.

The interpreter must be on before triton is first imported (its own library functions are decorated
then), and other tests in this process may already have imported it. So the ``test_triton_*`` tests
run only where TRITON_INTERPRET=1 was set from the start; elsewhere
tests/kernels/test_interpreter.py runs them in a fresh pytest process with the flag set.
"""

import numpy as np
import pytest
import torch

import hfrl_kernels
from hfrl_kernels import decode_attention as da, native
from tests.kernels._interpreter import require_interpreter



def make_cache(lens, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0, key_layout="token"):
    """q, k_cache, v_cache, block_tables, seq_lens with shuffled physical blocks, -1 past each
    sequence's last block, and NaN in every cache slot no sequence owns (so reading one shows).
    key_layout "dim": k_cache stored dim-major (``empty_key_cache``), the same logical values."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(blocks) + 2), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = k_cache.clone()
    used = 0
    for b, (n, count) in enumerate(zip(lens, blocks)):
        ids = perm[used:used + count]
        used += count
        tables[b, :count] = ids
        for t in range(n):
            k_cache[ids[t // block_size], t % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_cache[ids[t // block_size], t % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    keys = da.empty_key_cache((), *k_cache.shape, key_layout, dtype=dtype).copy_(k_cache)
    return q.to(dtype), keys, v_cache.to(dtype), tables, seq_lens


def naive(q, k_cache, v_cache, tables, seq_lens, sliding_window=None):
    """Plain softmax over each sequence's keys, one sequence and one head at a time."""
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        first = max(0, n - sliding_window) if sliding_window else 0
        positions = range(first, n)
        keys = torch.stack([k_cache[tables[b, t // block_size], t % block_size] for t in positions])
        values = torch.stack([v_cache[tables[b, t // block_size], t % block_size] for t in positions])
        for h in range(num_heads):
            weights = torch.softmax(keys[:, h // group] @ q[b, h] * head_dim ** -0.5, dim=0)
            out[b, h] = weights @ values[:, h // group]
    return out


RAGGED = [1, 300, 17, 16, 33, 128, 2, 255]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (16, 2)])   # GQA 1, 4, 8
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("sliding_window", [None, 40])
@pytest.mark.parametrize("key_layout", ["token", "dim"])
def test_reference_equals_naive(num_heads, num_kv_heads, head_dim, block_size, sliding_window, key_layout):
    case = make_cache(RAGGED, num_heads, num_kv_heads, head_dim, block_size, key_layout=key_layout)
    assert da.keys_dim_major(case[1]) == (key_layout == "dim")
    expected = naive(*case, sliding_window=sliding_window)
    out = da.decode_attention_reference(*case, sliding_window=sliding_window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 1, 17, 40])
def test_dim_major_path_in_every_dtype_and_window(sliding_window):
    """The two-bag path (fp32, fp64; windows starting mid-block, one key) and the gathering path on a
    dim-major cache (bf16) agree with the naive loop; NaN in the unowned slots after a sequence's
    last key and in the slots before its window never leaks into a result."""
    lens = [1, 300, 17, 16, 33, 2]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 3e-2)):
        q, k, v, tables, seq_lens = case = make_cache(lens, 8, 2, 64, 16, dtype=dtype, key_layout="dim")
        expected = naive(*(t.double() if t.is_floating_point() else t for t in case), sliding_window=sliding_window)
        if sliding_window:  # keys before sequence 1's window: never read by the naive loop
            for t in range(300 - sliding_window):
                k[tables[1, t // 16], t % 16] = v[tables[1, t // 16], t % 16] = float("nan")
        out = da.decode_attention_reference(*case, sliding_window=sliding_window)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("sliding_window", [None, 17])
def test_dim_major_groups_long_and_short_sequences(sliding_window):
    """A few long sequences among many short ones get a group of their own (the short ones are not
    padded to the long ones), wherever they sit in the batch; q in any memory order."""
    lens = [20] * 30 + [700] + [9] * 30 + [450]
    q, k, v, tables, seq_lens = case = make_cache(lens, 4, 2, 64, 16, key_layout="dim")
    groups = [g.tolist() for g in da.split_by_length((seq_lens.numpy() + 15) // 16, 4 * 16)]
    assert groups[0] == [30, 61]  # the long ones, in batch order
    plan = da.plan_decode(tables, seq_lens, 16, sliding_window)
    assert len(plan.key_bags(2, 2, 64).groups) == (1 if sliding_window else 2)
    permuted = q.transpose(0, 1).contiguous().transpose(0, 1)  # memory (heads, batch, dim)
    out = da.decode_attention(permuted, k, v, tables, seq_lens, sliding_window=sliding_window, plan=plan)
    torch.testing.assert_close(out, naive(*case, sliding_window=sliding_window), atol=1e-5, rtol=1e-5)
    assert da.split_by_length(np.array([5] * 8), 64)[0].tolist() == list(range(8))  # equal lengths: one group


def test_key_layout_choice_and_bad_layout():
    interpreted = hfrl_kernels.triton_available() and hfrl_kernels.interpreting()  # the kernel then runs on CPU
    assert da.key_layout_for(torch.device("cpu"), torch.float32) == ("token" if interpreted else "dim")
    assert da.key_layout_for(torch.device("cpu"), torch.float64, 4) == ("token" if interpreted else "dim")
    compiled = native.available() and not interpreted  # the C kernel reads a kv head's keys once per group
    assert da.key_layout_for(torch.device("cpu"), torch.float32, 8) == ("dim" if compiled else "token")
    assert da.key_layout_for(torch.device("cpu"), torch.float64, 8) == "token"  # bags read keys once per head
    assert da.key_layout_for(torch.device("cpu"), torch.bfloat16) == "token"
    assert da.key_layout_for(torch.device("cuda"), torch.float32) == "token"
    keys = da.empty_key_cache((3,), 5, 16, 2, 64, "dim")
    assert keys.shape == (3, 5, 16, 2, 64) and da.keys_dim_major(keys[1])
    assert not da.keys_dim_major(da.empty_key_cache((), 5, 16, 2, 64, "token"))
    with pytest.raises(ValueError, match="layout must be 'token' or 'dim', got 'bshd'"):
        da.empty_key_cache((), 5, 16, 2, 64, "bshd")


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 512])
def test_reference_any_chunking(chunk_size):
    """Chunks shorter than a block, not dividing it, and longer than every sequence agree."""
    case = make_cache(RAGGED, 8, 2, 64, 16)
    expected = naive(*case, sliding_window=50)
    out = da.decode_attention_reference(*case, sliding_window=50, chunk_size=chunk_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_math_path_equals_fused():
    """The matmul form (used off CPU when Triton is missing) equals ATen's fused CPU kernel."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 2, 4, 64, generator=gen) for _ in range(3))
    k, v = k.repeat(1, 1, 8, 1), v.repeat(1, 1, 8, 1)                       # (5, 2, 32, 64)
    bias = torch.zeros(5, 1, 1, 32).masked_fill_(torch.arange(32) >= torch.tensor([32, 1, 9, 20, 31])[:, None, None, None], float("-inf"))
    fused, fused_lse = da._chunk_attention(q, k, v, bias, 0.125)
    math_out, math_lse = da._chunk_attention_math(q, k, v, bias, 0.125)
    torch.testing.assert_close(math_out, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(math_lse, fused_lse, atol=1e-5, rtol=1e-5)


def test_reference_bf16_close_to_fp32():
    case = make_cache(RAGGED, 8, 2, 64, 16)
    expected = naive(*case)
    out = da.decode_attention_reference(*(t.bfloat16() if t.is_floating_point() else t for t in case))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_cpu_dispatches_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_cache([3, 40], 8, 2, 64, 16)
    assert not hfrl_kernels.use_triton(case[0])
    torch.testing.assert_close(da.decode_attention(*case), naive(*case), atol=1e-5, rtol=1e-5)


# ---- Triton kernel under the interpreter: few, well-chosen shapes (the interpreter is slow) ------

TRITON_CASES = [
    # (lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window, num_splits)
    ([1, 300, 37], 8, 2, 64, 16, None, 1),       # GQA 4, one split: the kernel writes the output
    ([1, 300, 37], 8, 2, 64, 16, None, 4),       # split-K; the 1-token sequence leaves 3 splits empty
    ([5, 129, 64], 4, 4, 128, 32, 20, 3),        # MHA, head_dim 128, window, uneven splits
    ([250, 17], 16, 2, 80, 16, None, 2),         # GQA 8, head_dim not a power of two
    ([200, 3, 96], 8, 1, 64, 7, 90, 5),          # block size not a multiple of the 64-key tile
]


@pytest.fixture
def interpreted():
    """The kernel module, when this process runs Triton kernels in the interpreter."""
    return require_interpreter(da, "_decode_split_kernel")


@pytest.mark.parametrize("lens,num_heads,num_kv_heads,head_dim,block_size,window,splits", TRITON_CASES)
def test_triton_equals_reference(interpreted, lens, num_heads, num_kv_heads, head_dim, block_size,
                                 window, splits):
    case = make_cache(lens, num_heads, num_kv_heads, head_dim, block_size, seed=len(lens))
    assert interpreted.use_triton(case[0])
    out = interpreted.decode_attention(*case, sliding_window=window, num_splits=splits)
    expected = da.decode_attention_reference(*case, sliding_window=window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_triton_reads_a_dim_major_key_cache(interpreted):
    """The kernel addresses the cache by its strides, so a dim-major key cache reads the same keys."""
    case = make_cache([1, 130, 37], 8, 2, 64, 16, seed=3, key_layout="dim")
    out = interpreted.decode_attention(*case, num_splits=2)
    torch.testing.assert_close(out, naive(*case), atol=1e-5, rtol=1e-5)


def test_triton_fp16_and_default_splits(interpreted):
    """fp16 in and out; num_splits=None takes choose_num_splits' count (here several splits)."""
    case = make_cache([300, 9, 150], 8, 2, 64, 16, dtype=torch.float16, seed=5)
    assert da.choose_num_splits(case[3].shape[1] * 16, 3 * 2, 128) > 1
    out = interpreted.decode_attention(*case)
    assert out.dtype == torch.float16
    expected = da.decode_attention_reference(*(t.float() if t.is_floating_point() else t for t in case))
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def test_choose_num_splits():
    assert da.choose_num_splits(4096, 64 * 8, 264) == 1          # enough programs already
    assert da.choose_num_splits(4096, 2 * 8, 264) == 16          # 16 programs -> 17 wanted -> 16 keys cap
    assert da.choose_num_splits(300, 2, 264) == 2                # short context: splits of >= 256 keys
    assert da.choose_num_splits(100, 1, 264) == 1
    assert da.choose_num_splits(1 << 20, 1, 264) == 64


# ---- bad input -------------------------------------------------------------------------------------

def _bad(**changes):
    q, k, v, tables, lens = make_cache([5, 20], 8, 2, 64, 16)
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, seq_lens=lens)
    kwargs = {key: changes.pop(key) for key in ("sliding_window", "num_splits") if key in changes}
    args.update(changes)
    return args, kwargs


@pytest.mark.parametrize("changes,match", [
    (lambda a: dict(q=a["q"][:, :7]), r"num_heads \(7\) must be a multiple of num_kv_heads \(2\)"),
    (lambda a: dict(q=a["q"][:, :, :32]), "head_dim 32"),
    (lambda a: dict(q=a["q"][0]), "q must be"),
    (lambda a: dict(v_cache=a["v_cache"][:, :8]), "v_cache shape"),
    (lambda a: dict(k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double()), "float64"),
    (lambda a: dict(block_tables=a["block_tables"].float()), "block_tables must be int32 or int64, got torch.float32"),
    (lambda a: dict(block_tables=a["block_tables"][:1]), r"block_tables must be \(batch=2"),
    (lambda a: dict(seq_lens=a["seq_lens"].float()), "seq_lens must be int32"),
    (lambda a: dict(seq_lens=a["seq_lens"][:1]), r"seq_lens must be \(batch=2,\)"),
    (lambda a: dict(seq_lens=torch.tensor([0, 3], dtype=torch.int32)), r"got values in \[0, 3\]"),
    (lambda a: dict(seq_lens=torch.tensor([5, 1000], dtype=torch.int32)), "1000"),
    (lambda a: dict(sliding_window=0), "sliding_window must be None or an int >= 1, got 0"),
    (lambda a: dict(num_splits=1.5), "num_splits"),
])
def test_bad_input(changes, match):
    args, _ = _bad()
    args, kwargs = _bad(**changes(args))
    with pytest.raises(ValueError, match=match):
        da.decode_attention(**args, **kwargs)


def test_two_chunk_lengths_cover_every_key_once():
    """A plan with full and tail chunks: every real key is in exactly one chunk of its sequence, and
    the result equals the naive one, also when each sequence has one chunk but in either group."""
    assert len(da.plan_decode(*make_cache([300, 20, 150], 8, 2, 64, 16)[3:], 16).chunks) == 1  # one padded chunk each
    for lens in ([400, 33] + [150] * 20 + [10] * 20, [120] * 10 + [10] * 100):
        case = make_cache(lens, 8, 2, 64, 16)
        plan = da.plan_decode(case[3], case[4], 16)
        assert len(plan.chunks) == 2, plan.chunks
        seq = plan.seq.repeat_interleave(torch.tensor([c for c, b in zip(plan.chunks, plan.biases)
                                                       for _ in range(b.shape[0])]))
        real = torch.cat([(b.reshape(b.shape[0], -1) == 0).reshape(-1) for b in plan.biases])
        keys = plan.slots[real]
        assert keys.unique().numel() == keys.numel() == sum(lens)
        assert torch.equal(torch.bincount(seq[real], minlength=len(lens)), torch.tensor(lens))
        torch.testing.assert_close(da.decode_attention_reference(*case), naive(*case), atol=1e-5, rtol=1e-5)
