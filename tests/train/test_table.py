"""`agepipe table`: the paper's grid on a synthetic store with pre-training, on CPU."""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.train.table import accuracy_stats, cell_train_overrides, parse_settings
from tests.train.synthetic_store import AGE_BIN_MIDPOINTS, Mixture, adience_like, age_gender_store, write_store

# The original's numbers as issue 12 quotes them: (task, variant, init) -> "mean +- std".
QUOTED = {("gender", "full", "pretrained"): "0.8887 +- 0.0255",
          ("gender", "no-ic", "pretrained"): "0.9066 +- 0.0248",
          ("gender", "full", "scratch"): "0.8406 +- 0.0273"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    store = age_gender_store(tmp_path_factory.mktemp("store"), n_adience=800, n_imdb=500, n_wiki=200)
    out = tmp_path_factory.mktemp("table")
    # Two variants (those with quoted numbers) keep the CPU test short; the grid logic is the same for five.
    args = ("table", "--store", store, "--out", out, "--variants", "full,no-ic", "--folds", "0,1", "--seeds", "1",
            "--epochs", "2", "--device", "cpu", "--set", "all.batch_size=64")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return store, out, args, result.output


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def cut_from_a_manifest_changed_since(store, dataset, tmp_path):
    """The dataset's shards recommitted as cut from a manifest file that has changed since."""
    from agepipe.features import store as fstore
    from agepipe.hashing import file_sha256
    from tests.train.synthetic_store import FEATURE_SET

    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"the manifest the shards were cut from")
    index = fstore.read_index(store, FEATURE_SET, dataset)
    fstore.commit_shards(store, FEATURE_SET, dataset, index.shards, file_sha256(manifest), index.generation,
                         str(manifest))
    manifest.write_bytes(b"that manifest rebuilt since")
    return manifest


def test_table_has_a_finite_row_per_cell_with_the_published_numbers(table_run):
    _, out, _, output = table_run
    rows = read_csv(out / "table.csv")
    cells = [(r["task"], r["variant"], r["init"]) for r in rows]
    assert sorted(cells) == sorted((t, v, i) for t in ("age", "gender") for v in ("full", "no-ic")
                                   for i in ("scratch", "pretrained"))
    for r in rows:
        assert r["runs"] == "2"
        values = [float(r[k]) for k in ("accuracy_mean", "accuracy_std", "ci95_low", "ci95_high", "seconds")]
        assert all(math.isfinite(v) for v in values), r
        assert 0 <= float(r["accuracy_mean"]) <= 1
        assert float(r["ci95_low"]) <= float(r["accuracy_mean"]) <= float(r["ci95_high"])
        assert (r["pretrain_seconds"] != "") == (r["init"] == "pretrained")
        cell = (r["task"], r["variant"], r["init"])
        if cell in QUOTED:
            assert f"{float(r['published_mean']):.4f} +- {float(r['published_std']):.4f}" == QUOTED[cell]
    by_cell = {(r["task"], r["variant"], r["init"]): r for r in rows}
    # Each variant's own hyper-parameters: the original's gender models without IC layers ran at lr 0.00244.
    assert float(by_cell["gender", "no-ic", "scratch"]["lr"]) == pytest.approx(0.00243983281217744)
    assert float(by_cell["gender", "full", "scratch"]["lr"]) == pytest.approx(0.024398)
    assert by_cell["age", "no-ic", "scratch"]["batch_norm"] == "False"
    assert by_cell["age", "no-ic", "scratch"]["dropout"] == "0.0"
    assert "[8/8] " in output and "pre-trained on imdb+wiki" in output
    assert "--init" not in output  # pre-trained on other datasets than the cross-validation's: no leak


def test_runs_are_the_cross_validation_folders_and_start_from_the_pretraining(table_run):
    _, out, _, _ = table_run
    cell = out / "gender" / "pretrained" / "no-ic"
    pre = json.loads((cell / "pretrain" / "config.json").read_text())
    assert pre["data"]["datasets"] == ["imdb", "wiki"]
    assert pre["model"]["batch_norm"] is False and pre["model"]["dropout"] == 0.0
    cv = json.loads((cell / "cv.json").read_text())
    assert [(r["fold"], r["seed"]) for r in cv["runs"]] == [(0, 0), (1, 0)]
    run = json.loads((cell / "fold1-seed0" / "config.json").read_text())
    assert run["init"] == str(cell / "pretrain") and run["data"]["test_fold"] == 1
    assert run["model"] == pre["model"]
    scratch = json.loads((out / "gender" / "scratch" / "no-ic" / "fold0-seed0" / "config.json").read_text())
    assert scratch["init"] is None and scratch["data"]["datasets"] == ["adience"]


def test_markdown_renders_the_csv_numbers(table_run):
    _, out, _, _ = table_run
    md = (out / "table.md").read_text()
    assert "Total wall time" in md
    for r in read_csv(out / "table.csv"):
        line = next(l for l in md.splitlines() if l.startswith(f"| {r['variant']} | {r['init']} |")
                    and _section(md, l) == r["task"])
        cols = [c.strip() for c in line.strip("|").split("|")]
        assert cols[2] == f"{float(r['accuracy_mean']):.4f} +- {float(r['accuracy_std']):.4f}"
        assert cols[3] == f"[{float(r['ci95_low']):.4f}, {float(r['ci95_high']):.4f}]"
        published = r["published_mean"] and f"{float(r['published_mean']):.4f} +- {float(r['published_std']):.4f}"
        assert cols[4] == published
        assert cols[5] == r["runs"]


def _section(md, line):
    """The task heading above ``line``."""
    head = md[:md.index(line)]
    return head[head.rindex("## ") + 3:].split("\n", 1)[0]


def test_a_rerun_reuses_every_finished_cell_and_says_once_that_a_manifest_changed(table_run, tmp_path):
    store, out, args, first = table_run
    assert "has changed since" not in first
    # WIKI's shards were cut from a manifest that has changed since (the same shards: cells reused)
    manifest = cut_from_a_manifest_changed_since(store, "wiki", tmp_path)
    before = (out / "gender" / "scratch" / "full" / "fold0-seed0" / "model.safetensors").stat().st_mtime_ns
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: wiki: its manifest ({manifest}) has changed since") == 1
    assert result.output.count("reused") == 8 and "pre-trained on" not in result.output
    assert (out / "gender" / "scratch" / "full" / "fold0-seed0" / "model.safetensors").stat().st_mtime_ns == before


def test_a_store_cut_into_other_shards_reuses_every_cell(table_run):
    """`extract --shard-rows N` rewrites the same rows into shards of another size: every cell
    trained again, as the cell's identity held the shards' file names."""
    from agepipe.features import store as fstore
    from tests.train.synthetic_store import FEATURE_SET

    store, _, args, _ = table_run
    assert invoke(*args).exit_code == 0  # every cell up to date, whatever ran before
    for dataset in ("adience", "imdb", "wiki"):
        fstore.write_dataset(fstore.read_table(store, FEATURE_SET, dataset), store, FEATURE_SET, dataset, 97)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 8 and "pre-trained on" not in result.output, result.output


def test_a_store_copied_elsewhere_reuses_every_cell(table_run, tmp_path):
    """The cell's identity held the store's absolute path: a store moved or copied trained every cell again."""
    store, _, args, _ = table_run
    assert invoke(*args).exit_code == 0  # every cell up to date, whatever ran before
    copy = shutil.copytree(store, tmp_path / "copy")
    result = invoke(*(copy if a == store else a for a in args))
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 8 and "pre-trained on" not in result.output, result.output


def test_a_changed_embedding_trains_its_cell_again_naming_the_rows(tmp_path):
    from agepipe.features import store as fstore
    from tests.train.synthetic_store import FEATURE_SET

    store = age_gender_store(tmp_path / "store", n_adience=400, n_imdb=50, n_wiki=50)
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args).exit_code == 0
    adience = fstore.read_table(store, FEATURE_SET, "adience")
    x = fstore.list_values(adience["embedding"].combine_chunks()).copy()
    x[7] = -x[7]
    adience = adience.set_column(adience.schema.get_field_index("embedding"), "embedding",
                                 fstore.fixed_list(x, fstore.EMBEDDING_DIM))
    fstore.write_dataset(adience, store, FEATURE_SET, "adience", 4000)
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "(again: rows changed)" in again.output and "reused" not in again.output, again.output
    assert "reused" in invoke(*args).output


def one_cell(store, tmp_path) -> tuple[tuple, Path, dict]:
    """A one-cell table (gender, scratch, no-ic, 2 folds, 1 epoch) run once: its arguments, its
    cell.json and what that holds."""
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "no-ic",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args).exit_code == 0
    cell = tmp_path / "t" / "gender" / "scratch" / "no-ic" / "cell.json"
    return args, cell, json.loads(cell.read_text())


def test_a_cell_recorded_with_the_store_path_and_cut_trains_again_saying_why(table_run, tmp_path):
    """A cell.json of an older agepipe: its identity held the store's path and its shards' names."""
    store, *_ = table_run
    args, cell, done = one_cell(store, tmp_path)
    identity = done["identity"]
    del identity["rows"], identity["pretrain_rows"]
    identity.update(cut="0123456789abcdef", pretrain_cut=None, data={**identity["data"], "store": store})
    cell.write_text(json.dumps(done))
    again = invoke(*args)
    assert "(again: rows not recorded)" in again.output and "reused" not in again.output, again.output


def test_a_cell_trained_on_rows_the_store_no_longer_holds_is_trained_again(table_run):
    """The pre-training rows change (a re-extract left a WIKI row out): the pre-trained cells
    train again, the scratch ones are reused. (Every cell was reused whatever the store held.)"""
    from agepipe.features import store as fstore
    from tests.train.synthetic_store import FEATURE_SET

    store, out, args, _ = table_run
    wiki = fstore.read_table(store, FEATURE_SET, "wiki")
    fstore.write_dataset(wiki.slice(1), store, FEATURE_SET, "wiki", 1000)
    result = invoke(*args, "--tasks", "gender", "--variants", "full")
    assert result.exit_code == 0, result.output
    assert "gender scratch full: " in result.output and "gender pretrained full: " in result.output
    assert result.output.count("reused") == 1 and "gender scratch full" in \
        next(line for line in result.output.splitlines() if "reused" in line)
    assert result.output.count("pre-trained on") == 1
    assert "(again: pretrain_rows changed)" in result.output


def test_blank_where_nothing_was_published(tmp_path):
    from agepipe.train.table import Grid, write_table
    row = {"task": "age", "variant": "full", "init": "scratch", **accuracy_stats([0.5, 0.6], [0, 1]),
           "published_mean": None, "published_std": None, "seconds": 1.0, "pretrain_seconds": None,
           "lr": 0.001, "weight_decay": 0.0, "gamma": 0.5, "batch_size": 8, "dropout": 0.05,
           "batch_norm": True, "skip": True}
    write_table(tmp_path, [row], Grid(["age"], ["full"], ["scratch"]), 1.0, "cpu", "fs")
    (r,) = read_csv(tmp_path / "table.csv")
    assert r["published_mean"] == "" and r["published_std"] == ""
    # the interval (-0.0853 to 1.1853 unclipped) is clipped to what an accuracy can be
    assert "| full | scratch | 0.5500 +- 0.0500 | [0.0000, 1.0000] |  | 2 |" in (tmp_path / "table.md").read_text()


def test_confidence_interval_is_the_t_interval_of_the_fold_means():
    # two seeds on each of three folds: the fold means 0.7, 0.8, 0.9 are the draws (mean 0.8,
    # sample std 0.1, t(0.975, 2) = 4.302653), not the six runs
    runs = [0.69, 0.71, 0.78, 0.82, 0.9, 0.9]
    s = accuracy_stats(runs, [0, 0, 1, 1, 2, 2])
    assert s["accuracy_mean"] == pytest.approx(0.8)
    assert s["ci95_low"] == pytest.approx(0.8 - 4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert s["ci95_high"] == 1.0 and s["ci95_over"] == "folds"  # 1.048 clipped: no accuracy exceeds 1
    assert s["accuracy_std"] == pytest.approx(np.std(runs))


def test_the_interval_is_around_the_fold_means_mean_when_folds_have_unequal_seeds():
    # fold means 0.7, 0.8, 0.9 (mean 0.8, sample std 0.1); the five runs' mean is 0.76
    s = accuracy_stats([0.7, 0.7, 0.7, 0.8, 0.9], [0, 0, 0, 1, 2])
    assert s["accuracy_mean"] == pytest.approx(0.76)
    assert s["ci95_low"] == pytest.approx(0.8 - 4.302653 * 0.1 / math.sqrt(3), rel=1e-6)


def test_one_fold_gives_the_seeds_interval_and_one_run_none():
    s = accuracy_stats([0.6, 0.7, 0.8], [3, 3, 3])
    assert s["ci95_high"] - 0.7 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert s["ci95_over"] == "seeds"
    one = accuracy_stats([0.7], [0])
    assert math.isnan(one["ci95_low"]) and math.isnan(one["accuracy_std"]) and one["ci95_over"] == ""


def test_one_run_shows_no_spread(tmp_path):
    from agepipe.train.table import Grid, write_table
    row = {"task": "age", "variant": "full", "init": "scratch", **accuracy_stats([0.5], [0]),
           "published_mean": None, "published_std": None, "seconds": 1.0, "pretrain_seconds": None,
           "lr": 0.001, "weight_decay": 0.0, "gamma": 0.5, "batch_size": 8, "dropout": 0.05,
           "batch_norm": True, "skip": True}
    write_table(tmp_path, [row], Grid(["age"], ["full"], ["scratch"], folds=[0], seeds=1), 1.0, "cpu", "fs")
    assert "| full | scratch | 0.5000 |  |  | 1 |" in (tmp_path / "table.md").read_text()
    (r,) = read_csv(tmp_path / "table.csv")
    assert r["accuracy_std"] == "" and r["ci95_low"] == ""


def test_settings_override_in_order_and_bad_ones_are_named():
    settings = parse_settings(["all.lr=0.1", "no-ic.lr=0.2", "gender:no-ic.batch_size=32"])
    assert cell_train_overrides("gender", "no-ic", settings) == {"lr": 0.2, "batch_size": 32}
    assert cell_train_overrides("age", "full", settings) == {"lr": 0.1}
    assert cell_train_overrides("gender", "neither", []) == {"lr": 0.00243983281217744}
    for bad in ("no-ic.momentum=1", "nope.lr=1", "all.lr", "all.batch_size=x"):
        with pytest.raises(ValueError, match="--set"):
            parse_settings([bad])
    with pytest.raises(ValueError, match=r"'1\.5' is not an integer"):
        parse_settings(["all.batch_size=1.5"])
    # out of range: refused before any cell trains, not a traceback (0) or a run cut short (patience 0)
    for bad, why in (("all.batch_size=0", "batch_size must be >= 2"), ("age.patience=0", "patience >= 1"),
                     ("full.lr=-1", "lr must be > 0"), ("all.lr=nan", "lr must be > 0"),
                     ("all.weight_decay=-0.1", "weight_decay >= 0"), ("all.gamma=2", "gamma must be in")):
        with pytest.raises(ValueError, match=f"--set '{bad}': .*{why}"):
            parse_settings([bad])


def test_training_warnings_are_said_once_as_sentences(table_run, tmp_path):
    """A run's doubts (here: too few steps an epoch) in a sentence each, once, as train says them;
    not Python's warning lines with a source file and line for every run."""
    store, *_ = table_run
    result = invoke("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
                    "--inits", "scratch", "--folds", "0,1", "--seeds", "2", "--epochs", "1", "--device", "cpu",
                    "--set", "all.batch_size=512")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if line.startswith("warning: an epoch is")]
    assert said and len(said) == len(set(said)), result.output
    assert "TrainingWarning" not in result.output and "loop.py" not in result.output


def test_a_tiny_schedule_is_advised_in_the_tables_own_options(tmp_path):
    """The warning of too few steps an epoch told a table user to pass --batch-size or --gamma,
    which table does not have (it takes --set batch_size=N)."""
    store = age_gender_store(tmp_path / "store", n_adience=300, n_imdb=50, n_wiki=50)
    result = invoke("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
                    "--inits", "scratch", "--folds", "0", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    [said] = [line for line in result.output.splitlines() if line.startswith("warning: an epoch is")]
    assert "--set batch_size=" in said, said
    assert invoke("table", "--batch-size", "4").exit_code == 2  # an option only train has


def test_a_manifest_change_is_said_once_when_cells_train(tmp_path):
    """Stale labels are said once a table by run_table; the runs it trains warn of them again
    (TrainingWarning), which the table command then said a second time."""
    store = age_gender_store(tmp_path / "store", n_adience=800, n_imdb=50, n_wiki=50)
    manifest = cut_from_a_manifest_changed_since(store, "adience", tmp_path)
    result = invoke("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
                    "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: adience: its manifest ({manifest}) has changed since") == 1, result.output


def test_a_cell_is_trained_again_in_another_precision_and_an_old_float32_one_is_reused(table_run, tmp_path,
                                                                                        monkeypatch):
    """A cell's identity holds the precision its runs trained in; one recorded before there was
    one trained in float32 (the stacked runs never autocast), so --fp32 reuses it."""
    monkeypatch.setattr("agepipe.train.model.bf16_native", lambda device: True)
    store, *_ = table_run
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "age", "--variants", "full",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args, "--fp32").exit_code == 0
    cell = tmp_path / "t" / "age" / "scratch" / "full" / "cell.json"
    done = json.loads(cell.read_text())
    assert done["identity"].pop("precision") == "float32"
    cell.write_text(json.dumps(done))  # as a cell trained before the precision was recorded
    assert "reused" in invoke(*args, "--fp32").output
    again = invoke(*args)
    assert "precision changed)" in again.output and "reused" not in again.output
    assert json.loads(cell.read_text())["identity"]["precision"] == "bfloat16"
    assert "reused" in invoke(*args).output


def test_fp32_reuses_a_cell_where_the_device_has_no_bfloat16_to_leave(tmp_path, monkeypatch):
    """Where the device lacks bfloat16 both ways train in float32, the same runs: --fp32 on a cell
    trained without it (or the reverse) reuses it. (train.amp differed, so every cell trained again.)"""
    monkeypatch.setattr("agepipe.train.model.bf16_native", lambda device: False)
    store = age_gender_store(tmp_path / "store", n_adience=400, n_imdb=50, n_wiki=50)
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "age", "--variants", "full",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args).exit_code == 0
    again = invoke(*args, "--fp32")
    assert again.exit_code == 0 and "reused" in again.output, again.output


def test_pretraining_on_the_people_of_the_cross_validation_is_refused(tmp_path):
    """Pre-training uses every row: on --dataset's own people it saw each run's test fold, and the
    pre-trained cells' accuracies came out inflated without a word."""
    store = age_gender_store(tmp_path / "store", n_adience=400, n_imdb=50, n_wiki=50)
    result = invoke("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
                    "--inits", "scratch,pretrained", "--folds", "0", "--seeds", "1", "--epochs", "1",
                    "--device", "cpu", "--pretrain-dataset", "adience")
    assert result.exit_code == 1
    assert "subject(s) of the cross-validation rows are in the pre-training rows too" in result.output
    assert not (tmp_path / "t").exists()


def test_rows_without_every_fold_are_refused_before_any_cell_pre_trains(tmp_path):
    # The cross-validation found it, after the first pre-trained cell had pre-trained for nothing.
    mixture = Mixture.make(classes=16)
    x, y = mixture.sample(200, seed=1)
    rows = adience_like(y // 2)
    rows["fold"] = rows["fold"] % 4
    write_store(tmp_path / "store", x, rows, dataset="adience")
    x, y = mixture.sample(100, seed=2)
    write_store(tmp_path / "store", x, {"subject_id": np.array([f"imdb{i}" for i in range(100)]),
                                        "age": AGE_BIN_MIDPOINTS[y // 2], "gender": y % 2}, dataset="imdb")
    result = invoke("table", "--store", tmp_path / "store", "--out", tmp_path / "t", "--tasks", "gender",
                    "--variants", "full", "--inits", "pretrained", "--seeds", "1", "--epochs", "1", "--device", "cpu",
                    "--pretrain-dataset", "imdb")
    assert result.exit_code == 1 and "cross-validation needs rows in folds 0-4; these rows have folds [0, 1, 2, 3]" \
        in result.output, result.output
    assert not (tmp_path / "t").exists()


def test_a_cell_that_diverges_is_marked_and_the_other_cells_go_on(tmp_path):
    # One cell's learning rate stopped the whole table, the cells after it never trained.
    store = age_gender_store(tmp_path / "store", n_adience=300, n_imdb=50, n_wiki=50)
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full,no-ic",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "2", "--device", "cpu")
    result = invoke(*args, "--set", "full.lr=1e8")
    assert result.exit_code == 1, result.output
    assert "1 of 2 cell(s) diverged (table.md marks them; a rerun trains only them again): gender scratch full: " \
        in result.output and "a cell's learning rate is --set VARIANT.lr=VALUE" in result.output
    full, no_ic = read_csv(tmp_path / "t" / "table.csv")
    assert "training diverged" in full["diverged"] and full["runs"] == "0" and full["accuracy_mean"] == ""
    assert no_ic["diverged"] == "" and no_ic["runs"] == "2" and float(no_ic["accuracy_mean"]) > 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| full | scratch | diverged |" in md and "Cells whose training diverged" in md
    # a rerun with a learning rate that trains: the diverged cell trains, the other is reused
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "gender scratch full: its training diverged after" in result.output
    assert "gender scratch no-ic: accuracy" in again.output and "reused" in again.output.split("no-ic")[-1]
    assert all(r["diverged"] == "" and r["runs"] == "2" for r in read_csv(tmp_path / "t" / "table.csv"))


def retrain_stopped_after_its_runs(args: tuple, monkeypatch) -> None:
    """``args`` run at 1 epoch, then again at 2 (other settings: the cell trains again), stopped
    (Ctrl-C) once the cell's runs are replaced and before its record is written."""
    import agepipe.train.table as table

    assert invoke(*args, "--epochs", "1").exit_code == 0
    real = table.cross_validate

    def stopped_after_the_runs(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(table, "cross_validate", stopped_after_the_runs)
    assert invoke(*args, "--epochs", "2").exit_code == 130
    monkeypatch.setattr(table, "cross_validate", real)


def test_a_cell_whose_retraining_stopped_is_not_reused_as_its_old_record(table_run, tmp_path, monkeypatch):
    """Settings changed, the cell trains again and stops part-way (Ctrl-C) after its runs were
    replaced: a rerun with the old settings reused the old cell.json, whose numbers then sat in
    table.md beside a folder of the new settings' runs."""
    store, *_ = table_run
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--device", "cpu")
    retrain_stopped_after_its_runs(args, monkeypatch)
    again = invoke(*args, "--epochs", "1")
    assert again.exit_code == 0 and "reused" not in again.output
    cv = json.loads((tmp_path / "t" / "gender" / "scratch" / "full" / "cv.json").read_text())
    row, = read_csv(tmp_path / "t" / "table.csv")
    assert float(row["accuracy_mean"]) == pytest.approx(cv["summary"]["test_accuracy"]["mean"])


def test_all_five_folds_named_reuse_the_cells_of_the_default(table_run, tmp_path):
    """--folds 0,1,2,3,4 trains the very runs the default does; it trained every cell again."""
    store, *_ = table_run
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "no-ic",
            "--inits", "scratch", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args).exit_code == 0
    again = invoke(*args, "--folds", "4,3,2,1,0")
    assert again.exit_code == 0 and "reused" in again.output, again.output


@pytest.mark.parametrize("damage", [lambda text: text[:len(text) // 2], lambda text: "[1, 2]",
                                    lambda text: '{"identity": []}',
                                    lambda text: json.dumps({**json.loads(text), "accuracy": None})])
def test_a_damaged_cell_record_is_trained_again_naming_the_file(tmp_path, damage):
    """A cell.json cut short, or JSON that is not a cell's record (an edit, a failing disk): a rerun
    stopped on a bare JSON error naming no file (or a TypeError); the cell now trains again."""
    store = age_gender_store(tmp_path / "store", n_adience=400, n_imdb=50, n_wiki=50)
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args).exit_code == 0
    cell = tmp_path / "t" / "gender" / "scratch" / "full" / "cell.json"
    cell.write_text(damage(cell.read_text()))
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert f"(again: {cell} is damaged" in again.output and "reused" not in again.output
    assert json.loads(cell.read_text())["identity"]["task"] == "gender"
    assert "reused" in invoke(*args).output


def test_a_cell_recorded_without_its_folds_is_trained_again(tmp_path):
    """cell.json written before the interval was over the folds' means holds no folds."""
    store = age_gender_store(tmp_path / "store", n_adience=400, n_imdb=50, n_wiki=50)
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert invoke(*args).exit_code == 0
    cell = tmp_path / "t" / "gender" / "scratch" / "full" / "cell.json"
    done = json.loads(cell.read_text())
    assert done["folds"] == [0, 1]
    cell.write_text(json.dumps({k: v for k, v in done.items() if k != "folds"}))
    again = invoke(*args)
    assert again.exit_code == 0 and "(again: recorded without its runs' test folds)" in again.output, again.output


def test_a_cell_recorded_before_temperature_scaling_is_reused(table_run, tmp_path):
    """train.calibrate joined the cell's identity with temperature scaling, which leaves the
    deterministic accuracies of the table as they were: an older cell.json must not train again."""
    store, *_ = table_run
    args, cell, done = one_cell(store, tmp_path)
    assert done["identity"]["train"].pop("calibrate") is True
    cell.write_text(json.dumps(done))  # as a cell trained before temperature scaling
    again = invoke(*args)
    assert again.exit_code == 0 and "reused" in again.output and "again:" not in again.output, again.output


def test_a_cell_whose_runs_a_later_cross_validation_replaced_is_trained_again(table_run, tmp_path):
    """`train --cv --out` into a finished cell (other settings, other seeds) replaced its runs and
    cv.json, and the table reused cell.json all the same: its accuracies, of runs no longer there."""
    store, *_ = table_run
    args, cell, done = one_cell(store, tmp_path)
    result = invoke("train", "--store", store, "--dataset", "adience", "--task", "gender", "--cv", "--out",
                    cell.parent, "--epochs", "1", "--lr", "0.0001", "--mc-samples", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert f"(again: {cell.parent / 'cv.json'} records other runs" in again.output and "reused" not in again.output
    cv = json.loads((cell.parent / "cv.json").read_text())
    assert [r["test_accuracy"] for r in cv["runs"]] == json.loads(cell.read_text())["accuracy"]
    assert "reused" in invoke(*args).output


def test_a_table_stopped_while_a_cell_trains_again_leaves_no_earlier_table(table_run, tmp_path, monkeypatch):
    """A rerun with other settings, stopped part-way (Ctrl-C, a cell that diverged): table.md and
    table.csv of the earlier settings stayed, their numbers those of runs the rerun had replaced."""
    store, *_ = table_run
    args = ("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "no-ic",
            "--inits", "scratch", "--folds", "0,1", "--seeds", "1", "--device", "cpu")
    retrain_stopped_after_its_runs(args, monkeypatch)
    assert not (tmp_path / "t" / "table.md").exists() and not (tmp_path / "t" / "table.csv").exists()
