#!/bin/sh
# bench/cv_report.sh TREE CV: the cross-validation report of the finished runs in CV (the --out
# folder of `agepipe train --cv`) drawn again from scratch by TREE's code: each run's report.md and
# four plots (one process per core), then the CV's own. Run folders are copied without their
# reports first, so every call draws the same work. Compare two checkouts side by side, e.g.:
#   git worktree add /tmp/old HEAD~1 && cd /tmp &&
#   farm-bench -n 3 --vs "$PWD/bench/cv_report.sh /tmp/old runs/cv" -- "$PWD/bench/cv_report.sh $PWD runs/cv"
# Run it from outside both trees: `python -c` puts the working folder first on the path.
set -e
tree=$(cd "$1" && pwd)
cv=$(cd "$2" && pwd)
python=${PYTHON:-$tree/.venv/bin/python}
[ -x "$python" ] || python=$(dirname "$0")/../.venv/bin/python
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for run in "$cv"/fold*-seed*; do
    mkdir "$out/${run##*/}"
    cp "$run/config.json" "$run/metrics.json" "$run/history.json" "$run/predictions.parquet" "$out/${run##*/}/"
done
mkdir "$out/cv"
PYTHONPATH=$tree "$python" -c "import glob, sys
from agepipe.train.report import write_cv_report
write_cv_report(sys.argv[1], sorted(glob.glob(sys.argv[2] + '/fold*-seed*')))" "$out/cv" "$out"
