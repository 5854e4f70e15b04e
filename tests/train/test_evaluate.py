import math

import numpy as np
import pytest
import torch

from agepipe.train.evaluate import (confusion_matrix, entropy, mc_dropout, reliability, risk_coverage,
                                    scores)
from agepipe.train.model import ModelConfig, ResMLP


def test_scores_for_age_classes():
    probs = np.array([[0.7, 0.3, 0, 0, 0, 0, 0, 0],
                      [0, 0, 0.5, 0.5, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0, 0.2, 0.8]])
    y = np.array([0, 3, 4])
    s = scores(probs, y, "age", ages=np.array([1.0, 17.5, 28.5], np.float32))
    assert s["accuracy"] == pytest.approx(1 / 3)           # row 2 predicts class 2 (first maximum)
    assert s["one_off_accuracy"] == pytest.approx(2 / 3)   # 2 vs 3 is one off, 7 vs 4 is not
    expected_ages = [0.7 * 1 + 0.3 * 5, 0.5 * 10 + 0.5 * 17.5, 0.2 * 50.5 + 0.8 * 80]
    assert s["mae_years"] == pytest.approx(np.mean(np.abs(np.array(expected_ages) - [1, 17.5, 28.5])))
    assert s["cross_entropy"] == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(1e-12)) / 3)
    gender = scores(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]), "gender", None)
    assert gender["accuracy"] == 0.5 and "mae_years" not in gender and "one_off_accuracy" not in gender


def test_reliability_and_ece_by_hand():
    # Two rows at confidence 0.9 (one right), two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    rel = reliability(probs, y, bins=10)
    assert rel["ece"] == pytest.approx((2 * abs(0.5 - 0.9) + 2 * abs(1.0 - 0.6)) / 4)
    assert rel["bin_count"][9] == 2 and rel["bin_count"][6] == 2
    assert rel["bin_accuracy"][0] is None


def test_risk_coverage_sets_aside_the_most_uncertain_first():
    uncertainty = np.array([0.1, 0.9, 0.2, 0.8, 0.3])
    correct = np.array([True, False, True, False, True])
    rc = risk_coverage(uncertainty, correct)
    assert rc["coverage"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert rc["accuracy"] == [1.0, 1.0, 1.0, 0.75, 0.6]
    assert rc["accuracy_at"]["0.50"] == 1.0 and rc["accuracy_at"]["1.00"] == 0.6
    assert rc["aurc"] == pytest.approx(np.mean([0, 0, 0, 0.25, 0.4]))


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_mc_dropout_is_one_batched_forward_with_independent_masks():
    torch.manual_seed(0)
    model = ResMLP(ModelConfig(num_classes=5, dropout=0.3))
    model.train()
    model(torch.randn(256, 512))
    model.eval()
    x = torch.randn(40, 512)
    running = model.blocks[1].ic[0].running_mean.clone()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    mc = mc_dropout(model, x, samples=16, max_rows=10_000)
    assert calls == [16 * 40]
    assert torch.equal(model.blocks[1].ic[0].running_mean, running)
    assert not model.training
    assert mc.probs.shape == (40, 5) and np.allclose(mc.probs.sum(1), 1, atol=1e-5)
    assert (mc.mutual_information >= 0).all() and (mc.mutual_information > 0).mean() > 0.9
    assert np.allclose(mc.predictive_entropy, entropy(torch.from_numpy(mc.probs)).numpy(), atol=1e-5)
    # Chunking the rows changes nothing but the number of forwards.
    calls.clear()
    torch.manual_seed(1)
    mc_dropout(model, x, samples=16, max_rows=16 * 15)
    assert calls == [16 * 15, 16 * 15, 16 * 10]


def test_mc_dropout_without_dropout_has_no_mutual_information():
    model = ResMLP(ModelConfig(num_classes=3, dropout=0.0)).eval()
    mc = mc_dropout(model, torch.randn(8, 512), samples=4)
    assert np.allclose(mc.mutual_information, 0, atol=1e-6)
