import numpy as np
import pandas as pd
import pytest

from agepipe.train.data import labels, load_task_data, make_split, resolve_feature_set
from tests.train.synthetic_store import FEATURE_SET, write_store


def test_labels_per_task():
    rows = pd.DataFrame({"age": [1.0, 22.0, np.nan, 104.6, 39.5, np.nan],
                         "age_bin": [0, -1, -1, 7, 5, 3],
                         "gender": [0, 1, -1, 1, 0, 0]})
    # A known bin wins; an age outside Adience's ranges takes the nearest midpoint (22 -> 17.5).
    assert labels("age", rows).tolist() == [0, 3, -1, 7, 5, 3]
    assert labels("age101", rows).tolist() == [1, 22, -1, 100, 40, -1]
    assert labels("gender", rows).tolist() == [0, 1, -1, 1, 0, 0]
    with pytest.raises(ValueError, match="unknown task"):
        labels("height", rows)


def test_load_keeps_ok_rows_with_a_label_above_the_det_score(tmp_path):
    n = 10
    x = np.eye(n, 512, dtype=np.float32)
    rows = {"status": np.array(["ok"] * 7 + ["no_face", "decode_error", "ok"], dtype=object),
            "gender": np.array([0, 1, -1, 1, 0, 1, 0, 1, 1, 0]),
            "det_score": np.array([0.9, 0.9, 0.9, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])}
    root = write_store(tmp_path, x, rows, shard_rows=4)
    data = load_task_data(root, FEATURE_SET, ["adience"], "gender", min_det_score=0.5)
    assert data.rows["image_id"].str[-7:-4].astype(int).tolist() == [0, 1, 4, 5, 6, 9]
    assert data.y.tolist() == [0, 1, 0, 1, 0, 0]
    # Each row keeps its own embedding through the filters.
    assert data.x.argmax(1).tolist() == [0, 1, 4, 5, 6, 9]
    assert data.dropped == {"unknown_label": 1}


def test_feature_set_may_be_omitted_only_when_the_store_has_one(tmp_path):
    x = np.ones((3, 512), np.float32)
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


# Every age exactly between two adjacent class midpoints, and the class the original gives it.
TIES = {3.0: 1, 7.5: 1, 13.75: 3, 23.0: 4, 34.5: 4, 45.5: 5, 65.25: 7}


def test_midpoint_ties_are_every_adjacent_pair():
    from agepipe.datasets.manifest import CLASS_MIDPOINTS
    assert sorted(TIES) == sorted((CLASS_MIDPOINTS[:-1] + CLASS_MIDPOINTS[1:]) / 2)


@pytest.mark.parametrize("age, want", [*TIES.items(), (0.0, 0), (2.9, 0), (3.1, 1), (22.9, 3), (23.1, 4),
                                       (34.4, 4), (34.6, 5), (65.2, 6), (65.3, 7), (101.0, 7)])
def test_training_fallback_and_manifests_share_one_age_class_rule(age, want):
    from agepipe.datasets.manifest import age_bin
    # A store row holds its age as float32; one without age_bin takes the manifests' class.
    rows = pd.DataFrame({"age": np.array([age], np.float32), "age_bin": np.array([-1], np.int8)})
    assert labels("age", rows).tolist() == [want]
    assert age_bin([age]).tolist() == [want]
