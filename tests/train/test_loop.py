import json
import math
import re

import numpy as np
import pytest
import torch

from agepipe.features.store import EMBEDDING_DIM
from agepipe.train.checkpoint import load_checkpoint
from agepipe.train.evaluate import evaluate_run, mc_dropout
from agepipe.train.loop import train
from tests.train.synthetic_store import FEATURE_SET, Mixture, adience_like, write_store


@pytest.fixture(scope="module")
def trained(gaussian_store, tmp_path_factory):
    store, mixture = gaussian_store
    run = tmp_path_factory.mktemp("runs") / "age"
    metrics = train(store, ["adience"], "age", run, test_fold=0, mc_samples=16, progress=False)
    return run, metrics, mixture


def test_training_comes_within_3_points_of_the_bayes_accuracy(trained):
    run, metrics, mixture = trained
    bayes = mixture.bayes_accuracy()
    assert 0.8 < bayes < 0.92
    model, _ = load_checkpoint(run)
    x, y = mixture.sample(20_000, seed=7)  # fresh rows: a standard error of 0.25 points
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert accuracy >= bayes - 0.03, (accuracy, bayes)
    assert metrics["test"]["accuracy"] >= bayes - 0.06  # ~800 test rows: a noisier estimate


def test_the_run_folder_holds_checkpoint_metrics_and_report(trained):
    run, metrics, _ = trained
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "model.safetensors", "history.json", "metrics.json", "report.md",
            "learning_curves.png", "confusion_matrix.png", "reliability.png", "risk_coverage.png"} <= names
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 0.0011670 and config["train"]["batch_size"] == 128
    assert config["data"]["features"] == {"pack": "buffalo_s", "det_size": 640}
    sizes = config["data"]["split_sizes"]
    assert sum(sizes.values()) == 4000 and sizes["val"] > 0
    history = json.loads((run / "history.json").read_text())["history"]
    assert history[1]["lr"] == pytest.approx(0.0011670 * 0.39479)
    test = metrics["test"]
    assert {"accuracy", "one_off_accuracy", "mae_years", "cross_entropy", "ece"} <= set(test)
    assert test["mc"]["samples"] == 16 and test["one_off_accuracy"] >= test["accuracy"]
    assert np.array(test["confusion_matrix"]).sum() == sizes["test"]
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "![reliability diagram](reliability.png)" in report
    assert (run / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mc_dropout_is_less_certain_far_from_the_training_data(trained):
    run, _, mixture = trained
    model, _ = load_checkpoint(run)
    torch.manual_seed(0)
    near, _ = mixture.sample(500, seed=11)
    far, _ = mixture.sample(500, seed=12, shift=6.0)
    sphere = np.random.default_rng(13).standard_normal((500, EMBEDDING_DIM))
    sphere = (sphere / np.linalg.norm(sphere, axis=1, keepdims=True)).astype(np.float32)
    h_near = mc_dropout(model, torch.from_numpy(near), 16).predictive_entropy.mean()
    for ood in (far, sphere):
        h_far = mc_dropout(model, torch.from_numpy(ood), 16).predictive_entropy.mean()
        assert h_far > h_near + 0.1, (h_far, h_near)


def test_evaluate_rebuilds_the_same_test_split(trained):
    run, metrics, _ = trained
    again = evaluate_run(run, mc_samples=8, device="cpu")
    assert again["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert again["test"]["n"] == metrics["test"]["n"]
    assert again["test"]["mc"]["samples"] == 8
    assert "warning" not in again


def test_evaluate_rebuilds_the_split_of_a_run_that_keyed_subjects_per_dataset(trained, tmp_path):
    """Runs trained before 2026-11-28 keyed subjects per dataset, which put other subjects in
    validation: evaluate scores them on the validation rows they were trained beside, not on
    rows the model trained on."""
    import shutil

    import pyarrow.parquet as pq

    from agepipe.train.data import load_task_data, make_split

    run, _, _ = trained
    old = shutil.copytree(run, tmp_path / "old-run")
    config = json.loads((old / "config.json").read_text())
    rec = config["data"]
    assert rec.pop("subjects") == "across datasets"
    data = load_task_data(rec["store"], rec["feature_set"], rec["datasets"], config["task"], rec["min_det_score"])
    then = make_split(data.rows, rec["test_fold"], rec["val_fraction"], subjects_per_dataset=True)
    now = make_split(data.rows, rec["test_fold"], rec["val_fraction"])
    assert set(then.val) != set(now.val) and list(now.test) == list(then.test)
    rec["split_sizes"] = then.sizes()
    (old / "config.json").write_text(json.dumps(config))
    again = evaluate_run(old, mc_samples=16, device="cpu")  # as trained: its T is the MC mean's
    assert "warning" not in again and again["val"]["n"] == len(then.val)
    scored = pq.read_table(old / "predictions.parquet", filters=[("split", "==", "val")])["image_id"].to_pylist()
    assert sorted(scored) == sorted(data.rows["image_id"].iloc[then.val])


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    mixture = Mixture.make(seed=5)
    x, y = mixture.sample(1200, seed=6)
    return write_store(tmp_path_factory.mktemp("small"), x, adience_like(y, subjects=60))


def test_the_same_seed_gives_the_same_metrics(small_store, tmp_path):
    def run(name, seed):
        return train(small_store, ["adience"], "age", tmp_path / name, mc_samples=8, report=False, progress=False,
                     train_overrides={"epochs": 3, "seed": seed})
    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    for m in (a, b, c):
        m.pop("train_seconds")
    assert a == b
    assert a["test"]["cross_entropy"] != c["test"]["cross_entropy"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_run_trained_again_never_shows_the_last_runs_results(small_store, tmp_path, monkeypatch):
    import agepipe.train.loop as loop
    from agepipe.train.report import PLOTS

    run = tmp_path / "run"
    train(small_store, ["adience"], "age", run, mc_samples=0, progress=False, train_overrides={"epochs": 1})
    results = ["history.json", "metrics.json", "predictions.parquet", "report.md", *PLOTS]
    assert all((run / name).exists() for name in results)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the new model is scored

    monkeypatch.setattr(loop, "score_splits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(small_store, ["adience"], "age", run, test_fold=1, mc_samples=0, progress=False,
              train_overrides={"epochs": 1, "lr": 0.05})
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["test_fold"] == 1 and config["train"]["lr"] == 0.05  # the new model is there
    assert [name for name in results if (run / name).exists()] == ["history.json"]  # the old scores are not


def test_a_run_stopped_between_its_weights_and_config_is_no_run(small_store, tmp_path, monkeypatch):
    """The weights are written, then config.json: a run trained again into its folder (another test
    fold) and stopped between the two left the new weights beside the old config.json, which
    evaluate and predict loaded as one run (scoring the new model on the old test fold, rows it
    trained on, at the old temperature)."""
    import agepipe.train.checkpoint as checkpoint
    from agepipe.train.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(small_store, ["adience"], "age", run, mc_samples=0, report=False, progress=False,
          train_overrides={"epochs": 1})
    real = checkpoint.write_json

    def stopped_at_the_config(path, obj):
        if path.name == "config.json":
            raise KeyboardInterrupt  # a kill between the two writes
        real(path, obj)

    monkeypatch.setattr(checkpoint, "write_json", stopped_at_the_config)
    with pytest.raises(KeyboardInterrupt):
        train(small_store, ["adience"], "age", run, test_fold=1, mc_samples=0, report=False, progress=False,
              train_overrides={"epochs": 1})
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(run)


def test_a_run_that_diverges_stops_loudly_and_saves_nothing(small_store, tmp_path):
    # Weights NaN from the first epoch: no better epoch to restore. The run used to save the NaN
    # checkpoint and crash in scoring ("'list' argument must have no negative elements").
    with pytest.raises(ValueError, match="training diverged.*lower learning rate"):
        train(small_store, ["adience"], "age", tmp_path / "run", mc_samples=0, progress=False,
              train_overrides={"epochs": 2, "lr": 1e8})
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "config.json").exists()


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    # Labels that are noise: the validation loss only rises once the model starts to memorise.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, EMBEDDING_DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = write_store(tmp_path / "store", x, adience_like(rng.integers(0, 8, 1000), subjects=50))
    metrics = train(store, ["adience"], "age", tmp_path / "run", mc_samples=0, report=False, progress=False,
                    train_overrides={"gamma": 1.0, "lr": 0.01, "patience": 2})
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    losses = [h["val_loss"] for h in history["history"]]
    assert history["stopped_early"] and len(losses) == history["best_epoch"] + 2
    assert history["best_epoch"] == 1 + int(np.argmin(losses))
    # the validation loss of the kept weights, before the temperature fitted on those rows lowers it
    assert metrics["val"]["at_temperature_1"]["cross_entropy"] == pytest.approx(min(losses), rel=1e-5)
    assert metrics["val"]["cross_entropy"] == pytest.approx(metrics["calibration"]["nll_after"], rel=1e-5)
    assert metrics["calibration"]["nll_after"] < metrics["calibration"]["nll_before"]


def test_a_value_some_runs_lack_is_summarised_over_those_that_have_it(tmp_path):
    # A run without validation rows has no val_accuracy: one NaN made the whole CV's "nan +- nan".
    from agepipe.train.loop import summarise
    from agepipe.train.report import write_cv_table

    assert summarise([0.5, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1)}
    partial = summarise([0.5, math.nan, 0.7])
    assert partial == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "runs": 2}
    assert math.isnan(summarise([math.nan])["mean"]) and summarise([math.nan])["runs"] == 0
    runs = [{"fold": k, "seed": 0, "best_epoch": 1, "val_accuracy": v} for k, v in enumerate((0.5, math.nan, 0.7))]
    write_cv_table(tmp_path / "cv.md", {"task": "age", "folds": [0, 1, 2], "seeds": 1, "runs": runs,
                                        "summary": {"val_accuracy": partial}})
    assert "| val_accuracy | 0.6000 +- 0.1000 (2 of 3 runs) |" in (tmp_path / "cv.md").read_text()


def test_cross_validation_runs_every_fold_and_aggregates(small_store, tmp_path):
    cv = train(small_store, ["adience"], "age", tmp_path, cv=True, seeds=2, mc_samples=4, progress=False,
               train_overrides={"epochs": 2})
    assert sorted((r["fold"], r["seed"]) for r in cv["runs"]) == [(k, s) for k in range(5) for s in range(2)]
    accs = [r["test_accuracy"] for r in cv["runs"]]
    assert cv["summary"]["test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert cv["summary"]["test_accuracy"]["std"] == pytest.approx(np.std(accs))
    assert {"test_one_off_accuracy", "test_mae_years", "test_mc_accuracy", "val_accuracy"} <= set(cv["summary"])
    for k in range(5):
        config = json.loads((tmp_path / f"fold{k}-seed1" / "config.json").read_text())
        assert config["data"]["test_fold"] == k and config["train"]["seed"] == 1
    table = (tmp_path / "cv.md").read_text()
    assert "| test_accuracy | " in table and " +- " in table
    assert json.loads((tmp_path / "cv.json").read_text())["seeds"] == 2


def test_a_cross_validation_into_the_folder_of_an_earlier_one_removes_its_other_runs(small_store, tmp_path):
    def cv(seeds):  # a model without hidden blocks: the folders are the point, not the fit
        return train(small_store, ["adience"], "age", tmp_path, cv=True, seeds=seeds, mc_samples=0, progress=False,
                     train_overrides={"epochs": 1}, model_overrides={"num_blocks": 0, "residuals_per_block": 0})

    cv(2)
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "fold9-seedX").mkdir()  # almost a run folder's name, and no config.json
    (tmp_path / "fold4-seed7").mkdir()  # a run folder's name, and a config.json not agepipe's
    (tmp_path / "fold4-seed7" / "config.json").write_text('{"lr": 0.1}')
    result = cv(1)
    new, earlier = [f"fold{k}-seed0" for k in range(5)], [f"fold{k}-seed1" for k in range(5)]
    assert sorted(p.name for p in tmp_path.glob("fold*-seed*")) == sorted(new + ["fold4-seed7", "fold9-seedX"])
    recorded = json.loads((tmp_path / "cv.json").read_text())
    assert [f"fold{r['fold']}-seed{r['seed']}" for r in recorded["runs"]] == new
    assert recorded["removed_runs"] == result["removed_runs"] == earlier
    assert (tmp_path / "notes.txt").read_text() == "the user's"


def test_a_cross_validation_stopped_part_way_leaves_no_earlier_summary_beside_its_runs(small_store, tmp_path,
                                                                                         monkeypatch):
    """A --cv into an earlier one's folder, interrupted while its runs were saved: the earlier cv.json,
    cv.md and report (its plots) stayed, summarising runs that were partly replaced by the new settings'."""
    import agepipe.train.loop as loop
    from agepipe.train.report import PLOTS, write_cv_report

    def cv(lr):
        return train(small_store, ["adience"], "age", tmp_path, cv=True, mc_samples=0, progress=False,
                     train_overrides={"epochs": 1, "lr": lr},
                     model_overrides={"num_blocks": 0, "residuals_per_block": 0})

    cv(0.001)
    write_cv_report(tmp_path, [tmp_path / f"fold{k}-seed0" for k in range(5)])  # as `train --cv` draws it
    real, saved = loop.save_run, []

    def interrupted(*args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a divergence) while the third run is saved
        saved.append(real(*args, **kwargs))
        return saved[-1]

    monkeypatch.setattr(loop, "save_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cv(0.05)
    assert json.loads((tmp_path / "fold0-seed0" / "config.json").read_text())["train"]["lr"] == 0.05
    left = [name for name in ("cv.json", "cv.md", "report.md", *PLOTS) if (tmp_path / name).exists()]
    assert left == []


def test_a_cross_validation_refused_at_setup_leaves_the_earlier_one_whole(small_store, tmp_path):
    """--init a run of another architecture: refused before any run trains, the earlier CV in OUT
    keeps its cv.json and cv.md (they went, with the runs they describe left as they were)."""
    from agepipe.train.checkpoint import CheckpointError

    common = dict(cv=True, mc_samples=0, progress=False, train_overrides={"epochs": 1})
    train(small_store, ["adience"], "age", tmp_path / "cv", **common,
          model_overrides={"num_blocks": 0, "residuals_per_block": 0})
    before = (tmp_path / "cv" / "cv.json").read_text()
    train(small_store, ["adience"], "age", tmp_path / "pre", mc_samples=0, report=False, progress=False,
          train_overrides={"epochs": 1}, model_overrides={"num_blocks": 0, "residuals_per_block": 0})
    with pytest.raises(CheckpointError, match="--init needs its architecture"):
        train(small_store, ["adience"], "age", tmp_path / "cv", init=str(tmp_path / "pre"), **common,
              model_overrides={"num_blocks": 1})
    assert (tmp_path / "cv" / "cv.json").read_text() == before and (tmp_path / "cv" / "cv.md").exists()


def test_a_cross_validation_keeps_the_earlier_run_it_started_from(small_store, tmp_path):
    """--init a run of the earlier cross-validation in OUT: it was removed, though every new run's
    config.json names it as where its weights came from."""
    def cv(seeds, init=None):
        return train(small_store, ["adience"], "age", tmp_path, cv=True, seeds=seeds, init=init, mc_samples=0,
                     progress=False, train_overrides={"epochs": 1},
                     model_overrides={"num_blocks": 0, "residuals_per_block": 0})

    from agepipe.train.loop import TrainingWarning

    cv(2)
    with pytest.warns(TrainingWarning, match="was trained on the adience rows"):  # said, not the point here
        result = cv(1, init=str(tmp_path / "fold0-seed1"))
    assert result["removed_runs"] == [f"fold{k}-seed1" for k in range(1, 5)]
    assert (tmp_path / "fold0-seed1" / "model.safetensors").exists()


def test_a_cross_validation_keeps_the_earlier_run_that_holds_the_run_it_started_from(small_store, tmp_path):
    """--init a run inside an earlier run folder that this cross-validation does not train again:
    that folder was removed as an earlier run, and the init run with it."""
    import shutil

    from agepipe.train.loop import TrainingWarning

    def cv(seeds, init=None):
        return train(small_store, ["adience"], "age", tmp_path, cv=True, seeds=seeds, init=init, mc_samples=0,
                     progress=False, train_overrides={"epochs": 1},
                     model_overrides={"num_blocks": 0, "residuals_per_block": 0})

    cv(2)
    shutil.copytree(tmp_path / "fold0-seed0", tmp_path / "fold3-seed1" / "pre")
    with pytest.warns(TrainingWarning, match="was trained on the adience rows"):  # said, not the point here
        result = cv(1, init=str(tmp_path / "fold3-seed1" / "pre"))
    assert result["removed_runs"] == [f"fold{k}-seed1" for k in (0, 1, 2, 4)]
    assert (tmp_path / "fold3-seed1" / "pre" / "model.safetensors").exists()


def test_an_init_run_the_cross_validation_trains_again_is_refused(small_store, tmp_path):
    """The API's train() refuses what `agepipe train` does (test_cli), before loading the store."""
    from agepipe.atomic import FolderError

    train(small_store, ["adience"], "age", tmp_path, cv=True, mc_samples=0, progress=False,
          train_overrides={"epochs": 1}, model_overrides={"num_blocks": 0, "residuals_per_block": 0})
    model = (tmp_path / "fold4-seed0" / "model.safetensors").read_bytes()
    with pytest.raises(FolderError, match=re.escape(f"writes {tmp_path / 'fold4-seed0'}")):
        train("/nonexistent-store", ["adience"], "age", tmp_path, cv=True, init=str(tmp_path / "fold4-seed0"))
    assert (tmp_path / "fold4-seed0" / "model.safetensors").read_bytes() == model


def test_an_earlier_run_that_cannot_be_removed_is_said_not_a_crash(small_store, tmp_path, monkeypatch):
    """A read-only earlier run folder (root ignores modes, so the refusal is injected): the new
    runs are trained and recorded, and the folder left is named, not a traceback after training."""
    from agepipe.train import loop

    def cv(seeds):
        return train(small_store, ["adience"], "age", tmp_path, cv=True, seeds=seeds, mc_samples=0, progress=False,
                     train_overrides={"epochs": 1}, model_overrides={"num_blocks": 0, "residuals_per_block": 0})

    cv(2)
    real = loop.remove_run_folder

    def read_only(run):
        if run.name == "fold3-seed1":
            raise PermissionError(13, "Permission denied")
        real(run)

    monkeypatch.setattr(loop, "remove_run_folder", read_only)
    with pytest.warns(loop.TrainingWarning, match="fold3-seed1: an earlier run, not removed"):
        result = cv(1)
    assert sorted(p.name for p in tmp_path.glob("fold*-seed1")) == ["fold3-seed1"]
    recorded = json.loads((tmp_path / "cv.json").read_text())
    assert any("fold3-seed1: an earlier run, not removed (Permission denied)" in w for w in recorded["warnings"])
    assert recorded["warnings"] == result["warnings"]


def test_init_pretrains_on_one_dataset_and_fine_tunes_on_another(tmp_path):
    mixture = Mixture.make(seed=8)
    x, y = mixture.sample(1500, seed=1)
    ages = np.array([1, 5, 10, 17.5, 28.5, 40.5, 50.5, 80])[y] + np.random.default_rng(0).normal(0, 1, len(y))
    store = write_store(tmp_path / "store", x, {"age": ages, "subject_id": [f"c{i % 300}" for i in range(len(y))],
                                                "fold": np.arange(len(y)) % 300 % 5}, dataset="imdb")
    x2, y2 = mixture.sample(600, seed=2)
    write_store(tmp_path / "store", x2, adience_like(y2, subjects=40), dataset="adience")
    train(store, ["imdb"], "age101", tmp_path / "pre", mc_samples=0, report=False, progress=False,
          train_overrides={"epochs": 3})
    fine = train(store, ["adience"], "age", tmp_path / "fine", init=str(tmp_path / "pre"), mc_samples=0,
                 report=False, progress=False, train_overrides={"epochs": 3})
    config = json.loads((tmp_path / "fine" / "config.json").read_text())
    assert config["init"] == str(tmp_path / "pre") and config["init_fresh"] == ["head.bias", "head.weight"]
    assert config["model"]["num_classes"] == 8 and config["data"]["datasets"] == ["adience"]
    assert fine["test"]["n"] == config["data"]["split_sizes"]["test"]
    assert FEATURE_SET == config["data"]["feature_set"]


def test_init_from_a_run_of_another_recogniser_is_refused(tmp_path):
    # Its weights read another embedding space: fine-tuning from them trained on without a word.
    from agepipe.train.checkpoint import CheckpointError

    x, y = Mixture.make(seed=8).sample(400, seed=1)
    for name, sha in (("buffalo_l-det640-aaaaaaaa", "a" * 64), ("buffalo_s-det640-bbbbbbbb", "b" * 64)):
        store = write_store(tmp_path / "store", x, adience_like(y, subjects=40), feature_set=name,
                            info={"pack": name[:9], "det_size": 640, "recognizer_sha256": sha})
    train(store, ["adience"], "age", tmp_path / "pre", feature_set="buffalo_l-det640-aaaaaaaa", mc_samples=0,
          report=False, progress=False, train_overrides={"epochs": 1})
    with pytest.raises(CheckpointError, match="recogniser sha256 aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        train(store, ["adience"], "age", tmp_path / "fine", feature_set="buffalo_s-det640-bbbbbbbb",
              init=str(tmp_path / "pre"), mc_samples=0, report=False, progress=False, train_overrides={"epochs": 1})
    assert not (tmp_path / "fine").exists()


def test_init_from_a_run_that_trained_on_the_test_fold_warns_of_the_leak(tmp_path):
    # A run of adience test fold 0 trained on folds 1-4: a run (or a --cv) starting from it and
    # tested on one of those folds starts from weights that saw its test rows; it said nothing.
    from click.testing import CliRunner

    from agepipe.cli import cli
    from agepipe.train.loop import TrainingWarning

    x, y = Mixture.make(seed=8).sample(500, seed=1)
    store = write_store(tmp_path / "store", x, adience_like(y, subjects=40))
    pre = str(tmp_path / "pre")
    quiet = {"mc_samples": 0, "report": False, "progress": False, "train_overrides": {"epochs": 1}}
    train(store, ["adience"], "age", pre, test_fold=0, **quiet)
    leak = f"--init {pre} was trained on the adience rows of folds 1, 2, 3, 4"
    with pytest.warns(TrainingWarning, match=re.escape(leak)):
        metrics = train(store, ["adience"], "age", tmp_path / "fine", test_fold=2, init=pre, **quiet)
    assert [w for w in metrics["train_warnings"] if w.startswith(leak)]
    config = json.loads((tmp_path / "fine" / "config.json").read_text())
    assert config["warnings"] == metrics["train_warnings"]
    # The init run's own test fold: it never saw those rows.
    same = train(store, ["adience"], "age", tmp_path / "same", test_fold=0, init=pre, **quiet)
    assert not [w for w in same["train_warnings"] if w.startswith("--init")]
    cv = train(store, ["adience"], "age", tmp_path / "cv", cv=True, init=pre, **quiet)
    assert [w for w in cv["warnings"] if w.startswith(leak)]
    for k in range(5):
        said = json.loads((tmp_path / "cv" / f"fold{k}-seed0" / "config.json").read_text())["warnings"]
        assert bool([w for w in said if w.startswith(leak)]) == (k != 0)
    result = CliRunner().invoke(cli, ["train", "--store", store, "--dataset", "adience", "--task", "age",
                                      "--out", str(tmp_path / "cli"), "--test-fold", "3", "--init", pre,
                                      "--epochs", "1", "--mc-samples", "0"], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.count(f"warning: {leak}") == 1, result.output


def test_init_from_an_imdb_run_warns_a_wiki_run_tested_on_its_training_folds(tmp_path):
    # A person's IMDB and Wikipedia photos share a subject (their name) and so a fold: a run of wiki
    # test fold 2 started from an imdb run of test fold 0 starts from weights that trained on its test
    # people's IMDB photos. The warning looked for the same dataset name in both and said nothing.
    from agepipe.train.loop import TrainingWarning

    mixture = Mixture.make(seed=8)
    for k, dataset in enumerate(("imdb", "wiki")):
        x, y = mixture.sample(400, seed=1 + k)
        person = np.arange(len(y)) % 40
        store = write_store(tmp_path / "store", x, {**adience_like(y, subjects=40), "fold": person % 5,
                                                    "subject_id": np.array([f"name{p}" for p in person])},
                            dataset=dataset)
    pre = str(tmp_path / "pre")
    quiet = {"mc_samples": 0, "report": False, "progress": False, "train_overrides": {"epochs": 1}}
    train(store, ["imdb"], "age", pre, test_fold=0, **quiet)
    leak = f"--init {pre} was trained on the imdb rows of folds 1, 2, 3, 4"
    with pytest.warns(TrainingWarning, match=re.escape(leak)):
        metrics = train(store, ["wiki"], "age", tmp_path / "fine", test_fold=2, init=pre, **quiet)
    assert [w for w in metrics["train_warnings"] if w.startswith(leak)]
    same = train(store, ["wiki"], "age", tmp_path / "same", test_fold=0, init=pre, **quiet)
    assert not [w for w in same["train_warnings"] if w.startswith("--init")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_graph_step_trains_like_the_eager_step():
    from agepipe.train.loop import PAPER_TRAIN, GraphedTrainStep, TrainStep, make_optimizer
    from agepipe.train.model import ModelConfig, ResMLP

    x = torch.nn.functional.normalize(torch.randn(4096, EMBEDDING_DIM, device="cuda"), dim=1)
    y = torch.randint(0, 8, (4096,), device="cuda")
    order = torch.randperm(4096, device="cuda")
    weights = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = ResMLP(ModelConfig(num_classes=8, dropout=0.0)).cuda().train()  # no dropout: same arithmetic
        optimizer = make_optimizer(model, PAPER_TRAIN["age"], torch.device("cuda"))
        step = (GraphedTrainStep(model, optimizer, x, y, False, order[:128]) if graphed
                else TrainStep(model, optimizer, x, y, False))
        for b in range(32):
            step(order[b * 128:(b + 1) * 128])
        weights.append((model.head.weight.detach().clone(), step.take()))
    assert torch.allclose(weights[0][0], weights[1][0], atol=1e-4)
    assert weights[0][1][0] == pytest.approx(weights[1][1][0], rel=1e-4)


def test_a_test_fold_without_rows_is_said_not_only_nan(tmp_path):
    """--test-fold 4 of rows in folds 0-3 (a small dataset, or --min-det-score above the fold's faces):
    the run trained and printed test accuracy nan with no word of why."""
    from agepipe.train.loop import TrainingWarning

    mixture = Mixture.make(seed=3)
    x, y = mixture.sample(400, seed=4)
    rows = adience_like(y, subjects=40)
    rows["fold"] = rows["fold"] % 4
    store = write_store(tmp_path / "store", x, rows)
    with pytest.warns(TrainingWarning, match="the test split is empty: fold 4 of adience has no row"):
        metrics = train(store, ["adience"], "age", tmp_path / "run", test_fold=4, mc_samples=0, report=False,
                        progress=False, train_overrides={"epochs": 1})
    assert metrics["test"]["n"] == 0
    assert any(w.startswith("the test split is empty") for w in metrics["train_warnings"])
