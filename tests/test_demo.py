"""`agepipe demo` end to end: the whole chain on the offline sample, in a temporary folder."""
import json

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.features import store as fstore
from agepipe.train.checkpoint import load_checkpoint


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
    # the runs wrote checkpoints that load
    for task in ("age", "gender"):
        model, config = load_checkpoint(work / "runs" / task)
        assert config["task"] == task
        assert (work / "runs" / task / "report.md").exists()
    # predict wrote JSON and an image
    predictions = json.loads((work / "predict.json").read_text())
    faces = predictions[0]["faces"]
    assert len(faces) == 6
    for face in faces:
        assert 0 <= face["gender"]["p_male"] <= 1
        assert np.isfinite(face["age"]["expected_age"])
    assert (work / "predict.jpg").stat().st_size > 10_000
