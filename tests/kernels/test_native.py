"""The compiled CPU kernels (hfrl_kernels.native): decode attention against the per-sequence loop
over odd shapes, the cache write against PagedKVCache's PyTorch write, bad indices refused before
anything is read or written, and the fallback when the kernels cannot be built or are switched off.

CI and this machine have gcc, so the kernel tests run there; elsewhere they skip with the reason."""
import pytest
import torch

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
