"""A store in S3 for real: moto's standalone S3 server on loopback, `agepipe extract --store
s3://...` on a local Dask cluster, then features list/show and train reading it back.
Credentials and endpoint come from the usual environment variables, as a user would set them."""
import json
import urllib.request

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
    # moto keeps its buckets per process, not per server: an earlier test's bucket would be there
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    fs.endpoint = endpoint
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    reset_auth(endpoint, "inf")
    server.stop()


def reset_auth(endpoint, after_requests):
    """moto checks credentials against its IAM after this many more requests ("inf": never)."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=after_requests.encode(),
                                                  headers={"Content-Type": "text/plain"}, method="POST")).read()


def test_extract_into_s3_resumes_and_reads_back(s3, tmp_path, monkeypatch):
    data = tmp_path / "data"
    run("download", "--dataset", "sample", "--data-dir", data)
    common = ("extract", "--dataset", "sample", "--data-dir", data, "--store", "s3://bucket/store",
              "--workers", 1, "--shard-rows", 32)
    out = run(*common)
    assert "2 to do (58 rows), 0 already finished" in out
    shards = {p: s3.info(p)["ETag"] for p in s3.glob("bucket/store/*/sample/part-*.parquet")}
    assert len(shards) == 2
    [index_path] = s3.glob("bucket/store/*/sample/_index.json")
    index = json.loads(s3.cat(index_path))
    assert index["rows"] == 58 and sorted(s["file"] for s in index["shards"]) == sorted(p.rsplit("/", 1)[-1] for p in shards)
    # a rerun resumes: nothing to do, no shard rewritten
    assert "0 to do (0 rows), 2 already finished (58 rows)" in run(*common)
    s3.invalidate_cache()
    assert {p: s3.info(p)["ETag"] for p in s3.glob("bucket/store/*/sample/part-*.parquet")} == shards
    listed = run("features", "list", "--store", "s3://bucket/store")
    name = listed.split()[0]
    assert f"{name}  sample: 58 rows" in listed
    shown = run("features", "show", name, "--store", "s3://bucket/store")
    assert "sample: 58 rows" in shown
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

    # a reader whose credentials may only read the bucket
    import boto3

    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": ["arn:aws:s3:::bucket", "arn:aws:s3:::bucket/*"]}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    reset_auth(s3.endpoint, "0")
    s3fs.S3FileSystem.clear_instance_cache()
    reader = s3fs.S3FileSystem(skip_instance_cache=True)
    with pytest.raises(PermissionError):
        reader.pipe("bucket/store/probe", b"a write")
    assert f"{name}  sample: 58 rows" in run("features", "list", "--store", "s3://bucket/store")
    run("train", "--store", "s3://bucket/store", "--dataset", "sample", "--task", "gender",
        "--out", tmp_path / "runs" / "read-only", "--epochs", 1)
    assert json.loads((tmp_path / "runs" / "read-only" / "config.json").read_text())["data"]["split_sizes"] == \
        record["data"]["split_sizes"]


def test_a_store_in_s3_without_credentials_is_one_sentence(s3, monkeypatch):
    # It ended in botocore's NoCredentialsError traceback.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    result = CliRunner().invoke(cli, ["features", "list", "--store", "s3://bucket/store"])
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert result.output.startswith("Error: the object store: Unable to locate credentials; give credentials as "
                                    "README.md's \"S3 and other object stores\" says"), result.output
