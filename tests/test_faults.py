"""Bad luck loses nothing: a full disk while saving, two runs on one out_dir, a torn metrics line, a corrupt shard, a
dataset that is not what its meta.json lists, a file system without hard links, a failure of rank 0 under DDP."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, copy_run, run_here, run_script

import checkpoint
from common import DiskFullError
from data import ShardLoader, read_shard, write_meta, write_shard
from tokenizer import Tokenizer

STEPS = ["--lr_decay_iters=8", "--eval_interval=4"]  # conftest's tiny_run: 4 of these steps, so resumed to 8 here
DOC = " ".join(f"word{i} and word{i * 7 % 101} again" for i in range(2000))  # enough pairs for 43 merges

# Simulates a disk that fills up while a checkpoint's temp file is written: the first 64 KiB land on disk, then
# every write fails with ENOSPC, as on a full file system (and as writing to /dev/full does).
FULL_DISK = """
import builtins, errno
real_open = builtins.open
class FullDisk:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        self.written += len(data)
        if self.written > 65536:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
def open_on_full_disk(path, *args, **kwargs):
    f = real_open(path, *args, **kwargs)
    return FullDisk(f) if str(path).endswith("ckpt.pt.tmp") else f
"""


def train(data, out, *extra, check=True):
    return run_here("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *extra, check=check)


def train_on_full_disk(data, out, *extra):
    """train.py in a fresh interpreter whose checkpoint writes hit a full disk."""
    argv = ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *extra]
    code = FULL_DISK + (
        "builtins.open = open_on_full_disk\nimport runpy, sys\n"
        f"sys.argv = {argv!r}\nrunpy.run_path('train.py', run_name='__main__')\n"
    )
    return run_script("-c", code, check=False)


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


# --- 1. disk full while saving ------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint(pydocs_data, tiny_run, tmp_path):
    copy_run(tiny_run, tmp_path)
    before = (tmp_path / "ckpt.pt").read_bytes()
    proc = train_on_full_disk(pydocs_data, tmp_path, "--init_from=resume", "--max_iters=8", *STEPS)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # one line, on its own
    assert errors[0].startswith("error: disk full while writing") and "the previous ckpt.pt is intact" in errors[0]
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()
    # the space is back: the same resume now runs to the end
    train(pydocs_data, tmp_path, "--init_from=resume", "--max_iters=8", *STEPS)
    assert load(tmp_path)["iter_num"] == 8


def test_stale_temp_file_of_a_crash_does_not_break_save_or_resume(pydocs_data, tiny_run, tmp_path):
    copy_run(tiny_run, tmp_path)
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"\0" * 100_000)  # what a kill -9 in torch.save leaves
    os.chmod(tmp_path / "ckpt.pt.tmp", 0o400)
    train(pydocs_data, tmp_path, "--init_from=resume", "--max_iters=8", *STEPS)
    assert load(tmp_path)["iter_num"] == 8 and not (tmp_path / "ckpt.pt.tmp").exists()


def test_checkpoint_save_on_full_disk_in_process(tmp_path, monkeypatch):
    """checkpoint.save itself: the error says what happened and that nothing was lost, the temp file is gone."""
    ckpt = {"model": {"w": torch.randn(256, 256)}, "model_args": {}, "iter_num": 1}
    checkpoint.save(ckpt, str(tmp_path))
    namespace = {}
    exec(FULL_DISK, namespace)
    monkeypatch.setattr("builtins.open", namespace["open_on_full_disk"])  # for *ckpt.pt.tmp only; undone below
    with pytest.raises(DiskFullError, match=r"disk full while writing .*ckpt.pt: the previous ckpt.pt is intact") as e:
        checkpoint.save(dict(ckpt, iter_num=2), str(tmp_path))
    monkeypatch.undo()
    assert e.value.__cause__ is None and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and checkpoint.load(str(tmp_path))["iter_num"] == 1


# --- 2. two train.py on one out_dir ---------------------------------------------------------------


def test_second_run_on_the_same_out_dir_refuses(pydocs_data, tmp_path):
    first = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            f"--data_dir={pydocs_data}",
            f"--out_dir={tmp_path}",
            *TINY,
            "--max_iters=1000000",
            "--eval_interval=1000000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        lock = tmp_path / "train.lock"
        deadline = time.time() + 120
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, "the first run did not take the lock"
            time.sleep(0.2)
        while not (tmp_path / "metrics.jsonl").exists():  # wait until it is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        proc = train(pydocs_data, tmp_path, "--max_iters=2", check=False)
        assert proc.returncode != 0 and "in use by another training run" in proc.stderr
        assert (
            f"pid {first.pid} " in proc.stderr and "another out_dir" in proc.stderr and "Traceback" not in proc.stderr
        )
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)  # dies without any cleanup: its lock file stays, with its pid
        first.wait()
    assert f"pid {first.pid} " in (tmp_path / "train.lock").read_text()
    # the kernel released the dead process's lock: the stale file does not stop the next run
    train(pydocs_data, tmp_path, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2")
    assert load(tmp_path)["iter_num"] == 2


def test_lock_is_released_when_the_holder_goes(tmp_path):
    held = checkpoint.RunLock(str(tmp_path))
    with pytest.raises(RuntimeError, match=f"in use by another training run \\(pid {os.getpid()} on "):
        checkpoint.RunLock(str(tmp_path))  # a second open file description: flock refuses it, even in one process
    held.release()
    checkpoint.RunLock(str(tmp_path)).release()


# --- 3. a torn last line in metrics.jsonl ---------------------------------------------------------


def test_torn_metrics_line_is_dropped_and_resume_goes_on(pydocs_data, tiny_run, tmp_path):
    copy_run(tiny_run, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "loss": 4.1')  # a crash mid-write
    proc = train(pydocs_data, tmp_path, "--init_from=resume", "--max_iters=8", *STEPS)
    assert f"warning: {tmp_path / 'metrics.jsonl'}: dropping its torn last line" in proc.stderr
    entries = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]  # every line whole again
    assert [e["iter"] for e in entries if "loss" in e] == list(range(1, 9))


def test_bad_metrics_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "loss": 5.0}\nnot json\n{"iter": 2, "loss": 4.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics entry"):
        checkpoint.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "loss": 5.0}\n{"iter": 2, "lo')
    assert checkpoint.read_metrics(str(tmp_path)) == [{"iter": 1, "loss": 5.0}]


# --- 4. token ids outside the vocabulary ----------------------------------------------------------


@pytest.fixture
def corrupt_data(tmp_path):
    """A dataset whose second train shard has one id past the vocabulary, deep in its body."""
    tok = Tokenizer.train_bpe([DOC], 300)
    assert tok.vocab_size == 300
    good = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
    bad = good.copy()
    bad[4321] = 300
    write_shard(str(tmp_path / "train_000000.bin"), good)
    write_shard(str(tmp_path / "train_000001.bin"), bad)
    write_shard(str(tmp_path / "val_000000.bin"), good)
    write_meta(str(tmp_path), tok)
    return tmp_path


def test_token_id_outside_the_vocabulary_names_the_shard(corrupt_data):
    loader = ShardLoader(str(corrupt_data), "train", 4, 64)
    assert loader.checked == {str(corrupt_data / "train_000000.bin")}  # a shard is checked when it is opened
    with pytest.raises(
        ValueError,
        match=r"train_000001.bin: token id 300 at position 4,321 is outside the dataset's "
        r"vocabulary of 300 \(meta.json\)",
    ):
        for _ in range(100):  # 5000 tokens per shard, 257 per batch: shard 1 opens within 20 batches
            loader.next_batch()
    assert int(read_shard(str(corrupt_data / "train_000001.bin")).max()) == 300


def test_train_refuses_a_corrupt_shard_in_one_line(corrupt_data, tmp_path):
    os.replace(corrupt_data / "train_000001.bin", corrupt_data / "train_000000.bin")  # the bad shard comes first
    proc = train(corrupt_data, tmp_path / "out", "--max_iters=2", check=False)
    assert proc.returncode != 0 and "index out of range" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {corrupt_data / 'train_000000.bin'}: token id 300")


# --- 5. the manifest: meta.json lists the shards and their token counts ---------------------------


def edit_meta(data, **changes):
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({k: v for k, v in {**meta, **changes}.items() if v is not None}))


def test_the_loader_reads_exactly_the_listed_shards(listed_data):
    loader = ShardLoader(str(listed_data), "train", 4, 64)
    assert [os.path.basename(p) for p in loader.paths] == ["train_000000.bin", "train_000001.bin"]
    assert loader.state_dict()["fingerprint"] == json.loads((listed_data / "meta.json").read_text())["fingerprint"]


def test_a_listed_shard_that_is_missing_is_named(listed_data):
    os.remove(listed_data / "train_000001.bin")  # an interrupted copy of the directory
    with pytest.raises(
        FileNotFoundError,
        match=r"train_000001.bin is missing \(1 of the 2 train shards .*meta.json lists\): "
        r"the dataset is incomplete; copy it again, or re-run prepare_data.py",
    ):
        ShardLoader(str(listed_data), "train", 4, 64)


def test_a_shard_that_meta_json_does_not_list_is_named(listed_data):
    write_shard(str(listed_data / "train_000002.bin"), np.zeros(3000, dtype=np.uint16))  # left by another dataset
    with pytest.raises(
        ValueError,
        match=r"train_000002.bin is not one of the train shards .*meta.json lists: it belongs "
        r"to another dataset; remove it, or re-run prepare_data.py",
    ):
        ShardLoader(str(listed_data), "train", 4, 64)


def test_a_token_count_that_disagrees_is_named(listed_data):
    edit_meta(listed_data, shard_tokens={"train": [6000, 4000], "val": [2000]}, tokens={"train": 10000, "val": 2000})
    with pytest.raises(
        ValueError,
        match=r"train_000000.bin holds 3,000 tokens, but .*meta.json says 6,000: the shard and "
        r"meta.json come from different builds",
    ):
        ShardLoader(str(listed_data), "train", 4, 64)
    # a dataset prepared before per-shard counts: its split's total is checked instead
    edit_meta(listed_data, shard_tokens=None)
    with pytest.raises(ValueError, match=r"the train shards of .* hold 5,000 tokens, but .*meta.json says 10,000"):
        ShardLoader(str(listed_data), "train", 4, 64)
    edit_meta(listed_data, tokens={"train": 5000, "val": 1000})
    assert len(ShardLoader(str(listed_data), "train", 4, 64).paths) == 2


def test_an_eot_id_outside_the_vocabulary_is_named(listed_data):
    edit_meta(listed_data, eot_id=300)
    with pytest.raises(
        ValueError, match=r"meta.json: eot_id 300 is outside the vocabulary of 300: meta.json is damaged"
    ):
        ShardLoader(str(listed_data), "train", 4, 64)


def test_a_dataset_without_a_shard_list_is_globbed(listed_data):
    edit_meta(listed_data, shards=None, shard_tokens=None, tokens=None)  # written by hand, or by an old prepare_data.py
    write_shard(str(listed_data / "train_000002.bin"), np.zeros(3000, dtype=np.uint16))
    assert len(ShardLoader(str(listed_data), "train", 4, 64).paths) == 3


# --- 6. keep_last where hard links are refused -----------------------------------------------------


def test_keep_last_copies_where_hard_links_are_refused(tmp_path, monkeypatch):
    def refuse_links(src, dst):  # gcsfuse, s3fs and FAT answer link(2) so
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse_links)
    for step in (1, 2, 3):
        checkpoint.save(
            {"model": {"w": torch.full((4,), float(step))}, "model_args": {}, "iter_num": step},
            str(tmp_path),
            keep_last=2,
        )
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert os.stat(tmp_path / "ckpt_0000003.pt").st_nlink == 1  # a copy, not a link
    assert (tmp_path / "ckpt_0000003.pt").read_bytes() == (tmp_path / "ckpt.pt").read_bytes()
    assert checkpoint.load(str(tmp_path / "ckpt_0000002.pt"))["model"]["w"][0] == 2


# --- 7. under DDP, what stops rank 0 stops every rank -----------------------------------------------


def two_nodes(out, data, *extra, script="train.py"):
    """torchrun on two "nodes" of one process each (two launchers, as on two machines): a failure on node 0 reaches
    node 1 only through the training processes themselves, not through a shared launcher."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                script,
                f"--data_dir={data}",
                f"--out_dir={out}",
                *TINY,
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for node in (0, 1)
    ]
    return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]  # a hang fails, not waits


def node_lines(stderr):
    """The lines the training process wrote, without torchrun's own report of a failed worker."""
    return [
        line
        for line in stderr.replace("\r", "\n").splitlines()
        if line.startswith(("error:", "[rank")) or 'train.py", line' in line
    ]


def test_a_lock_that_rank_0_cannot_take_stops_every_rank(pydocs_data, tmp_path):
    held = checkpoint.RunLock(str(tmp_path))  # another run on this out_dir
    try:
        nodes = two_nodes(tmp_path, pydocs_data, "--max_iters=4")
    finally:
        held.release()
    for rc, stderr in nodes:  # each node's process stopped on its own, with the same line (no gloo error, no traceback)
        assert rc == 1 and "exitcode  : 1 " in stderr, stderr[-2000:]
        assert node_lines(stderr) == [
            f"error: {tmp_path} is in use by another training run (pid {os.getpid()} on "
            f"{os.uname().nodename}): wait for it to finish, or give this run another out_dir"
        ]


def test_a_full_disk_at_rank_0s_save_stops_every_rank(pydocs_data, tmp_path):
    wrapper = tmp_path / "train_on_full_disk.py"
    wrapper.write_text(
        FULL_DISK + f"builtins.open = open_on_full_disk\nimport runpy, sys\nsys.path.insert(0, {ROOT!r})\n"
        f"sys.argv[0] = 'train.py'\nrunpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n"
    )
    nodes = two_nodes(tmp_path / "out", pydocs_data, "--max_iters=8", *STEPS, script=str(wrapper))
    for rc, stderr in nodes:
        assert rc == 1 and "exitcode  : 1 " in stderr, stderr[-2000:]
        lines = node_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith(
            f"error: disk full while writing {tmp_path / 'out' / 'ckpt.pt'}: nothing was written"
        ), stderr[-2000:]
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")
