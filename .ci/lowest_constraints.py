"""Print pip constraints pinning every runtime dependency of pyproject.toml to its floor (the
version after ">="), for the lowest-versions environment that .ci/run tests."""
import re
import sys
import tomllib
from pathlib import Path

pyproject = Path(__file__).parents[1] / "pyproject.toml"
for dep in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][^,;\s]*)", dep.strip())
    if not m:
        sys.exit(f"{pyproject}: {dep!r} needs a plain floor (name>=version) to be tested")
    print(f"{m[1]}=={m[2]}")   # constraints take no extras: dask[distributed]'s own pin brings distributed
