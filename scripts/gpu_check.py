"""One-shot CUDA check of hfrl's GPU paths (run on a GPU machine): the Triton kernels compiled against
their PyTorch references (with timings), the rollout engine on CUDA against the CPU, and the hybrid
engine's single-process paths on CUDA. Prints one JSON line per check."""
import json
import time
import traceback

import torch


def timed(fn, iters=20):
    fn(); torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True); end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def report(name, **fields):
    print(json.dumps({"check": name, **fields}), flush=True)


def check(name):
    def wrap(fn):
        try:
            fn()
        except Exception:  # noqa: BLE001
            report(name, ok=False, error=traceback.format_exc()[-1500:])
        return fn
    return wrap


dev = torch.device("cuda")
report("env", torch=torch.__version__, gpu=torch.cuda.get_device_name(0))


@check("reshard_pack")
def _():
    from hfrl_kernels import reshard as rs
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(4096, 4096, device=dev, dtype=dtype), torch.randn(4096, 11008, device=dev, dtype=dtype)[:, 1000:5096],
              torch.randn(7, 33, 5, device=dev, dtype=dtype), torch.randn(1, device=dev, dtype=dtype)]
        total = sum(w.numel() for w in ws)
        out_t, out_r = torch.zeros(total + 5, device=dev, dtype=dtype), torch.zeros(total + 5, device=dev, dtype=dtype)
        rs.pack(ws, out_t); rs.pack_reference(ws, out_r)
        equal = torch.equal(out_t, out_r)
        t_tri, t_ref = timed(lambda: rs.pack(ws, out_t)), timed(lambda: rs.pack_reference(ws, out_r))
        report("reshard_pack", ok=equal, dtype=str(dtype), MB=total * ws[0].element_size() / 2**20,
               triton_GBps=2 * total * ws[0].element_size() / t_tri / 1e9, torch_GBps=2 * total * ws[0].element_size() / t_ref / 1e9)


@check("reshard_copy_segments")
def _():
    from hfrl_kernels import reshard as rs
    rows, cols, shards = 4096, 1024, 4  # row-parallel unpack: shard r -> columns [r*cols, (r+1)*cols)
    src = torch.randn(shards * rows * cols, device=dev)
    r = torch.arange(shards, device=dev).repeat_interleave(rows); k = torch.arange(rows, device=dev).repeat(shards)
    tables = (r * rows * cols + k * cols, k * cols * shards + r * cols, torch.full_like(r, cols))
    dst_t, dst_r = torch.zeros_like(src), torch.zeros_like(src)
    rs.copy_segments(src, dst_t, *tables); rs.copy_segments_reference(src, dst_r, *tables)
    t_tri, t_ref = timed(lambda: rs.copy_segments(src, dst_t, *tables)), timed(lambda: rs.copy_segments_reference(src, dst_r, *tables))
    report("reshard_copy_segments", ok=torch.equal(dst_t, dst_r), MB=src.nbytes / 2**20,
           triton_GBps=2 * src.nbytes / t_tri / 1e9, torch_GBps=2 * src.nbytes / t_ref / 1e9)


@check("decode_attention")
def _():
    from hfrl_kernels import decode_attention as da
    for lens, nh, nkv, hd, bs in [([1, 17, 300, 2049], 32, 8, 128, 16), ([5000] * 8, 32, 4, 128, 32), ([64] * 64, 16, 16, 64, 16)]:
        blocks = [-(-n // bs) for n in lens]
        nb = sum(blocks) + 4
        tables = torch.full((len(lens), max(blocks)), -1, dtype=torch.int32)
        perm, used = torch.randperm(nb), 0
        for b, c in enumerate(blocks):
            tables[b, :c] = perm[used:used + c]; used += c
        for dtype in (torch.float32, torch.bfloat16):
            k = torch.randn(nb, bs, nkv, hd, device=dev, dtype=dtype); v = torch.randn_like(k)
            q = torch.randn(len(lens), nh, hd, device=dev, dtype=dtype)
            t, sl = tables.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
            out = da.decode_attention(q, k, v, t, sl)
            ref = da.decode_attention_reference(q, k, v, t, sl)
            err = (out.float() - ref.float()).abs().max().item()
            tt = timed(lambda: da.decode_attention(q, k, v, t, sl)); tr = timed(lambda: da.decode_attention_reference(q, k, v, t, sl))
            kv_bytes = 2 * sum(lens) * nkv * hd * k.element_size()
            report("decode_attention", ok=err < (2e-3 if dtype == torch.float32 else 3e-2), lens=lens[:4], dtype=str(dtype),
                   max_err=err, triton_ms=tt * 1e3, torch_ms=tr * 1e3, triton_kv_GBps=kv_bytes / tt / 1e9)


@check("rollout_and_hybrid_cuda")
def _():
    import tempfile
    from transformers import LlamaConfig, LlamaForCausalLM
    from hfrl.engine.train_engine import EngineConfig, TrainEngine
    from hfrl.hybrid_engine import HybridEngine
    from hfrl.rollout import RolloutEngine, SamplingParams
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                     initializer_range=0.2))
    path = tempfile.mkdtemp(); m.save_pretrained(path)
    prompts = [[1, 2, 3, 4, 5], [9, 8], list(range(100, 160))]
    params = SamplingParams(temperature=0, max_new_tokens=40)
    cpu = TrainEngine(EngineConfig(model_path=path), device="cpu")
    want = [s.token_ids for s in RolloutEngine(cpu.model, kv_cache_bytes=64 << 20).generate(prompts, params).samples]
    for mode in ("hybridflow", "ds_chat"):
        gpu = TrainEngine(EngineConfig(model_path=path), device=dev)
        hybrid = HybridEngine(gpu, mode=mode, offload_optimizer=True)
        rollout = hybrid.rollout_engine(kv_cache_bytes=256 << 20)
        with hybrid.generation():
            t0 = time.perf_counter(); out = rollout.generate(prompts, params); dt = time.perf_counter() - t0
        got = [s.token_ids for s in out.samples]
        same = sum(a == b for a, b in zip(got, want))
        report("rollout_and_hybrid_cuda", mode=mode, ok=same == len(want), equal_to_cpu=f"{same}/{len(want)}",
               first_diff=[(a[:12], b[:12]) for a, b in zip(got, want) if a != b][:1], seconds=dt,
               enter_s=hybrid.last.enter_s, offloaded=hybrid.last.offloaded)


@check("cuda_paths_from_audit")
def _():
    """The CUDA-only paths fixed without a GPU (2026-11-30): a masked GQA forward on CUDA against the CPU,
    the engine's log-probs (CUDA) cut by a host batch's mask, and a KV budget that does not shrink
    from one generate to the next while the caching allocator holds the previous cache."""
    import tempfile
    from transformers import LlamaConfig, LlamaForCausalLM
    from hfrl.controller import Batch
    from hfrl.models import weights
    from hfrl.rollout import RolloutEngine, SamplingParams
    from hfrl.workers.common import response_from_shifted
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512))
    path = tempfile.mkdtemp(); m.save_pretrained(path)
    model = weights.from_pretrained(path).eval()
    ids = torch.randint(0, 1000, (3, 40)); mask = torch.ones(3, 40, dtype=torch.long); mask[0, :7] = 0; mask[2, :19] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        got = model.to(dev)(ids.to(dev), attention_mask=mask.to(dev))
    err = ((got.float().cpu() - want.float()) * mask[..., None]).abs().max().item()
    report("cuda_paths_from_audit", part="masked_gqa_forward", ok=err < 2e-3, max_err=err)
    batch = Batch({"input_ids": ids, "attention_mask": mask, "response_mask": mask[:, 30:]})
    cut = response_from_shifted(torch.randn(3, 39, device=dev), batch)
    report("cuda_paths_from_audit", part="response_from_shifted", ok=cut.device.type == "cuda" and cut.shape == (3, 10))
    free = torch.cuda.mem_get_info(dev)[0]
    hog = torch.empty(int(free * 0.8), dtype=torch.uint8, device=dev)
    del hog   # held by the caching allocator: cudaMemGetInfo counts it used until empty_cache
    engine = RolloutEngine(model, kv_cache_fraction=0.1, max_num_seqs=1 << 20)
    engine.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_new_tokens=8))
    budget = engine.cache.num_blocks * engine.shape.bytes_per_block
    report("cuda_paths_from_audit", part="kv_budget_after_a_freed_allocation", ok=budget >= 0.05 * free,
           budget_GB=budget / 1e9, free_GB=free / 1e9)   # counted as used, it would be about 0.02 x free
