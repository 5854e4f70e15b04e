"""`agepipe demo` end to end: the whole chain on the offline sample, in a temporary folder."""
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.datasets.sample import photo_path
from agepipe.features import store as fstore
from agepipe.train.checkpoint import load_checkpoint
from agepipe.train.data import AGE_BIN_MIDPOINTS
from agepipe.train.predict import UNDECIDED_ENTROPY_SHARE, UNDECIDED_MI


def test_demo_runs_the_whole_chain(tmp_path):
    work = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(work)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for step in range(1, 7):
        assert f"[{step}/6]" in result.output
    assert "demo finished in" in result.output
    # every manifest row reached the store exactly once
    manifest = pq.read_table(work / "data" / "sample" / "manifest.parquet").to_pandas()
    [feature_set] = fstore.list_feature_sets(str(work / "store"))
    rows = fstore.read_table(str(work / "store"), feature_set, "sample").to_pandas()
    assert sorted(rows.image_id) == sorted(manifest.image_id)
    assert (rows.status == "ok").mean() > 0.9
    # fold 0, the test fold, is t1.jpg's faces and nothing else: the photo predicted on was never trained on
    assert set(manifest.image_id[manifest.fold == 0].str.split("/").str[1]) == {"t1"}
    assert (manifest.image_id.str.startswith("sample_crop/t1/") == (manifest.fold == 0)).all()
    for task in ("age", "gender"):
        model, config = load_checkpoint(work / "runs" / task)
        assert config["task"] == task and config["data"]["test_fold"] == 0
        assert config["train"]["balance"] is True
        assert (work / "runs" / task / "report.md").exists()
        predictions = pq.read_table(work / "runs" / task / "predictions.parquet").to_pandas()
        assert (predictions.split == "test").sum() == 12
        assert predictions.image_id.str.startswith("sample_crop/t1/").sum() == 12
        # the console says, in words, how the model did against the majority baseline
        test = json.loads((work / "runs" / task / "metrics.json").read_text())["test"]
        base = test["majority_baseline"]["balanced_accuracy"]
        verdict = next(line for line in result.output.splitlines() if line.strip().startswith(f"the {task} model"))
        beats = test["mc"]["balanced_accuracy"] > base
        assert ("does not beat the majority baseline" in verdict) == (not beats), verdict
        assert f"{test['n']} held-out photos" in verdict
    # predict wrote JSON and an image
    predictions = json.loads((work / "predict.json").read_text())
    faces = predictions[0]["faces"]
    assert len(faces) == 6
    for face in faces:  # each label as the MC-dropout numbers beside it say
        gender, age = face["gender"], face["age"]
        assert gender["predicted"] == ("male" if gender["p_male"] > gender["p_female"] else "female")
        probs = np.array(list(age["probs"].values()))
        assert age["expected_age"] == pytest.approx(probs @ AGE_BIN_MIDPOINTS, abs=0.15)
        for d in (gender, age):
            assert d["undecided"] == (d["entropy_share"] > UNDECIDED_ENTROPY_SHARE
                                      or d["mutual_information"] > UNDECIDED_MI)
    # its closing suggestions are the README's workflow (`--gpus all` alone needs onnxruntime-gpu)
    readme = {line.split("#")[0].strip() for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines()}
    suggested = result.output.split("The same on real data")[1].splitlines()[1:]
    commands = [c.strip() for line in suggested if line.strip().startswith("agepipe ") for c in line.split("&&")]
    assert len(commands) >= 6 and not set(commands) - readme, set(commands) - readme
    drawn = cv2.imread(str(work / "predict.jpg"))
    photo = cv2.imread(str(photo_path("t1")))
    assert drawn.shape[1] == photo.shape[1] and drawn.shape[0] > photo.shape[0]  # the legend's band
