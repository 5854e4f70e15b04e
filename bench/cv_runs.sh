#!/bin/sh
# bench/cv_runs.sh TREE: `agepipe train --cv --seeds 5` (25 runs: 5 folds x 5 seeds, the paper's
# settings for age, early stopping on) from the checkout TREE, on a synthetic store of $ROWS
# Adience-like rows (default 3,000) written by TREE's own test helper (the store layout changed
# over time; the rows are the same). What a user waits for, from the command line. Compare two
# checkouts side by side, e.g. today's against the one issue 12 measured (e8878fc):
#   git worktree add /tmp/old e8878fc && cd /tmp &&
#   farm-bench -n 3 --vs "$PWD/bench/cv_runs.sh /tmp/old" -- "$PWD/bench/cv_runs.sh $PWD"
# Run it from outside both trees: `python -m` puts the working folder first on the path.
set -e
tree=$(cd "$1" && pwd)
python=${PYTHON:-$tree/.venv/bin/python}
[ -x "$python" ] || python=$(dirname "$0")/../.venv/bin/python
rows=${ROWS:-3000}
store=${TMPDIR:-/tmp}/agepipe-cv-runs-store-$rows-$(cd "$tree" && git rev-parse --short HEAD:agepipe/features/store.py)
if [ ! -d "$store" ]; then
    PYTHONPATH=$tree "$python" -c "import sys; from pathlib import Path
from tests.train.synthetic_store import Mixture, adience_like, write_store
x, y = Mixture.make(seed=1).sample(int(sys.argv[2]), seed=2)
write_store(Path(sys.argv[1]), x, adience_like(y, subjects=200))" "$store.$$" "$rows"
    mv "$store.$$" "$store"   # whole or not at all
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PYTHONPATH=$tree "$python" -m agepipe train --store "$store" --out "$out/cv" --dataset adience --task age \
    --cv --seeds 5 --device cpu 2>/dev/null | grep -E "test_accuracy |val_accuracy "
