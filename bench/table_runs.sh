#!/bin/sh
# bench/table_runs.sh TREE: `agepipe table` from the checkout TREE on a grid with every run but
# little training (age x {full, no-ic} x {scratch, pre-trained} x 5 folds x 5 seeds, 1 epoch; a
# synthetic store of 600 Adience, 600 IMDB and 200 WIKI rows, written once to $STORE), so its
# time is mostly each run's host cost. Compare two checkouts side by side, e.g.:
#   git worktree add /tmp/old <rev> && cd /tmp &&
#   farm-bench -n 3 --vs "$PWD/bench/table_runs.sh /tmp/old" -- "$PWD/bench/table_runs.sh $PWD"
# Run it from outside both trees: `python -m` puts the working folder first on the path.
set -e
tree=$(cd "$1" && pwd)
python=${PYTHON:-$tree/.venv/bin/python}
[ -x "$python" ] || python=$(dirname "$0")/../.venv/bin/python
store=${STORE:-${TMPDIR:-/tmp}/agepipe-table-runs-store}
if [ ! -d "$store" ]; then
    PYTHONPATH=$tree "$python" -c "import sys; from pathlib import Path
from tests.train.synthetic_store import age_gender_store
age_gender_store(Path(sys.argv[1]), n_adience=600, n_imdb=600, n_wiki=200)" "$store.$$"
    mv "$store.$$" "$store"   # whole or not at all
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PYTHONPATH=$tree "$python" -m agepipe table --store "$store" --out "$out" --tasks age --variants full,no-ic \
    --epochs 1 --device cpu 2>/dev/null | tail -1
