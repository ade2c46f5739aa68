"""
How every script stops: Ctrl-C (SIGINT), a scheduler's SIGTERM (SLURM's time limit and scancel, Kubernetes, spot
instances) or SIGUSR1 (Lightning's SLURM convention; on Windows, which has neither SIGUSR1 nor an outside SIGTERM,
Ctrl-Break's SIGBREAK) ends a script with one line on stderr saying what was stopped and what is kept, and exit status
128 + the signal's number, what a shell reports for a process the signal killed: never a KeyboardInterrupt traceback,
never a silent death.

A script installs the handler first, before it imports torch (1-2 s) or transformers, so that a signal in its first
second ends the same way, and only when it runs as a program (a test or a notebook that imports it keeps its Ctrl-C):

    import stopping

    if __name__ == "__main__":
        stopping.stop_on_signals("stopped by {signal}: nothing was written")

    import torch

It says what a stop keeps with on_stop(line) whenever that changes (prepare_data.py once its build holds work), or
hands stops to a handler of its own (train.py saves the step it reached first; study_growth.py stops its runs).
A stop raises SystemExit, so the code's own cleanup runs on the way out: common.atomic_write removes its temporary,
and nothing half-written is left looking complete; later signals are ignored meanwhile, so the cleanup finishes.

A write that a signal must not cut runs inside `with deferred():`, and a signal that arrives meanwhile is honoured
when the block ends: torch.save (checkpoint.write) calls back into Python to write, and an exception raised there
comes out of its zip writer as a RuntimeError ("unexpected pos"), a traceback instead of a stop.

This module imports nothing heavy (it has to load in milliseconds) and nothing of the project.
"""

import atexit
import os
import signal
import sys
from contextlib import contextmanager

# the stop signals this platform has (Windows: SIGINT, SIGBREAK, and SIGTERM only as raised by the process itself)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGBREAK") if hasattr(signal, name)
)

message = "stopped by {signal}"  # the line a stop says; {signal} is the signal's name
handler = None  # a script's own handler(signum), in place of saying the line and exiting
stopped = 0  # the signal that is stopping this process (0: none), for cleanup that says something else on errors
deferring, pending = 0, []  # how many deferred() blocks are open; the signals they hold back


def stop_on_signals(line):
    """From now on a stop signal ends this process with `line` (a format string with {signal}) and exit status
    128 + the signal."""
    on_stop(line)
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


def on_stop(line=None, own_handler=None):
    """From now on a stop says `line` (None: the line it had), or calls own_handler(signum) instead. Nothing else
    changes: in a process that did not call stop_on_signals (a test importing a script) signals act as ever."""
    global message, handler
    message, handler = line or message, own_handler


def on_signal(signum, frame):
    if deferring:
        pending.append(signum)
        return
    (handler or stop)(signum)


def stop(signum, line=None):
    """Exit with 128 + signum, saying the line (the script's, by default) last of all: after the cleanup on the way
    out (finally blocks, atomic_write's removal of its temporary) and any progress bar it closes. Further signals are
    ignored, so that cleanup runs to its end."""
    global stopped
    stopped = signum
    ignore()
    line = line or message.format(signal=signal.Signals(signum).name)
    if importing():
        # an exception raised while a module runs its top-level code can be caught and replaced by the C code that
        # imports it (numpy's multiarray, inside torch's import, turns it into an ImportError traceback), and an
        # import writes nothing this process would have to clean up: exit at once
        say(line)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):  # no stream, a closed pipe
                pass
        os._exit(128 + signum)
    atexit.register(say, line)
    raise SystemExit(128 + signum)


def importing():
    """True while an import is under way (a frame of importlib's machinery is on the stack)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def ignore():
    """Ignore stop signals from here on (SIG_IGN, which CPython keeps to the end: a Python handler would be dropped
    while the interpreter shuts down, and the process would die by the signal)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def deferred():
    """Hold stop signals back while the block runs and honour them, in order, when it ends. Blocks may nest."""
    global deferring
    deferring += 1
    try:
        yield
    finally:
        deferring -= 1
        while not deferring and pending:
            on_signal(pending.pop(0), None)


def say(line):
    """One line on stderr, as common.log writes it (which this module cannot import: common imports torch): under
    torchrun only rank 0's, and below a tqdm progress bar, not on its line, when tqdm is loaded."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    bar = getattr(sys.modules.get("tqdm"), "tqdm", None)
    if bar is not None:
        bar.write(line + "\n", file=sys.stderr, end="")
    else:
        print(line, file=sys.stderr, flush=True)
