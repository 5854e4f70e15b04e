"""The Dask clusters agepipe starts itself: loopback only, their workers' settings, and the GPU
layout's decode threads."""
import os

import pytest

from agepipe.pipeline.cluster import gpu_layout, open_client


def listen_hosts(client):
    info = client.scheduler_info(n_workers=-1)
    return [info["address"]] + list(info["workers"])


@pytest.mark.parametrize("mode", [{"workers": 1}, {"gpus": ["0"]}], ids=["local", "gpus"])
def test_scheduler_and_workers_listen_on_loopback_only(mode):
    with open_client(**mode) as (client, layout):
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(a.startswith("tcp://127.0.0.1:") for a in listen_hosts(client)), listen_hosts(client)
        assert layout.workers == 1
        # glibc's adaptive mmap threshold kept (Dask's nannies set MALLOC_TRIM_THRESHOLD_), no profiler
        assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None]
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert list(profiling.values()) == [False]


def test_gpu_layout_shares_the_cores_among_gpus():
    cores = os.cpu_count()
    assert gpu_layout(["0"]).decode_threads == cores
    assert gpu_layout([str(i) for i in range(cores * 2)]).decode_threads == 1
    assert gpu_layout(["0", "1"]).decode_threads == max(1, cores // 2)


def test_a_heartbeat_racing_the_workers_close_is_not_logged():
    """The record a closing worker's heartbeat logs is dropped; a running worker's is kept."""
    import logging
    from types import SimpleNamespace

    from distributed.core import Status

    from agepipe.pipeline.extract import HEARTBEAT_AT_CLOSE, closing_heartbeat_filter

    worker = SimpleNamespace(status=Status.running)
    keep = closing_heartbeat_filter(worker)

    def record(message):
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, message, None, None)

    assert keep(record(HEARTBEAT_AT_CLOSE + "."))
    worker.status = Status.closing
    assert not keep(record(HEARTBEAT_AT_CLOSE + "."))
    assert keep(record("Compute Failed"))


def test_a_scheduler_without_workers_says_the_checks_run_on_none(capsys):
    """`extract --scheduler` on a cluster with no worker yet: the checks on every worker (photos
    there, models matching) passed having run nowhere, without a word; stderr now says so, and what
    happens to workers that join. A worker connected (its own process) is checked: no warning."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        address = cluster.scheduler_address
        with open_client(scheduler=address) as (client, layout):
            assert layout.workers == 0
        err = capsys.readouterr().err
        assert f"warning: the Dask scheduler at {address} has no workers yet" in err, err
        assert "will have run on none" in err and "missing_image" in err and f"dask worker {address}" in err
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        with open_client(scheduler=address) as (client, layout):
            assert layout.workers == 1 and list(client.run(os.getpid).values()) != [os.getpid()]
        assert "no workers" not in capsys.readouterr().err


@pytest.mark.parametrize("address", ["closed", "host:port", "http://127.0.0.1:1"])
def test_a_scheduler_that_does_not_answer_is_one_sentence_and_writes_nothing(tmp_path, address):
    """`extract --scheduler` where no scheduler listens, or at no Dask address: exit 1, one
    sentence naming the address (it was an OSError traceback after 30 s, or "invalid literal for
    int()"), nothing in the store."""
    import socket

    import dask
    from click.testing import CliRunner

    from agepipe.cli import cli
    from tests.pipeline.conftest import write_manifest

    if address == "closed":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: nobody listens
    write_manifest(tmp_path / "data" / "mini", [{"image_id": "a.jpg", "subject_id": "s", "fold": 0, "age": 30.0,
                                                 "age_bin": 4, "gender": 1, "face_hint": None, "status": "ok"}])
    pytest.importorskip("distributed")  # its config defaults loaded before the override, not dropped after it
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        result = CliRunner().invoke(cli, ["extract", "--dataset", "mini", "--data-dir", str(tmp_path / "data"),
                                          "--store", str(tmp_path / "store"), "--scheduler", address])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert f"Error: --scheduler {address}: " in result.output and "dask scheduler" in result.output, result.output
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("failure", ["exits", "times out"])
def test_local_workers_that_do_not_start_are_one_sentence_and_write_nothing(tmp_path, monkeypatch, failure):
    """A local worker process that dies as it starts (out of memory, a broken install) ended in
    distributed's 'RuntimeError: Nanny failed to start.' traceback, one that never joins the cluster
    in a TimeoutError traceback from wait_for_workers; both are now one sentence, nothing in the store."""
    import dask
    from click.testing import CliRunner
    from distributed import Client

    from agepipe.cli import cli
    from tests.pipeline.conftest import write_manifest

    write_manifest(tmp_path / "data" / "mini", [{"image_id": "a.jpg", "subject_id": "s", "fold": 0, "age": 30.0,
                                                 "age_bin": 4, "gender": 1, "face_hint": None, "status": "ok"}])
    config = {}
    if failure == "exits":
        (tmp_path / "die.py").write_text("import os\nos._exit(3)\n")  # a worker preload: the process dies
        config = {"distributed.worker.preload": [str(tmp_path / "die.py")]}
    else:
        def never(self, n_workers, timeout=None):
            raise TimeoutError(f"Only 0/{n_workers} workers arrived after {timeout}")

        monkeypatch.setattr(Client, "wait_for_workers", never)
    with dask.config.set(config):
        result = CliRunner().invoke(cli, ["extract", "--dataset", "mini", "--data-dir", str(tmp_path / "data"),
                                          "--store", str(tmp_path / "store"), "--workers", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Error: 1 local Dask worker process did not start" in result.output, result.output
    assert "--workers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "store").exists()


def _daemonic():
    import multiprocessing

    return multiprocessing.current_process().daemon


def test_a_gpu_worker_restarted_by_its_nanny_may_still_start_decode_processes():
    """A worker that dies (a native crash in the models, the OOM killer) comes back from its nanny,
    which reads distributed.worker.daemon as it starts it: a daemonic GPU worker could decode
    only in threads (`--decoders processes`: a ModelError that stops the run)."""
    with open_client(gpus=["0"]) as (client, layout):
        assert list(client.run(_daemonic).values()) == [False]
        client.restart()
        assert list(client.run(_daemonic).values()) == [False]
