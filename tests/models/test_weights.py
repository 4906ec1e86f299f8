"""HF checkpoint <-> hfrl mapping: loading, saving, sharded checkpoints, errors, TP shard plan."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hfrl.models import weights
from hfrl.models.config import ModelConfig
from hfrl.models.llama import Attention, CausalLM, MLP, ValueModel
from tests.models._hf import build_hf

TOL = 1e-5


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_bias"])
def test_state_dict_round_trip_is_exact(case):
    ref = build_hf(case)
    config = ModelConfig.from_hf(ref.config)
    hf_sd = ref.state_dict()
    sd = weights.hf_to_hfrl(hf_sd, config)
    assert set(sd) == set(CausalLM(config).state_dict())
    q, k, v = (hf_sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(sd["layers.1.attn.qkv_proj.weight"], torch.cat([q, k, v]))
    back = weights.hfrl_to_hf(sd, config)
    expected = {n for n in hf_sd if not (config.tie_word_embeddings and n == "lm_head.weight")}
    assert set(back) == expected
    assert all(torch.equal(back[n], hf_sd[n]) for n in back)


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_bias"])
@torch.no_grad()
def test_save_pretrained_loads_in_transformers(case, tmp_path):
    build_hf(case).save_pretrained(tmp_path / "hf")
    model = weights.from_pretrained(tmp_path / "hf").eval()
    weights.save_pretrained(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 9))
    assert (reloaded(ids).logits - model(ids)).abs().max() == 0


@torch.no_grad()
def test_value_model_save_loads_as_sequence_classification(tmp_path):
    config = ModelConfig.from_hf(build_hf("qwen2_bias").config)
    critic = ValueModel(config).eval()
    weights.save_pretrained(critic, tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_labels == 1 and type(reloaded).__name__ == "Qwen2ForSequenceClassification"
    ids = torch.randint(0, 128, (2, 9))
    expected = reloaded.score(reloaded.model(ids).last_hidden_state).squeeze(-1)
    assert (critic(ids) - expected).abs().max() < TOL


def test_critic_from_actor_checkpoint_needs_opt_in(tmp_path):
    build_hf("llama_gqa_tied").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="score.weight"):
        weights.from_pretrained(tmp_path, value_head=True)
    critic = weights.from_pretrained(tmp_path, value_head=True, init_missing_value_head=True)
    assert torch.isfinite(critic.score.weight).all() and critic.score.weight.abs().sum() > 0


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    (tmp_path / "tokenizer.json").write_text("{}")
    build_hf("llama_gqa_tied", tie_word_embeddings=False).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / weights.SAFE_INDEX_NAME).exists()
    model = CausalLM(config)
    weights.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json"]
    loaded = weights.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.fixture
def sharded_checkpoint(tmp_path):
    ref = build_hf("qwen2_bias")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / weights.SAFE_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return ref, tmp_path, index


@torch.no_grad()
def test_sharded_checkpoint_loads(sharded_checkpoint):
    ref, path, _ = sharded_checkpoint
    model = weights.from_pretrained(path).eval()
    ids = torch.randint(0, 128, (2, 9))
    assert (model(ids) - ref(ids).logits).abs().max() < TOL


def test_missing_shard_is_named(sharded_checkpoint):
    _, path, index = sharded_checkpoint
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        weights.from_pretrained(path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    build_hf("llama_gqa_tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(80, 64\)"):
        weights.from_pretrained(tmp_path)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    build_hf("llama_gqa_tied").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        weights.from_pretrained(tmp_path)


def test_stage_plan_uses_local_names_and_global_sources():
    config = ModelConfig.from_hf(build_hf("llama_gqa_tied").config)
    plan = {spec.name: spec for spec in weights.model_param_plan(CausalLM(config, layer_range=(1, 3)))}
    assert "embed_tokens.weight" not in plan and "layers.2.attn.qkv_proj.weight" not in plan
    assert plan["layers.0.attn.qkv_proj.weight"].hf_names[0] == "model.layers.1.self_attn.q_proj.weight"
    assert plan["lm_head.weight"].hf_names == ("model.embed_tokens.weight",)  # tied
    assert plan["lm_head.weight"].shard == "vocab" and plan["layers.1.mlp.down_proj.weight"].shard == "row"


@torch.no_grad()
def test_shard_plan_gives_exact_tensor_parallel_layer():
    """Simulated tp=2 in one process: per-rank attention/MLP built from shard_slices sum to the full layer."""
    ref = build_hf("qwen2_bias")  # q/k/v biases: column-split with their weights
    config = ModelConfig.from_hf(ref.config)
    hf_sd, tp = ref.state_dict(), 2
    plan = {spec.name: spec for spec in weights.param_plan(config)}
    full = CausalLM(config)
    full.load_state_dict(weights.hf_to_hfrl(hf_sd, config))
    layer = full.layers[0]
    x = torch.randn(2, 7, config.hidden_size)
    cos, sin = full.rotary_emb(torch.arange(7)[None].expand(2, 7), x.dtype)
    attn_out, mlp_out = torch.zeros_like(x), torch.zeros_like(x)
    for rank in range(tp):
        def local(name):
            pieces = weights.shard_slices(plan[f"layers.0.{name}"], rank, tp)
            return torch.cat([hf_sd[n][index] for n, index in pieces], dim=0)

        attn, mlp = Attention(config, 0), MLP(config)
        attn.num_heads, attn.num_kv_heads = config.num_heads // tp, config.num_kv_heads // tp
        attn.qkv_proj.weight = torch.nn.Parameter(local("attn.qkv_proj.weight"))
        attn.qkv_proj.bias = torch.nn.Parameter(local("attn.qkv_proj.bias"))
        attn.o_proj.weight = torch.nn.Parameter(local("attn.o_proj.weight"))
        mlp.gate_up_proj.weight = torch.nn.Parameter(local("mlp.gate_up_proj.weight"))
        mlp.down_proj.weight = torch.nn.Parameter(local("mlp.down_proj.weight"))
        attn_out += attn(x, cos, sin, None)  # the all-reduce of row-parallel outputs
        mlp_out += mlp(x)
    assert (attn_out - layer.attn(x, cos, sin, None)).abs().max() < TOL
    assert (mlp_out - layer.mlp(x)).abs().max() < TOL
    with pytest.raises(ValueError, match="tp=4"):
        weights.shard_slices(plan["layers.0.attn.qkv_proj.weight"], 0, 4)  # 2 kv heads over 4 ranks
    vocab = [weights.shard_slices(plan["embed_tokens.weight"], r, 3)[0][1][0] for r in range(3)]
    assert [(s.start, s.stop) for s in vocab] == [(0, 43), (43, 86), (86, 128)]
