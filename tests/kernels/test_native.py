"""The compiled CPU kernels (hfrl_kernels.native): decode attention against the per-sequence loop
over odd shapes, the cache write against PagedKVCache's PyTorch write, bad indices refused before
anything is read or written, and the fallback when the kernels cannot be built or are switched off.

CI and this machine have gcc, so the kernel tests run there; elsewhere they skip with the reason."""
import pytest
import torch
import torch.nn.functional as F

from hfrl_kernels import decode_attention as da, native
from tests.kernels.test_decode_attention import make_cache, naive

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")


@needs_native
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [
    (4, 4, 64, 16),     # MHA
    (8, 2, 128, 32),    # GQA 4, head_dim 128
    (16, 2, 80, 7),     # GQA 8, head_dim 80, a block size the kernel has no specialisation for
    (8, 1, 64, 16),     # MQA: one work item per sequence
])
@pytest.mark.parametrize("sliding_window", [None, 1, 17, 40])
def test_native_equals_naive(num_heads, num_kv_heads, head_dim, block_size, sliding_window):
    """Ragged lengths 1..300 over shuffled blocks, NaN in every slot no sequence owns; windows that
    start mid-block, and a one-key window."""
    q, k, v, tables, lens = case = make_cache([1, 300, 17, 16, 33, 128, 2, 255], num_heads, num_kv_heads,
                                              head_dim, block_size, key_layout="dim")
    assert native.supports(q, k, v)
    out = native.decode_attention(q, k, v, tables, lens, head_dim ** -0.5, sliding_window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive(*case, sliding_window=sliding_window), atol=2e-6, rtol=2e-5)
    # the public function takes the compiled kernel for these tensors, with int64 indices too
    public = da.decode_attention(q, k, v, tables.long(), lens.long(), sliding_window=sliding_window)
    torch.testing.assert_close(public, out, atol=0, rtol=0)


@needs_native
def test_native_reads_q_as_a_view_of_the_fused_projection():
    """The decode step passes q as rows of the fused q/k projection (row stride > heads * head_dim)."""
    q, k, v, tables, lens = case = make_cache([40, 3, 77], 8, 2, 64, 16, key_layout="dim")
    fused = torch.cat([q, torch.randn(3, 2, 64)], dim=1)  # (B, nh + nkv, hd)
    view = fused[:, :8]
    assert view.stride(0) == 10 * 64 and native.supports(view, k, v)
    torch.testing.assert_close(native.decode_attention(view, k, v, tables, lens, 0.125), naive(*case),
                               atol=2e-6, rtol=2e-5)
    assert not native.supports(q.transpose(0, 1).contiguous().transpose(0, 1), k, v)  # heads not hd apart
    assert not native.supports(q, da.empty_key_cache((), *k.shape, "token").copy_(k), v)
    assert not native.supports(q.double(), k.double(), v.double())


@needs_native
def test_native_write_equals_the_pytorch_write():
    """write_kv stores each token's keys dim-major and values token-major at its flat slot, exactly
    as PagedKVCache's index_put_/index_copy_ path, and nothing else."""
    from hfrl.rollout.kv_cache import CacheShape, PagedKVCache

    shape = CacheShape(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    caches = [PagedKVCache(shape, 6, torch.device("cpu"), key_layout="dim") for _ in range(2)]
    for cache in caches:
        cache.k.fill_(7.0), cache.v.fill_(7.0)
    slots = torch.tensor([0, 17, 95, 40, 33])
    qkv = torch.randn(5, 8 + 2 + 2, 64)  # k and v as the decode step passes them: views of the projection
    k, v = qkv[:, 8:10], qkv[:, 10:]
    native.write_kv(caches[0].k[1], caches[0].v[1], slots, k, v)
    real = native.writes
    try:
        native.writes = lambda *args: False
        caches[1].write(1, caches[1].locate(slots), k, v)  # the PyTorch path
    finally:
        native.writes = real
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[0].k[1, 5, 15], k[2]) and torch.equal(caches[0].v[1, 1, 1], v[1])
    assert int((caches[0].k != 7.0).sum()) == 5 * 2 * 64 and torch.equal(caches[0].k[0], caches[1].k[0])


@needs_native
def test_native_refuses_bad_indices_before_reading():
    q, k, v, tables, lens = make_cache([5, 20], 8, 2, 64, 16, key_layout="dim")
    bad = tables.clone()
    bad[1, 1] = k.shape[0]  # one past the last block
    with pytest.raises(ValueError, match=rf"block id outside the cache in sequence 1 .*the cache has {k.shape[0]} blocks"):
        native.decode_attention(q, k, v, bad, lens, 0.125)
    bad[1, 1] = -1
    with pytest.raises(ValueError, match="block id outside the cache in sequence 1"):
        native.decode_attention(q, k, v, bad, lens, 0.125)
    bad[1, 1] = tables[1, 1]
    bad[0, 3] = 10 ** 6  # past sequence 0's last block: never read, so accepted
    torch.testing.assert_close(native.decode_attention(q, k, v, bad, lens, 0.125),
                               native.decode_attention(q, k, v, tables, lens, 0.125), atol=0, rtol=0)
    for wrong in ([0, 3], [5, tables.shape[1] * 16 + 1]):
        with pytest.raises(ValueError, match=r"seq_lens must lie in \[1, max_blocks_per_seq \* block_size"):
            native.decode_attention(q, k, v, tables, torch.tensor(wrong, dtype=torch.int32), 0.125)
    with pytest.raises(ValueError, match=r"native decode_attention takes .* got q \(2, 8, 64\) strides \(1, 2, 16\)"):
        native.decode_attention(q.transpose(0, 2).contiguous().transpose(0, 2), k, v, tables, lens, 0.125)
    with pytest.raises(ValueError, match=r"block_tables \(1, "):
        native.decode_attention(q, k, v, tables[:1], lens, 0.125)
    with pytest.raises(ValueError, match=r"write_kv takes .* slots \(3,\)"):
        native.write_kv(k, v, torch.tensor([1, 2, 3]), torch.randn(2, 2, 64), torch.randn(2, 2, 64))
    before = k.clone()
    with pytest.raises(ValueError, match=r"slot 96 of token 1 lies outside the cache's 6 blocks of 16"):
        native.write_kv(k[:6], v[:6], torch.tensor([3, 96]), torch.randn(2, 2, 64), torch.randn(2, 2, 64))
    torch.testing.assert_close(k, before, atol=0, rtol=0, equal_nan=True)  # nothing written, not even token 0


def test_fallback_when_switched_off_or_unbuildable(monkeypatch, tmp_path):
    """HFRL_NATIVE_KERNELS=0, or a compiler that fails: available() is False with the reason, the
    caches keep the PyTorch layout choice, and decode_attention still answers (the PyTorch path)."""
    case = make_cache([5, 40], 8, 2, 64, 16, key_layout="dim")
    try:
        monkeypatch.setenv("HFRL_NATIVE_KERNELS", "0")
        native.library.cache_clear()
        assert not native.available() and "HFRL_NATIVE_KERNELS" in native.reason()
        assert not native.supports(*case[:3])
        assert da.key_layout_for(torch.device("cpu"), torch.float32, 8) == "token"
        torch.testing.assert_close(da.decode_attention(*case), naive(*case), atol=1e-5, rtol=1e-5)
        monkeypatch.setenv("HFRL_NATIVE_KERNELS", "1")
        monkeypatch.setenv("CC", "false")  # a compiler that always fails
        monkeypatch.setenv("HFRL_KERNEL_CACHE", str(tmp_path))
        native.library.cache_clear()
        assert not native.available() and "failed" in native.reason()
        assert not list(tmp_path.iterdir())  # no half-written library left behind
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    native.available()


def _rope_tables(max_len, head_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.arange(max_len).float()[:, None] * inv
    return torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((-freqs.sin(), freqs.sin()), -1)


@needs_native
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,sliding_window", [
    (8, 2, 64, 16, None),
    (4, 4, 80, 7, 17),      # MHA, head_dim 80, odd block size, a window starting mid-block
    (65, 1, 64, 32, None),  # 65 query heads on one kv head (no fixed per-group limit in the C)
    (6, 3, 128, 16, 1),     # a one-key window: only the new token
])
def test_attend_qkv_equals_rope_write_then_attention(num_heads, num_kv_heads, head_dim, block_size, sliding_window):
    """The decode step's fused call (rotate q and k at position seq_len - 1, store k and v, attend)
    equals doing those three in PyTorch: the same cache contents and the same outputs."""
    lens = [1, 300, 17, 16, 33, 2]
    q0, k, v, tables, seq_lens = make_cache(lens, num_heads, num_kv_heads, head_dim, block_size, key_layout="dim")
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(len(lens), (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    cos, sin = _rope_tables(320, head_dim)
    k_ref, v_ref = k.clone(), v.clone()
    half = head_dim // 2
    for b, n in enumerate(lens):
        rows = qkv[b].view(-1, head_dim)
        c, s = cos[n - 1], sin[n - 1]
        rotated = rows * c + torch.cat((rows[:, half:], rows[:, :half]), -1) * s
        block, offset = tables[b, (n - 1) // block_size], (n - 1) % block_size
        k_ref[block, offset] = rotated[num_heads:num_heads + num_kv_heads]
        v_ref[block, offset] = rows[num_heads + num_kv_heads:]
        q0[b] = rotated[:num_heads]
    out = native.attend_qkv(qkv, num_heads, num_kv_heads, cos, sin, k, v, tables, seq_lens, head_dim ** -0.5,
                            sliding_window)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0, equal_nan=True)
    expected = naive(q0, k_ref, v_ref, tables, seq_lens, sliding_window=sliding_window)
    torch.testing.assert_close(out.view_as(expected), expected, atol=3e-6, rtol=3e-5)
    with pytest.raises(ValueError, match=r"RoPE table rows = 299\)\], got values in \[1, 300\]"):
        native.attend_qkv(qkv, num_heads, num_kv_heads, cos[:299].contiguous(), sin[:299].contiguous(), k, v,
                          tables, seq_lens, 0.1)
    with pytest.raises(ValueError, match=f"nkv={num_kv_heads + 1}"):
        native.attend_qkv(qkv, num_heads - 2, num_kv_heads + 1, cos, sin, k, v, tables, seq_lens, 0.1)


@needs_native
def test_row_kernels_equal_torch():
    """RMSNorm, SwiGLU's product and greedy (argmax + log-softmax value) against torch, on strided
    rows and a vocabulary that is not a multiple of the kernel's 256-entry chunks; NaN and -inf rows
    pick what torch.argmax picks."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 700, generator=gen) * 3
    x, weight = wide[:, 100:612], torch.randn(512, generator=gen)  # rows 700 apart
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-6), expected, atol=2e-6, rtol=2e-6)
    gate_up = wide[:, :600]
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate_up[:, :300]) * gate_up[:, 300:],
                               atol=1e-6, rtol=1e-6)
    logits = torch.randn(6, 33001, generator=gen) * 4
    logits[1, 32999] = 100.0  # the maximum in the last, partial chunk
    logits[2, 10] = logits[2, 700] = 50.0  # a tie across chunks: the first wins
    tokens, log_probs = native.greedy(logits)
    assert tokens.tolist() == logits.argmax(-1).tolist() and tokens[1] == 32999 and tokens[2] == 10
    exact = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs.double(), exact, atol=1e-6, rtol=0)
    odd = torch.full((3, 1000), float("-inf"))
    odd[1, 400], odd[1, 999] = float("nan"), 5.0
    odd[2] = float("nan")
    tokens, log_probs = native.greedy(odd)
    assert tokens.tolist() == odd.argmax(-1).tolist() == [0, 400, 0]
    assert log_probs.isnan().all()
    with pytest.raises(ValueError, match="rms_norm takes"):
        native.rms_norm(x, weight[:10], 1e-6)
    with pytest.raises(ValueError, match="greedy takes"):
        native.greedy(logits.double())


@needs_native
def test_int64_indices_outside_int32_are_refused():
    q, k, v, tables, lens = make_cache([5, 20], 8, 2, 64, 16, key_layout="dim")
    wrapped = tables.long()
    wrapped[1, 0] += 2 ** 32  # would wrap to a valid block id in int32
    with pytest.raises(ValueError, match="block_tables holds values outside int32"):
        native.decode_attention(q, k, v, wrapped, lens, 0.125)
    with pytest.raises(ValueError, match="seq_lens holds values outside int32"):
        native.decode_attention(q, k, v, tables, lens.long() + 2 ** 32, 0.125)


@needs_native
def test_build_with_a_compiler_command_and_without_openmp(monkeypatch, tmp_path, caplog):
    """$CC with arguments is split as a shell would; a compiler without OpenMP gives a one-thread
    build kept under its own name, with a warning at every load."""
    import shutil

    gcc = shutil.which("gcc") or shutil.which("cc")
    no_openmp = tmp_path / "cc-no-openmp"
    no_openmp.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {gcc} "$@"\n')
    no_openmp.chmod(0o755)
    try:
        for cc, suffix in ((f"{gcc} -Wall", "-omp.so"), (str(no_openmp), "-serial.so")):
            monkeypatch.setenv("CC", cc)
            monkeypatch.setenv("HFRL_KERNEL_CACHE", str(tmp_path / "cache"))
            for _ in range(2):  # built, then loaded from the cache
                native.library.cache_clear()
                caplog.clear()
                with caplog.at_level("WARNING", logger="hfrl_kernels.native"):
                    assert native.available(), native.reason()
                assert any(p.name.endswith(suffix) for p in (tmp_path / "cache").iterdir())
                assert ("without OpenMP" in caplog.text) == (suffix == "-serial.so")
            case = make_cache([40, 3], 8, 2, 64, 16, key_layout="dim")
            torch.testing.assert_close(native.decode_attention(*case, 0.125), naive(*case), atol=2e-6, rtol=2e-5)
        assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"]
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    native.available()
