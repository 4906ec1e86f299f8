"""HybridEngine without torch.distributed (one rank: nothing to gather): generation equals the training
model's, a failed entry leaves the optimizer state as it was, bad arguments are named."""
import pytest
import torch

from hfrl.engine.optim import OptimConfig
from hfrl.engine.train_engine import EngineConfig, TrainEngine
from hfrl.hybrid_engine import HybridEngine
from hfrl.rollout import RolloutEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=67, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         initializer_range=0.3, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("single")
    model.save_pretrained(path)
    engine = TrainEngine(EngineConfig(model_path=str(path), optim=OptimConfig(lr=0.01)))
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    engine.train_step(batch, lambda logits, mb: (logits.float().logsumexp(-1).mean(), {}))
    return engine


@pytest.mark.parametrize("mode", ["hybridflow", "ds_chat"])
def test_generation_equals_the_training_model(engine, mode):
    hybrid = HybridEngine(engine, mode=mode)
    rollout = hybrid.rollout_engine(block_size=4, kv_cache_bytes=1 << 18)
    assert hybrid.last.enter_s == 0  # built without a transition
    params = SamplingParams(temperature=0, max_new_tokens=6)
    with hybrid.generation() as model:
        assert model is hybrid.model
        got = [s.token_ids for s in rollout.generate([[1, 2, 3], [9]], params).samples]
    want = [s.token_ids for s in RolloutEngine(engine.model, block_size=4, kv_cache_bytes=1 << 18)
            .generate([[1, 2, 3], [9]], params).samples]
    assert got == want
    assert hybrid.last.received == 0 and hybrid.resident_bytes() == hybrid.resident_train


def test_a_failed_entry_restores_the_offloaded_state(engine, monkeypatch):
    hybrid = HybridEngine(engine, offload_optimizer=True)
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(engine.optimizer.state.values())}

    def fail():
        raise RuntimeError("simulated out of memory in the all-gather")
    monkeypatch.setattr(hybrid, "_enter_pieces", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        hybrid.enter()
    assert not hybrid.active and not engine.in_generation
    for i, state in enumerate(engine.optimizer.state.values()):
        for k, v in state.items():
            assert torch.equal(v, before[i][k]), (i, k)
    monkeypatch.undo()
    with hybrid.generation():
        assert hybrid.last.offloaded > 0  # the moments live on the host: no device storage left
        assert all(s["exp_avg"].untyped_storage().nbytes() == 0 for s in engine.optimizer.state.values())
    assert all(torch.equal(s["exp_avg"], before[i]["exp_avg"]) for i, s in enumerate(engine.optimizer.state.values()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="zero3"), r"mode='zero3'.*hybridflow"),
    (dict(bucket_mb=float("inf")), r"bucket_mb=inf"),
    (dict(bucket_mb=1e-9), r"bucket_mb=1e-09.*1 KiB"),
    (dict(mode="hybridflow_v"), r"'vanilla' generation grouping"),
])
def test_bad_arguments_are_named(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridEngine(engine, **kwargs)


def test_from_config_follows_the_grouping(engine):
    from hfrl.config import HybridConfig

    hybrid = HybridEngine.from_config(engine, HybridConfig(bucket_mb=1.0, offload_optimizer=True))
    assert (hybrid.mode, hybrid.bucket_bytes, hybrid.offload_optimizer) == ("hybridflow", 2**20, True)
    assert HybridEngine.from_config(engine, HybridConfig(mode="ds_chat")).mode == "ds_chat"
