"""`agepipe extract --runtime torch`: the device-resident pipeline through the CLI and the --gpus
cluster (on the CPU here, as `--gpus 0 --device cpu`), against the onnxruntime path."""
import json

import numpy as np
import pytest

from tests.pipeline.test_extract import assert_each_manifest_row_once, assert_matches_embed, extract, the_feature_set


@pytest.mark.parametrize("decoders", ["threads", "processes"])  # processes: spawned by the Dask GPU worker
def test_gpus_runtime_torch_matches_onnxruntime_row_for_row(mini_data, tmp_path, embedder, decoders):
    store = tmp_path / "store"
    result = extract(mini_data, store, "--gpus", "0", "--device", "cpu", "--runtime", "torch",
                     "--shard-rows", 8, "--batch-size", 5, "--decoders", decoders)
    assert result.exit_code == 0, result.output
    assert "cluster: gpus, 1 worker processes, GPUs 0" in result.output
    assert "torch on cpu" in result.output
    rows = assert_each_manifest_row_once(mini_data, store)
    status = dict(zip(rows.image_id, rows.status))
    assert status["photos/bad.jpg"] == "decode_error"
    assert status["photos/gone.jpg"] == "missing_image"
    assert (rows.status == "bad_label").sum() == 1
    assert rows[rows.image_id.str.contains("t1")].n_faces.tolist() == [6, 6]
    assert rows[rows.status != "ok"].embedding.map(lambda e: np.isnan(e).all()).all()  # NaN, never null
    assert_matches_embed(mini_data, rows, embedder)  # same face, box within 1 px, cosine >= 0.999
    info = json.loads((store / the_feature_set(store) / "feature_set.json").read_text())
    stages = info["stats"]["stage_seconds"]
    assert stages["detect"] > 0 and stages["embed"] > 0 and stages["write"] > 0
