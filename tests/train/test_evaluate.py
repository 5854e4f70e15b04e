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


def test_mc_dropout_gives_the_same_numbers_twice_and_leaves_the_callers_random_stream():
    """evaluate and predict twice on one run: the same probabilities, entropies and so the same
    UNDECIDED flags; another seed draws other masks; torch's stream goes on as if unused."""
    torch.manual_seed(0)
    model = ResMLP(ModelConfig(num_classes=8, dropout=0.3)).eval()
    x = torch.randn(30, 512)
    torch.manual_seed(5)
    first = mc_dropout(model, x, samples=8)
    after = torch.rand(3)
    second = mc_dropout(model, x, samples=8)
    other = mc_dropout(model, x, samples=8, seed=1)
    assert np.array_equal(first.probs, second.probs)
    assert np.array_equal(first.mutual_information, second.mutual_information)
    assert not np.allclose(first.probs, other.probs)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mc_dropout_on_a_gpu_leaves_every_gpu_s_random_stream():
    """torch.manual_seed inside it reseeded every GPU's generator, and fork_rng restored only the
    one it ran on: a model training on another GPU of the process lost its stream."""
    model = ResMLP(ModelConfig(num_classes=8, dropout=0.3)).cuda().eval()
    before = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
    x = torch.randn(30, 512, device="cuda")
    first = mc_dropout(model, x, samples=8)
    assert all(torch.equal(torch.cuda.get_rng_state(d), b) for d, b in enumerate(before))
    assert np.array_equal(first.probs, mc_dropout(model, x, samples=8).probs)


def test_mc_dropout_without_dropout_has_no_mutual_information():
    model = ResMLP(ModelConfig(num_classes=3, dropout=0.0)).eval()
    mc = mc_dropout(model, torch.randn(8, 512), samples=4)
    assert np.allclose(mc.mutual_information, 0, atol=1e-6)


def test_balanced_accuracy_per_class_and_majority_baseline():
    from agepipe.train.evaluate import balanced_accuracy, majority_baseline, per_class

    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    assert balanced_accuracy(y, pred) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert balanced_accuracy(y, np.zeros(6, int)) == 0.5  # a constant guess scores 1/classes
    rows = per_class(y, pred, ["female", "male"])
    assert rows[0] == {"class": "female", "support": 4, "predicted": 4, "precision": 0.75, "recall": 0.75}
    assert rows[1]["precision"] == 0.5 and rows[1]["recall"] == 0.5
    assert per_class(y, np.zeros(6, int), ["female", "male"])[1]["precision"] is None
    # the baseline is the training split's majority, scored on the test rows
    base = majority_baseline(np.array([1, 1, 1, 0]), y, ["female", "male"])
    assert base == {"class": "male", "accuracy": pytest.approx(2 / 6), "balanced_accuracy": 0.5}


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_rows():
    from agepipe.train.evaluate import bootstrap_ci

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    small, large = bootstrap_ci(y[:40], pred[:40]), bootstrap_ci(y, pred)
    acc = (pred == y).mean()
    assert large["accuracy"][0] < acc < large["accuracy"][1]
    assert np.diff(large["accuracy"])[0] < np.diff(small["accuracy"])[0]
    assert large["balanced_accuracy"][0] < large["balanced_accuracy"][1]


def test_risk_coverage_names_its_measure_and_the_random_baseline():
    correct = np.array([True, True, False, False])
    good = risk_coverage(np.array([0.1, 0.2, 0.8, 0.9]), correct, "MI")
    bad = risk_coverage(np.array([0.9, 0.8, 0.2, 0.1]), correct)
    assert good["measure"] == "MI" and good["random_accuracy"] == 0.5 and good["random_aurc"] == 0.5
    assert good["error_auroc"] == 1.0 and bad["error_auroc"] == 0.0
    assert good["aurc"] < good["random_aurc"] < bad["aurc"]
    tied = risk_coverage(np.zeros(4), correct)
    assert tied["error_auroc"] == 0.5


def test_warnings_for_a_constant_model_and_an_uncertainty_worse_than_chance():
    from agepipe.train.evaluate import split_warnings
    from agepipe.train.report import baseline_sentence

    split = {"classes": ["female", "male"], "n": 4, "balanced_accuracy": 0.5,
             "majority_baseline": {"class": "male", "accuracy": 0.5, "balanced_accuracy": 0.5},
             "risk_coverage": {"measure": "predictive entropy", "error_auroc": 0.2}}
    warnings = split_warnings(split, np.ones(4, int))
    assert any("predicts one class (male) for all 4 rows" in w for w in warnings)
    assert any("does not beat the majority baseline" in w for w in warnings)
    assert any("ranks errors worse than chance" in w for w in warnings)
    assert "does not beat the majority baseline: too little data" in baseline_sentence("gender", split)
    split.update(balanced_accuracy=0.9, bootstrap_95={"balanced_accuracy": [0.8, 0.95]})
    split["risk_coverage"]["error_auroc"] = 0.7
    assert split_warnings(split, np.array([0, 1, 1, 0])) == []
    assert baseline_sentence("gender", split).startswith("the gender model beats the majority baseline by 40 points")


def test_bootstrap_draws_the_rows_distribution():
    """The cells' multinomial gives the intervals that resampling row indices gives."""
    from agepipe.train.evaluate import balanced_accuracy, bootstrap_ci

    rng = np.random.default_rng(1)
    y = rng.choice(8, 300, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 8, 300))
    idx = rng.integers(0, len(y), (4000, len(y)))
    rows = {"accuracy": np.percentile((pred[idx] == y[idx]).mean(1), [2.5, 97.5]),
            "balanced_accuracy": np.percentile([balanced_accuracy(y[i], pred[i]) for i in idx], [2.5, 97.5])}
    cells = bootstrap_ci(y, pred, resamples=4000, seed=2)
    for key, bounds in rows.items():
        np.testing.assert_allclose(cells[key], bounds, atol=0.012)
    # a class with one row is absent from about a third of the resamples: averaged only where present
    rare = bootstrap_ci(np.array([0] * 50 + [1]), np.array([0] * 50 + [0]))
    assert 0.5 <= rare["balanced_accuracy"][0] and rare["balanced_accuracy"][1] == 1.0


def test_evaluate_names_a_damaged_metrics_json(gaussian_store, tmp_path):
    from agepipe.train.checkpoint import CheckpointError
    from agepipe.train.evaluate import evaluate_run
    from agepipe.train.loop import train

    store, _ = gaussian_store
    run = tmp_path / "run"
    train(store, ["adience"], "gender", run, mc_samples=0, report=False, progress=False,
          train_overrides={"epochs": 1})
    (run / "metrics.json").write_text("{")
    with pytest.raises(CheckpointError, match="metrics.json: not a metrics file of `agepipe train`"):
        evaluate_run(run, mc_samples=0)
    (run / "metrics.json").unlink()  # as the message says: without one, evaluate scores the run again
    assert evaluate_run(run, mc_samples=0)["test"]["n"] > 0


def test_no_rows_have_no_calibration_error():
    """An empty split (a test fold with no labelled rows) scores NaN everywhere, ECE too: 0 would
    read as a perfectly calibrated model."""
    from agepipe.train.evaluate import scores

    out = scores(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), "gender", None)
    assert math.isnan(out["accuracy"]) and math.isnan(out["ece"])
    assert math.isnan(reliability(np.zeros((0, 8)), np.zeros(0, np.int64))["ece"])


@pytest.mark.parametrize("old", [False, True])
def test_a_float32_run_is_scored_in_float32_where_the_device_has_bfloat16(gaussian_store, tmp_path, monkeypatch,
                                                                          old):
    """A run trained in float32 (a CPU without bfloat16, "precision": "float32"; or one trained on a
    CPU before agepipe recorded a precision, which always trained CPUs in float32) evaluated on a
    device with bfloat16: it was scored in bfloat16 (train.amp is on), not in the precision it ran."""
    import json

    import pyarrow.parquet as pq

    from agepipe.train.evaluate import evaluate_run
    from agepipe.train.loop import train

    store, _ = gaussian_store
    run = tmp_path / "run"
    monkeypatch.setattr("agepipe.train.model.bf16_native", lambda device: False)
    train(store, ["adience"], "age", run, mc_samples=0, report=False, progress=False, train_overrides={"epochs": 2})
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == "float32" and config["train"]["amp"]
    if old:
        del config["precision"]
        (run / "config.json").write_text(json.dumps(config))
    trained = pq.read_table(run / "predictions.parquet").to_pandas()
    monkeypatch.setattr("agepipe.train.model.bf16_native", lambda device: True)
    evaluate_run(run, mc_samples=0)
    scored = pq.read_table(run / "predictions.parquet").to_pandas()
    assert np.allclose(np.stack(trained["probabilities"]), np.stack(scored["probabilities"]), atol=1e-6)


def test_predictions_parquet_says_which_uncertainty_its_entropy_holds(gaussian_store, tmp_path):
    import json

    import pyarrow.parquet as pq

    from agepipe.train.evaluate import evaluate_run
    from agepipe.train.loop import train

    def measures():
        return json.loads(pq.read_schema(run / "predictions.parquet").metadata[b"agepipe.uncertainty"])

    store, _ = gaussian_store
    run = tmp_path / "run"
    train(store, ["adience"], "age", run, mc_samples=0, report=False, progress=False, train_overrides={"epochs": 1},
          model_overrides={"num_blocks": 1, "residuals_per_block": 0})  # small, and with dropout
    softmax = "softmax entropy (deterministic)"
    assert measures() == {"val": softmax, "test": softmax}
    evaluate_run(run, mc_samples=4, device="cpu")
    # validation rows are scored deterministically whatever --mc-samples says
    assert measures() == {"val": softmax, "test": "MC-dropout predictive entropy (K=4)"}


def test_evaluate_says_when_the_labels_manifest_changed_since_the_cut(tmp_path):
    """train warns that the store's labels may no longer be the manifest's; evaluate scored the run
    on those labels again without a word."""
    from agepipe.features import store as fstore
    from agepipe.hashing import file_sha256
    from agepipe.train.evaluate import evaluate_run
    from agepipe.train.loop import train
    from tests.train.synthetic_store import FEATURE_SET, Mixture, adience_like, write_store

    x, y = Mixture.make().sample(400)
    store = write_store(tmp_path / "store", x, adience_like(y, subjects=40))
    run = tmp_path / "run"
    train(store, ["adience"], "age", run, mc_samples=0, report=False, progress=False, train_overrides={"epochs": 1})
    assert "warning" not in evaluate_run(run, mc_samples=0)
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"the manifest the shards were cut from")
    index = fstore.read_index(store, FEATURE_SET, "adience")
    fstore.commit_shards(store, FEATURE_SET, "adience", index.shards, file_sha256(manifest), index.generation,
                         str(manifest))
    manifest.write_bytes(b"that manifest rebuilt since")
    metrics = evaluate_run(run, mc_samples=0)
    assert f"adience: its manifest ({manifest}) has changed since" in metrics["warning"]


def test_evaluate_says_when_a_row_changed_in_place_since_training(tmp_path):
    """A row re-extracted or relabelled since training keeps the split sizes, which were all
    evaluate compared: it scored the run on other rows without a word. The run records the rows'
    digest now; a run recorded before it is judged by the sizes alone."""
    import json

    from agepipe.train.evaluate import evaluate_run
    from agepipe.train.loop import train
    from tests.train.synthetic_store import Mixture, adience_like, write_store

    x, y = Mixture.make().sample(400)
    rows = adience_like(y, subjects=40)
    run = tmp_path / "run"
    train(write_store(tmp_path / "store", x, rows), ["adience"], "age", run, mc_samples=0, report=False,
          progress=False, train_overrides={"epochs": 1})
    same = write_store(tmp_path / "copy", x, rows)
    assert "warning" not in evaluate_run(run, store=same, mc_samples=0)
    moved = x.copy()
    moved[7] = -moved[7]
    changed = write_store(tmp_path / "changed", moved, rows)
    warning = evaluate_run(run, store=changed, mc_samples=0)["warning"]
    assert "the rows differ from those this run was trained on (the same split sizes)" in warning
    config = json.loads((run / "config.json").read_text())
    del config["data"]["rows"]
    (run / "config.json").write_text(json.dumps(config))
    assert "warning" not in evaluate_run(run, store=changed, mc_samples=0)


def test_bootstrap_of_groups_draws_photos_not_rows():
    """A photo that several runs (seeds) scored is one draw: its copies are not independent rows."""
    from agepipe.train.evaluate import balanced_accuracy, bootstrap_ci

    rng = np.random.default_rng(4)
    y = rng.choice(4, 200, p=[0.4, 0.3, 0.2, 0.1])
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    once = bootstrap_ci(y, pred)
    photos = np.tile(np.arange(200), 5)  # five seeds that agree on every photo
    tiled = bootstrap_ci(np.tile(y, 5), np.tile(pred, 5), groups=photos)
    assert tiled.pop("groups") == 200 and tiled == once
    # seeds that disagree: the cells' multinomial gives what resampling photo indices gives
    preds = np.stack([np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200)) for _ in range(3)])
    ys, photos = np.tile(y, 3), np.tile(np.arange(200), 3)
    idx = rng.integers(0, 200, (4000, 200))
    rows = {"accuracy": np.percentile((preds[:, idx] == y[idx]).mean((0, 2)), [2.5, 97.5]),
            "balanced_accuracy": np.percentile([balanced_accuracy(np.tile(y[i], 3), preds[:, i].ravel())
                                                for i in idx], [2.5, 97.5])}
    cells = bootstrap_ci(ys, preds.ravel(), resamples=4000, seed=5, groups=photos)
    for key, bounds in rows.items():
        np.testing.assert_allclose(cells[key], bounds, atol=0.012)



def test_bootstrap_draws_subjects_whose_photos_span_classes():
    """A subject's photos are alike, so they are right or wrong together: resampling them as independent
    rows gave an interval about a third of the width that resampling subjects gives (here 0.06 against 0.17).
    A subject's photos may hold several classes (a person photographed at several ages)."""
    from agepipe.train.evaluate import balanced_accuracy, bootstrap_ci

    rng = np.random.default_rng(6)
    subjects, photos = 120, 8
    subject = np.repeat(np.arange(subjects), photos)
    y = np.repeat(rng.integers(0, 3, subjects), photos)
    y[::photos] = (y[::photos] + 1) % 3  # one photo of every subject of another class
    pred = np.where(np.repeat(rng.random(subjects) < 0.7, photos), y, (y + 1) % 3)
    pick = rng.integers(0, subjects, (4000, subjects))
    idx = (pick[:, :, None] * photos + np.arange(photos)).reshape(4000, -1)
    drawn = {"accuracy": np.percentile((pred[idx] == y[idx]).mean(1), [2.5, 97.5]),
             "balanced_accuracy": np.percentile([balanced_accuracy(y[i], pred[i]) for i in idx], [2.5, 97.5])}
    cells = bootstrap_ci(y, pred, resamples=4000, seed=7, groups=subject)
    assert cells["groups"] == subjects
    for key, bounds in drawn.items():
        np.testing.assert_allclose(cells[key], bounds, atol=0.015)
    assert np.diff(cells["accuracy"])[0] > 1.5 * np.diff(bootstrap_ci(y, pred)["accuracy"])[0]


def test_a_runs_intervals_resample_its_test_subjects(gaussian_store, tmp_path):
    from agepipe.train.loop import train

    store, _ = gaussian_store
    run = tmp_path / "run"
    metrics = train(store, ["adience"], "age", run, mc_samples=0, progress=False, train_overrides={"epochs": 1},
                    model_overrides={"num_blocks": 1, "residuals_per_block": 0})
    # the store's 100 subjects, fold = subject % 5: test fold 0 holds 20 of them
    assert metrics["test"]["bootstrap_95"]["groups"] == 20
    assert f"resamples of the 20 subjects of the {metrics['test']['n']} test rows" in (run / "report.md").read_text()

def test_risk_coverage_of_tied_uncertainty_does_not_follow_the_row_order():
    """A constant model ties every row: it ranks nothing, so its curve is the random one, however
    the rows are stored (the right ones first here); within a tie, the mean over every order."""
    correct = np.array([True] * 6 + [False] * 4)
    tied = risk_coverage(np.zeros(10), correct)
    assert tied["accuracy_at"]["0.50"] == pytest.approx(0.6) and tied["aurc"] == pytest.approx(tied["random_aurc"])
    assert tied["accuracy"] == pytest.approx([0.6] * 10)
    # a tie of two rows (one right) after a certain right row: 1, then 1.5 / 2, then 2 / 3
    part = risk_coverage(np.array([0.0, 0.5, 0.5]), np.array([True, True, False]))
    assert part["accuracy"] == pytest.approx([1.0, 0.75, 2 / 3])
