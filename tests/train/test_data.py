import numpy as np
import pandas as pd
import pytest
import torch

from agepipe.datasets.manifest import CLASS_MIDPOINTS, age_bin
from agepipe.features.store import EMBEDDING_DIM
from agepipe.train.data import content_digest, labels, load_task_data, make_split, resolve_feature_set
from tests.train.synthetic_store import FEATURE_SET, write_store


def test_labels_per_task():
    rows = pd.DataFrame({"age": [1.0, 22.0, np.nan, 104.6, 39.5, np.nan, 28.5],
                         "age_bin": [0, -1, -1, 7, 5, 3, 4],
                         "gender": [0, 1, -1, 1, 0, 0, 1]})
    # A known bin wins; an age outside Adience's ranges takes the nearest midpoint (22 -> 17.5).
    assert labels("age", rows).tolist() == [0, 3, -1, 7, 5, 3, 4]
    # A half year goes up alike for odd and even years (np.rint gave 28.5 -> 28 but 39.5 -> 40).
    assert labels("age101", rows).tolist() == [1, 22, -1, 100, 40, -1, 29]
    assert labels("gender", rows).tolist() == [0, 1, -1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="unknown task"):
        labels("height", rows)


def test_load_keeps_ok_rows_with_a_label_above_the_det_score(tmp_path):
    n = 10
    x = np.eye(n, EMBEDDING_DIM, dtype=np.float32)
    rows = {"status": np.array(["ok"] * 7 + ["no_face", "decode_error", "ok"], dtype=object),
            "gender": np.array([0, 1, -1, 1, 0, 1, 0, 1, 1, 0]),
            "det_score": np.array([0.9, 0.9, 0.9, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])}
    root = write_store(tmp_path, x, rows, shard_rows=4)
    data = load_task_data(root, FEATURE_SET, ["adience"], "gender", min_det_score=0.5)
    assert data.rows["image_id"].str[-7:-4].astype(int).tolist() == [0, 1, 4, 5, 6, 9]
    assert data.y.tolist() == [0, 1, 0, 1, 0, 0]
    # Each row keeps its own embedding through the filters.
    assert data.x.argmax(1).tolist() == [0, 1, 4, 5, 6, 9]
    assert data.dropped == {"decode_error": 1, "det_score_below_min": 1, "no_face": 1, "unknown_label": 1}
    assert data.left_out == data.dropped and data.warnings == []


def test_no_row_left_to_train_on_says_why(tmp_path):
    # once "the training split has 0 rows; nothing to fit", from deep in the loop
    x = np.eye(4, EMBEDDING_DIM, dtype=np.float32)
    root = write_store(tmp_path, x, {"gender": np.array([0, 1, 0, 1]), "det_score": np.full(4, 0.8)})
    with pytest.raises(ValueError, match=r'adience in .*: no row has status "ok", det_score >= 0.99 '
                                         r"\(--min-det-score\), a gender label and a finite embedding"):
        load_task_data(root, FEATURE_SET, ["adience"], "gender", min_det_score=0.99)


def test_a_row_whose_embedding_is_not_finite_is_left_out_and_said(tmp_path):
    # One NaN row made every weight NaN in the first step; the run then crashed in scoring
    # ("'list' argument must have no negative elements") after saving a NaN checkpoint.
    from tests.train.synthetic_store import Mixture, adience_like
    from agepipe.train.loop import train

    x, y = Mixture.make().sample(400)
    x[7, 3], x[9, 0] = np.nan, np.inf
    root = write_store(tmp_path / "store", x, adience_like(y))
    data = load_task_data(root, FEATURE_SET, ["adience"], "age")
    assert len(data.x) == 398 and bool(torch.isfinite(data.x).all())
    assert data.dropped == {"unknown_label": 0, "nonfinite_embedding": 2}
    assert data.left_out == {"nonfinite_embedding": 2}  # the reasons that left a row out
    assert "2 row(s)" in data.warnings[0] and "adience/img0000007.jpg" in data.warnings[0]
    with pytest.warns(UserWarning, match="NaN or infinite"):
        metrics = train(root, ["adience"], "age", tmp_path / "run", mc_samples=0, progress=False, report=False,
                        train_overrides={"epochs": 1, "batch_size": 16})
    assert np.isfinite(metrics["test"]["cross_entropy"])


def test_rows_without_a_fold_are_said(tmp_path):
    # a store agepipe did not write: its rows would train in every CV run, unsaid
    x = np.eye(5, EMBEDDING_DIM, dtype=np.float32)
    root = write_store(tmp_path, x, {"gender": np.array([0, 1, 0, 1, 0]),
                                     "fold": np.array([0, None, 2, None, 4], dtype=object)})
    data = load_task_data(root, FEATURE_SET, ["adience"], "gender")
    assert len(data.x) == 5
    assert data.warnings == ["2 row(s) have no fold (the first: adience/img0000001.jpg): they are never in a "
                             "test fold, and every cross-validation run trains on them"]


def test_content_digest_is_the_rows_whatever_their_order_and_changes_with_any_value(tmp_path):
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    from tests.train.synthetic_store import Mixture, adience_like

    x, y = Mixture.make().sample(300)
    root = write_store(tmp_path / "store", x, adience_like(y), shard_rows=64)
    data = load_task_data(root, FEATURE_SET, ["adience"], "gender")
    digest = content_digest(data)

    def changed(rows=None, x=None, y=None):
        return content_digest(dataclasses.replace(data, rows=data.rows if rows is None else rows,
                                                  x=data.x if x is None else x, y=data.y if y is None else y))

    order = np.random.default_rng(0).permutation(len(data.rows))
    assert changed(data.rows.iloc[order].reset_index(drop=True), data.x[order], data.y[order]) == digest
    x = data.x.clone()
    x[7, 3] = torch.nextafter(x[7, 3], torch.tensor(2.0))  # one float a step away
    assert changed(x=x) != digest
    y = data.y.clone()
    y[7] = 1 - y[7]
    assert changed(y=y) != digest
    rows = data.rows.copy()
    rows.loc[7, "subject_id"] = "someone else"
    assert changed(rows) != digest
    assert changed(data.rows.iloc[1:].reset_index(drop=True), data.x[1:], data.y[1:]) != digest
    # Another process (another PYTHONHASHSEED) digests the same rows alike.
    code = ("import sys; from agepipe.train.data import content_digest, load_task_data; "
            f"print(content_digest(load_task_data(sys.argv[1], {FEATURE_SET!r}, ['adience'], 'gender')))")
    here = Path(content_digest.__code__.co_filename).parents[2]  # this checkout's agepipe, not an installed one
    other = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True, cwd=here)
    assert other.stdout.strip() == digest


def test_content_digest_spells_a_null_string_alike_under_every_pandas(tmp_path):
    """A row without a subject_id (Adience's empty user_id) loads as None under pandas 2 and as
    NaN under pandas 3: the digest told them apart, so a pandas upgrade trained every cell again."""
    import dataclasses

    import pandas as pd

    from tests.train.synthetic_store import Mixture, adience_like

    x, y = Mixture.make().sample(50)
    data = load_task_data(write_store(tmp_path, x, adience_like(y)), FEATURE_SET, ["adience"], "gender")
    subjects = [None if i % 7 == 0 else s for i, s in enumerate(data.rows["subject_id"])]

    def digest(null):
        rows = data.rows.assign(subject_id=pd.Series([null if s is None else s for s in subjects], dtype=object))
        return content_digest(dataclasses.replace(data, rows=rows))

    assert digest(None) == digest(np.nan) != content_digest(data)


def test_feature_set_may_be_omitted_only_when_the_store_has_one(tmp_path):
    x = np.ones((3, EMBEDDING_DIM), np.float32)
    write_store(tmp_path, x, {"gender": [0, 1, 0]})
    assert resolve_feature_set(str(tmp_path), None) == FEATURE_SET
    write_store(tmp_path, x, {"gender": [0, 1, 0]}, feature_set="other-00000000")
    with pytest.raises(ValueError, match="2 feature sets"):
        resolve_feature_set(str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_feature_set(str(tmp_path), "nope")


def adience_rows(n=3000, subjects=120, seed=0):
    rng = np.random.default_rng(seed)
    subject = rng.integers(0, subjects, n)
    return pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "subject_id": [f"u{s}" for s in subject],
                         "fold": subject % 5, "dataset": "adience"})


def test_split_test_fold_and_subject_disjoint_validation():
    rows = adience_rows()
    split = make_split(rows, test_fold=2)
    assert (rows["fold"].iloc[split.test] == 2).all()
    assert len(split.test) == (rows["fold"] == 2).sum()
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(len(rows)))
    train_subjects = set(rows["subject_id"].iloc[split.train])
    val_subjects = set(rows["subject_id"].iloc[split.val])
    assert val_subjects and not train_subjects & val_subjects
    assert 0.06 < len(split.val) / (len(split.train) + len(split.val)) <= 0.1
    again = make_split(adience_rows().sample(frac=1.0, random_state=1).reset_index(drop=True), test_fold=2)
    assert len(again.val) == len(split.val)  # the same subjects whatever the row order


def test_split_without_subjects_treats_each_image_as_its_own():
    rows = adience_rows(1000)
    rows["subject_id"] = None
    split = make_split(rows, test_fold=None, val_fraction=0.2)
    assert len(split.test) == 0
    assert len(split.val) == 200


def test_one_person_in_two_datasets_stays_on_one_side_of_the_split():
    # IMDB's and Wikipedia's photos of the same 40 people: the manifests give both the name
    rows = pd.concat([adience_rows(600, 40, seed=1).assign(dataset="imdb"),
                      adience_rows(600, 40, seed=2).assign(dataset="wiki")], ignore_index=True)
    rows["image_id"] = rows["dataset"] + "/" + rows["image_id"]
    split = make_split(rows, test_fold=None, val_fraction=0.3)
    assert len(split.val) and not set(rows["subject_id"].iloc[split.train]) & set(rows["subject_id"].iloc[split.val])


# Every age exactly between two class midpoints, and the class the original's code gives it
# (its midpoint list, in the order [28.5, 40.5, 5, 80, 17.5, 50.5, 10, 1], takes the first nearest).
TIES = {3.0: 1, 7.5: 1, 13.75: 3, 23.0: 4, 34.5: 4, 45.5: 5, 65.25: 7}


def test_one_age_mapping_with_the_original_tie_rule_for_manifests_and_training():
    midpoints = sorted(CLASS_MIDPOINTS)
    assert sorted(TIES) == [(a + b) / 2 for a, b in zip(midpoints, midpoints[1:])]
    ages = np.array(list(TIES) + [22.9, 23.1, np.nan])
    want = list(TIES.values()) + [3, 4, -1]
    assert age_bin(ages).tolist() == want
    rows = pd.DataFrame({"age": ages, "age_bin": np.full(len(ages), -1)})  # training's fallback: no age_bin
    assert labels("age", rows).tolist() == want
