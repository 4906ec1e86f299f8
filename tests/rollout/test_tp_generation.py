"""Tensor-parallel generation on real processes (gloo) equals generation on one process."""
import pytest
import torch

from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
from hfrl.models import weights
from hfrl.models.parallelize import tp_from_pretrained
from hfrl.rollout import RolloutEngine, SamplingParams
from tests.models._hf import build_hf
from tests.multiproc import run_ranks

PROMPTS = [[1, 5, 9, 3, 4], [7, 8], list(range(10, 23)), [100, 2, 50]]
REPLICA_PROMPTS = [PROMPTS[:2], PROMPTS[2:]]  # each generation replica (DP) gets its own prompts


def params():
    return [SamplingParams(temperature=0, max_new_tokens=12),
            SamplingParams(n=3, seed=5, temperature=1.0, top_k=30, top_p=0.95, max_new_tokens=12),
            SamplingParams(seed=9, temperature=0.8, max_new_tokens=10, stop_token_ids=[3, 4, 5, 6]),
            SamplingParams(temperature=0, max_new_tokens=7)]


def _generate(model, group, prompts, params_list):
    engine = RolloutEngine(model, tp_group=group, block_size=4, kv_cache_bytes=1 << 20)
    out = engine.generate(prompts, params_list)
    return [(s.token_ids, s.log_probs, s.finish_reason) for s in out.samples]


def tp_body(rank, world_size, path):
    results = {}
    # tg = 2: the training tp=4 pool holds two generation replicas of two ranks each
    dims = ParallelDims.create(world_size, tp=4, tg=2)
    groups = build_groups("actor", dims, tuple(range(world_size)), rank, GroupCache())
    replica = groups.coord.gen_replica(dims.tp // dims.tg)
    model = tp_from_pretrained(path, groups.groups["gen_tp"]).eval()
    lo = 2 * replica
    results["tg2"] = (replica, _generate(model, groups.groups["gen_tp"], REPLICA_PROMPTS[replica], params()[lo:lo + 2]))
    # tg = 4: the whole pool is one generation group (kv heads replicated: 2 kv heads on 4 ranks)
    model = tp_from_pretrained(path, None if world_size == 1 else groups.groups["tp"]).eval()
    results["tg4"] = _generate(model, groups.groups["tp"], PROMPTS, params())
    # Unseeded sampling with a different torch seed and a different KV budget on every rank: the
    # group still samples one stream (seeds drawn on its first rank) with one cache size (the minimum).
    torch.manual_seed(rank)
    engine = RolloutEngine(model, tp_group=groups.groups["tp"], block_size=4, kv_cache_bytes=(rank + 1) << 16)
    out = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=6))
    results["unseeded"] = ([s.token_ids for s in out.samples], out.stats["kv_blocks"])
    try:  # ranks given different prompts: refused on every rank before any token is computed
        engine.generate([[1, 2, rank]], SamplingParams(max_new_tokens=2))
    except ValueError as err:
        results["mismatch"] = str(err)
    results["after"] = engine.generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=3)).samples[0].token_ids
    return results


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    ref = build_hf("llama_gqa_tied", initializer_range=0.3, max_position_embeddings=96)
    folder = tmp_path_factory.mktemp("tp_gen")
    ref.save_pretrained(folder)
    return folder


def _assert_same(got, expected):
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[2] for g in got] == [e[2] for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g[1], e[1], atol=1e-4, rtol=0)


def test_tp_generation_equals_one_process(path):
    model = weights.from_pretrained(path).eval()
    single = _generate(model, None, PROMPTS, params())
    results = run_ranks(4, tp_body, path, init=True, timeout=240)
    assert sorted(r["tg2"][0] for r in results) == [0, 0, 1, 1]
    for result in results:
        _assert_same(result["tg4"], single)  # every rank holds the same tokens
        replica, got = result["tg2"]
        per_replica = _generate(model, None, REPLICA_PROMPTS[replica], params()[2 * replica:2 * replica + 2])
        _assert_same(got, per_replica)
    assert len({tuple(s[0]) for s in single}) > 3
    unseeded = [r["unseeded"] for r in results]
    assert all(u == unseeded[0] for u in unseeded)
    smallest = RolloutEngine(model, block_size=4).shape.bytes_per_block  # per rank: tp=4 shards the heads
    assert unseeded[0][1] == (1 << 16) // (smallest // 2)  # kv heads 2 -> 1 per rank (replicated)
    assert all("different prompts or sampling params" in r.get("mismatch", "") for r in results)
    assert all(r["after"] == results[0]["after"] for r in results)
