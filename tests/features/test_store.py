"""The feature store's contracts: no nulls inside fixed-size lists, old files still read."""
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agepipe.datasets.manifest import write_manifest
from agepipe.features import store as fstore
from agepipe.pipeline.extract import manifest_table

FS = "fs-test"


def shard_rows(n: int, start: int = 0, seed: int = 0, ok_every: int = 3, nulls: bool = False) -> pa.Table:
    """A shard's table: every ``ok_every``-th row has no face. With ``nulls`` the lists of
    those rows are null, as agepipe 0.1.0 wrote them; else NaN-filled."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, fstore.EMBEDDING_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ok = np.arange(n) % ok_every != 0
    def lists(values, width):
        if nulls:
            if int(pa.__version__.split(".")[0]) < 26:   # the lowest-versions environment (.ci/run)
                pytest.skip(f"pyarrow {pa.__version__} cannot read a fixed_size_list column with nulls")
            return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(values, np.float32).reshape(-1)), width,
                                                     mask=pa.array(~ok))
        return fstore.fixed_list(values, width, ok)
    return pa.table({
        "image_id": [f"img/{start + i:05d}.jpg" for i in range(n)],
        "subject_id": [f"s{(start + i) // 3}" for i in range(n)],
        "fold": pa.array((np.arange(n) + start) % 5, pa.int8()),
        "age": pa.array(np.full(n, 30.0), pa.float32()),
        "age_bin": pa.array(np.full(n, 4), pa.int8()),
        "gender": pa.array(np.arange(n) % 2, pa.int8()),
        "face_hint": pa.nulls(n, pa.list_(pa.float32(), 4)) if nulls else fstore.fixed_list(np.zeros((n, 4)), 4, np.zeros(n, bool)),
        "status": np.where(ok, "ok", "no_face").tolist(),
        "n_faces": pa.array(ok.astype(np.int16)),
        "det_score": pa.array(np.where(ok, 0.9, np.nan), pa.float32()),
        "bbox": lists(np.tile([1, 2, 3, 4], (n, 1)), 4),
        "landmarks": lists(np.ones((n, 10)), 10),
        "embedding": lists(emb, fstore.EMBEDDING_DIM),
        "embedding_norm": pa.array(np.where(ok, 20.0, np.nan), pa.float32()),
    }), emb, ok


def assert_no_nulls_in_lists(path):
    table = pq.read_table(path)
    lists = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
    assert lists
    for name in lists:
        column = table[name]
        assert column.null_count == 0, name
        assert all(chunk.values.null_count == 0 for chunk in column.chunks), name
    meta = pq.ParquetFile(path).metadata
    for j in range(meta.num_columns):
        col = meta.row_group(0).column(j)
        if col.path_in_schema.split(".")[0] in lists and col.statistics is not None:
            assert col.statistics.null_count == 0, col.path_in_schema


def write_cut(root, table, shard_rows, dataset="d"):
    """Shards of ``shard_rows`` rows, committed as the dataset's content."""
    return fstore.write_dataset(table, str(root), FS, dataset, shard_rows, "m")


def test_rows_without_a_value_hold_nan_never_null(tmp_path):
    table, emb, ok = shard_rows(12, nulls=True)  # even a table with nulls is written without
    write_cut(tmp_path, table, 12)
    [path] = fstore.shard_files(str(tmp_path), FS, "d")
    assert_no_nulls_in_lists(path)
    back = pq.read_table(path)
    emb_back = np.stack(back["embedding"].to_numpy(zero_copy_only=False))
    assert np.isnan(emb_back[~ok]).all() and np.array_equal(emb_back[ok], emb[ok])
    assert back["status"].to_pylist() == np.where(ok, "ok", "no_face").tolist()
    feats = fstore.load_features(str(tmp_path), FS, "d")
    assert np.array_equal(feats.embeddings, emb[ok])


def test_manifest_face_hint_is_nan_filled_and_old_manifests_read(tmp_path):
    frame = pd.DataFrame({"image_id": ["a.jpg", "b.jpg"], "subject_id": ["x", "y"], "fold": [0, 1],
                          "age": [30.0, np.nan], "age_bin": [4, -1], "gender": [1, -1],
                          "face_hint": [None, [1.0, 2.0, 30.0, 40.0]], "status": ["ok", "ok"]})
    path = write_manifest(frame, tmp_path / "new" / "manifest.parquet")
    assert_no_nulls_in_lists(path)
    hints = manifest_table(str(tmp_path), "new")["face_hint"].to_pylist()
    assert np.isnan(hints[0]).all() and hints[1] == [1.0, 2.0, 30.0, 40.0]
    # a manifest as agepipe 0.1.0 wrote it: a null face_hint
    if int(pa.__version__.split(".")[0]) < 26:   # the lowest-versions environment (.ci/run)
        pytest.skip(f"pyarrow {pa.__version__} cannot read a fixed_size_list column with nulls")
    old = pa.Table.from_pandas(frame, preserve_index=False).cast(fstore.MANIFEST_SCHEMA)
    (tmp_path / "old").mkdir()
    pq.write_table(old, tmp_path / "old" / "manifest.parquet")
    assert pq.read_table(tmp_path / "old" / "manifest.parquet")["face_hint"].null_count == 1
    assert manifest_table(str(tmp_path), "old")["face_hint"].to_pylist()[1] == [1.0, 2.0, 30.0, 40.0]


def test_a_store_written_with_nulls_still_loads(tmp_path):
    """A store as agepipe 0.1.0 wrote it: part-NNNNN.parquet with null lists, no index."""
    root = tmp_path / FS / "d"
    root.mkdir(parents=True)
    parts = [shard_rows(7, start=0, seed=1, nulls=True), shard_rows(5, start=7, seed=2, nulls=True)]
    for i, (table, _, _) in enumerate(parts):
        pq.write_table(table.cast(fstore.SHARD_SCHEMA), root / f"part-{i:05d}.parquet")
    assert pq.read_table(root / "part-00000.parquet")["embedding"].null_count > 0
    feats = fstore.load_features(str(tmp_path), FS, "d")
    expected = np.concatenate([emb[ok] for _, emb, ok in parts])
    assert np.array_equal(feats.embeddings, expected)
    assert list(feats.rows.image_id) == [f"img/{i:05d}.jpg" for i in (1, 2, 4, 5, 8, 9, 11)]
    assert fstore.status_counts(str(tmp_path), FS) == {"d": {"no_face": 3 + 2, "ok": 4 + 3}}


def test_shards_of_an_extract_that_never_committed_are_refused_not_read(tmp_path):
    """A first extract killed before its commit leaves finished shards and no index: they may
    hold part of the manifest only, so a reader refuses them instead of loading what is there."""
    table, emb, ok = shard_rows(12)
    path = fstore.write_shard(table.slice(0, 8), str(tmp_path), FS, "d", 0)  # shard 1 of 2, then the crash
    with pytest.raises(fstore.StoreError, match=r"/d: the extract that wrote these shards has not finished.*"
                                                r"agepipe extract --dataset d"):
        fstore.load_features(str(tmp_path), FS, "d")
    assert fstore.status_counts(str(tmp_path), FS) == {}  # over all datasets: not there yet, not an error
    entries = [fstore.ShardEntry(Path(path).name, 0, 8, fstore.rows_digest(table.slice(0, 8)))]
    second = fstore.write_shard(table.slice(8), str(tmp_path), FS, "d", 1)  # the rerun's shard and commit
    entries.append(fstore.ShardEntry(Path(second).name, 8, 4, fstore.rows_digest(table.slice(8))))
    fstore.commit_shards(str(tmp_path), FS, "d", entries, "m", None)
    assert np.array_equal(fstore.load_features(str(tmp_path), FS, "d").embeddings, emb[ok])


# --- exactly once: the index --------------------------------------------------------------

def test_a_new_cut_replaces_the_old_one_whole(tmp_path):
    table, emb, ok = shard_rows(40)
    write_cut(tmp_path, table.slice(0, 30), 16)  # a first run with --limit 30 --shard-rows 16
    assert fstore.status_counts(str(tmp_path), FS)["d"] == {"no_face": 10, "ok": 20}
    old = set(fstore.shard_files(str(tmp_path), FS, "d"))
    write_cut(tmp_path, table, 1000)             # then the whole manifest in one shard
    feats = fstore.load_features(str(tmp_path), FS, "d")
    assert np.array_equal(feats.embeddings, emb[ok])
    assert list(feats.rows.image_id) == [f"img/{i:05d}.jpg" for i in np.flatnonzero(ok)]
    [new] = fstore.shard_files(str(tmp_path), FS, "d")
    assert new not in old and sorted(p.name for p in (tmp_path / FS / "d").glob("part-*")) == [new.rsplit("/", 1)[-1]]
    assert sum(fstore.status_counts(str(tmp_path), FS)["d"].values()) == 40


def test_write_dataset_takes_a_table_of_other_types_than_the_store_s(tmp_path):
    """A tool's table as pandas gives it (ages float64, folds int64): the index records the
    digest of the rows as the shard holds them (float32, int8), so the store reads. (It recorded
    the uncast table's: 33.3 as float64 is another number than as float32, and every reader
    refused the shard as holding other rows than the index lists.)"""
    table, emb, ok = shard_rows(6)
    table = table.set_column(table.schema.get_field_index("age"), "age", pa.array(np.full(6, 33.3)))
    table = table.set_column(table.schema.get_field_index("fold"), "fold", pa.array(np.arange(6) % 5))
    write_cut(tmp_path, table, 4)
    feats = fstore.load_features(str(tmp_path), FS, "d")
    assert np.array_equal(feats.embeddings, emb[ok])
    assert np.allclose(feats.rows.age, 33.3)


def test_a_deleted_or_damaged_shard_is_refused_naming_what_to_run(tmp_path):
    table, _, _ = shard_rows(30)
    write_cut(tmp_path, table, 10)
    first, second, _ = fstore.shard_files(str(tmp_path), FS, "d")
    (tmp_path / FS / "d" / second.rsplit("/", 1)[-1]).unlink()
    with pytest.raises(fstore.StoreError, match=r"d: shard part-00001-\w+\.parquet listed in _index\.json is "
                                                r"missing; run `agepipe extract --dataset d`"):
        fstore.load_features(str(tmp_path), FS, "d")
    write_cut(tmp_path, table, 10)
    path = fstore.shard_files(str(tmp_path), FS, "d")[0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(fstore.StoreError, match=re_escape(path) + r": cannot read this shard .*"
                                                "run `agepipe extract --dataset d` to redo it"):
        fstore.load_features(str(tmp_path), FS, "d")
    open(path, "wb").write(b"not parquet at all" * 100)  # garbage
    with pytest.raises(fstore.StoreError, match=re_escape(path)):
        fstore.status_counts(str(tmp_path), FS)


def test_a_shard_damaged_before_its_footer_is_to_be_deleted_not_only_rerun(tmp_path):
    """A rerun knows a finished shard by its footer (shard_digests), so one whose data pages are
    damaged and footer whole was trusted again: the reader said to rerun extract, which kept it."""
    table, _, _ = shard_rows(30)
    write_cut(tmp_path, table, 10)
    path = fstore.shard_files(str(tmp_path), FS, "d")[0]
    before = fstore.shard_digests(str(tmp_path), path)
    data = bytearray(open(path, "rb").read())
    data[4:400] = bytes(396)  # the first column's pages zeroed; the footer at the end untouched
    open(path, "wb").write(bytes(data))
    assert fstore.shard_digests(str(tmp_path), path) == before  # what a rerun checks: still "finished"
    with pytest.raises(fstore.StoreError, match=re_escape(path) + r": cannot read this shard .*; delete it, "
                                                r"then run `agepipe extract --dataset d` to redo it"):
        fstore.load_features(str(tmp_path), FS, "d")


def test_a_dataset_folder_that_cannot_be_listed_is_one_sentence(tmp_path, monkeypatch):
    """fs.glob walked past a folder it could not list (no shard found, silently); fs.ls raises."""
    import fsspec.implementations.local as local

    table, _, _ = shard_rows(30)
    write_cut(tmp_path, table, 10)
    listing = local.LocalFileSystem.ls

    def refusing(self, path, *args, **kwargs):  # as a user without read permission meets it (tests run as root)
        if str(path).rstrip("/").endswith(f"{FS}/d"):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(self, path, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "ls", refusing)
    with pytest.raises(fstore.StoreError, match=r"d: cannot list this folder \(Permission denied\); fix its permissions"):
        fstore.rows_on_disk(str(tmp_path), FS, "d")


def test_a_shard_that_cannot_be_opened_for_access_is_not_called_damaged(tmp_path, monkeypatch):
    """No permission (or a lost connection) says nothing of the file: deleting the shard, the advice
    for damage, would throw away a finished one."""
    table, _, _ = shard_rows(30)
    write_cut(tmp_path, table, 10)

    def refused(*args, **kwargs):  # as a user without read permission meets it (tests run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fstore.pq, "ParquetFile", refused)
    with pytest.raises(fstore.StoreError, match="Permission denied.*fix access to it") as e:
        fstore.load_features(str(tmp_path), FS, "d")
    assert "delete it" not in str(e.value)


@pytest.mark.parametrize("at", ["index", "labels", "embeddings"])
def test_a_commit_while_a_reader_reads_is_said_as_that_not_as_damage(tmp_path, monkeypatch, at):
    """An extract that commits a new cut while train, table or evaluate reads the old one deletes the
    old cut's shards right after: the reader, past the index, finds a listed shard gone (before its
    check, or before it opens it for labels or embeddings). It said the store was damaged and to
    redo the extract (one is running: its lock refuses a second); it says the index changed while
    it read and to rerun the command. A shard gone with the index unchanged is still damage."""
    table, emb, ok = shard_rows(30)
    write_cut(tmp_path, table, 10)
    hooked = {"index": "read_index", "labels": "read_shard_file", "embeddings": "read_embeddings"}[at]
    original, committed = getattr(fstore, hooked), []

    def commit_first(*args, **kwargs):
        result = original(*args, **kwargs) if at == "index" else None  # the reader has the old index
        if not committed:
            committed.append(True)
            write_cut(tmp_path, table, 15)  # another extract's commit: the old cut's shards are deleted
        return result if at == "index" else original(*args, **kwargs)

    monkeypatch.setattr(fstore, hooked, commit_first)
    with pytest.raises(fstore.IndexChanged, match=r"d/_index\.json: an `agepipe extract` committed a new cut of d "
                                                  r"while this command read it.*rerun the command"):
        fstore.load_features(str(tmp_path), FS, "d")
    monkeypatch.undo()
    assert np.array_equal(fstore.load_features(str(tmp_path), FS, "d").embeddings, emb[ok])  # the rerun


def re_escape(text):
    import re

    return re.escape(text)


def test_an_index_whose_shards_overlap_or_leave_rows_out_is_refused(tmp_path):
    table, _, _ = shard_rows(20)
    index = write_cut(tmp_path, table, 10)
    a, b = index.shards
    import dataclasses
    import json

    path = tmp_path / FS / "d" / "_index.json"
    raw = json.loads(path.read_text())
    raw["shards"][1]["start"] = 5
    path.write_text(json.dumps(raw))
    with pytest.raises(fstore.StoreError, match="shards overlap at row 5.*agepipe extract --dataset d"):
        fstore.load_features(str(tmp_path), FS, "d")
    raw["shards"][1]["start"] = 12
    path.write_text(json.dumps(raw))
    with pytest.raises(fstore.StoreError, match="leave out manifest rows at row 10"):
        fstore.load_features(str(tmp_path), FS, "d")
    # a shard swapped for one with other rows under a listed name
    raw["shards"][1] = dataclasses.asdict(dataclasses.replace(b, file=a.file, start=10))
    path.write_text(json.dumps(raw))
    with pytest.raises(fstore.StoreError, match="holds other rows than _index.json lists"):
        fstore.load_features(str(tmp_path), FS, "d")


@pytest.mark.parametrize("damage", [{"start": "10"}, {"rows": None}, {"rows": -10}, {"file": 3}, {"digest": []},
                                    {"file": "../../elsewhere/part-00001-0badf00d.parquet"}])
def test_an_index_entry_of_the_wrong_type_is_refused_and_replaced(tmp_path, damage):
    """An index entry whose values are valid JSON of the wrong type, or a file outside the
    dataset's folder: readers refuse it with a sentence naming the index and what to run, and a
    writer replaces it. (A TypeError or AttributeError traceback came out of load_features,
    `features list` and the rerun of extract meant to repair it.)"""
    import json

    table, emb, ok = shard_rows(20)
    write_cut(tmp_path, table, 10)
    path = tmp_path / FS / "d" / "_index.json"
    raw = json.loads(path.read_text())
    raw["shards"][1].update(damage)
    path.write_text(json.dumps(raw))
    with pytest.raises(fstore.StoreError, match=re_escape(str(path)) + ": not a readable shard index.*"
                                                "agepipe extract --dataset d"):
        fstore.load_features(str(tmp_path), FS, "d")
    assert fstore.index_to_replace(str(tmp_path), FS, "d") is None
    write_cut(tmp_path, table, 10)
    assert np.array_equal(fstore.load_features(str(tmp_path), FS, "d").embeddings, emb[ok])


def test_a_store_without_index_holding_a_row_twice_is_refused(tmp_path):
    """agepipe 0.1.0's README sequence left two cuts side by side; such a store is refused."""
    root = tmp_path / FS / "d"
    root.mkdir(parents=True)
    table, _, _ = shard_rows(20)
    pq.write_table(table.slice(0, 16).cast(fstore.SHARD_SCHEMA), root / "part-00000.parquet")
    pq.write_table(table.slice(16, 4).cast(fstore.SHARD_SCHEMA), root / "part-00001.parquet")
    assert len(fstore.load_features(str(tmp_path), FS, "d").rows) == 13
    pq.write_table(table.cast(fstore.SHARD_SCHEMA), root / "part-00002.parquet")
    with pytest.raises(fstore.StoreError, match=r"'img/00000.jpg' is in two shards.*agepipe extract --dataset d"):
        fstore.load_features(str(tmp_path), FS, "d")


def test_a_store_without_index_holding_a_file_of_other_columns_is_refused_naming_it(tmp_path):
    """A Parquet file of other columns among agepipe 0.1.0's shards (another tool's output saved
    there): readers refuse it naming the file and what to run, not with a KeyError traceback."""
    root = tmp_path / FS / "d"
    root.mkdir(parents=True)
    table, _, _ = shard_rows(4)
    pq.write_table(table.cast(fstore.SHARD_SCHEMA), root / "part-00000.parquet")
    pq.write_table(pa.table({"image_id": ["x.jpg"], "status": ["ok"]}), root / "part-00001.parquet")
    for read in (lambda: fstore.load_features(str(tmp_path), FS, "d"), lambda: fstore.status_counts(str(tmp_path), FS),
                 lambda: fstore.read_table(str(tmp_path), FS, "d")):
        with pytest.raises(fstore.StoreError, match=re_escape(str(root / "part-00001.parquet")) +
                           r": not a shard of this store .*agepipe extract --dataset d"):
            read()


def _record_runs(store: str, dataset: str, n: int) -> None:
    for i in range(n):
        fstore.update_feature_set_info(store, FS, lambda info: info.setdefault("runs", []).append(f"{dataset}-{i}"))


def test_extracts_of_different_datasets_keep_each_others_feature_set_records(tmp_path):
    """Two extracts (different datasets, so different writer locks) finishing together both
    update feature_set.json: without the feature set's lock one's read-modify-write drops the
    other's record."""
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_record_runs, args=(str(tmp_path), d, 40)) for d in ("adience", "imdb", "wiki")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    runs = fstore.read_feature_set_info(str(tmp_path), FS)["runs"]
    assert sorted(runs) == sorted(f"{d}-{i}" for d in ("adience", "imdb", "wiki") for i in range(40))
    assert fstore.list_datasets(str(tmp_path), FS) == []  # the lock is a file, not a dataset


def test_one_writer_at_a_time_and_no_commit_over_an_index_it_did_not_read(tmp_path):
    with fstore.writer_lock(str(tmp_path), FS, "d"):
        with pytest.raises(fstore.StoreError, match="another `agepipe extract` is writing"):
            with fstore.writer_lock(str(tmp_path), FS, "d"):
                pass
    with fstore.writer_lock(str(tmp_path), FS, "d"):  # released
        pass
    table, _, _ = shard_rows(10)
    first = write_cut(tmp_path, table, 5)
    second = write_cut(tmp_path, table, 10)
    with pytest.raises(fstore.StoreError, match="changed while this run worked"):
        fstore.commit_shards(str(tmp_path), FS, "d", first.shards, "m", first.generation)
    assert fstore.read_index(str(tmp_path), FS, "d") == second


def test_write_dataset_holds_the_writer_lock_from_its_first_shard(tmp_path, monkeypatch):
    """Another writer (an extract, a tool) that commits while write_dataset writes its shards is
    refused; before, the lock was taken for the commit alone: the other's commit deleted the shards
    written so far as unlisted, and write_dataset then committed an index listing them, missing."""
    table, emb, ok = shard_rows(20)
    other, _, _ = shard_rows(20, seed=1)
    write_shard, refused = fstore.write_shard, []

    def write_shard_then_another_writer(*args, **kwargs):
        path = write_shard(*args, **kwargs)
        if not refused:
            refused.append("once")
            with pytest.raises(fstore.StoreError, match="another `agepipe extract` is writing"):
                write_cut(tmp_path, other, 20)
        return path

    monkeypatch.setattr(fstore, "write_shard", write_shard_then_another_writer)
    write_cut(tmp_path, table, 10)
    assert refused
    assert np.array_equal(fstore.load_features(str(tmp_path), FS, "d").embeddings, emb[ok])


def test_a_read_only_store_loads_and_reading_writes_nothing(tmp_path):
    """chmod -R a-w, then read. (As root the modes do not stop a write, so the test also
    checks that no file or folder changed: agepipe 0.1.0 left an .arrow/ copy here.)"""
    import stat

    table, emb, ok = shard_rows(25)
    write_cut(tmp_path, table, 10)

    def tree():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [tmp_path, *tmp_path.rglob("*")])

    before = tree()
    paths = [tmp_path, *tmp_path.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        assert np.array_equal(fstore.load_features(str(tmp_path), FS, "d").embeddings, emb[ok])
        assert np.array_equal(fstore.load_features(str(tmp_path), FS, "d", folds=[1, 2]).embeddings,
                              emb[ok & np.isin(np.arange(25) % 5, [1, 2])])
        assert fstore.status_counts(str(tmp_path), FS)["d"]["ok"] == int(ok.sum())
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert tree() == before


def test_the_cli_says_which_shard_is_broken_without_a_traceback(tmp_path):
    from click.testing import CliRunner

    from agepipe.cli import cli

    table, _, _ = shard_rows(30)
    write_cut(tmp_path, table, 10)
    fstore.write_feature_set_info(str(tmp_path), FS, {"pack": "buffalo_s", "det_size": 640})
    path = fstore.shard_files(str(tmp_path), FS, "d")[1]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    for args in (["features", "show", FS], ["features", "list"],
                 ["train", "--feature-set", FS, "--dataset", "d", "--task", "gender", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(cli, [*args, "--store", str(tmp_path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        assert f"Error: {path}: cannot read this shard" in result.output, args
        assert "run `agepipe extract --dataset d` to redo it" in result.output and "Traceback" not in result.output


def test_a_store_url_fsspec_cannot_open_is_one_sentence(tmp_path, monkeypatch):
    """--store gs://... without gcsfs installed (README: "any fsspec URL whose package is
    installed"), or a scheme fsspec does not know, ended in fsspec's ImportError or ValueError
    traceback; it is one sentence naming the store and what fsspec said (exit 1)."""
    import importlib

    from click.testing import CliRunner

    from agepipe.cli import cli

    registry = importlib.import_module("fsspec.registry")  # a scheme whose package is not installed, as gs:// without gcsfs
    monkeypatch.setitem(registry.known_implementations, "agepipetest",
                        {"class": "agepipe_no_such_module.FileSystem",
                         "err": "Please install agepipe-no-such-package to access it"})
    for store, said in (("agepipetest://bucket/store", "Please install agepipe-no-such-package to access it"),
                        ("nosuchscheme://bucket/store", "Protocol not known: nosuchscheme")):
        for args in (["features", "list"],
                     ["train", "--dataset", "d", "--task", "gender", "--out", str(tmp_path / "run")]):
            result = CliRunner().invoke(cli, [*args, "--store", store])
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
            assert f"Error: {store}: fsspec cannot open it ({said})" in result.output, (args, result.output)


def test_features_of_a_store_that_is_not_there_says_so(tmp_path):
    """A mistyped --store (no such folder, or a file) read "no feature sets in X" with exit 0, as an
    empty store does: a script taking the first word as a feature set's name got "no". `features
    show` said "no feature set 'NAME' in X (known: none)", as if the store were there."""
    from click.testing import CliRunner

    from agepipe.cli import cli

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    for store in (tmp_path / "nope", tmp_path / "file"):
        for args in (["features", "list"], ["features", "show", FS]):
            result = CliRunner().invoke(cli, [*args, "--store", str(store)])
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert f"Error: no feature store at {store} (no such folder)" in result.output, args
    result = CliRunner().invoke(cli, ["features", "list", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 0 and result.output == f"no feature sets in {tmp_path / 'empty'}\n"
    result = CliRunner().invoke(cli, ["features", "show", FS, "--store", str(tmp_path / "empty")])
    assert result.exit_code == 1 and f"no feature set '{FS}' in {tmp_path / 'empty'} (known: none)" in result.output


@pytest.mark.parametrize("text", ['{"pack": "buffalo_s", "det_', "[]"])
def test_a_damaged_feature_set_json_is_refused_naming_it(tmp_path, text):
    """feature_set.json cut short (a copy interrupted) or not an object: `features show`, train
    and extract's update say which file, in one sentence. (show and train ended in a JSON or
    attribute error traceback or message naming no file; extract's said 'Expecting value: line 1'.)"""
    from click.testing import CliRunner

    from agepipe.cli import cli

    table, _, _ = shard_rows(30)
    write_cut(tmp_path, table, 10)
    path = Path(fstore.feature_set_json_path(str(tmp_path), FS))
    path.write_text(text)
    for args in (["features", "show", FS],
                 ["train", "--feature-set", FS, "--dataset", "d", "--task", "gender", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(cli, [*args, "--store", str(tmp_path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        assert f"Error: {path}: not a readable feature set record" in result.output, args
    with pytest.raises(fstore.StoreError, match=re_escape(str(path)) + ": not a readable feature set record"):
        fstore.update_feature_set_info(str(tmp_path), FS, lambda info: None)
    assert path.read_text() == text  # kept as it was, for its owner to restore


def test_a_dataset_named_twice_is_read_once(tmp_path):
    """load_features(..., ["d", "d"]) (train --dataset imdb-wiki --dataset imdb) read every row of d
    twice: duplicated rows in training and in the test fold's metrics."""
    table, _, ok = shard_rows(10)
    fstore.write_dataset(table, str(tmp_path), FS, "d", shard_rows=4)
    assert len(fstore.load_features(str(tmp_path), FS, ["d", "d"]).rows) == int(ok.sum())
    assert fstore.read_table(str(tmp_path), FS, ["d", "d"]).num_rows == 10


def test_features_shows_every_dataset_whatever_state_another_is_in(tmp_path):
    """One damaged dataset made `features list` and `show` fail without a word of the others, and
    one whose first extract had not committed read "no shards yet" though its shards were there."""
    from click.testing import CliRunner

    from agepipe.cli import cli

    table, _, ok = shard_rows(30)
    write_cut(tmp_path, table, 10, dataset="good")
    write_cut(tmp_path, table, 10, dataset="broken")
    fstore.write_shard(table, str(tmp_path), FS, "unfinished", 0)
    fstore.write_feature_set_info(str(tmp_path), FS, {"pack": "buffalo_s", "det_size": 640})
    path = fstore.shard_files(str(tmp_path), FS, "broken")[1]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    for args in (["features", "list"], ["features", "show", FS]):
        result = CliRunner().invoke(cli, [*args, "--store", str(tmp_path)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "good: 30 rows" in result.output, result.output
        assert "broken: cannot be read (below)" in result.output and f"Error: {path}: cannot read" in result.output
        assert "unfinished: not committed yet" in result.output


def read_only(folder) -> list[str]:
    """A command prefix that runs a command where ``folder`` is mounted read-only (a mount namespace
    of its own; root ignores file modes). Skips where that is not allowed."""
    import subprocess

    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" "{folder}" && exec "$@"',
              "sh"]
    try:
        probe = subprocess.run([*prefix, "sh", "-c", f'! touch "{folder}/.probe" 2>/dev/null'], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode:
        pytest.skip("needs unshare -m and mount (root in a container)")
    return prefix


def test_a_read_only_store_refuses_a_writer_in_one_sentence_and_still_reads(tmp_path):
    """A store on a read-only mount: the writer lock was a PermissionError/OSError traceback (an
    extract's first write); it is now StoreError naming the folder. Readers read as before."""
    import subprocess
    import sys

    table, emb, ok = shard_rows(25)
    write_cut(tmp_path, table, 10)
    script = f"""
from agepipe.features import store as fstore
for dataset in ("d", "new"):  # a dataset folder with its lock file, and one not made yet
    try:
        with fstore.writer_lock({str(tmp_path)!r}, {FS!r}, dataset):
            print("locked")
    except fstore.StoreError as e:
        print("refused:", e)
print("ok rows:", len(fstore.load_features({str(tmp_path)!r}, {FS!r}, "d").rows))
"""
    result = subprocess.run([*read_only(tmp_path), sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused", "refused", "ok rows"], result.stdout
    assert f"{tmp_path}/{FS}/d: cannot write" in lines[0] and f"{tmp_path}/{FS}/new: cannot write" in lines[1]
    assert "--store" in lines[0] and lines[2] == f"ok rows: {int(ok.sum())}"


def test_temporaries_of_a_writer_killed_mid_write_are_removed_by_the_next(tmp_path):
    """open_atomic names its temporaries .NAME.<id>.tmp: the next writer removed the shards' only,
    never the index's or feature_set.json's of a client killed while it wrote them."""
    table, _, _ = shard_rows(5)
    write_cut(tmp_path, table, 10)
    folder = tmp_path / FS / "d"
    junk = [folder / ".part-00000-0123abcd.parquet.deadbeef.tmp", folder / "._index.json.deadbeef.tmp",
            tmp_path / FS / ".feature_set.json.deadbeef.tmp"]
    for path in junk:
        path.write_text("half")
    assert fstore.remove_stale_temporaries(str(tmp_path), FS, "d") == 2
    fstore.update_feature_set_info(str(tmp_path), FS, lambda info: info.update(runs=[]))
    assert not [p for p in junk if p.exists()]
    assert sorted(p.name for p in tmp_path.rglob(".*")) == [".lock", ".lock"]


def test_a_store_on_an_object_store_whose_path_holds_glob_characters_is_written_and_recut(tmp_path):
    """fsspec's generic mv and rm (an object store's, here the memory file system's) read a [, *
    or ? as a pattern: no shard could be committed under 's3://bucket/store [1]', and a re-cut
    could not delete the old cut's shards."""
    fsspec = pytest.importorskip("fsspec")
    root = f"memory://{tmp_path.name}/store [1]*?"
    table, emb, ok = shard_rows(12)
    try:
        write_cut(root, table, 4)
        write_cut(root, table, 6)
        listed = [p.rsplit("/", 1)[-1] for p in fstore.shard_files(root, FS, "d")]
        fs = fsspec.filesystem("memory")
        folder = f"/{tmp_path.name}/store [1]*?/{FS}/d"
        on_disk = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False) if "/part-" in p)
        assert on_disk == sorted(listed) and len(listed) == 2
        assert np.array_equal(fstore.load_features(root, FS, "d").embeddings, emb[ok])
    finally:
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


def test_a_store_whose_path_holds_glob_characters_finds_its_shards(tmp_path):
    """A store at /data/store [1]: the shards were found with fs.glob on the whole path, which
    read the "[1]" as a pattern and found none, so a new cut never deleted the old one (pandas
    reading the folder counted each row twice), a rerun found no finished shard, and a reader
    took shards no index lists for no shards at all."""
    root = tmp_path / "store [1]"
    table, emb, ok = shard_rows(12)
    write_cut(root, table, 4)
    write_cut(root, table, 6)  # a re-cut: the old cut's shards go
    folder = root / FS / "d"
    listed = [p.rsplit("/", 1)[-1] for p in fstore.shard_files(str(root), FS, "d")]
    assert sorted(p.name for p in folder.glob("part-*")) == sorted(listed) and len(listed) == 2
    assert len(pd.read_parquet(folder)) == 12
    assert sum(len(found) for found in fstore.shards_on_disk(str(root), FS, "d").values()) == 2
    assert fstore.rows_on_disk(str(root), FS, "d") == 12
    (folder / ".part-00000-0123abcd.parquet.deadbeef.tmp").write_text("half")
    assert fstore.remove_stale_temporaries(str(root), FS, "d") == 1
    (folder / "_index.json").unlink()  # as if the extract stopped before its commit
    with pytest.raises(fstore.UnfinishedExtract):
        fstore.load_features(str(root), FS, "d")
