"""
The two helpers that every script and library module shares: log() and atomic_write().

They sit below data.py, tokenizer.py and checkpoint.py (this module imports nothing of the project), so that
no module copies them and nothing has to import a script to get them (nanochat keeps its own in common.py).
"""
import errno
import os
import shutil
import sys
from contextlib import contextmanager

from tqdm import tqdm


def log(msg):
    """Progress and diagnostics go to stderr; stdout carries only results (tables, sampled text). Under torchrun
    only rank 0 logs (nanochat's print0), and a tqdm progress bar is redrawn below the line, not broken by it."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(msg, file=sys.stderr)


class DiskFullError(OSError):
    """A write ran out of space. Its message is one line that says what was lost (nothing)."""


@contextmanager
def atomic_write(path):
    """
    Write `path` all at once or not at all:

        with atomic_write("data/meta.json") as tmp, open(tmp, "w") as f:
            json.dump(meta, f)             # or build a directory at tmp

    The block writes to `path + ".tmp"`, which replaces `path` in one rename when the block ends without
    error, so a reader sees the old file or the new one, never a part (POSIX rename is atomic on one file
    system). On any error or Ctrl-C the temporary is removed and `path` is left as it was; a full disk
    raises DiskFullError saying so. A stale temporary of a crashed write is removed first: it only holds
    disk space. A directory replaces a directory by two renames, the old one moved aside first.
    """
    tmp = path + ".tmp"
    remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.lexists(path):
            old = path + ".old"
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        if disk_full(e):
            kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
            raise DiskFullError(f"disk full while writing {path}: {kept} and the partial file was removed; "
                                f"free some space on {os.path.dirname(os.path.abspath(path))} and run again") from None
        raise


def disk_full(error):
    """True if the error, or one it was raised from, is the OS saying the disk (or the user's quota) is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove(path):
    """Remove a file or a directory tree, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
