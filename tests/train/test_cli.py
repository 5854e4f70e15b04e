import json

from click.testing import CliRunner

from agepipe.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def sizes_val(config: dict) -> int:
    return config["data"]["split_sizes"]["val"]


def test_train_then_evaluate_from_the_command_line(gaussian_store, tmp_path):
    store, _ = gaussian_store
    run = tmp_path / "run"
    result = invoke("train", "--store", store, "--dataset", "adience", "--task", "age", "--out", run,
                    "--epochs", "2", "--mc-samples", "4", "--test-fold", "3")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "MC dropout" in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["test_fold"] == 3 and config["train"]["epochs"] == 2
    (run / "report.md").unlink()
    result = invoke("evaluate", run, "--mc-samples", "0")
    assert result.exit_code == 0, result.output
    assert (run / "report.md").exists()
    assert not [line for line in result.output.splitlines() if line.startswith("  test ") and "MC dropout" in line]
    # the run's temperature, fitted at training for its K=4 prediction, is applied and said
    assert f"Temperature scaling: T = {config['temperature']:.3f}, fitted on {sizes_val(config)} validation rows" \
        in result.output
    sizes = config["data"]["split_sizes"]  # in words, not a Python dict's repr
    assert f"(rows: train {sizes['train']}, val {sizes['val']}, test {sizes['test']})" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert "mc" not in metrics["test"] and metrics["best_epoch"] <= 2


def test_ablation_switches_reach_the_model(gaussian_store, tmp_path):
    store, _ = gaussian_store
    result = invoke("train", "--store", store, "--dataset", "adience", "--task", "gender", "--out", tmp_path,
                    "--epochs", "1", "--no-batch-norm", "--no-skip", "--dropout", "0", "--blocks", "3")
    assert result.exit_code == 0, result.output
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert model == {**model, "batch_norm": False, "skip": False, "dropout": 0.0, "num_blocks": 3,
                     "num_classes": 2}
    assert "mc" not in json.loads((tmp_path / "metrics.json").read_text())["test"]


def test_cv_from_the_command_line(gaussian_store, tmp_path):
    store, _ = gaussian_store
    (tmp_path / "fold0-seed3").mkdir()  # a run of an earlier cross-validation with more seeds
    (tmp_path / "fold0-seed3" / "config.json").write_text('{"format": "agepipe-run"}')
    result = invoke("train", "--store", store, "--dataset", "adience", "--task", "age", "--cv", "--out", tmp_path,
                    "--epochs", "1", "--mc-samples", "2")
    assert result.exit_code == 0, result.output
    assert "5 runs" in result.output and "test_accuracy" in result.output
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert len(cv["runs"]) == 5
    # each run's temperature, fitted on its own validation rows, and their mean: in cv.json and said
    for r in cv["runs"]:
        config = json.loads((tmp_path / f"fold{r['fold']}-seed{r['seed']}" / "config.json").read_text())
        assert r["temperature"] == config["temperature"]
        assert r["deterministic_temperature"] == config.get("deterministic_temperature", 1.0)  # 1: none fitted
    for key in ("temperature", "deterministic_temperature"):
        t = cv["summary"][key]
        assert f"  {key:<26} {t['mean']:.4f} +- {t['std']:.4f}\n" in result.output
    assert "removed 1 run folder(s) of an earlier cross-validation: fold0-seed3\n" in result.output
    assert not (tmp_path / "fold0-seed3").exists()


def test_a_single_run_and_a_cross_validation_do_not_share_a_folder(gaussian_store, tmp_path):
    """A run into a cross-validation's --out (or a --cv into a run's) wrote its report.md and
    plots over the other's, leaving config.json and cv.json side by side; it is refused, naming
    the folder, before any training."""
    store, _ = gaussian_store
    common = ("train", "--store", store, "--dataset", "adience", "--task", "gender", "--epochs", "1", "--mc-samples", "0")
    assert invoke(*common, "--cv", "--out", tmp_path / "cv").exit_code == 0
    cv_report = (tmp_path / "cv" / "report.md").read_text()
    result = invoke(*common, "--out", tmp_path / "cv")
    assert result.exit_code == 1 and f"{tmp_path / 'cv'} holds a cross-validation (cv.json)" in result.output
    assert not (tmp_path / "cv" / "config.json").exists() and (tmp_path / "cv" / "report.md").read_text() == cv_report
    assert invoke(*common, "--out", tmp_path / "run").exit_code == 0
    run_report = (tmp_path / "run" / "report.md").read_text()
    result = invoke(*common, "--cv", "--out", tmp_path / "run")
    assert result.exit_code == 1 and f"{tmp_path / 'run'} holds a run (config.json)" in result.output
    assert not (tmp_path / "run" / "cv.json").exists() and (tmp_path / "run" / "report.md").read_text() == run_report
    assert invoke(*common, "--out", tmp_path / "run").exit_code == 0  # a run again into its own folder: as before


def test_init_from_a_run_this_command_writes_is_refused_before_any_write(gaussian_store, tmp_path):
    """`train --cv --init X/fold0-seed0 --out X` trained fold 0 seed 0 again, over the run all five
    started from; a single run's --init its own --out (or a run inside it) likewise. Each is refused,
    naming both paths, with every file under them as it was."""
    import shutil

    store, _ = gaussian_store
    common = ("train", "--store", store, "--dataset", "adience", "--task", "gender", "--epochs", "1", "--mc-samples", "0")
    cv, run = tmp_path / "cv", tmp_path / "run"
    assert invoke(*common, "--cv", "--out", cv).exit_code == 0
    assert invoke(*common, "--out", run).exit_code == 0
    shutil.copytree(run, cv / "fold2-seed0" / "pre")
    shutil.copytree(cv / "fold1-seed0", run / "pre")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for init, out, flags, written in [(cv / "fold0-seed0", cv, ("--cv",), cv / "fold0-seed0"),
                                      (cv / "fold2-seed0" / "pre", cv, ("--cv",), cv / "fold2-seed0"),
                                      (run, run, (), run), (run / "pre", run, (), run)]:
        result = invoke(*common, *flags, "--init", init, "--out", out)
        assert result.exit_code == 1 and f"Error: --init {init}: " in result.output, result.output
        assert f"--out {out}` writes {written}" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_evaluate_from_another_store_than_the_runs_names_both(gaussian_store, tmp_path):
    """AGEPIPE_STORE (set for another project) overrides the store a run recorded: evaluate said only
    "feature set ... not in OTHER", not that the run came from elsewhere nor why OTHER was read."""
    store, _ = gaussian_store
    run = tmp_path / "run"
    assert invoke("train", "--store", store, "--dataset", "adience", "--task", "gender", "--out", run,
                  "--epochs", "1", "--mc-samples", "0").exit_code == 0
    other = tmp_path / "other-store"
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--mc-samples", "0"], env={"AGEPIPE_STORE": str(other)})
    assert result.exit_code == 1 and f"not in {other} (found: none)" in result.output, result.output
    assert (f"{run} was trained from the store {store}; --store (or env AGEPIPE_STORE) pointed evaluate at "
            f"{other}") in " ".join(result.output.split()), result.output


def test_init_from_another_architecture_names_what_differs(gaussian_store, tmp_path):
    """--init from a run of another architecture printed both ModelConfig reprs; it names the
    fields that differ and the options that set them."""
    store, _ = gaussian_store
    common = ("train", "--store", store, "--dataset", "adience", "--task", "gender", "--epochs", "1", "--mc-samples", "0")
    assert invoke(*common, "--out", tmp_path / "pre").exit_code == 0
    result = invoke(*common, "--out", tmp_path / "fine", "--init", tmp_path / "pre", "--no-skip")
    assert result.exit_code == 1
    assert "skip True there, False here (--no-skip)" in result.output and "ModelConfig(" not in result.output
    assert "dropout" not in result.output  # what agrees is not listed


def test_clear_errors(gaussian_store, tmp_path):
    store, _ = gaussian_store
    result = invoke("train", "--store", store, "--dataset", "imdb", "--task", "age", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "holds no dataset 'imdb'" in result.output
    assert "run `agepipe extract --dataset imdb` first" in result.output
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"arch": "ResMLP"}')
    result = invoke("evaluate", tmp_path / "foreign")
    assert result.exit_code == 1 and "not an agepipe run config" in result.output


def test_options_the_kind_of_training_would_ignore_are_refused(gaussian_store, tmp_path):
    # --seeds without --cv trained one run, --seed or --test-fold with --cv were dropped: silently.
    store, _ = gaussian_store
    base = ("train", "--store", store, "--dataset", "adience", "--task", "age", "--epochs", "1")
    result = invoke(*base, "--out", tmp_path / "a", "--seeds", "5")
    assert result.exit_code == 2 and "--seeds N is for --cv" in result.output
    result = invoke(*base, "--out", tmp_path / "b", "--cv", "--seed", "3", "--test-fold", "2")
    assert result.exit_code == 2 and "--seed and --test-fold: for a single run" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_architecture_options_stop_where_a_run_could_still_be_loaded(tmp_path):
    """A run with more residual blocks than checkpoint.py reads trained and saved, then evaluate,
    predict and --init refused it."""
    from agepipe.train.checkpoint import MAX_BLOCKS, MAX_RESIDUALS

    params = {p.name: p.type for p in cli.commands["train"].params}
    assert params["residuals_per_block"].max == MAX_RESIDUALS and params["blocks"].max <= MAX_BLOCKS
    result = invoke("train", "--dataset", "adience", "--task", "age", "--out", tmp_path / "r",
                    "--residuals-per-block", MAX_RESIDUALS + 1)
    assert result.exit_code == 2 and "--residuals-per-block" in result.output and not (tmp_path / "r").exists()


def test_a_misspelled_dataset_or_an_empty_store_says_what_to_do(gaussian_store, tmp_path):
    # A typo was told to run `agepipe extract --dataset adeince`, which download then refused; a
    # store with no feature set was told to name one with --feature-set.
    store, _ = gaussian_store
    result = invoke("train", "--store", store, "--dataset", "adeince", "--task", "age", "--out", tmp_path / "a")
    assert result.exit_code == 1 and "holds no dataset 'adeince' (it holds: adience" in result.output
    assert "'adeince' is no dataset agepipe knows" in result.output and "agepipe extract" not in result.output
    result = invoke("table", "--store", store, "--dataset", "adeince", "--out", tmp_path / "t")
    assert result.exit_code == 1 and "'adeince' is no dataset agepipe knows" in result.output
    result = invoke("train", "--store", tmp_path / "empty", "--dataset", "adience", "--task", "age")
    assert result.exit_code == 1 and "no feature sets in" in result.output
    assert "run `agepipe extract --dataset NAME` first" in result.output and "--feature-set" not in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "t").exists()


def test_evaluate_from_a_store_without_the_runs_feature_set_names_it(gaussian_store, tmp_path):
    store, _ = gaussian_store
    run = tmp_path / "run"
    assert invoke("train", "--store", store, "--dataset", "adience", "--task", "gender", "--out", run,
                  "--epochs", "1", "--mc-samples", "0").exit_code == 0
    result = invoke("evaluate", run, "--store", tmp_path / "elsewhere")
    assert result.exit_code == 1 and f"not in {tmp_path / 'elsewhere'} (found: none)" in result.output
    assert "agepipe extract" not in result.output


def test_a_second_command_writing_the_same_folder_stops_before_any_work(gaussian_store, tmp_path):
    """Two `train --cv` (or `table`s, or `demo`s: a double click) into one folder at once wrote each
    other's run files; one removed the other's runs as an earlier cross-validation's, and one died
    in a FileNotFoundError traceback drawing its report from a fold folder the other replaced. The
    second now stops at once with a sentence. The first is held here as the lock a running command
    holds (flock on OUT/.lock: another open file, as another process's is)."""
    import fcntl

    store, _ = gaussian_store
    out = tmp_path / "out"
    table = ("table", "--store", store, "--out", out, "--tasks", "gender", "--variants", "full", "--inits", "scratch",
             "--folds", "0", "--seeds", "1", "--epochs", "1")
    commands = {
        out: [("train", "--store", store, "--dataset", "adience", "--task", "age", "--cv", "--epochs", "1",
               "--out", out),
              ("train", "--store", store, "--dataset", "adience", "--task", "age", "--epochs", "1", "--out", out),
              table, ("demo", "--workdir", out)],
        out / "gender" / "scratch" / "full": [table],  # a `train --cv --out` into the table's cell
    }
    for held, argvs in commands.items():
        held.mkdir(parents=True, exist_ok=True)
        with open(held / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for argv in argvs:
                result = invoke(*argv)
                assert result.exit_code == 1, (argv, result.output)
                assert f"{held}: another agepipe command is writing this folder now; let it finish, or give " \
                       f"`agepipe {argv[0]}` another one" in result.output, result.output
                assert "Traceback" not in result.output
                assert not list(held.glob("fold*")) and not (out / "table.md").exists()
    result = invoke(*table)  # the first done, the next runs
    assert result.exit_code == 0, result.output


def test_table_cuda_graphs_on_a_cpu_says_it_steps_as_usual(gaussian_store, tmp_path):
    # The flag was dropped without a word where the runs train on the CPU.
    store, _ = gaussian_store
    result = invoke("table", "--store", store, "--out", tmp_path / "t", "--tasks", "gender", "--variants", "full",
                    "--inits", "scratch", "--folds", "0", "--seeds", "1", "--epochs", "1", "--device", "cpu",
                    "--cuda-graphs")
    assert result.exit_code == 0, result.output
    assert "warning: --cuda-graphs: the runs train on the CPU, so they step as usual" in result.output


def test_train_says_which_rows_it_left_out_and_why(tmp_path):
    """DESIGN: every tool reports how many rows had which status. train said only how many rows
    each split had: a store's no_face and decode_error rows, those under --min-det-score and
    those without a label left no trace in its output, metrics.json or report.md."""
    import numpy as np

    from tests.train.synthetic_store import Mixture, adience_like, write_store

    x, y = Mixture.make().sample(600)
    rows = adience_like(y)
    rows["status"] = np.array(["ok"] * 590 + ["no_face"] * 6 + ["decode_error"] * 4, dtype=object)
    rows["det_score"] = np.where(np.arange(600) < 7, 0.4, 0.9)  # 7 ok rows under the threshold
    rows["gender"][10:13] = -1
    store = write_store(tmp_path / "store", x, rows)
    run = tmp_path / "run"
    result = invoke("train", "--store", store, "--dataset", "adience", "--task", "gender", "--out", run,
                    "--epochs", "1", "--mc-samples", "0", "--test-fold", "0", "--min-det-score", "0.5")
    assert result.exit_code == 0, result.output
    said = "left out: decode_error 4, det_score_below_min 7, no_face 6, unknown_label 3"
    assert f"  {said}\n" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["left_out"] == {"decode_error": 4, "det_score_below_min": 7, "no_face": 6, "unknown_label": 3}
    assert sum(metrics["split_sizes"].values()) + sum(metrics["left_out"].values()) == 600  # every row
    assert said in (run / "report.md").read_text()
    result = invoke("evaluate", run, "--mc-samples", "0")  # scored again: the same rows said
    assert result.exit_code == 0, result.output
    assert f"  {said}\n" in result.output and said in (run / "report.md").read_text()
    result = invoke("train", "--store", store, "--dataset", "adience", "--task", "gender", "--out", tmp_path / "cv",
                    "--cv", "--epochs", "1", "--mc-samples", "0", "--min-det-score", "0.5")
    assert result.exit_code == 0, result.output
    assert f"  {said}\n" in result.output
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["left_out"] == metrics["left_out"]
