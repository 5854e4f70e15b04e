"""The store's contracts through the real CLI: the sample dataset's real photos, real models,
real Dask worker processes."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.features import store as fstore


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    run("download", "--dataset", "sample", "--data-dir", data)
    return data


def test_the_readme_sequence_holds_each_row_once(sample_data, tmp_path):
    """`--shard-rows 16 --limit 40`, then a plain run: 58 rows, not 40 + 58 - 16 = 82, in the
    first cut's 16-row shards (the two it finished kept)."""
    store = tmp_path / "store"
    common = ("--dataset", "sample", "--data-dir", sample_data, "--store", store, "--workers", 1)
    out = run("extract", *common, "--shard-rows", 16, "--limit", 40)
    assert "3 to do (40 rows)" in out
    [name] = fstore.list_feature_sets(str(store))
    assert f"{name}  sample: 40 rows" in run("features", "list", "--store", store)
    out = run("extract", *common)
    assert "2 to do (26 rows), 2 already finished (32 rows)" in out  # rows 32-39 redone in shard 32-47
    manifest = pq.read_table(sample_data / "sample" / "manifest.parquet").to_pandas()
    assert len(manifest) == 58
    assert f"{name}  sample: 58 rows" in run("features", "list", "--store", store)
    rows = fstore.read_table(str(store), name, "sample").to_pandas()
    assert sorted(rows.image_id) == sorted(manifest.image_id)
    assert len(list((store / name / "sample").glob("part-*.parquet"))) == 4  # the 8-row shard is gone
    index = json.loads((store / name / "sample" / "_index.json").read_text())
    assert index["rows"] == 58 and [s["rows"] for s in index["shards"]] == [16, 16, 16, 10]
    # train sees each usable row once
    out_dir = tmp_path / "runs" / "gender"
    run("train", "--store", store, "--dataset", "sample", "--task", "gender", "--out", out_dir, "--epochs", 1)
    record = json.loads((out_dir / "config.json").read_text())
    usable = ((rows.status == "ok") & (rows.gender >= 0)).sum()
    assert sum(record["data"]["split_sizes"].values()) == usable and usable > 40
    # another --shard-rows cuts anew, replacing the cut: still 58 rows; a plain rerun keeps that cut
    assert "1 to do (58 rows), 0 already finished" in run("extract", *common, "--shard-rows", 58)
    assert len(fstore.read_table(str(store), name, "sample")) == 58
    assert "0 to do (0 rows), 1 already finished (58 rows)" in run("extract", *common)
    assert "4 to do (58 rows), 0 already finished" in run("extract", *common, "--shard-rows", 16)
    assert "0 to do (0 rows), 4 already finished (58 rows)" in run("extract", *common)
    # a deleted shard: readers refuse, naming what to run; extract redoes just that shard
    victim = fstore.shard_files(str(store), name, "sample")[2]
    (store / name / "sample" / victim.rsplit("/", 1)[-1]).unlink()
    result = CliRunner().invoke(cli, ["features", "list", "--store", str(store)])
    assert result.exit_code == 1 and "is missing; run `agepipe extract --dataset sample`" in result.output
    result = CliRunner().invoke(cli, ["train", "--store", str(store), "--dataset", "sample", "--task", "gender",
                                      "--out", str(tmp_path / "runs" / "x"), "--epochs", 1])
    assert result.exit_code == 1 and "is missing; run `agepipe extract --dataset sample`" in result.output
    assert "1 to do (16 rows), 3 already finished (42 rows)" in run("extract", *common)
    assert len(fstore.read_table(str(store), name, "sample")) == 58


@pytest.fixture(scope="module")
def sample_store(sample_data, tmp_path_factory):
    store = tmp_path_factory.mktemp("readers") / "store"
    run("extract", "--dataset", "sample", "--data-dir", sample_data, "--store", store, "--workers", 1,
        "--shard-rows", 16)
    [name] = fstore.list_feature_sets(str(store))
    return store, name


def by_image(image_ids, statuses, embeddings) -> dict:
    return {i: (s, np.asarray(e, np.float32)) for i, s, e in zip(image_ids, statuses, embeddings)}


def test_pandas_pyarrow_duckdb_polars_and_datasets_read_the_same_store(sample_store, tmp_path):
    import pandas as pd
    import pyarrow.dataset as ds

    # The readers come with the test extra, not with test-base (the lowest-versions environment).
    datasets, duckdb, pl = (pytest.importorskip(m) for m in ("datasets", "duckdb", "polars"))

    store, name = sample_store
    folder = store / name / "sample"
    files = fstore.shard_files(str(store), name, "sample")
    assert len(files) == 4
    ours = fstore.read_table(str(store), name, "sample")
    feats = fstore.load_features(str(store), name, "sample")
    expected = by_image(ours["image_id"].to_pylist(), ours["status"].to_pylist(),
                        np.stack(ours["embedding"].to_numpy(zero_copy_only=False)))
    ok = {i for i, (s, _) in expected.items() if s == "ok"}
    assert len(expected) == 58 and len(ok) == len(feats.rows) > 40
    for i, e in zip(feats.rows.image_id, feats.embeddings):
        assert np.array_equal(expected[i][1], e)

    df = pd.read_parquet(folder)  # the folder as a whole: _index.json is skipped
    table = ds.dataset(folder).to_table()
    duck = duckdb.sql(f"select image_id, status, embedding from read_parquet({[str(f) for f in files]})").arrow()
    duck = duck.read_all() if hasattr(duck, "read_all") else duck
    polars = pl.read_parquet(files)
    hf = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                               cache_dir=str(tmp_path / "hf")).with_format("numpy")
    readers = {
        "pandas": by_image(df.image_id, df.status, df.embedding),
        "pyarrow.dataset": by_image(table["image_id"].to_pylist(), table["status"].to_pylist(),
                                    table["embedding"].to_numpy(zero_copy_only=False)),
        "duckdb": by_image(duck["image_id"].to_pylist(), duck["status"].to_pylist(),
                           duck["embedding"].to_numpy(zero_copy_only=False)),
        "polars": by_image(polars["image_id"].to_list(), polars["status"].to_list(), polars["embedding"].to_numpy()),
        "datasets": by_image(hf["image_id"], hf["status"], hf["embedding"]),
    }
    for reader, got in readers.items():
        assert got.keys() == expected.keys(), reader
        for i, (status, emb) in expected.items():
            assert got[i][0] == status, (reader, i)
            assert got[i][1].shape == (fstore.EMBEDDING_DIM,), (reader, i)
            if i in ok:
                assert np.array_equal(got[i][1], emb), (reader, i)
            else:
                assert np.isnan(got[i][1]).all(), (reader, i)  # NaN-filled, not null
