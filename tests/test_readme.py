"""The README's offline examples (its ```bash blocks) run as written, so the README cannot drift."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_offline_examples():
    commands = [line for block in bash_blocks() for line in block.splitlines() if line.startswith("agepipe ")]
    for name in ("embed", "download", "extract", "features", "train", "evaluate", "predict"):
        assert any(c.startswith(f"agepipe {name} ") for c in commands), name


def test_readme_examples_run(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in bash_blocks():
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README block failed:\n{block}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        if "agepipe train " in block:  # each model says plainly whether it beats its majority baseline
            said = [line for line in proc.stdout.splitlines() if "majority baseline" in line]
            assert len(said) >= 2 and all(("beats" in line) != ("does not beat" in line) for line in said), said
    assert (tmp_path / "faces.parquet").exists()
    assert (tmp_path / "annotated.jpg").stat().st_size > 10_000
    assert (tmp_path / "runs" / "gender" / "report.md").exists()
    # the columns the README lists are those the files have, in their order
    import pyarrow.parquet as pq

    text = " ".join(README.read_text().split())
    listed = re.findall(r"`(\w+)`", text.split("`predictions.parquet`: one row per validation and test photo with")[1]
                        .split("to study the errors")[0])
    assert listed == pq.read_schema(tmp_path / "runs" / "gender" / "predictions.parquet").names
    listed = re.findall(r"`(\w+)`", text.split("Each shard holds the manifest's columns")[1]
                        .split("`status` is the truth")[0])
    manifest = pq.read_schema(tmp_path / "data" / "sample" / "manifest.parquet").names
    [shard] = list((tmp_path / "store").glob("*/sample/part-00000-*.parquet"))
    assert listed == manifest + [c for c in pq.read_schema(shard).names if c not in manifest]


def test_every_option_the_readme_gives_a_command_exists():
    """Each `agepipe CMD ... --option` line in the README's code blocks, runnable or not, names
    options CMD has (the examples that need a network or a GPU are not run)."""
    import shlex

    import click

    from agepipe.cli import cli

    lines = [line.split("#")[0] for block in re.findall(r"```\w*\n(.*?)```", README.read_text(), flags=re.S)
             for line in block.splitlines() if line.startswith("agepipe ")]
    assert len(lines) > 20
    for line in lines:
        words = shlex.split(line.replace("$(", "(").replace('"$', '"'))[1:]
        command, path = cli, []
        while isinstance(command, click.Group) and words and words[0] in command.commands:
            command = command.commands[words[0]]
            path.append(words.pop(0))
        names = {o for p in command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in names]
        assert not unknown, f"README: agepipe {' '.join(path)} has no {unknown}: {line}"


def test_the_readme_does_not_install_onnxruntime_gpu_beside_onnxruntime():
    # `pip install "agepipe[gpu]"` after uninstalling onnxruntime brings it back: agepipe requires it.
    text = README.read_text()
    assert 'pip uninstall -y onnxruntime && pip install onnxruntime-gpu' in text
    assert 'onnxruntime && pip install "agepipe[gpu]"' not in text


def test_every_run_a_readme_block_names_was_trained_earlier_in_it():
    """A block's `--init RUN`, `--age-model RUN`, `--gender-model RUN` and `evaluate RUN` name a run
    folder (or a run inside a cross-validation's) that an earlier `agepipe train` of the same block
    wrote, at its --out or train's default: the workflow once predicted with a runs/gender no line trained."""
    import shlex

    from agepipe.cli import default_run_dir

    for block in re.findall(r"```\w*\n(.*?)```", README.read_text(), flags=re.S):
        written = []
        for line in block.splitlines():
            if not line.startswith("agepipe "):
                continue
            words = shlex.split(line.split("#")[0].replace("$(", "(").replace('"$', '"'))
            value = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("-")}
            named = [value[o] for o in ("--init", "--age-model", "--gender-model") if o in value]
            named += [words[2]] if words[1] == "evaluate" else []
            for run in named:
                assert any(run == w or Path(run).parent == Path(w) for w in written), f"README: no run {run}: {line}"
            if words[1] == "train":
                datasets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--dataset"]
                written.append(value.get("--out") or default_run_dir(value["--task"], datasets, "--cv" in words,
                                                                     int(value.get("--test-fold", 0))))


def test_how_the_code_fits_together_names_every_features_module():
    # "features/ holds one job per module: ..." once left out decoders.py
    section = README.read_text().split("## How the code fits together")[1].split("\n## ")[0]
    modules = {p.name for p in (README.parent / "agepipe" / "features").glob("*.py")} - {"__init__.py"}
    assert not {m for m in modules if f"`{m}`" not in section}


def test_supported_versions_table_gives_pyproject_floors():
    # the table is what .ci/run's lowest-versions environment pins; pyproject.toml is its source
    project = (README.parent / "pyproject.toml").read_text()
    dependencies = project.split("dependencies = [")[1].split("]\n")[0]
    floors = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)(?:\[\w+\])?>=([\w.]+)"', dependencies, flags=re.M))
    assert len(floors) > 10
    section = README.read_text().split("**Supported versions.**")[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    for package, floor in floors.items():
        cells = [c.strip() for row in rows for c in row.split("|")]
        where = [i for i, c in enumerate(cells) if package in re.split(r"[ ,/]+", c)]
        assert where, package
        # the floor is in the next cell (onnx / onnxruntime share one: "1.14.0 / 1.16.0")
        assert any(floor in re.split(r"[ /(]+", cells[i + 1]) for i in where), (package, floor)
