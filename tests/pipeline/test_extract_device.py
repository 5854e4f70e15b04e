"""`agepipe extract --runtime torch`: the device-resident pipeline through the CLI and the --gpus
cluster (on the CPU here, as `--gpus 0 --device cpu`), against the onnxruntime path."""
import json

import numpy as np
import pytest

from tests.pipeline.test_extract import assert_each_manifest_row_once, assert_matches_embed, extract, the_feature_set
from tests.test_faults import run_inprocess


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


@pytest.mark.parametrize("crashing", [3, 1])
def test_decoders_that_crash_on_every_photo_stop_the_run(photos, tmp_path, monkeypatch, crashing):
    """A decode process that dies on every photo (/dev/shm filled by another process after its check:
    each write to the shared slot a SIGBUS) made each row worker_lost, and the run ended as if done,
    where on the CPU path a crash on every photo stops the run (not the photos' fault). Now a call
    none of whose photos got decoded, some crashing, fails as a dead worker would: redone photo by
    photo, each such photo a lost worker, and a shard none of whose photos gets through stops the run.
    One crashing photo among decoded ones is still that photo's worker_lost row."""
    import functools

    from agepipe.features import decoders, gpu
    from agepipe.pipeline import extract as ex
    from tests.features import crashing_decoder
    from tests.pipeline.conftest import write_manifest

    root = tmp_path / "data" / "mini"
    root.mkdir(parents=True)
    names = [f"{'crash' if i < crashing else 'fine'}-{i}.jpg" for i in range(3)]
    for name in names:
        (root / name).write_bytes(photos["obama"].read_bytes())
    write_manifest(root, [{"image_id": name, "subject_id": "s", "fold": 0, "age": 30.0, "age_bin": 4,
                           "gender": 1, "face_hint": None, "status": "ok"} for name in names])
    monkeypatch.setattr(ex, "_EMBEDDERS", {})
    monkeypatch.setattr(gpu, "ProcessDecoders", functools.partial(decoders.ProcessDecoders,
                                                                   decode=crashing_decoder.decode_into))
    cfg = ex.ExtractConfig(pack="buffalo_s", runtime="torch", batch_size=2, decode_threads=1, decoders="processes")
    store = tmp_path / "store"
    try:
        if crashing == 1:
            [result] = run_inprocess(tmp_path / "data", store, cfg)
            assert result["status"] == {"worker_lost": 1, "ok": 2}
            return
        with pytest.raises(ex.ExtractError, match="every photo that reached the models failed"):
            run_inprocess(tmp_path / "data", store, cfg)
    finally:
        for pipeline in ex._EMBEDDERS.values():
            pipeline.close()
    assert not list(store.glob("**/part-*.parquet"))
