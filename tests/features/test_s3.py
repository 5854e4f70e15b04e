"""A store in S3 for real: moto's standalone S3 server on loopback, `agepipe extract --store
s3://...` on a local Dask cluster, then features list/show and train reading it back.
Credentials and endpoint come from the usual environment variables, as a user would set them."""
import json

import pytest
from click.testing import CliRunner

from agepipe.cli import cli

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture
def s3(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_extract_into_s3_resumes_and_reads_back(s3, tmp_path):
    data = tmp_path / "data"
    run("download", "--dataset", "sample", "--data-dir", data)
    common = ("extract", "--dataset", "sample", "--data-dir", data, "--store", "s3://bucket/store",
              "--workers", 1, "--shard-rows", 32)
    out = run(*common)
    assert "2 to do (54 rows), 0 already finished" in out
    shards = {p: s3.info(p)["ETag"] for p in s3.glob("bucket/store/*/sample/part-*.parquet")}
    assert len(shards) == 2
    [index_path] = s3.glob("bucket/store/*/sample/_index.json")
    index = json.loads(s3.cat(index_path))
    assert index["rows"] == 54 and sorted(s["file"] for s in index["shards"]) == sorted(p.rsplit("/", 1)[-1] for p in shards)
    # a rerun resumes: nothing to do, no shard rewritten
    assert "0 to do (0 rows), 2 already finished (54 rows)" in run(*common)
    s3.invalidate_cache()
    assert {p: s3.info(p)["ETag"] for p in s3.glob("bucket/store/*/sample/part-*.parquet")} == shards
    listed = run("features", "list", "--store", "s3://bucket/store")
    name = listed.split()[0]
    assert f"{name}  sample: 54 rows" in listed
    shown = run("features", "show", name, "--store", "s3://bucket/store")
    assert "sample: 54 rows" in shown
    out_dir = tmp_path / "runs" / "gender"
    run("train", "--store", "s3://bucket/store", "--dataset", "sample", "--task", "gender", "--out", out_dir,
        "--epochs", 1)
    record = json.loads((out_dir / "config.json").read_text())
    assert sum(record["data"]["split_sizes"].values()) > 40
    # nothing but the index, the shards and feature_set.json in the bucket: reads wrote nothing
    s3.invalidate_cache()
    names = sorted(p.split("/", 3)[-1] for p in s3.find("bucket/store"))
    assert names == sorted(["feature_set.json", "sample/_index.json",
                            *(p.split("/", 3)[-1] for p in shards)])
