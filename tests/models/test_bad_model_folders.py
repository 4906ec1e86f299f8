"""Broken model folders are refused at load with a ValueError naming the file (and the tensor).

Each case damages a freshly saved transformers checkpoint in one way and loads it with both hfrl
loaders: ``weights.from_pretrained`` (whole tensors) and ``parallelize.tp_from_pretrained`` (the
engine's path: safetensors slices). Tensors that HF checkpoints legitimately carry beyond the
model's own (a rotary ``inv_freq`` buffer of older transformers, a tied ``lm_head.weight``, the other
head of a causal LM / sequence-classification pair) still load.
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForSequenceClassification

from hfrl.models import weights
from hfrl.models.parallelize import tp_from_pretrained
from tests.models._hf import build_hf

LOADERS = {
    "from_pretrained": lambda path, **kw: weights.from_pretrained(path, **kw),
    "tp_from_pretrained": lambda path, **kw: tp_from_pretrained(path, None, **kw),
}


@pytest.fixture
def folder(tmp_path):
    build_hf("llama_gqa_tied").save_pretrained(tmp_path)  # 3 layers, tied embeddings, one model.safetensors
    return tmp_path


def _edit_tensors(folder, edit):
    file = folder / weights.SAFE_WEIGHTS_NAME
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("text,expected", [("{ not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                           ("", "not valid JSON")])
def test_config_json_that_is_not_a_json_object(folder, loader, text, expected):
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json")) + ".*" + expected):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "header_only"])
def test_unreadable_safetensors_file_is_named(folder, loader, damage):
    file = folder / weights.SAFE_WEIGHTS_NAME
    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    file.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "header_only": data[:header],
                      "garbage": bytes(range(256)) * 64}[damage])
    with pytest.raises(ValueError, match=re.escape(str(file))):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_more_layers_than_the_config_uses(folder, loader):
    _edit_config(folder, num_hidden_layers=2)  # the file still holds layers 0, 1 and 2
    with pytest.raises(ValueError, match=re.escape(str(folder / weights.SAFE_WEIGHTS_NAME))
                       + r".*model\.layers\.2\..*num_hidden_layers"):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_integer_weight_is_refused(folder, loader):
    name = "model.layers.1.mlp.down_proj.weight"
    file = _edit_tensors(folder, lambda t: t.update({name: torch.ones_like(t[name], dtype=torch.int64)}))
    with pytest.raises(ValueError, match=re.escape(str(file)) + r".*" + re.escape(name) + ".*I64"):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("bad", ["all_nan", "one_inf"])
def test_non_finite_weights_are_refused(folder, loader, bad):
    name = "model.layers.2.self_attn.o_proj.weight"

    def poison(tensors):
        if bad == "all_nan":
            tensors[name] = torch.full_like(tensors[name], float("nan"))
        else:
            tensors[name][3, 5] = float("inf")

    file = _edit_tensors(folder, poison)
    with pytest.raises(ValueError, match=re.escape(str(file)) + r".*" + re.escape(name) + ".*non-finite"):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_tensors_hf_checkpoints_legitimately_carry_still_load(folder, loader):
    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # transformers < 4.31
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # tied, saved anyway
    _edit_tensors(folder, add)
    LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_causal_lm_from_a_tied_reward_checkpoint_ignores_the_score_head(tmp_path, loader):
    build_hf("llama_gqa_tied", LlamaForSequenceClassification, num_labels=1, pad_token_id=0).save_pretrained(tmp_path)
    LOADERS[loader](tmp_path)  # score.weight is not the causal LM's, and not an error either
    LOADERS[loader](tmp_path, value_head=True)
