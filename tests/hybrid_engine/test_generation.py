"""Generation after resharding equals generation with the full model on one process, before and after a
training step changed the weights; offloaded optimizer state comes back bit-exactly; bf16 training
generates from its bf16 weights; bad layouts and modes are refused on every rank."""
import pytest
import torch
import torch.distributed as dist

from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
from hfrl.engine.optim import OptimConfig
from hfrl.engine.train_engine import EngineConfig, TrainEngine
from hfrl.hybrid_engine.engine import HybridEngine
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from hfrl.rollout import RolloutEngine, SamplingParams
from tests.multiproc import run_ranks

PROMPTS = [[1, 5, 9, 3, 4], [7, 8], list(range(10, 23)), [100, 2, 50]]
PARAMS = [SamplingParams(temperature=0, max_new_tokens=10),
          SamplingParams(n=2, seed=3, temperature=1.0, top_k=20, max_new_tokens=8)] * 2
# (mode, grouping, pp, tp, tg, zero_stage, offload): TP pieces with replicated kv heads, pipeline stages
# gathered, ZeRO-1 parameters (views of its flat buffer), both baselines
CASES = [("hybridflow", "hybridflow", 1, 4, 2, 0, True), ("hybridflow", "hybridflow", 2, 2, 1, 0, False),
         ("hybridflow", "hybridflow", 1, 2, 1, 1, True), ("hybridflow_v", "vanilla", 1, 4, 2, 0, False),
         ("ds_chat", "hybridflow", 2, 1, 1, 1, True)]


def _samples(out):
    return [(s.prompt_index, s.index, s.token_ids, s.log_probs) for s in out.samples]


def _reference(path, state):
    model = CausalLM(ModelConfig.from_pretrained(path)).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return _samples(RolloutEngine(model, block_size=4, kv_cache_bytes=1 << 20).generate(PROMPTS, PARAMS))


def _full_state(engine):
    """Every stage's full tensors, on every rank (stages gathered over the world)."""
    stage = {k: v.detach().clone() for k, v in engine.stage_state_dict().items()}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, stage)
    return {k: v for s in states for k, v in s.items()}


def _tensors(tree, prefix=""):
    """{path: clone} of every tensor in a nested optimizer state dict."""
    if torch.is_tensor(tree):
        return {prefix: tree.clone()}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _loss(engine):
    def loss_fn(logits, mb):
        log_probs = engine.token_log_probs(logits, mb["input_ids"])
        mask = mb["loss_mask"][:, 1:]
        return -(log_probs * mask).sum() / mask.sum(), {}
    return loss_fn


def generation_body(rank, world_size, path, cache):
    results = {}
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]] * 2), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    for case in CASES:
        mode, grouping, pp, tp, tg, zero, offload = case
        dims = ParallelDims.create(world_size, pp=pp, tp=tp, tg=tg, pg=1, grouping=grouping)
        groups = build_groups("actor", dims, tuple(range(world_size)), rank, cache)
        optim = OptimConfig(lr=0.05, weight_decay=0.0, zero_stage=zero)
        engine = TrainEngine(EngineConfig(model_path=str(path), optim=optim), groups)
        engine.train_step(batch, _loss(engine))  # AdamW has state now, for the offload round trip
        hybrid = HybridEngine(engine, mode=mode, offload_optimizer=offload)
        rollout = hybrid.rollout_engine(block_size=4, kv_cache_bytes=1 << 20)
        record = []
        for _ in range(2):
            state = _tensors(engine.optimizer.state_dict())
            with hybrid.generation():
                got = _samples(rollout.generate(PROMPTS, PARAMS))
                assert rollout.cache is not None
            assert rollout.cache is None  # the KV cache is freed with the gathered weights
            after = _tensors(engine.optimizer.state_dict())
            assert after.keys() == state.keys() and len(state) > 1
            for name, tensor in state.items():  # offloaded and restored bit-exactly
                assert torch.equal(after[name], tensor), (mode, name)
            record.append((got, _reference(path, _full_state(engine)), hybrid.last.offloaded))
            with hybrid.generation():
                try:
                    engine.train_step(batch, _loss(engine))
                except RuntimeError as err:
                    assert "inside HybridEngine.generation()" in str(err)
                else:
                    raise AssertionError("train_step ran inside generation()")
            # the next generation must see the new weights; the gradients (ZeRO-1: views of a flat buffer
            # that went to the host and back) are still the ones the norm is taken over
            assert engine.train_step(batch, _loss(engine))["grad_norm"] > 0.1, case
        results[(mode, pp, tp, tg, zero, offload)] = record
    return results


def bf16_body(rank, world_size, path, cache):
    dims = ParallelDims.create(world_size, tp=2, tg=1)
    groups = build_groups("actor", dims, tuple(range(world_size)), rank, cache)
    engine = TrainEngine(EngineConfig(model_path=str(path), dtype="bfloat16",
                                      optim=OptimConfig(lr=0.05, weight_decay=0.0)), groups)
    hybrid = HybridEngine(engine)
    engine.train_step({"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)},
                      _loss(engine))
    with hybrid.generation():
        tensors = hybrid.generation_tensors()
        qkv = hybrid.generation_weights()["layers.0.attn.qkv_proj.weight"]
        masters = engine.optimizer.master_params
    assert all(t.dtype == torch.bfloat16 for t in tensors)
    own = engine.model.layers[0].attn.qkv_proj.weight
    assert any(p is own or p.data_ptr() == own.data_ptr() for p in qkv)  # the trained bf16 weight itself
    assert all(m.dtype == torch.float32 for m in masters)
    return [p.float() for p in qkv]


def errors_body(rank, world_size, path, cache):
    out = {}
    vanilla = build_groups("actor", ParallelDims.create(world_size, tp=4, tg=2, grouping="vanilla"),
                           tuple(range(world_size)), rank, cache)
    engine = TrainEngine(EngineConfig(model_path=str(path)), vanilla)
    for name, kwargs in {"grouping": dict(mode="hybridflow"), "mode": dict(mode="zero3"),
                         "bucket": dict(mode="hybridflow_v", bucket_mb=0)}.items():
        try:
            HybridEngine(engine, **kwargs)
        except ValueError as err:
            out[name] = str(err)
    try:
        ParallelDims.create(world_size, tp=4, tg=3)
    except ValueError as err:
        out["layout"] = str(err)
    dist.barrier()  # every rank got here: nothing above was collective or hung
    return out


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         initializer_range=0.3, tie_word_embeddings=False))
    folder = tmp_path_factory.mktemp("hybrid_gen")
    model.save_pretrained(folder)
    return folder


def body(rank, world_size, path):
    """One launch for all three checks (each spawn of 4 ranks costs seconds)."""
    cache = GroupCache()
    return {"generation": generation_body(rank, world_size, path, cache),
            "bf16": bf16_body(rank, world_size, path, cache), "errors": errors_body(rank, world_size, path, cache)}


@pytest.fixture(scope="module")
def results(path):
    return run_ranks(4, body, path, init=True, timeout=300)


def test_generation_after_resharding_equals_the_full_model(results):
    for rank, result in enumerate(results):
        for case, record in result["generation"].items():
            (before, ref_before, offloaded), (after, ref_after, _) = record
            assert [s[:3] for s in before] == [s[:3] for s in ref_before], (case, rank)
            assert [s[:3] for s in after] == [s[:3] for s in ref_after], (case, rank)
            assert [s[2] for s in before] != [s[2] for s in after], case  # the step changed the tokens
            for got, want in zip(before + after, ref_before + ref_after):
                torch.testing.assert_close(torch.as_tensor(got[3]), torch.as_tensor(want[3]), rtol=0, atol=1e-5)
            assert (offloaded > 0) == case[-1], case


def test_bf16_training_generates_from_its_bf16_weights(results):
    assert all(len(r["bf16"]) == 2 for r in results)  # tp=2 -> tg=1: two pieces, each a training shard
    torch.testing.assert_close(torch.cat(results[0]["bf16"]), torch.cat(results[1]["bf16"]), rtol=0, atol=0)


def test_bad_modes_and_layouts_are_refused_on_every_rank(results):
    for out in (r["errors"] for r in results):
        assert "grouping" in out["grouping"] and "'vanilla'" in out["grouping"]
        assert "zero3" in out["mode"] and "hybridflow_v" in out["mode"]
        assert "bucket_mb=0" in out["bucket"]
        assert "tg=3" in out["layout"] and "(pg=1, tg=2)" in out["layout"]
