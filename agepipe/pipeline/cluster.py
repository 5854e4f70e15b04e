"""Where extraction runs: this machine's cores, one worker per GPU, or a cluster you already run.

Every mode yields a ``distributed.Client``; workers are separate processes that load the
models themselves (nothing model-shaped is sent from the client).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass


# A Dask scheduler runs whatever it is sent: the ones agepipe starts listen on loopback only.
LOOPBACK = "127.0.0.1"


class ClusterError(Exception):
    """No cluster to run on (a scheduler that does not answer); the message names it and what to do."""


@dataclass
class Layout:
    mode: str                 # "local", "gpus" or "scheduler"
    workers: int
    gpus: list[str] | None = None
    decode_threads: int = 4   # photo-decoding threads per worker


def gpu_layout(gpus: list[str]) -> Layout:
    """One worker per GPU, each decoding on its share of the node's cores."""
    return Layout("gpus", len(gpus), gpus, decode_threads=max(1, (os.cpu_count() or 1) // len(gpus)))


def parse_gpus(spec: str | None) -> list[str] | None:
    """``all`` -> every visible CUDA device; ``0,1`` -> those ids."""
    if not spec:
        return None
    if spec == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("--gpus all: torch sees no CUDA device on this machine")
        return [str(i) for i in range(count)]
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ValueError(f"--gpus takes 'all' or device ids like 0,1 (got {spec!r})")
    return ids


def local_layout(workers: int | None = None) -> Layout:
    cores = os.cpu_count() or 1
    n = workers or cores
    return Layout("local", n)


# Dask's defaults for the workers of clusters agepipe starts, overridden. MALLOC_TRIM_THRESHOLD_
# (set by every nanny) turns off glibc's adaptive mmap threshold, so each decoded photo and canvas
# (~1 MB) is mmap'd, page-faulted and unmapped anew: without it decoding in a worker ran 1.9x
# faster here (bench/worker_env_bench.py). The sampling profiler walks every thread's stack each 10 ms under
# the GIL that the decode threads and the device launches need.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                 "distributed.worker.profile.enabled": False}
# A GPU worker decodes in processes of its own (features/decoders.py): a daemonic worker may not
# start any. Its nanny still stops it with the cluster.
GPU_WORKER_CONFIG = {**WORKER_CONFIG, "distributed.worker.daemon": False}


@contextlib.contextmanager
def _without_env(name: str):
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def _silence_dashboard_warning():
    import logging

    logging.getLogger("distributed.dashboard").setLevel(logging.ERROR)


def check_address(address: str) -> None:
    """ValueError unless ``address`` is a Dask address (host:port, tcp://host:port, ...): given
    another (http://, host:port with no number), Client leaves a half-opened client behind."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    scheme, location = parse_address(address)
    get_backend(scheme)
    if scheme in ("tcp", "tls", "ws", "wss"):
        parse_host_port(location)


WORKER_START_TIMEOUT = 120  # seconds for the local workers to join their scheduler


@contextlib.contextmanager
def _workers_start(n: int):
    """ClusterError for local worker processes that do not start: one dies as it starts (distributed's
    'Nanny failed to start.' RuntimeError) or does not join in time (TimeoutError)."""
    try:
        yield
    except (RuntimeError, TimeoutError, OSError) as e:
        raise ClusterError(f"{n} local Dask worker process{'es' if n > 1 else ''} did not start "
                           f"({type(e).__name__}: {e}); free memory, or ask for fewer "
                           "(--workers N, --gpus)") from None


def say_no_workers(address: str) -> None:
    """On stderr: extract's setup checks ask every worker connected now (client.run), so on a cluster
    with none they pass having run nowhere. A WorkerPlugin would reach workers that join later, but
    distributed (2026.8) logs a joining worker's failed setup and gives it tasks all the same, and a
    plugin outlives the run on the scheduler of a cluster that is not agepipe's."""
    print(f"warning: the Dask scheduler at {address} has no workers yet: the checks made on every worker before "
          "any shard (that it sees the photos where the manifest says, that its face models load and match this "
          "machine's) will have run on none. The shards wait for workers to join; each checks its models with its "
          "first shard (missing or different ones stop the run) but not the photos: a worker that cannot see them "
          "records its shards' photos as missing_image (rerun with --retry-failed once it can). Start the workers "
          f"first (`dask worker {address}`) to have them checked", file=sys.stderr)


@contextlib.contextmanager
def open_client(scheduler: str | None = None, gpus: list[str] | None = None, workers: int | None = None):
    """A Client and its Layout for the chosen mode; a cluster we start is closed afterwards."""
    import dask
    from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

    _silence_dashboard_warning()
    if scheduler:
        try:
            check_address(scheduler)
            # dask's connect timeout: 30 s unless DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT says otherwise
            client = Client(scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, ValueError) as e:  # refused, timed out, no such host; no Dask address
            raise ClusterError(f"--scheduler {scheduler}: {e}; start it (`dask scheduler`, then `dask worker "
                               f"{scheduler}` where the photos are) or give the address it listens on "
                               "(tcp://host:8786)") from None
        try:
            n = len(client.scheduler_info(n_workers=-1)["workers"])
            if n == 0:
                say_no_workers(scheduler)
            yield client, Layout("scheduler", n)
        finally:
            client.close()
        return
    layout = gpu_layout(gpus) if gpus else local_layout(workers)
    # set for the cluster's whole life, not just its start: a nanny reads distributed.worker.daemon
    # each time it (re)starts its worker, and a daemonic GPU worker may not start decode processes
    with dask.config.set(GPU_WORKER_CONFIG if gpus else WORKER_CONFIG):
        # read by each nanny as it starts; a nanny of an earlier cluster in this process may have left
        # the variable in os.environ, which its workers would inherit
        with _without_env("MALLOC_TRIM_THRESHOLD_"), _workers_start(layout.workers):
            if gpus:
                # One worker process per GPU, each seeing only its own device, like dask-cuda's LocalCUDACluster.
                # Two task threads: one shard writes its Parquet while the next has the device (features/gpu.py
                # gives the device to one shard at a time, the waiting one's first batches decoded early).
                spec = {f"gpu-{g}": {"cls": Nanny, "options": {"nthreads": 2, "host": LOOPBACK, "silence_logs": 40,
                                                               "env": {"CUDA_VISIBLE_DEVICES": g}}}
                        for g in gpus}
                cluster = SpecCluster(workers=spec, silence_logs=40, scheduler={
                    "cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}})
            else:
                cluster = LocalCluster(n_workers=layout.workers, threads_per_worker=1, processes=True, host=LOOPBACK,
                                       dashboard_address=f"{LOOPBACK}:0", silence_logs=40)
        try:
            with Client(cluster) as client:
                with _workers_start(layout.workers):
                    client.wait_for_workers(layout.workers, timeout=WORKER_START_TIMEOUT)
                yield client, layout
        finally:
            cluster.close()


def dashboard_link(client) -> str | None:
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        return None
    return client.dashboard_link
