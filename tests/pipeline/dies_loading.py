"""A Dask worker preload: the worker kills itself (SIGKILL) as it loads its models, as one that the
kernel's OOM killer picks at that memory peak would."""
import os
import signal

from agepipe.pipeline import extract


def load_models(cfg):
    os.kill(os.getpid(), signal.SIGKILL)


extract.load_models = load_models
