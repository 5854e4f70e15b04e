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
    """`--shard-rows 16 --limit 40`, then a plain run: 54 rows, not 40 + 54 - 16 = 78."""
    store = tmp_path / "store"
    common = ("--dataset", "sample", "--data-dir", sample_data, "--store", store, "--workers", 1)
    out = run("extract", *common, "--shard-rows", 16, "--limit", 40)
    assert "3 to do (40 rows)" in out
    [name] = fstore.list_feature_sets(str(store))
    assert f"{name}  sample: 40 rows" in run("features", "list", "--store", store)
    out = run("extract", *common)
    assert "1 to do (54 rows), 0 already finished" in out
    manifest = pq.read_table(sample_data / "sample" / "manifest.parquet").to_pandas()
    assert len(manifest) == 54
    assert f"{name}  sample: 54 rows" in run("features", "list", "--store", store)
    rows = fstore.read_table(str(store), name, "sample").to_pandas()
    assert sorted(rows.image_id) == sorted(manifest.image_id)
    assert len(list((store / name / "sample").glob("part-*.parquet"))) == 1  # the first cut is gone
    index = json.loads((store / name / "sample" / "_index.json").read_text())
    assert index["rows"] == 54 and [s["rows"] for s in index["shards"]] == [54]
    # train sees each usable row once
    out_dir = tmp_path / "runs" / "gender"
    run("train", "--store", store, "--dataset", "sample", "--task", "gender", "--out", out_dir, "--epochs", 1)
    record = json.loads((out_dir / "config.json").read_text())
    usable = ((rows.status == "ok") & (rows.gender >= 0)).sum()
    assert sum(record["data"]["split_sizes"].values()) == usable and usable > 40
    # a rerun with the first cut's shard size resumes nothing from the old cut, now gone, and
    # replaces the cut again: still 54 rows
    out = run("extract", *common, "--shard-rows", 16)
    assert "4 to do (54 rows), 0 already finished" in out
    assert len(fstore.read_table(str(store), name, "sample")) == 54
    assert "0 to do (0 rows), 4 already finished (54 rows)" in run("extract", *common, "--shard-rows", 16)
    # a deleted shard: readers refuse, naming what to run; extract redoes just that shard
    victim = fstore.shard_files(str(store), name, "sample")[2]
    (store / name / "sample" / victim.rsplit("/", 1)[-1]).unlink()
    result = CliRunner().invoke(cli, ["features", "list", "--store", str(store)])
    assert result.exit_code == 1 and "is missing; run `agepipe extract --dataset sample`" in result.output
    result = CliRunner().invoke(cli, ["train", "--store", str(store), "--dataset", "sample", "--task", "gender",
                                      "--out", str(tmp_path / "runs" / "x"), "--epochs", 1])
    assert result.exit_code == 1 and "is missing; run `agepipe extract --dataset sample`" in result.output
    assert "1 to do (16 rows), 3 already finished (38 rows)" in run("extract", *common, "--shard-rows", 16)
    assert len(fstore.read_table(str(store), name, "sample")) == 54
