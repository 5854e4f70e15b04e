"""`agepipe extract` end to end on real photos, real models and real Dask worker processes."""
import json
import re
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.features import store as fstore
from agepipe.features.images import read_photo
from agepipe.train.data import stale_labels
from tests.conftest import chosen_face


def extract(data, store, *args):
    result = CliRunner().invoke(cli, ["extract", "--dataset", "mini", "--data-dir", str(data),
                                      "--store", str(store), *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def the_feature_set(store):
    [name] = fstore.list_feature_sets(str(store))
    return name


def store_rows(store):
    return fstore.read_table(str(store), the_feature_set(store), "mini").to_pandas()


def assert_each_manifest_row_once(data, store):
    manifest = pq.read_table(Path(data) / "mini" / "manifest.parquet").to_pandas()
    rows = store_rows(store)
    assert len(rows) == len(manifest)
    assert sorted(rows.image_id) == sorted(manifest.image_id)  # each exactly once, nothing else
    return rows


def assert_matches_embed(data, rows, embedder, expected_ok=16):
    """Each ok row holds the face `agepipe embed` finds and the policy chooses for that photo."""
    ok = rows[rows.status == "ok"]
    assert len(ok) == expected_ok
    for image_id, emb, bbox in zip(ok.image_id, ok.embedding, ok.bbox):
        photo = read_photo(str(Path(data) / "mini" / image_id))
        expected = chosen_face(embedder, photo.pixels)
        assert float(np.asarray(emb) @ expected.embedding) >= 0.999, image_id
        np.testing.assert_allclose(np.asarray(bbox), expected.bbox, atol=1.0)


def test_local_cluster_extracts_every_row_once_with_statuses(mini_data, tmp_path, embedder):
    store = tmp_path / "store"
    result = extract(mini_data, store, "--shard-rows", 5, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "cluster: local, 2 worker processes" in result.output
    rows = assert_each_manifest_row_once(mini_data, store)
    status = dict(zip(rows.image_id, rows.status))
    assert status["photos/bad.jpg"] == "decode_error"
    assert status["photos/gone.jpg"] == "missing_image"
    assert (rows.status == "bad_label").sum() == 1  # the manifest's own status is kept
    assert rows[rows.image_id.str.contains("t1")].n_faces.max() == 6
    assert all(np.isnan(e).all() for e in rows[rows.status != "ok"].embedding)  # NaN-filled, never null
    assert_matches_embed(mini_data, rows, embedder)
    info = json.loads((store / the_feature_set(store) / "feature_set.json").read_text())
    assert info["counts"]["mini"]["ok"] == 16
    assert set(info["stats"]["stage_seconds"]) == {"decode", "detect", "align", "embed", "write"}
    assert info["detector_sha256"] and info["pack"] == "buffalo_s"
    # a rerun finds every shard finished and does nothing
    again = extract(mini_data, store, "--shard-rows", 5, "--workers", 2)
    assert "0 to do (0 rows), 4 already finished (19 rows)" in again.output


def test_interrupted_run_resumes_to_the_same_rows(mini_data, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert extract(mini_data, whole, "--shard-rows", 4, "--workers", 1).exit_code == 0
    # an interruption: a first run over the first rows, then a half-written shard left behind
    assert extract(mini_data, resumed, "--shard-rows", 4, "--workers", 1, "--limit", 9).exit_code == 0
    name = the_feature_set(resumed)
    junk = resumed / name / "mini" / ".part-00003.parquet.deadbeef.tmp"
    junk.write_bytes(b"PAR1 half a shard")
    # without --shard-rows: the cut's own (the default size would cut every shard anew, every photo read again)
    result = extract(mini_data, resumed, "--workers", 1)
    assert "3 to do (11 rows), 2 already finished (8 rows)" in result.output  # shard 2 held 1 row, now 4
    assert not junk.exists()
    a, b = store_rows(whole), store_rows(resumed)
    assert list(a.image_id) == list(b.image_id) and list(a.status) == list(b.status)
    ok = a.status == "ok"
    np.testing.assert_allclose(np.stack(a.embedding[ok]), np.stack(b.embedding[ok]), atol=1e-6)


def test_a_run_stopped_before_its_first_commit_resumes_in_its_own_cut(mini_data, tmp_path):
    """A first extract with --shard-rows that stopped before its commit (no index yet) leaves its
    shards; a rerun without --shard-rows cut at the default size, and read every photo again."""
    store = tmp_path / "store"
    assert extract(mini_data, store, "--shard-rows", 4, "--workers", 1).exit_code == 0
    (store / the_feature_set(store) / "mini" / "_index.json").unlink()  # as if it never committed
    shards = lambda: sorted(p.name for p in (store / the_feature_set(store) / "mini").glob("part-*"))  # noqa: E731
    before = shards()
    result = extract(mini_data, store, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "0 to do (0 rows), 5 already finished (19 rows)" in result.output
    assert shards() == before and len(before) == 5  # kept, and committed as they are
    assert_each_manifest_row_once(mini_data, store)


def test_a_dataset_whose_photos_are_all_absent_stops_before_any_row(mini_data, tmp_path):
    """A manifest without its photos (not unpacked, another --data-dir) is a setup error: it
    became a "missing_image" row for every photo, which reruns kept even once the photos came."""
    import shutil

    data = tmp_path / "data"
    (data / "mini").mkdir(parents=True)
    shutil.copy(mini_data / "mini" / "manifest.parquet", data / "mini")
    store = tmp_path / "store"
    result = extract(data, store, "--workers", 1)
    assert result.exit_code == 1
    assert re.search(r"/mini: none of the first \d+ photos its manifest lists is there \(the first: .*/mini/photos/",
                     result.output), result.output
    assert not list(store.glob("**/part-*.parquet")) and not list(store.glob("**/_index.json"))


def test_a_setup_error_records_no_feature_set(mini_data, tmp_path):
    """An extract stopped by a setup error (photos absent, models that do not load) lists no
    feature set: one recorded before the checks stayed listed with no rows, and `agepipe train`
    without --feature-set then refused a store whose only data was another feature set's."""
    import shutil

    data = tmp_path / "data"
    (data / "mini").mkdir(parents=True)
    shutil.copy(mini_data / "mini" / "manifest.parquet", data / "mini")
    store = tmp_path / "store"
    assert extract(data, store, "--workers", 1, "--det-size", 320).exit_code == 1
    assert fstore.list_feature_sets(str(store)) == []


def test_a_damaged_other_dataset_does_not_fail_this_datasets_extract(mini_data, tmp_path):
    """Another dataset of the feature set whose store is damaged is that dataset's problem: an
    extract of this one committed its rows, then counted every dataset's and ended in exit 1 with
    the other's error, its run not recorded."""
    store = tmp_path / "store"
    assert extract(mini_data, store, "--workers", 1, "--limit", 3).exit_code == 0
    other = store / the_feature_set(store) / "other"
    other.mkdir()
    (other / "_index.json").write_text('{"shards": [')
    result = extract(mini_data, store, "--workers", 1, "--limit", 4)
    assert result.exit_code == 0, result.output
    info = json.loads((store / the_feature_set(store) / "feature_set.json").read_text())
    assert sum(info["counts"]["mini"].values()) == 4 and info["runs"][-1]["limit"] == 4


def test_a_smaller_limit_never_shrinks_what_the_store_holds(mini_data, tmp_path):
    """--limit on a store that holds more of the dataset would commit the first rows and delete
    the rest: refused before any work, the store untouched; a larger --limit grows it."""
    store = tmp_path / "store"
    assert extract(mini_data, store, "--workers", 1, "--limit", 4, "--shard-rows", 2).exit_code == 0
    shards = sorted((store / the_feature_set(store) / "mini").glob("part-*.parquet"))
    result = extract(mini_data, store, "--workers", 1, "--limit", 3, "--shard-rows", 2)
    assert result.exit_code == 1
    assert "holds 4 rows; --limit 3 would replace them with the first 3" in result.output
    assert sorted((store / the_feature_set(store) / "mini").glob("part-*.parquet")) == shards
    assert len(store_rows(store)) == 4
    assert extract(mini_data, store, "--workers", 1, "--limit", 6, "--shard-rows", 2).exit_code == 0
    assert len(store_rows(store)) == 6


@pytest.mark.parametrize("damage", ["index damaged", "not committed"])
def test_a_smaller_limit_never_shrinks_rows_no_readable_index_lists(mini_data, tmp_path, damage):
    """Shards on disk that no readable index lists (a damaged _index.json, or an extract stopped
    before its commit) are rows the writer plans from: the check counted only an index's rows, so
    --limit 3 committed the first 3 and deleted every other shard, hours of work at scale."""
    store = tmp_path / "store"
    assert extract(mini_data, store, "--workers", 1, "--limit", 4, "--shard-rows", 2).exit_code == 0
    folder = store / the_feature_set(store) / "mini"
    if damage == "index damaged":
        (folder / "_index.json").write_text('{"shards": [')
    else:
        (folder / "_index.json").unlink()
    shards = sorted(folder.glob("part-*.parquet"))
    result = extract(mini_data, store, "--workers", 1, "--limit", 3, "--shard-rows", 2)
    assert result.exit_code == 1, result.output
    assert "holds 4 rows; --limit 3 would replace them" in result.output
    assert sorted(folder.glob("part-*.parquet")) == shards


def test_a_smaller_limit_keeps_the_shards_of_an_extract_that_stopped_before_its_commit(mini_data, tmp_path):
    """The index lists 4 rows (an earlier --limit 4); a full extract wrote every shard and stopped
    before its commit. A --limit 6 run would commit 6 rows and delete the rest of those shards,
    which a rerun without --limit keeps."""
    import shutil

    store, whole = tmp_path / "store", tmp_path / "whole"
    assert extract(mini_data, store, "--workers", 1, "--limit", 4, "--shard-rows", 2).exit_code == 0
    assert extract(mini_data, whole, "--workers", 1, "--shard-rows", 2).exit_code == 0
    folder = store / the_feature_set(store) / "mini"
    for shard in (whole / the_feature_set(whole) / "mini").glob("part-*.parquet"):  # written, not committed
        shutil.copy(shard, folder)
    shards = sorted(folder.glob("part-*.parquet"))
    result = extract(mini_data, store, "--workers", 1, "--limit", 6, "--shard-rows", 2)
    assert result.exit_code == 1 and "holds 19 rows; --limit 6 would replace them" in result.output, result.output
    assert sorted(folder.glob("part-*.parquet")) == shards
    rerun = extract(mini_data, store, "--workers", 1, "--shard-rows", 2)  # keeps every one of them
    assert "0 to do (0 rows), 10 already finished (19 rows)" in rerun.output
    assert len(store_rows(store)) == 19


def test_a_limit_that_cuts_nothing_is_not_refused(mini_data, tmp_path):
    """A manifest rebuilt with fewer rows than the store holds: extract without --limit takes the
    new manifest, and so must a --limit that cuts none of it; it was refused, blaming the limit."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    store = tmp_path / "store"
    assert extract(data, store, "--workers", 1, "--limit", 4).exit_code == 0
    manifest = data / "mini" / "manifest.parquet"
    pq.write_table(pq.read_table(manifest).slice(0, 3), manifest)
    for limit in (3, 10):
        result = extract(data, store, "--workers", 1, "--limit", limit)
        assert result.exit_code == 0, result.output
        assert len(store_rows(store)) == 3


def test_the_index_records_the_manifest_as_it_was_read(mini_data, tmp_path, monkeypatch):
    """A manifest rebuilt while extract runs (between its read and the plan, which hashed it):
    the index must record the file whose rows it holds, or training takes the store's labels
    for the new file's and never warns."""
    import shutil

    from agepipe.hashing import file_sha256
    from agepipe.pipeline import extract as ex

    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    manifest = data / "mini" / "manifest.parquet"
    read = file_sha256(manifest)
    real = ex.manifest_table

    def read_then_rebuilt(data_dir, dataset):
        table = real(data_dir, dataset)
        pq.write_table(pq.read_table(manifest).replace_schema_metadata({"rebuilt": "since"}), manifest)
        return table

    monkeypatch.setattr(ex, "manifest_table", read_then_rebuilt)
    store = tmp_path / "store"
    assert extract(data, store, "--workers", 1, "--limit", 2).exit_code == 0
    index = fstore.read_index(str(store), the_feature_set(store), "mini")
    assert file_sha256(manifest) != read and index.manifest_sha256 == read


def test_a_dataset_named_twice_is_extracted_once(mini_data, tmp_path):
    """--dataset mini --dataset mini (or imdb-wiki and imdb) took the dataset's lock twice and stopped
    with "another `agepipe extract` is writing", though none was."""
    store = tmp_path / "store"
    result = extract(mini_data, store, "--dataset", "mini", "--workers", 1, "--limit", 3)
    assert result.exit_code == 0, result.output
    assert len(store_rows(store)) == 3


def test_a_second_extract_of_a_dataset_is_refused_before_its_cluster_starts(mini_data, tmp_path):
    """It said "another `agepipe extract` is writing" only once its own Dask cluster had started,
    seconds in (minutes on a GPU node loading its models)."""
    store = tmp_path / "store"
    assert extract(mini_data, store, "--workers", 1, "--limit", 2).exit_code == 0
    with fstore.writer_lock(str(store), the_feature_set(store), "mini"):  # the first extract, still running
        result = extract(mini_data, store, "--workers", 1, "--limit", 3)
    assert result.exit_code == 1 and "another `agepipe extract` is writing" in result.output, result.output
    assert "Dask cluster" not in result.output
    assert len(store_rows(store)) == 2


def test_feature_set_json_keeps_its_creation_time(mini_data, tmp_path):
    """feature_set.json's "created" (shown by `agepipe features show`) was the last extract's start."""
    store = tmp_path / "store"
    assert extract(mini_data, store, "--workers", 1, "--limit", 2).exit_code == 0
    path = store / the_feature_set(store) / "feature_set.json"
    created = json.loads(path.read_text())["created"]
    time.sleep(1.1)
    assert extract(mini_data, store, "--workers", 1, "--limit", 3).exit_code == 0
    info = json.loads(path.read_text())
    assert info["created"] == created and len(info["runs"]) == 2
    # What ran each extract is its run's (the top level keeps only the last run's)
    assert [(r["runtime"], r["device"], r["cluster"]["workers"]) for r in info["runs"]] == [("onnxruntime", "cpu", 1)] * 2
    assert all(r["versions"]["pyarrow"] == info["versions"]["pyarrow"] for r in info["runs"])
    assert info["versions"]["opencv"] == cv2.__version__


def test_features_show_keeps_the_last_extract_that_ran_photos_over_a_rerun_with_nothing_to_do(mini_data, tmp_path):
    """A rerun that found every shard finished made `features show` print its own record, raw JSON
    of 0 images/s and 0 s per stage, in place of the extract that made the feature set."""
    store = tmp_path / "store"
    for _ in range(2):
        rerun = extract(mini_data, store, "--workers", 1, "--limit", 2)
        assert rerun.exit_code == 0
    # the rerun's own summary: not "0 rows in 0.0 s" over a store that holds them
    assert "this run: nothing to extract; the rows below are in the store from earlier runs" in rerun.output
    assert "mini: 2 rows in the store" in rerun.output, rerun.output
    result = CliRunner().invoke(cli, ["features", "show", the_feature_set(store), "--store", str(store)])
    assert result.exit_code == 0, result.output
    [line] = [s for s in result.output.splitlines() if "last extract" in s]
    found = re.search(r"last extract: mini: 2 rows in [0-9.]+ s, ([0-9.]+) images/s, finished 20", line)
    assert found and float(found[1]) > 0 and "{" not in line, line  # the first run's, not the rerun's 0
    # the stages in the order extract's own summary gives them (feature_set.json sorts its keys)
    assert re.search(r"time per stage \(summed over workers\): decode [0-9.]+ s, detect [0-9.]+ s, align [0-9.]+ s, "
                     r"embed [0-9.]+ s, write [0-9.]+ s$", line), line


def test_a_manifest_changed_where_the_row_digest_does_not_look_redoes_those_shards(mini_data, tmp_path):
    """A rebuilt manifest gives one row another status and another row another age_bin: the
    ids, subjects, folds, ages and genders (the rows digest) are unchanged. Only the two shards
    holding them are redone, and the store says what the manifest now says. (Both shards were
    kept as finished, with the old status and age_bin.)"""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    store = tmp_path / "store"
    assert extract(data, store, "--shard-rows", 5, "--workers", 1).exit_code == 0
    path = data / "mini" / "manifest.parquet"
    manifest = pq.read_table(path)
    rows = manifest.to_pylist()
    embedded = set(store_rows(store).query("status == 'ok'").image_id)
    ok = [i for i, r in enumerate(rows) if r["image_id"] in embedded]
    rows[ok[0]]["status"] = "bad_label"         # shard 0 (rows 0-4)
    rows[ok[-1]]["age_bin"] = (rows[ok[-1]]["age_bin"] + 1) % 8   # the last shard
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest.schema), path)
    result = extract(data, store, "--shard-rows", 5, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "2 to do (9 rows), 2 already finished (10 rows)" in result.output
    now = store_rows(store).set_index("image_id")
    changed, relabelled = rows[ok[0]]["image_id"], rows[ok[-1]]["image_id"]
    assert now.loc[changed, "status"] == "bad_label" and np.isnan(now.loc[changed, "embedding"]).all()
    assert now.loc[relabelled, "age_bin"] == rows[ok[-1]]["age_bin"] and now.loc[relabelled, "status"] == "ok"
    again = extract(data, store, "--shard-rows", 5, "--workers", 1)
    assert "0 to do (0 rows), 4 already finished (19 rows)" in again.output


def test_a_manifest_whose_labels_alone_changed_relabels_its_shards_without_reading_a_photo(mini_data, tmp_path):
    """A manifest rebuilt after a label fix (new subjects and folds, a corrected gender and age)
    holds the same photos: the shards holding changed rows are rewritten under the new labels with
    their results kept, so their photos are not read again (here they are gone from disk, and
    they stay "ok" with their embeddings); the other shards are left alone."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    store = tmp_path / "store"
    assert extract(data, store, "--shard-rows", 5, "--workers", 1).exit_code == 0
    before = store_rows(store).set_index("image_id")
    assert stale_labels(str(store), the_feature_set(store), ["mini"]) == []
    path = data / "mini" / "manifest.parquet"
    manifest = pq.read_table(path)
    rows = manifest.to_pylist()
    for r in rows[5:10]:                                    # shard 1: another subject and fold for each
        r["subject_id"], r["fold"] = f"{r['subject_id']}-fixed", (r["fold"] + 1) % 5
    rows[11]["gender"], rows[11]["age"] = 1 - rows[11]["gender"], 33.0    # shard 2: one row's labels
    # Shard 3 recorded no inputs (written before they were): a label and a status changed there,
    # so its old statuses cannot be trusted under the new labels. It is extracted again.
    legacy = fstore.shard_files(str(store), the_feature_set(store), "mini")[3]
    table = pq.read_table(legacy)
    pq.write_table(table.replace_schema_metadata({b"agepipe.rows": table.schema.metadata[b"agepipe.rows"]}), legacy)
    dropped = next(i for i in range(15, 19) if rows[i]["status"] == "ok" and before.loc[rows[i]["image_id"], "status"] == "ok")
    rows[15]["subject_id"], rows[dropped]["status"] = f"{rows[15]['subject_id']}-fixed", "duplicate"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest.schema), path)
    for r in rows[5:15]:
        (data / "mini" / r["image_id"]).unlink(missing_ok=True)
    # Until extract runs again, training says its labels may not be the manifest's.
    [stale] = stale_labels(str(store), the_feature_set(store), ["mini"])
    assert stale.startswith(f"mini: its manifest ({path}) has changed since") and "agepipe extract --dataset mini" in stale
    result = extract(data, store, "--shard-rows", 5, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "3 to do (14 rows), 1 already finished (5 rows); 2 of those to do only relabelled" in result.output
    assert "10 of them kept from finished shards" in result.output
    now = assert_each_manifest_row_once(data, store).set_index("image_id")
    assert now.loc[rows[dropped]["image_id"], "status"] == "duplicate"
    for r in rows:
        got = now.loc[r["image_id"]]
        assert (got.subject_id, got.fold, got.gender) == (r["subject_id"], r["fold"], r["gender"]), r["image_id"]
        if r["image_id"] != rows[dropped]["image_id"]:
            assert got.status == before.loc[r["image_id"], "status"], r["image_id"]  # not "missing_image"
    ok = (before.status == "ok").to_numpy() & (before.index != rows[dropped]["image_id"])
    assert ok[5:15].any()
    np.testing.assert_array_equal(np.stack(now.embedding[ok]), np.stack(before.embedding[ok]))
    assert now.loc[rows[11]["image_id"], "age"] == 33.0
    assert len(fstore.shard_files(str(store), the_feature_set(store), "mini")) == 4  # the old two deleted
    assert len(list((store / the_feature_set(store) / "mini").glob("part-*.parquet"))) == 4
    again = extract(data, store, "--shard-rows", 5, "--workers", 1)
    assert "0 to do (0 rows), 4 already finished (19 rows)" in again.output
    assert stale_labels(str(store), the_feature_set(store), ["mini"]) == []


def test_the_stale_labels_warning_gives_the_extract_that_relabels_the_cut_it_warns_of(mini_data, tmp_path):
    """The warning said `agepipe extract --dataset mini` of a store cut with --shard-rows 5: run as
    given, under the default shard size, it cut every shard anew and read every photo again, not
    the relabelling without reading a photo that it promised."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    store = tmp_path / "store"
    assert extract(data, store, "--shard-rows", 5, "--workers", 1).exit_code == 0
    path = data / "mini" / "manifest.parquet"
    manifest = pq.read_table(path)
    rows = manifest.to_pylist()
    rows[6]["gender"] = 1 - rows[6]["gender"]
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest.schema), path)
    [stale] = stale_labels(str(store), the_feature_set(store), ["mini"])
    command = re.search(r"`agepipe extract --dataset mini([^`]*)`", stale).group(1).split()
    result = extract(data, store, *command, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "1 to do (5 rows), 3 already finished (14 rows); 1 of those to do only relabelled" in result.output
    assert stale_labels(str(store), the_feature_set(store), ["mini"]) == []


def extract_with_a_lost_photo(mini_data, store):
    """The mini dataset in two 10-row shards, its shard 0 committed again with its third photo
    "worker_lost"; returns the feature set, that shard's table, its inputs digest and its path."""
    assert extract(mini_data, store, "--shard-rows", 10, "--workers", 1).exit_code == 0
    name = the_feature_set(store)
    index = fstore.read_index(str(store), name, "mini")
    first = fstore.shard_files(str(store), name, "mini")[0]
    table = pq.read_table(first)
    status = table["status"].to_pylist()
    status[2] = "worker_lost"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    _, made_from = fstore.shard_digests(str(store), first)
    lost = fstore.write_shard(table, str(store), name, "mini", 0, made_from)
    fstore.commit_shards(str(store), name, "mini", [replace(index.shards[0], file=Path(lost).name), index.shards[1]],
                         index.manifest_sha256, index.generation)
    return name, table, made_from, lost


def test_retry_failed_redoes_only_transient_rows(mini_data, tmp_path):
    store = tmp_path / "store"
    name, table, made_from, lost = extract_with_a_lost_photo(mini_data, store)
    assert "0 to do (0 rows), 2 already finished" in extract(mini_data, store, "--shard-rows", 10, "--workers", 1).output
    # Retrying reads photos: from a --data-dir without them the run stops, the store unchanged.
    elsewhere = tmp_path / "elsewhere" / "mini"
    elsewhere.mkdir(parents=True)
    (elsewhere / "manifest.parquet").write_bytes((mini_data / "mini" / "manifest.parquet").read_bytes())
    stopped = extract(elsewhere.parent, store, "--shard-rows", 10, "--workers", 1, "--retry-failed")
    assert stopped.exit_code == 1 and "none of the first" in stopped.output, stopped.output
    assert fstore.shard_files(str(store), name, "mini")[0] == lost
    result = extract(mini_data, store, "--shard-rows", 10, "--workers", 1, "--retry-failed")
    assert "2 to do (19 rows)" in result.output  # and the shard holding photos/gone.jpg (missing_image)
    first = fstore.shard_files(str(store), name, "mini")[0]
    assert first != lost and pq.read_table(first)["status"].to_pylist()[2] == "ok"
    assert len(list((store / name / "mini").glob("part-*.parquet"))) == 2  # the rewritten one is gone
    assert_each_manifest_row_once(mini_data, store)


def test_retry_failed_commits_the_shard_it_wrote_not_a_killed_retrys_leftover(mini_data, tmp_path):
    """A --retry-failed run killed before its commit left its shard 0, whose failed photo had failed
    again (worker_lost); the next --retry-failed redoes shard 0 and the photo goes through: its
    commit lists the shard it wrote. (It listed whichever file holding those rows sorted first,
    here the leftover, so the photo stayed worker_lost after a run that had redone it.)"""
    store = tmp_path / "store"
    name, table, made_from, lost = extract_with_a_lost_photo(mini_data, store)
    leftover = Path(fstore.write_shard(table, str(store), name, "mini", 0, made_from))  # the killed retry's
    leftover = leftover.rename(leftover.with_name("part-00000-00000000.parquet"))         # sorts first
    result = extract(mini_data, store, "--shard-rows", 10, "--workers", 1, "--retry-failed")
    assert result.exit_code == 0, result.output
    assert pq.read_table(fstore.shard_files(str(store), name, "mini")[0])["status"].to_pylist()[2] == "ok"
    assert not leftover.exists()
    assert_each_manifest_row_once(mini_data, store)


def test_retry_failed_redoes_photos_that_were_missing_and_have_arrived(mini_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    late = next(p for p in sorted((data / "mini" / "photos").rglob("*.jpg")) if "bad" not in p.name)
    held = tmp_path / late.name
    late.rename(held)
    store = tmp_path / "store"
    assert extract(data, store, "--shard-rows", 100, "--workers", 1).exit_code == 0
    image_id = str(late.relative_to(data / "mini"))
    assert store_rows(store).set_index("image_id").loc[image_id, "status"] == "missing_image"
    held.rename(late)
    assert "0 to do" in extract(data, store, "--shard-rows", 100, "--workers", 1).output  # a plain rerun keeps it
    result = extract(data, store, "--shard-rows", 100, "--workers", 1, "--retry-failed")
    assert "1 to do (19 rows)" in result.output, result.output
    rows = assert_each_manifest_row_once(data, store).set_index("image_id")
    assert rows.loc[image_id, "status"] == "ok"
    assert rows.loc["photos/gone.jpg", "status"] == "missing_image"  # still missing: still that


def test_a_photo_that_breaks_its_task_costs_only_that_photo(mini_data, tmp_path, monkeypatch):
    """Fault injection: one photo makes its task raise (as an unforeseen model or library
    failure would). The shard is redone photo by photo; that photo alone gets a status."""
    from distributed import Client, LocalCluster

    from agepipe.pipeline import extract as ex

    real = ex.embed_rows

    def embed_rows(rows, data_root, cfg, timings):
        if "photos/0/obama2.jpg" in rows["image_id"].to_pylist():
            raise RuntimeError("injected failure")
        return real(rows, data_root, cfg, timings)

    monkeypatch.setattr(ex, "embed_rows", embed_rows)
    manifests, hashed = ex.read_manifests(str(mini_data), ["mini"])
    pack = "buffalo_s"
    cfg = ex.ExtractConfig(pack=pack)
    store = str(tmp_path / "store")
    plan = ex.make_plan({"mini": manifests["mini"].slice(0, 6)}, str(mini_data), store, "fs-test", cfg, 10, False, hashed)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        [result] = ex.run_tasks(client, plan.tasks, progress=False)
    ex.commit_plan(plan, [result], store, "fs-test")
    assert result["rescued"].startswith("RuntimeError")
    assert result["lost"] == [{"image_id": "photos/0/obama2.jpg", "status": "error",
                               "error": "RuntimeError: injected failure"}]
    table = fstore.read_table(store, "fs-test", "mini")
    assert table["status"].to_pylist() == ["ok", "ok", "ok", "error", "ok", "ok"]


def test_a_worker_killed_mid_write_leaves_no_temporary_after_the_run(mini_data, tmp_path, monkeypatch):
    """A worker killed while it wrote a shard cannot remove its temporary; Dask runs the task again
    and the run finishes. Its commit deleted the shards it left out but not that temporary, which
    stayed in the folder until some later extract of the dataset."""
    from distributed import Client, LocalCluster

    from agepipe.pipeline import extract as ex

    real, killed = ex.extract_shard, tmp_path / "killed"  # a file: the task runs a copy of this closure

    def extract_shard(task):
        if not killed.exists():  # the first attempt dies mid-write, as a killed process leaves its temporary
            killed.touch()
            folder = Path(fstore.dataset_dir(task["store"], task["feature_set"], task["dataset"]))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".part-00000-0badc0de.parquet.0123456789abcdef.tmp").write_bytes(b"PAR1 half")
            raise RuntimeError("killed mid-write")
        return real(task)

    monkeypatch.setattr(ex, "extract_shard", extract_shard)
    manifests, hashed = ex.read_manifests(str(mini_data), ["mini"])
    store = str(tmp_path / "store")
    plan = ex.make_plan({"mini": manifests["mini"].slice(0, 6)}, str(mini_data), store, "fs-test",
                        ex.ExtractConfig(pack="buffalo_s"), 10, False, hashed)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        results = ex.run_tasks(client, plan.tasks, progress=False)
    ex.commit_plan(plan, results, store, "fs-test")
    assert killed.exists() and "rescued" not in results[0]  # Dask's retry did it
    folder = Path(fstore.dataset_dir(store, "fs-test", "mini"))
    assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == \
        ["_index.json", results[0]["file"]]


def test_degenerate_photos_get_a_status_not_a_crash(tmp_path, embedder):
    import cv2

    strip = tmp_path / "strip.png"
    cv2.imwrite(str(strip), np.full((1, 9000, 3), 128, np.uint8))  # wider than MAX_SIDE, 1 pixel high
    photo = read_photo(str(strip))
    assert photo.pixels.shape[0] == 1 and max(photo.pixels.shape) == 4096
    assert embedder.faces(photo.pixels) == []


def test_gpus_layout_one_worker_per_device(mini_data, tmp_path, embedder):
    store = tmp_path / "store"
    result = extract(mini_data, store, "--gpus", "0,1", "--device", "cpu", "--limit", 4, "--shard-rows", 2)
    assert result.exit_code == 0, result.output
    assert "cluster: gpus, 2 worker processes, GPUs 0,1" in result.output
    info = json.loads((store / the_feature_set(store) / "feature_set.json").read_text())
    assert sorted(info["cluster"]["worker_env"].values()) == ["0", "1"]
    rows = fstore.read_table(str(store), the_feature_set(store), "mini").to_pandas()
    assert_matches_embed(mini_data, rows, embedder, expected_ok=4)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(extra_worker_args=(), env=None, cwd=None, worker_prefix=()):
    """A `dask scheduler` and two `dask worker` processes on loopback, as a user would run them
    (in the folder ``cwd``, default this process's; each worker's command after ``worker_prefix``)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), **(env or {})}
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(2)
    for i in range(2):
        procs.append(subprocess.Popen([*worker_prefix, str(bindir / "dask"), "worker", address, "--nthreads", "1",
                                       "--no-dashboard", "--name", f"w{i}", *extra_worker_args], env=env,
                                      cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=60)
    return address, procs


def stop_cluster(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture
def dask_cluster(tmp_path):
    address, procs = start_cluster()
    yield address
    stop_cluster(procs)


def test_existing_cluster_through_scheduler(mini_data, tmp_path, dask_cluster, embedder):
    store = tmp_path / "store"
    result = extract(mini_data, store, "--scheduler", dask_cluster, "--shard-rows", 5)
    assert result.exit_code == 0, result.output
    assert "cluster: scheduler, 2 worker processes" in result.output
    rows = assert_each_manifest_row_once(mini_data, store)
    assert_matches_embed(mini_data, rows, embedder)


def test_relative_paths_mean_the_clients_folder_to_workers_started_elsewhere(mini_data, tmp_path, monkeypatch):
    """`--data-dir` and `--store` relative to the client's folder, workers of an existing cluster
    started in another: every photo is read and every shard written where the client means. (The
    workers resolved both from their own folder: each photo became "missing_image" there and the
    commit found no shard.)"""
    workers, client = tmp_path / "workers", tmp_path / "client"
    workers.mkdir()
    client.mkdir()
    address, procs = start_cluster(cwd=workers)
    try:
        monkeypatch.chdir(client)
        result = extract(os.path.relpath(mini_data, client), "store", "--scheduler", address, "--shard-rows", 5)
        assert result.exit_code == 0, result.output
    finally:
        stop_cluster(procs)
    rows = assert_each_manifest_row_once(mini_data, client / "store")
    assert (rows.status == "ok").sum() == 16
    assert not list(workers.rglob("*.parquet"))


def hiding(folder) -> list[str]:
    """A command prefix that runs a command where ``folder`` is an empty tmpfs (a mount namespace of
    its own): a worker on a node that does not mount the photos. Skips where that is not allowed."""
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs none "{folder}" && exec "$@"', "sh"]
    try:
        probe = subprocess.run([*prefix, "test", "!", "-e", str(next(Path(folder).iterdir()))], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode:
        pytest.skip("needs unshare -m and mount (root in a container)")
    return prefix


def test_a_misspelled_dataset_is_named_unknown_not_sent_to_download(mini_data, tmp_path):
    # It was told to run `agepipe download --dataset mnii`, which download refuses.
    result = CliRunner().invoke(cli, ["extract", "--dataset", "mnii", "--data-dir", str(mini_data),
                                      "--store", str(tmp_path / "store")])
    assert result.exit_code == 1, result.output
    assert "unknown dataset 'mnii': agepipe knows adience" in result.output and "download" not in result.output
    assert not (tmp_path / "store").exists()


def test_workers_that_do_not_see_the_photos_stop_the_run_though_the_client_does(mini_data, tmp_path):
    """An existing cluster whose workers do not mount the photos the client sees: the check that
    the photos are there is made where they are read, and the run stops before any row. (It was
    made on the client alone: every photo became a "missing_image" row, committed, exit 0.)"""
    address, procs = start_cluster(worker_prefix=hiding(mini_data / "mini" / "photos"))
    try:
        result = extract(mini_data, tmp_path / "store", "--scheduler", address, "--shard-rows", 5)
    finally:
        stop_cluster(procs)
    assert result.exit_code == 1, result.output
    assert re.search(r"/mini: none of the first \d+ photos its manifest lists is there \(the first: .*/mini/photos/"
                     r".*seen from worker tcp://127\.0\.0\.1:\d+", result.output), result.output
    assert not list((tmp_path / "store").glob("**/part-*.parquet"))


POISON = "photos/0/obama2.jpg"


@pytest.fixture
def poisoned_cluster(tmp_path):
    """Workers that SIGKILL themselves on POISON while the flag file exists; a scheduler that
    gives up on a task at its first lost worker (so a kill becomes KilledWorker at once)."""
    flag = tmp_path / "poison-flag"
    flag.touch()
    address, procs = start_cluster(["--preload", "tests.pipeline.poison"], env={
        "AGEPIPE_POISON": POISON, "AGEPIPE_POISON_FLAG": str(flag),
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    yield address, flag
    stop_cluster(procs)


def test_killed_worker_mid_shard_gives_worker_lost_then_retry_failed_redoes_it(mini_data, tmp_path,
                                                                              poisoned_cluster):
    """A worker process really dies (SIGKILL) in the middle of the shard holding POISON: the
    shard is redone photo by photo, POISON's own task kills its worker again and that row
    alone is stored as worker_lost; --retry-failed (the photo healed) then makes it ok."""
    address, flag = poisoned_cluster
    store = tmp_path / "store"
    args = ["--scheduler", address, "--shard-rows", 4]
    result = extract(mini_data, store, *args)
    assert result.exit_code == 0, result.output
    kills = flag.with_name(flag.name + ".kills").read_text().split("\n")[:-1]
    assert [k.split()[1] for k in kills][-1] == "1" and len(kills) >= 2  # the shard's task, then the photo's
    rows = assert_each_manifest_row_once(mini_data, store)
    status = dict(zip(rows.image_id, rows.status))
    assert status[POISON] == "worker_lost"
    assert (rows.status == "ok").sum() >= 12  # the others kept their features
    # the poisoned shard (0) among them: a shard queued on the killed worker may be redone too
    redone = re.search(r"shards redone photo by photo after failures: \[([\d, ]*)\]", result.output)
    assert redone and 0 in {int(k) for k in redone[1].split(",")}, result.output
    flag.unlink()
    again = extract(mini_data, store, *args, "--retry-failed")
    assert again.exit_code == 0, again.output
    rows = assert_each_manifest_row_once(mini_data, store)
    assert dict(zip(rows.image_id, rows.status))[POISON] == "ok"
    assert (rows.status == "ok").sum() == 16 and not set(rows.status) & fstore.TRANSIENT_STATUSES


def test_torch_runtime_matches_onnxruntime(mini_data, tmp_path):
    """--runtime torch runs the same ONNX graphs in torch (on CPU here; fp16 on CUDA)."""
    ort_store, torch_store = tmp_path / "ort", tmp_path / "torch"
    assert extract(mini_data, ort_store, "--limit", 6, "--workers", 1).exit_code == 0
    result = extract(mini_data, torch_store, "--limit", 6, "--workers", 1, "--runtime", "torch")
    assert result.exit_code == 0, result.output
    assert "torch on cpu" in result.output
    a, b = store_rows(ort_store), store_rows(torch_store)
    assert list(a.status) == list(b.status) and (a.status == "ok").sum() == 6
    cos = (np.stack(a.embedding) * np.stack(b.embedding)).sum(axis=1)
    assert cos.min() >= 0.999, cos


def test_a_stopped_runs_task_that_finishes_after_the_next_commit_leaves_no_file(mini_data, tmp_path):
    """--scheduler: a task that Ctrl-C cancelled keeps running on the user's worker (Dask cannot stop
    a running task) and may write its shard after the next run's commit. That shard, listed by no
    index, stayed in the folder, and pandas, reading the folder as the README shows, counted its rows
    twice. The task now sees that the index changed since its run planned and deletes it."""
    import pandas as pd

    from agepipe.pipeline import extract as ex

    manifests, hashed = ex.read_manifests(str(mini_data), ["mini"])
    manifests = {"mini": manifests["mini"].slice(0, 6)}
    cfg, store = ex.ExtractConfig(pack="buffalo_s"), str(tmp_path / "store")

    def plan():
        return ex.make_plan(manifests, str(mini_data), store, "fs-test", cfg, 3, False, hashed)

    stopped = plan()  # the run stopped by Ctrl-C, one task still running on a worker
    nxt = plan()      # the next run, which finishes and commits
    ex.commit_plan(nxt, [ex.extract_shard(t) for t in nxt.tasks], store, "fs-test")
    with pytest.raises(fstore.StoreError, match="changed while this run worked"):
        ex.extract_shard(stopped.tasks[0])
    folder = Path(store) / "fs-test" / "mini"
    assert sorted(p.name for p in folder.glob("part-*")) == sorted(
        Path(p).name for p in fstore.shard_files(store, "fs-test", "mini"))
    assert len(pd.read_parquet(folder)) == 6
    # while its run is the current one, a task writes as before
    assert ex.extract_shard({**nxt.tasks[0], "generation": fstore.read_index(store, "fs-test", "mini").generation})


def test_decoders_without_the_device_pipeline_are_refused_before_any_work(mini_data, tmp_path):
    # It ran without a word, the decoders chosen used by no path. (--gpus with --device cpu is
    # kept: the GPU workers' layout on a CPU, as the tests and bench/gpu_extract_device.py run it.)
    result = CliRunner().invoke(cli, ["extract", "--dataset", "mini", "--data-dir", str(mini_data),
                                      "--store", str(tmp_path / "store"), "--decoders", "processes"])
    said = "--decoders chooses what decodes beside the device pipeline of --runtime torch; onnxruntime decodes"
    assert result.exit_code == 2 and said in result.output, result.output  # a usage error, as train's
    assert not (tmp_path / "store").exists()
    result = CliRunner().invoke(cli, ["extract", "--dataset", "mini", "--data-dir", str(mini_data),
                                      "--store", str(tmp_path / "store"), "--gpus", "0", "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "--gpus starts its own workers" in result.output, result.output
    assert not (tmp_path / "store").exists()
