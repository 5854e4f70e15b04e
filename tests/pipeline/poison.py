"""A Dask worker preload (``dask worker --preload tests.pipeline.poison``): a worker kills itself
with SIGKILL when a task reaches a photo $AGEPIPE_POISON names (comma-separated) while the file
$AGEPIPE_POISON_FLAG exists, as a photo that crashes its decoder would. Each kill is logged
to FLAG.kills first, so a test can show the kill landed during the run."""
import os
import signal

from agepipe.pipeline import extract

_embed_rows = extract.embed_rows


def embed_rows(rows, data_root, cfg, timings):
    flag = os.environ["AGEPIPE_POISON_FLAG"]
    if set(os.environ["AGEPIPE_POISON"].split(",")) & set(rows["image_id"].to_pylist()) and os.path.exists(flag):
        with open(flag + ".kills", "a") as log:
            log.write(f"{os.getpid()} {rows.num_rows}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return _embed_rows(rows, data_root, cfg, timings)


extract.embed_rows = embed_rows
