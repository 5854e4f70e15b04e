"""Run reports and the cross-validation report, from real runs on a synthetic store."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from agepipe.train.data import AGE_BINS
from agepipe.train.loop import train
from agepipe.train.report import PLOTS, write_cv_report, write_reports

HEADINGS = ["## Warnings", "## Headline (test fold)", "## Test metrics", "## Per class (test)",
            "## Reliability (test, final prediction)", "## Risk-coverage (test)"]


@pytest.fixture(scope="module")
def cv_runs(gaussian_store, tmp_path_factory):
    store, _ = gaussian_store
    out = tmp_path_factory.mktemp("cv")
    said = []
    result = train(store, ["adience"], "age", out, cv=True, mc_samples=8, progress=False,
                   train_overrides={"epochs": 3}, echo=said.append)
    # a line as each run ends, not one at the very end
    assert [line.split(":")[0] for line in said] == [f"run {i}/5" for i in range(1, 6)]
    return out, [out / f"fold{r['fold']}-seed{r['seed']}" for r in result["runs"]]


def test_every_run_has_predictions_class_names_and_a_baseline(cv_runs):
    _, runs = cv_runs
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    test = metrics["test"]
    assert test["classes"] == list(AGE_BINS)
    assert test["majority_baseline"]["class"] in AGE_BINS
    assert len(test["per_class"]) == 8 and sum(r["support"] for r in test["per_class"]) == test["n"]
    lo, hi = test["bootstrap_95"]["balanced_accuracy"]
    assert lo <= test["mc"]["balanced_accuracy"] <= hi
    table = pq.read_table(runs[0] / "predictions.parquet").to_pandas()
    for column in ("image_id", "label", "prediction", "probabilities", "entropy", "mutual_information"):
        assert column in table
    tested = table[table.split == "test"]
    assert len(tested) == test["n"] and set(tested.label) <= set(AGE_BINS)
    assert np.allclose(np.stack(tested.probabilities).sum(1), 1, atol=1e-4)
    assert (tested.correct == (tested.label == tested.prediction)).all()
    assert tested.mutual_information.notna().all() and (tested.entropy >= 0).all()


def test_cv_report_has_every_section_and_a_report_per_fold(cv_runs):
    out, runs = cv_runs
    text = write_cv_report(out, runs).read_text()
    for heading in ["## Warnings", "## Every run (test fold)", "## Pooled over runs", "## Per class (test)",
                    "## Reliability (test, final prediction)", "## Risk-coverage (test)", "## Plots across folds"]:
        assert heading in text, heading
    assert "random ranking" in text and "Uncertainty measure: MC-dropout predictive entropy (K=8)" in text
    assert "majority baseline" in text and "95%" in text
    for run in runs:
        assert f"[report]({run.name}/report.md)" in text
        report = (run / "report.md").read_text()
        for heading in HEADINGS:
            assert heading in report, (run, heading)
        assert "| rows |" in report  # the reliability bins with their counts
    for plot in ("reliability.png", "risk_coverage.png", "confusion_matrix.png"):
        assert (out / plot).stat().st_size > 5000


def test_reports_drawn_on_several_cores_match_one_drawn_here_and_a_failure_names_the_file(cv_runs, tmp_path,
                                                                                         monkeypatch):
    import shutil

    _, runs = cv_runs
    copies = [shutil.copytree(run, tmp_path / run.name) for run in runs[:3]]
    for copy in copies:
        for name in ["report.md", *PLOTS]:
            (copy / name).unlink(missing_ok=True)
    # The working folder holds another agepipe whose report draws nothing: the children must
    # import this one (started with `python -m` they took the folder's, exited 0, drew nothing).
    other = tmp_path / "other-checkout" / "agepipe" / "train"
    other.mkdir(parents=True)
    for init in (other.parent / "__init__.py", other / "__init__.py"):
        init.write_text("")
    (other / "report.py").write_text("def write_report(run):\n    pass\n")
    monkeypatch.chdir(other.parent.parent)
    write_reports(copies)  # in other processes (with 2 cores or more)
    for copy, run in zip(copies, runs):
        assert (copy / "report.md").read_text().replace(copy.name, run.name) == (run / "report.md").read_text()
        assert all((copy / name).stat().st_size > 5000 for name in PLOTS)
    (copies[1] / "metrics.json").unlink()
    with pytest.raises((RuntimeError, FileNotFoundError), match="metrics.json"):
        write_reports(copies)


def test_no_text_of_any_plot_falls_outside_its_figure(cv_runs, tmp_path, monkeypatch):
    """The plots have fixed margins (no bbox_inches="tight"): every label, tick label, legend and
    annotation they draw must still lie inside the saved image, at the extremes of what they show."""
    import shutil

    from matplotlib.text import Text

    from agepipe.train import report

    drawn, outside = [], []
    draw = Text.draw

    def recording_draw(text, renderer):
        draw(text, renderer)
        if text.get_visible() and text.get_text():  # ticks outside the view are never drawn
            drawn.append((text.get_text(), text.get_window_extent(renderer).frozen(), text.figure.bbox.frozen()))

    save = report._save

    def checked_save(fig, path):
        drawn.clear()
        save(fig, path)
        assert drawn, path
        outside.extend((path.name, t) for t, box, page in drawn
                       if box.x0 < 0 or box.y0 < 0 or box.x1 > page.width or box.y1 > page.height)

    monkeypatch.setattr(Text, "draw", recording_draw)
    monkeypatch.setattr(report, "_save", checked_save)
    _, runs = cv_runs
    run = shutil.copytree(runs[0], tmp_path / "run")
    report.write_report(run)  # a run's four plots, and the CV's three with one curve per run
    (tmp_path / "cv").mkdir()
    report.write_cv_report(tmp_path / "cv", runs)
    test = json.loads((run / "metrics.json").read_text())["test"]
    many_rows = {**test["reliability"], "bin_count": [c * 10_000 for c in test["reliability"]["bin_count"]]}
    report.plot_reliability([("MC dropout K=32", many_rows)], tmp_path / "reliability.png")
    report.plot_confusion(np.array([[900, 100], [80, 920]]), ["female", "male"], tmp_path / "gender.png")
    report.plot_confusion(np.ones((101, 101), int), [str(k) for k in range(101)], tmp_path / "age101.png")
    diverging = {"best_epoch": 1, "history": [{"epoch": e, "train_loss": 1e5 / e, "val_loss": 2e5 / e,
                                               "train_accuracy": 0.5, "val_accuracy": 0.5} for e in range(1, 31)]}
    report.plot_learning_curves(diverging, tmp_path / "diverging.png")  # 6-digit loss tick labels
    long_measure = "MC-dropout predictive entropy (K=32)"
    report.plot_risk_coverage([("this run", test["risk_coverage"])], long_measure, tmp_path / "rc.png")
    assert not outside


def test_pooled_interval_resamples_photos_that_several_runs_scored(cv_runs, tmp_path):
    """Each run twice (as two seeds that agree): the same photos, so the same pooled interval."""
    out, runs = cv_runs
    once = write_cv_report(tmp_path / "once", runs).read_text()
    twice = write_cv_report(tmp_path / "twice", runs + runs).read_text()
    pooled = [next(line for line in text.splitlines() if " predictions of " in line) for text in (once, twice)]
    rows = sum(json.loads((run / "metrics.json").read_text())["test"]["n"] for run in runs)
    assert pooled[0].startswith(f"{rows} predictions of {rows} photos")
    assert pooled[1] == pooled[0].replace(f"{rows} predictions", f"{2 * rows} predictions", 1)


def test_pooled_interval_resamples_subjects(cv_runs, tmp_path):
    """A subject's photos are alike: the pooled interval draws the store's 100 subjects, not their photos;
    runs written before predictions.parquet named the subjects draw photos."""
    import shutil

    _, runs = cv_runs
    line = next(line for line in write_cv_report(tmp_path / "cv", runs).read_text().splitlines()
                if " predictions of " in line)
    assert " photos of 100 subjects: accuracy " in line and "resampling subjects" in line
    old = [shutil.copytree(run, tmp_path / run.name) for run in runs]
    for run in old:
        table = pq.read_table(run / "predictions.parquet")
        pq.write_table(table.drop_columns(["subject_id"]), run / "predictions.parquet")
    rows = sum(json.loads((run / "metrics.json").read_text())["test"]["n"] for run in runs)
    line = next(line for line in write_cv_report(tmp_path / "old", old).read_text().splitlines()
                if " predictions of " in line)
    assert f" photos of {rows} subjects: accuracy " in line


def test_the_confusion_matrix_is_of_the_prediction_the_report_scores():
    """With MC dropout the report scores the MC mean (headline, per-class table, warnings): the
    confusion matrix it draws must count those predictions, not the deterministic pass's."""
    import torch

    from agepipe.train.evaluate import evaluate_split
    from agepipe.train.model import ModelConfig, ResMLP

    torch.manual_seed(0)
    model = ResMLP(ModelConfig(num_classes=8, dropout=0.5))
    model.train()
    model(torch.randn(256, 512))
    model.eval()
    x, y = torch.randn(300, 512), torch.randint(0, 8, (300,))
    ages = np.full(300, 30.0, np.float32)
    test = evaluate_split(model, x, y, "age", ages, mc_samples=8, amp=False)
    cm = np.array(test["confusion_matrix"])
    assert test["prediction"] == "MC dropout mean"
    assert test["mc"]["accuracy"] != test["accuracy"]  # the two passes disagree on some rows
    assert cm.sum(0).tolist() == [r["predicted"] for r in test["per_class"]]
    assert np.trace(cm) / cm.sum() == pytest.approx(test["mc"]["accuracy"])


def test_a_report_evaluate_wrote_on_a_changed_store_says_so_and_counts_the_rows_it_scored(tmp_path):
    """evaluate on a store that gained rows since training: report.md listed the training's split
    sizes beside metrics of more test rows, and its Warnings said "none" though evaluate warned."""
    import pandas as pd

    from agepipe.train.evaluate import evaluate_run
    from tests.train.synthetic_store import Mixture, adience_like, write_store

    x, y = Mixture.make().sample(500)
    rows = pd.DataFrame(adience_like(y, subjects=50))
    run = tmp_path / "run"
    train(write_store(tmp_path / "store", x[:400], rows.iloc[:400].reset_index(drop=True)), ["adience"], "age", run,
          mc_samples=0, report=False, progress=False, train_overrides={"epochs": 1})
    metrics = evaluate_run(run, store=write_store(tmp_path / "more", x, rows), mc_samples=0)
    report = (run / "report.md").read_text()
    sizes = metrics["split_sizes"]
    assert f"- rows: train {sizes['train']}, val {sizes['val']}, test {sizes['test']}" in report
    assert metrics["test"]["n"] == sizes["test"]
    assert "the rows differ from those this run was trained on" in report.split("## Headline")[0]


def test_a_model_a_fraction_of_a_point_above_its_baseline_is_not_said_to_beat_it_by_0_points():
    """A near-constant model on imbalanced classes (a few rows of a rare class right) gains well
    under a point of balanced accuracy: the sentence said it 'beats the majority baseline by 0 points'."""
    from agepipe.train.report import baseline_sentence

    split = {"n": 5000, "balanced_accuracy": 0.1253,
             "majority_baseline": {"class": "25-32", "accuracy": 0.4, "balanced_accuracy": 0.125},
             "bootstrap_95": {"balanced_accuracy": [0.1249, 0.1262]}}
    said = baseline_sentence("age", split)
    assert "by 0 points" not in said and "by 0.03 points" in said
    split.update(balanced_accuracy=0.1250001)
    assert "by under 0.01 points" in baseline_sentence("age", split)  # not "by 1e-05 points"
    split.update(balanced_accuracy=0.52, bootstrap_95={"balanced_accuracy": [0.4, 0.6]})
    assert "by 40 points" in baseline_sentence("age", split)  # whole points, as before


def test_a_run_that_held_out_no_fold_reports_its_validation_not_empty_test_sections(gaussian_store, tmp_path):
    """A table's pre-training run holds no test row: its report said "test fold None", "0 bootstrap
    resamples of the 0 test rows", tables of dashes and "Expected calibration error nan", beside
    empty plots."""
    from agepipe.train.report import write_report

    store, _ = gaussian_store
    run = tmp_path / "pretrain"
    train(store, ["adience"], "gender", run, test_fold=None, mc_samples=4, report=False, progress=False,
          train_overrides={"epochs": 1})
    text = write_report(run).read_text()
    assert "no test fold (every fold trained on)" in text and "No held-out test rows" in text
    assert "Validation accuracy" in text and "learning_curves.png" in text
    assert not any(s in text for s in ("test fold None", "bootstrap resamples", " nan", "| - -"))
    assert not any((run / name).exists() for name in ("reliability.png", "risk_coverage.png", "confusion_matrix.png"))
