"""ModelConfig from transformers configs (5.x rope_parameters and 4.x rope_theta/rope_scaling)."""
import json
from types import SimpleNamespace

import pytest
from transformers import GPT2Config

from hfrl.models.config import ModelConfig
from tests.models._hf import CASES, ROPE_CASES, hf_config


def test_fields_from_each_family():
    llama = ModelConfig.from_hf(hf_config("llama_gqa_tied"))
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.tie_word_embeddings) == (4, 2, 16, True)
    assert (llama.attention_bias, llama.sliding_window, llama.rope_scaling) == (False, None, None)
    qwen = ModelConfig.from_hf(hf_config("qwen2_bias"))
    assert (qwen.attention_bias, qwen.o_proj_bias, qwen.sliding_window) == (True, False, None)
    qwen_sliding = ModelConfig.from_hf(hf_config("qwen2_sliding_layers"))
    assert [qwen_sliding.layer_sliding_window(i) for i in range(3)] == [None, 4, 4]
    mistral = ModelConfig.from_hf(hf_config("mistral_window"))
    assert mistral.layer_types == ("sliding_attention",) * 3 and mistral.layer_sliding_window(0) == 4
    llama3 = ModelConfig.from_hf(hf_config("llama3_rope"))
    assert llama3.rope_theta == 500000.0 and llama3.rope_type == "llama3"
    assert llama3.rope_scaling["original_max_position_embeddings"] == 16


@pytest.mark.parametrize("case", [*CASES, *ROPE_CASES])
def test_to_hf_round_trip(case):
    config = ModelConfig.from_hf(hf_config(case))
    rebuilt = ModelConfig.from_hf(config.replace().to_hf())  # replace() drops hf_config: built from fields
    assert rebuilt == config


def test_transformers_4_style_rope_fields():
    legacy = SimpleNamespace(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=None, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, hidden_act="silu")
    config = ModelConfig.from_hf(legacy)
    assert config.rope_theta == 500000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.num_kv_heads == 4 and config.head_dim == 16
    legacy.rope_scaling = None
    assert ModelConfig.from_hf(legacy).rope_scaling is None


def test_unsupported_model_type(tmp_path):
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2, mistral"):
        ModelConfig.from_hf(GPT2Config())
    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2, mistral"):
        ModelConfig.from_pretrained(tmp_path)


def test_invalid_configs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig(rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="gelu"):
        ModelConfig.from_hf(hf_config("llama_gqa_tied", hidden_act="gelu"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert ModelConfig.from_pretrained(tmp_path).model_type == "llama"  # AutoConfig defaults
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("case", [*CASES, *ROPE_CASES])
def test_config_json_read_without_transformers_equals_transformers(case, tmp_path, monkeypatch):
    """A complete transformers 5.x config.json with plain RoPE is read from the JSON alone (no
    transformers import in a fresh rank); the result equals transformers' reading, field for field."""
    hf = hf_config(case)
    hf.save_pretrained(tmp_path)
    expected = ModelConfig.from_hf(hf)
    import transformers

    calls = []
    original = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: calls.append(a) or original(*a, **k))
    got = ModelConfig.from_pretrained(tmp_path)
    assert got == expected
    assert (not calls) == (expected.rope_type == "default")  # other RoPE types need transformers' init functions
    saved = {k: v for k, v in got.to_hf().to_dict().items() if k != "_name_or_path"}
    assert saved == {k: v for k, v in hf.to_dict().items() if k != "_name_or_path"}  # every field kept (token ids, ...)
    fields = json.loads((tmp_path / "config.json").read_text())
    del fields["rms_norm_eps"]  # incomplete (an older or hand-written file): transformers fills the default
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert ModelConfig.from_pretrained(tmp_path) == expected.replace(rms_norm_eps=type(hf)().rms_norm_eps)
