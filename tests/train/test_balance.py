"""--balance (class-balanced loss) and the warnings about runs too small to trust."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.train.loop import PAPER_TRAIN, class_weights, train, training_warnings
from tests.train.synthetic_store import Mixture, write_store


def test_class_weights_give_every_present_class_the_same_total_weight():
    y = torch.tensor([0] * 90 + [1] * 8 + [3] * 2)
    w = class_weights(y, 4)
    totals = w * torch.bincount(y, minlength=4)
    assert torch.allclose(totals[[0, 1, 3]], torch.full((3,), 100 / 3))
    assert w[2] == 0 and w[y].mean() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def imbalanced_store(tmp_path_factory):
    """Two overlapping classes, 9 to 1: a model that ignores the minority is right 90% of the time."""
    mixture = Mixture.make(classes=2, signal=1.0, seed=3)
    x, y = mixture.sample(20_000, seed=4)
    keep = np.flatnonzero(y == 1)[:1800].tolist() + np.flatnonzero(y == 0)[:200].tolist()
    x, y = x[keep], y[keep]
    rows = {"gender": y, "subject_id": [f"u{i % 100}" for i in range(len(y))], "fold": np.arange(len(y)) % 100 % 5}
    return write_store(tmp_path_factory.mktemp("imbalanced"), x, rows)


def minority_recall(metrics):
    cm = np.array(metrics["test"]["confusion_matrix"])
    return cm[0, 0] / cm[0].sum()


def test_balance_makes_the_minority_class_count(imbalanced_store, tmp_path):
    runs = {}
    for balance in (False, True):
        runs[balance] = train(imbalanced_store, ["adience"], "gender", tmp_path / str(balance), mc_samples=0,
                              report=False, progress=False, train_overrides={"balance": balance, "batch_size": 100,
                                                                             "gamma": 0.5, "epochs": 8})
        config = json.loads((tmp_path / str(balance) / "config.json").read_text())
        assert config["train"]["balance"] is balance
    assert minority_recall(runs[False]) < 0.5 < minority_recall(runs[True]), (minority_recall(runs[False]),
                                                                               minority_recall(runs[True]))


def test_a_tiny_run_warns_about_its_schedule_and_its_validation_split():
    cfg = PAPER_TRAIN["gender"]  # batch 512, gamma 0.066: one step an epoch on 40 rows
    schedule, val = training_warnings(40, 2, cfg)
    assert "1 optimizer step(s)" in schedule and "batch size (<= 4 gives" in schedule and "--batch-size 4" in schedule
    assert "validation split has 2 rows" in val
    assert training_warnings(12_000, 1500, cfg) == []  # Adience's size: the paper's schedule is fine
    assert "empty" in training_warnings(12_000, 0, cfg)[0]
    assert "gamma closer to 1: train's --batch-size 4 or --gamma," in schedule  # the decay ends the useful steps
    # Five epochs at gamma 0.9 end long before the rate has fallen 100x: only more epochs add steps.
    capped = training_warnings(42, 4, replace(cfg, batch_size=8, gamma=0.9, epochs=5))[0]
    assert "only 25 steps" in capped and "gamma closer to 1" not in capped and "--set gamma" not in capped
    assert "or more epochs: train's --batch-size 4 or --epochs, table's --set batch_size=4 or --epochs." in capped


def test_the_warnings_reach_config_json_and_the_console(tmp_path):
    mixture = Mixture.make(classes=2, seed=9)
    x, y = mixture.sample(60, seed=1)
    store = write_store(tmp_path / "store", x, {"gender": y, "subject_id": [f"u{i}" for i in range(60)]})
    result = CliRunner().invoke(cli, ["train", "--store", store, "--dataset", "adience", "--task", "gender",
                                      "--out", str(tmp_path / "run"), "--epochs", "5", "--mc-samples", "0",
                                      "--balance"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["balance"] is True and len(config["warnings"]) == 2
    for warning in config["warnings"]:  # each printed once (the report's own warnings may follow)
        assert result.output.count(f"warning: {warning}") == 1
    assert "optimizer step(s)" in result.output


def test_a_validation_split_that_weighs_nothing_trains_every_epoch_and_says_so(tmp_path):
    # Every validation subject's photos are female, the training split's all male: --balance weighs
    # the validation rows 0, their loss is NaN, and the run went on without a word.
    from agepipe.train.data import make_split

    x, _ = Mixture.make(classes=2, seed=9).sample(400, seed=1)
    rows = pd.DataFrame({"subject_id": [f"u{i % 80}" for i in range(400)], "fold": np.arange(400) % 80 % 5,
                         "image_id": [f"adience/img{i:07d}.jpg" for i in range(400)]})
    split = make_split(rows, 0)
    gender = np.random.default_rng(0).integers(0, 2, 400)
    gender[split.train], gender[split.val] = 1, 0
    store = write_store(tmp_path / "store", x, rows.assign(gender=gender))
    metrics = train(store, ["adience"], "gender", tmp_path / "run", mc_samples=0, report=False, progress=False,
                    train_overrides={"balance": True, "epochs": 6, "patience": 1, "batch_size": 32})
    said = [w for w in metrics["train_warnings"] if "weighs 0" in w]
    assert said and f"validation split's {len(split.val)} rows" in said[0]
    assert metrics["epochs_run"] == metrics["best_epoch"] == 6
