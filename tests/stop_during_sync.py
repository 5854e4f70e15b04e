"""A stop signal (argv[1]: TERM or INT) that reaches the client while distributed's sync() has not
yet bound its future (the loop busy): sync's cancel callback then raises NameError, which tornado
logs with a traceback. Run with agepipe's stop handlers installed, as its console script does."""
import asyncio
import os
import signal
import sys
import threading
import time

from distributed.utils import sync  # importing distributed sets its logging up, as in a run
from tornado.ioloop import IOLoop

from agepipe import cli

cli.install_stop_handlers()
started, loops = threading.Event(), []


def run_loop():
    asyncio.set_event_loop(asyncio.new_event_loop())
    loops.append(IOLoop.current())
    started.set()
    loops[0].start()


threading.Thread(target=run_loop, daemon=True).start()
started.wait()
loops[0].add_callback(time.sleep, 0.5)  # busy: sync's coroutine cannot bind its future before the signal
threading.Timer(0.1, os.kill, (os.getpid(), getattr(signal, f"SIG{sys.argv[1]}"))).start()
try:
    sync(loops[0], asyncio.sleep, 5)
except KeyboardInterrupt as e:
    print(type(e).__name__)
time.sleep(1)  # the loop runs sync's cancel
