"""Masked helpers and loss aggregation, against hand-computed numbers."""
import pytest
import torch

from hfrl.algorithms import agg_loss, masked_mean, masked_sum, masked_var, masked_whiten, sequence_mask

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # ragged rows, one empty


def test_masked_reductions():
    assert masked_sum(X, MASK).item() == 10.0
    assert masked_mean(X, MASK).item() == 2.5
    assert masked_sum(X, MASK, dim=-1).tolist() == [6.0, 4.0, 0.0]
    assert masked_mean(X, MASK, dim=-1).tolist() == [2.0, 4.0, 0.0]  # empty row -> 0, not NaN
    # values 1, 2, 3, 4: mean 2.5, squared deviations sum 5
    assert masked_var(X, MASK).item() == pytest.approx(5 / 3)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(X, torch.zeros_like(MASK)).item() == 0.0
    assert masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]])).item() == 0.0


def test_masked_whiten():
    w = masked_whiten(X, MASK)
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (5 / 3) ** 0.5
    torch.testing.assert_close(w[MASK.bool()], expected)
    assert (w[~MASK.bool()] == 0).all()
    scaled = masked_whiten(X, MASK, shift_mean=False)
    torch.testing.assert_close(scaled[MASK.bool()], expected + 2.5)
    integers = masked_whiten(X.round().long(), MASK)   # integer scores whiten to float32, not to 0
    assert integers.dtype == torch.float32
    torch.testing.assert_close(integers, masked_whiten(X.round(), MASK))


def test_sequence_mask():
    assert sequence_mask(MASK).tolist() == [True, True, False]


def test_agg_modes_literal():
    assert agg_loss(X, MASK, "token-mean").item() == 2.5  # (1+2+3+4) / 4
    assert agg_loss(X, MASK, "seq-mean-token-sum").item() == 5.0  # (6 + 4) / 2, empty row ignored
    assert agg_loss(X, MASK, "seq-mean-token-mean").item() == 3.0  # (2 + 4) / 2


def test_agg_bad_mode_and_shape():
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(X, MASK, "sum")
    with pytest.raises(ValueError, match="shape mismatch"):
        agg_loss(X, MASK[:, :2], "token-mean")
