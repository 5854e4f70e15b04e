"""Help texts and README claims that once said something untrue."""
import re
from pathlib import Path

from click.testing import CliRunner

from agepipe.cli import cli

README = (Path(__file__).parents[1] / "README.md").read_text()


def help_of(*args) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_group_help_lists_each_command_once_and_whole():
    text = help_of()
    for name in cli.commands:
        assert len(re.findall(rf"^  {name}\b", text, flags=re.M)) == 1, name
    assert "..." not in text.split("Commands:")[1]  # no short help cut off


def test_models_help_offers_only_commands_that_exist():
    text = help_of("models")
    assert "check" not in text
    assert set(re.findall(r"^  (\w+)  ", text.split("Commands:")[1], flags=re.M)) == set(cli.commands["models"].commands)
    assert "..." not in text.split("Commands:")[1]


def test_train_help_names_the_sample_dataset_and_shows_defaults():
    text = " ".join(help_of("train").split())
    assert "sample" in text and "gamma 0.39479" in text
    assert "[default: 0;" in text and "[default: 32;" in text and "default: auto]" in text


def test_readme_default_pack_agrees_with_the_option():
    default = next(p for p in cli.commands["extract"].params if p.name == "pack").default
    assert default == "buffalo_s"
    assert "`--models` defaults to `buffalo_s`" in README
    assert "buffalo_l` (default" not in README


def test_demo_does_not_import_the_cli():
    source = (Path(__file__).parents[1] / "agepipe" / "demo.py").read_text()
    assert "agepipe.cli" not in source and "STEPS" not in source


def test_every_command_has_a_short_help():
    from agepipe.cli import SHORT_HELP

    assert set(SHORT_HELP) == set(cli.commands)


def test_train_help_states_the_paper_values_the_code_uses():
    from agepipe.train.loop import PAPER_TRAIN

    text = " ".join(help_of("train").split())
    for task in ("age", "gender"):
        cfg = PAPER_TRAIN[task]
        assert f"{task}: batch {cfg.batch_size}, lr {cfg.lr}" in text, task  # 0.001167 within 0.0011670
        assert f"weight decay {cfg.weight_decay}" in text and f"gamma {cfg.gamma}" in text


def test_every_option_of_every_command_says_what_it_does():
    # --weight-decay and the MLP commands' --device once showed only their type and default.
    import click

    def options(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from options(sub, [*path, name])
        for param in command.params:
            if isinstance(param, click.Option):
                yield " ".join(path), param

    missing = [f"{path} --{p.name}" for path, p in options(cli, ["agepipe"]) if not (p.help or "").strip()]
    assert not missing, missing
    assert "auto is cuda when torch sees a GPU" in " ".join(help_of("train").split())


def test_embed_batch_size_refuses_zero(tmp_path):
    # embed's once took 0 and -3 without a word (and ran photo by photo)
    result = CliRunner().invoke(cli, ["embed", str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "x.parquet"),
                                      "--batch-size", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output
    assert "[default: 16; x>=1]" in " ".join(help_of("embed").split())


def test_only_extract_says_runtime_torch_is_the_device_pipeline():
    # embed's --runtime torch runs the ONNX files in PyTorch through FaceEmbedder, photo batches as
    # with onnxruntime; only extract's runs features/gpu.py, yet embed's help once said it did.
    assert "device pipeline" not in " ".join(help_of("embed").split())
    assert "the batched device pipeline for GPUs" in " ".join(help_of("extract").split())


def test_models_fetch_says_only_buffalo_l_downloads(tmp_path):
    # its help said any PACK is downloaded into insightface's cache; buffalo_s is only found in its wheel
    result = CliRunner().invoke(cli, ["models", "fetch", "buffalo_s"], env={"INSIGHTFACE_HOME": str(tmp_path)})
    assert result.exit_code == 0 and result.output.count("sha256") == 2, result.output
    assert not list(tmp_path.iterdir())
    assert "buffalo_l is the only pack that downloads" in " ".join(help_of("models", "fetch").split())


def test_embed_help_names_every_column_it_writes():
    # its list once left out status and error
    from agepipe.features.embed import FACES_SCHEMA_FIELDS

    text = " ".join(help_of("embed").split()).split("One row per face:")[1].split(".")[0]
    assert [c for c in FACES_SCHEMA_FIELDS if c not in re.findall(r"\w+", text)] == []


def test_every_example_in_a_help_gives_options_its_command_has():
    import shlex

    import click

    def commands(command, path):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from commands(sub, [*path, name])

    examples = [line.strip() for path, command in commands(cli, []) for line in help_of(*path).splitlines()
                if line.strip().startswith("agepipe ")]
    assert len(examples) > 10
    for line in examples:
        words, command = shlex.split(line)[1:], cli
        while isinstance(command, click.Group) and words and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        names = {o for p in command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        assert not [w for w in words if w.startswith("-") and w.split("=")[0] not in names], line
