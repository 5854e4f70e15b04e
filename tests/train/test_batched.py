"""Cross-validation runs trained at once as one stacked model (train/batched.py)."""
import json

import numpy as np
import pytest
import torch

from agepipe.train.batched import StackedResMLP
from agepipe.train.checkpoint import load_checkpoint
from agepipe.train.loop import train
from agepipe.train.model import ModelConfig, ResMLP
from tests.train.synthetic_store import Mixture, adience_like, write_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    mixture = Mixture.make(seed=5)
    x, y = mixture.sample(1200, seed=6)
    return write_store(tmp_path_factory.mktemp("small"), x, adience_like(y, subjects=60))


@pytest.mark.parametrize("variant", [{}, {"skip": False, "batch_norm": False}, {"dropout": 0.0}])
def test_a_stacked_runs_exported_weights_give_the_stacked_forward(variant):
    cfg = ModelConfig(num_classes=8, num_blocks=2, **variant)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(ResMLP(cfg))
    stacked = StackedResMLP(models)
    x = torch.nn.functional.normalize(torch.randn(3, 64, 512), dim=2)
    stacked.train()
    stacked(x)  # one training step's worth of BatchNorm statistics, so they differ per run
    stacked.eval()
    with torch.no_grad():
        out = stacked(x)
        for r in range(3):
            assert torch.allclose(stacked.export(r)(x[r]), out[r], atol=1e-5)
            assert torch.allclose(models[r].eval()(x[r]), out[r], atol=1e-5) == (not cfg.batch_norm)


def test_batched_cv_matches_sequential_runs_in_distribution(small_store, tmp_path):
    def cv(batched):
        return train(small_store, ["adience"], "age", tmp_path / str(batched), cv=True, seeds=2, mc_samples=0,
                       progress=False, train_overrides={"epochs": 4}, batched=batched)

    runs = {b: cv(b) for b in (True, False)}
    acc = {b: np.array([r["test_accuracy"] for r in runs[b]["runs"]]) for b in runs}
    # Same folds, seeds and schedule: the means may differ by the runs' sampling noise only.
    noise = np.sqrt(acc[True].var(ddof=1) / len(acc[True]) + acc[False].var(ddof=1) / len(acc[False]))
    assert abs(acc[True].mean() - acc[False].mean()) <= 3 * noise + 0.01, (acc[True], acc[False])
    assert min(acc[True].mean(), acc[False].mean()) > 1 / 8  # both learn something in 4 short epochs (chance: 1/8)
    for k in range(5):
        run = tmp_path / "True" / f"fold{k}-seed1"
        config = json.loads((run / "config.json").read_text())
        assert config["data"]["test_fold"] == k and config["train"]["seed"] == 1
        model, _ = load_checkpoint(run)
        history = json.loads((run / "history.json").read_text())
        assert 1 <= history["best_epoch"] <= len(history["history"]) <= 4
    assert runs[True]["batched"] and not runs[False]["batched"]
