import json
import math
import shutil

import pytest
import torch

from agepipe.train import report
from agepipe.train.calibrate import MIN_ROWS, calibrate_run, fit_temperature, nll
from agepipe.train.checkpoint import CheckpointError, load_checkpoint, read_config, temperature_for
from agepipe.train.data import load_task_data, make_split
from agepipe.train.evaluate import calibration_record, evaluate_run
from agepipe.train.loop import train
from agepipe.train.predict import Predictor
from agepipe.train.report import write_report


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_the_temperature_that_drew_the_labels_is_found(true_t):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6000, 8, generator=g) * 3
    y = torch.multinomial(torch.softmax(logits[0] / true_t, -1), 1, generator=g).squeeze(1)
    fitted = fit_temperature(logits, y)
    assert fitted["temperature"] == pytest.approx(true_t, rel=0.06)
    assert fitted["nll_after"] < fitted["nll_before"] and "at_bound" not in fitted


def test_the_fit_is_a_minimum_of_the_mc_mean_likelihood():
    # K passes: the likelihood of the mean of their softmaxes, not of each pass
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 500, 5, generator=g) * 4 + torch.randn(1, 500, 5, generator=g) * 4
    y = torch.multinomial(torch.softmax(logits / 3, -1).mean(0), 1, generator=g).squeeze(1)
    fitted = fit_temperature(logits, y)
    t, f = fitted["temperature"], nll(logits, y)
    assert "at_bound" not in fitted
    assert f(t) <= min(f(t * 1.02), f(t / 1.02))
    mean = torch.softmax(logits / t, -1).mean(0)
    assert f(t) == pytest.approx(float(-torch.log(mean[torch.arange(500), y]).mean()), rel=1e-5)


def test_too_few_validation_rows_fit_nothing():
    fitted = fit_temperature(torch.randn(1, MIN_ROWS - 1, 8), torch.zeros(MIN_ROWS - 1, dtype=torch.long))
    assert fitted["temperature"] == 1.0 and "fewer than" in fitted["skipped"]


@pytest.fixture(scope="module")
def run(gaussian_store, tmp_path_factory):
    store, _ = gaussian_store
    out = tmp_path_factory.mktemp("calibrated") / "age"
    metrics = train(store, ["adience"], "age", out, mc_samples=0, progress=False, report=False,
                    train_overrides={"epochs": 3})
    return out, metrics


def test_an_over_confident_model_gets_a_temperature_as_many_times_larger(run, gaussian_store):
    # Logits scaled by c are the same model c times as sure: the temperature takes the factor back.
    out, metrics = run
    model, _ = load_checkpoint(out)
    x, y = _validation_rows(out, gaussian_store[0])
    plain = calibrate_run(model, x, y, 0, amp=False)
    with torch.no_grad():
        model.head.weight.mul_(4.0)
        model.head.bias.mul_(4.0)
    sure = calibrate_run(model, x, y, 0, amp=False)
    assert sure["temperature"] == pytest.approx(4.0 * plain["temperature"], rel=1e-3)
    assert sure["nll_after"] == pytest.approx(plain["nll_after"], rel=1e-4)
    assert sure["nll_before"] > plain["nll_before"]


def _validation_rows(out, store):
    config = read_config(out)
    rec = config["data"]
    data = load_task_data(store, rec["feature_set"], rec["datasets"], "age")
    split = make_split(data.rows, rec["test_fold"], rec["val_fraction"])
    val = torch.from_numpy(split.val)
    return data.x[val], data.y[val]


def test_a_run_records_its_temperature_and_evaluate_divides_by_it(run, tmp_path):
    out, metrics = run
    config = json.loads((out / "config.json").read_text())
    cal = metrics["calibration"]
    assert config["temperature"] == cal["temperature"] != 1.0
    assert cal["rows"] == metrics["split_sizes"]["val"] and cal["prediction"] == "deterministic"
    # The deterministic prediction keeps its class; its probabilities are the logits over T.
    assert metrics["test"]["accuracy"] == metrics["test"]["at_temperature_1"]["accuracy"]
    assert metrics["val"]["cross_entropy"] == pytest.approx(cal["nll_after"], rel=1e-4)
    again = evaluate_run(out, mc_samples=0)
    assert again["test"]["cross_entropy"] == pytest.approx(metrics["test"]["cross_entropy"], rel=1e-5)
    before = again["test"]["at_temperature_1"]
    assert before["reliability"]["ece"] == before["ece"] != again["test"]["ece"]
    report = (out / "report.md").read_text()
    assert (f"Temperature scaling: T = {cal['temperature']:.3f}, fitted on {cal['rows']} validation rows "
            f"(deterministic; their negative log-likelihood {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}); "
            f"test ECE {before['ece']:.4f} -> {again['test']['ece']:.4f}") in report
    # the same run at T = 1: what "at_temperature_1" said
    config["temperature"] = 1.0
    (out / "config.json").write_text(json.dumps(config))
    try:
        plain = evaluate_run(out, mc_samples=0)
    finally:
        config["temperature"] = cal["temperature"]
        (out / "config.json").write_text(json.dumps(config))
    assert "at_temperature_1" not in plain["test"]
    # config.json's T set by hand: the report says the T used, not training's fit as if it were
    assert plain["calibration"]["temperature"] == 1.0 and plain["calibration"]["fit"] == cal
    assert (f"Temperature scaling: T = 1.000, config.json's, set since training fitted {cal['temperature']:.3f}."
            in (out / "report.md").read_text())
    assert evaluate_run(out, mc_samples=0)["calibration"] == cal  # back to training's T: its record again
    for key in ("cross_entropy", "ece"):
        assert plain["test"][key] == pytest.approx(metrics["test"]["at_temperature_1"][key], rel=1e-5)
    # training's record of the fit gone: the run's T is still applied, and said
    (out / "metrics.json").unlink()
    bare = evaluate_run(out, mc_samples=0)
    assert bare["calibration"] == {"temperature": cal["temperature"]}
    assert bare["test"]["cross_entropy"] == pytest.approx(metrics["test"]["cross_entropy"], rel=1e-5)
    assert f"Temperature scaling: T = {cal['temperature']:.3f}; test ECE" in (out / "report.md").read_text()


def test_a_run_reporting_the_mc_mean_fits_the_deterministic_softmax_its_own_temperature(gaussian_store, tmp_path):
    # The mean of K passes is softer than the one deterministic pass: one T cannot calibrate both.
    store, _ = gaussian_store
    out = tmp_path / "mc"
    metrics = train(store, ["adience"], "age", out, mc_samples=8, progress=False, report=False,
                    train_overrides={"epochs": 2}, model_overrides={"dropout": 0.5})
    cal, config = metrics["calibration"], read_config(out)
    det = cal["deterministic"]
    assert cal["prediction"] == "MC dropout mean (K=8)" and "warning" not in metrics
    assert config["temperature"] == cal["temperature"] and config["deterministic_temperature"] == det["temperature"]
    assert abs(math.log(det["temperature"] / cal["temperature"])) > 0.05  # two fits, not one T written twice
    assert temperature_for(config, 0) == det["temperature"] and temperature_for(config, 8) == cal["temperature"]
    # the deterministic scores at their own T: the validation rows' cross-entropy is that fit's NLL
    assert metrics["val"]["cross_entropy"] == pytest.approx(det["nll_after"], rel=1e-4)
    model, _ = load_checkpoint(out)
    x, y = _validation_rows(out, store)
    assert calibrate_run(model, x, y, 0, amp=False)["temperature"] == pytest.approx(det["temperature"], rel=1e-4)
    # an evaluate of the deterministic prediction takes its T, says nothing, and scores as training did
    plain = evaluate_run(out, mc_samples=0)
    assert "warning" not in plain and plain["calibration"] == cal
    for key in ("cross_entropy", "ece"):
        assert plain["test"][key] == pytest.approx(metrics["test"][key], rel=1e-5)
    assert (f"; T = {det['temperature']:.3f} for the deterministic softmax (negative log-likelihood "
            f"{det['nll_before']:.4f} -> {det['nll_after']:.4f})") in (out / "report.md").read_text()
    # the deterministic T set by hand: used, and said as config.json's
    config["deterministic_temperature"] = 1.0
    (out / "config.json").write_text(json.dumps(config))
    edited = evaluate_run(out, mc_samples=8)
    assert edited["calibration"] == {"temperature": cal["temperature"], "deterministic": {"temperature": 1.0},
                                     "fit": cal}
    assert edited["test"]["ece"] != pytest.approx(metrics["test"]["ece"], rel=1e-3)
    assert edited["test"]["mc"]["ece"] == pytest.approx(metrics["test"]["mc"]["ece"], rel=1e-5)  # the MC mean's T kept
    assert "config.json's, set since training" in (out / "report.md").read_text()


def test_no_calibrate_keeps_the_models_probabilities(gaussian_store, tmp_path):
    store, _ = gaussian_store
    metrics = train(store, ["adience"], "age", tmp_path / "run", mc_samples=0, progress=False, report=False,
                    train_overrides={"epochs": 1, "calibrate": False})
    assert read_config(tmp_path / "run")["temperature"] == 1.0
    assert "--no-calibrate" in metrics["calibration"]["skipped"] and "at_temperature_1" not in metrics["test"]


@pytest.mark.parametrize("key", ["temperature", "deterministic_temperature"])
@pytest.mark.parametrize("bad", [0, -1.5, "2", None, math.inf])
def test_a_config_whose_temperature_is_no_positive_number_is_refused(run, tmp_path, bad, key):
    out, _ = run
    config = json.loads((out / "config.json").read_text())
    config[key] = bad
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf'config.json: "{key}" is .*, not a finite number > 0'):
        read_config(tmp_path)


@pytest.mark.parametrize("rows", [0, MIN_ROWS - 1])
@pytest.mark.parametrize("samples", [0, 4])
def test_an_empty_or_small_validation_split_fits_nothing_with_or_without_mc_passes(run, rows, samples):
    # A training split of one subject has no validation rows: the MC passes of none died in torch.cat.
    out, _ = run
    model, _ = load_checkpoint(out)
    x = torch.randn(rows, model.config.in_features)
    fitted = calibrate_run(model, x, torch.zeros(rows, dtype=torch.long), samples, amp=False)
    assert fitted["temperature"] == 1.0 and fitted["rows"] == rows and "fewer than" in fitted["skipped"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_logits_that_are_not_finite_fit_no_temperature(bad):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 100, 3, generator=g)
    logits[1, 7, 2] = bad
    fitted = fit_temperature(logits, torch.randint(0, 3, (100,), generator=g))
    assert fitted["temperature"] == 1.0 and "1 of 100 validation row(s)" in fitted["skipped"]


def test_a_likelihood_flat_in_float32_keeps_t_at_1():
    # Every row right by a margin of 1000: each T's likelihood is 0, nothing to fit. The golden
    # section over a flat stretch walked to its lower end (T = 0.78), against the tie-break.
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (200,), generator=g)
    logits = torch.zeros(1, 200, 4)
    logits[0, torch.arange(200), y] = 1000.0
    fitted = fit_temperature(logits, y)
    assert fitted["temperature"] == pytest.approx(1.0, abs=1e-9) and fitted["nll_after"] == 0


def test_evaluate_says_when_it_scores_another_prediction_than_the_temperature_was_fitted_for(gaussian_store,
                                                                                           tmp_path):
    store, _ = gaussian_store
    out = tmp_path / "run"
    metrics = train(store, ["adience"], "age", out, mc_samples=0, progress=False, report=False,
                    train_overrides={"epochs": 2})
    assert metrics["calibration"]["prediction"] == "deterministic" and "warning" not in metrics
    same = evaluate_run(out, mc_samples=0)
    assert "warning" not in same
    other = evaluate_run(out, mc_samples=4)  # the MC mean, at the deterministic prediction's T
    t = metrics["calibration"]["temperature"]
    assert (f"the run's temperature T = {t:.3f} was fitted for its deterministic prediction; this evaluate scores "
            "the MC dropout mean one (--mc-samples 4)") in other["warning"]
    assert "was fitted for its deterministic prediction" in (out / "report.md").read_text()
    # a deterministic T given by hand is the deterministic prediction's: the MC mean still takes the other
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "deterministic_temperature": 1.0}))
    assert "was fitted for its deterministic prediction" in evaluate_run(out, mc_samples=4)["warning"]
    assert "warning" not in evaluate_run(out, mc_samples=0)


@pytest.fixture(scope="module")
def mc_run(gaussian_store, tmp_path_factory):
    """A run that reports the MC mean at dropout 0.5: two T, the MC mean's and the deterministic softmax's."""
    out = tmp_path_factory.mktemp("mc") / "run"
    train(gaussian_store[0], ["adience"], "age", out, mc_samples=8, progress=False, report=False,
          train_overrides={"epochs": 2}, model_overrides={"dropout": 0.5})
    return out


def _copy(run, tmp_path, edit=None):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    if edit:
        config = json.loads((out / "config.json").read_text())
        edit(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def test_the_reliability_diagram_labels_each_curve_with_the_t_that_divided_it(mc_run, tmp_path, monkeypatch):
    # The deterministic curve was labelled with the MC mean's T, though its own divided it.
    out = _copy(mc_run, tmp_path)
    drawn = []
    monkeypatch.setattr(report, "plot_reliability", lambda curves, path: drawn.append([c[0] for c in curves]))
    write_report(out)
    config = read_config(out)
    t, det = config["temperature"], config["deterministic_temperature"]
    assert drawn[-1] == [f"deterministic, T = {det:.2f}", "MC dropout K=8, T = 1", f"MC dropout K=8, T = {t:.2f}"]
    evaluate_run(out, mc_samples=0)  # the deterministic prediction alone, at its own T
    assert drawn[-1] == ["deterministic, T = 1", f"deterministic, T = {det:.2f}"]


def test_the_warning_of_a_t_fitted_for_another_prediction_survives_an_evaluate(mc_run, tmp_path):
    # The T under "fit" (config.json changed since training) is still the one fitted for the other
    # prediction: an evaluate's record of it silenced the warning, and predict's after it.
    gone = _copy(mc_run, tmp_path, lambda c: c.pop("deterministic_temperature"))
    t = read_config(gone)["temperature"]
    for _ in range(2):  # the deterministic softmax at the MC mean's T, as a run from before took it
        said = evaluate_run(gone, mc_samples=0)["warning"]
        assert f"T = {t:.3f} was fitted for its MC dropout mean (K=8) prediction" in said
    assert "was fitted for its MC dropout mean" in Predictor(str(gone), None, mc_samples=0, device="cpu").warnings[0]


def test_the_calibration_sentence_says_when_the_deterministic_t_is_at_its_bound():
    # The MC mean's T at a bound was said; the deterministic softmax's, its own fit, was not.
    fit = {"temperature": 20.0, "rows": 60, "nll_before": 2.0, "nll_after": 1.5, "at_bound": True}
    cal = {**fit, "temperature": 3.0, "prediction": "MC dropout mean (K=8)", "deterministic": fit}
    del cal["at_bound"]
    said = report.calibration_sentence({"calibration": cal, "test": {}})
    assert "K=8); their negative log-likelihood 2.0000 -> 1.5000)" in said
    assert "T = 20.000 for the deterministic softmax (negative log-likelihood 2.0000 -> 1.5000, T at its bound)" in said


def test_the_calibration_sentence_says_which_t_was_set_by_hand():
    # A deterministic T set by hand was said as the MC mean's ("T = 0.600, config.json's, set since
    # training fitted 0.600"), and a removed one not at all, the deterministic softmax then at the MC mean's T.
    det = {"temperature": 0.9, "rows": 300, "nll_before": 1.3, "nll_after": 1.2}
    fit = {"temperature": 0.6, "rows": 300, "nll_before": 1.4, "nll_after": 1.1, "prediction": "MC dropout mean (K=8)",
           "deterministic": det}
    fitted = ("T = 0.600, fitted on 300 validation rows (MC dropout mean (K=8); their negative log-likelihood "
              "1.4000 -> 1.1000)")
    said = report.calibration_sentence({"calibration": calibration_record(
        {"temperature": 0.6, "deterministic_temperature": 1.0}, fit), "test": {}})
    assert said == f"Temperature scaling: {fitted}; T = 1.000 for the deterministic softmax, config.json's, set " \
                   "since training fitted 0.900."
    said = report.calibration_sentence({"calibration": calibration_record({"temperature": 0.6}, fit), "test": {}})
    assert said == (f"Temperature scaling: {fitted}; the deterministic softmax takes it too (config.json holds no "
                    "deterministic_temperature since training fitted 0.900).")
    said = report.calibration_sentence({"calibration": calibration_record(
        {"temperature": 1.0, "deterministic_temperature": 0.9}, fit), "test": {}})
    assert said == ("Temperature scaling: T = 1.000, config.json's, set since training fitted 0.600; "
                    "T = 0.900 for the deterministic softmax.")
