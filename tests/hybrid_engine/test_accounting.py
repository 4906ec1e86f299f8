"""The transition's predicted cost (the paper's Table 2) and the model size it is scaled by."""
from fractions import Fraction

import pytest

from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.hybrid_engine.accounting import MODES, layout_report, model_bytes, predict
from tests.models._hf import build_hf


@pytest.mark.parametrize("pp,tp,dp,pg,tg", [(1, 4, 2, 1, 2), (2, 4, 1, 1, 2), (2, 2, 2, 2, 2), (4, 8, 4, 1, 1),
                                            (1, 1, 8, 1, 1)])
def test_table_2_rows(pp, tp, dp, pg, tg):
    dims = ParallelDims(pp=pp, tp=tp, dp=dp, pg=pg, tg=tg)
    mp, gen = tp * pp, tg * pg
    hybrid = predict(dims)
    # a rank holds its training shard (1/mp) and receives the rest of its generation shard (1/gen)
    assert hybrid.received == Fraction(1, gen) - Fraction(1, mp) == Fraction(mp - gen, gen * mp)
    assert (hybrid.resident, hybrid.redundant) == (Fraction(1, gen), 0)
    vanilla, ds = predict(dims, "hybridflow_v"), predict(dims, "ds_chat")
    assert (vanilla.received, vanilla.resident, vanilla.redundant) == (Fraction(mp - 1, mp), 1, Fraction(1, mp))
    n = mp * dp
    assert (ds.received, ds.resident, ds.redundant) == (Fraction(n - 1, n), 1, Fraction(1, n))
    assert hybrid.received <= vanilla.received <= ds.received  # the paper's ordering
    assert predict(dims).in_bytes(1000 * mp * gen)["received"] == 1000 * (mp - gen)
    with pytest.raises(ValueError, match="mode='zero3'"):
        predict(dims, "zero3")


@pytest.mark.parametrize("tied", [True, False])
def test_model_bytes_counts_every_parameter_once(tmp_path, tied):
    ref = build_hf("llama_gqa_tied", tie_word_embeddings=tied)
    ref.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in ref.parameters())  # tied: one tensor, counted once
    assert model_bytes(str(tmp_path)) == 4 * expected
    assert model_bytes(str(tmp_path), "bfloat16") == 2 * expected
    report = layout_report(ParallelDims(tp=2, tg=1), str(tmp_path))
    assert report["modes"]["hybridflow"]["bytes"]["resident"] == 4 * expected  # tg=1: the whole model
    assert set(report["modes"]) == set(MODES) and len(report["lines"]) == 3
    assert layout_report(ParallelDims(tp=2), str(tmp_path / "elsewhere"))["model_bytes"] is None
