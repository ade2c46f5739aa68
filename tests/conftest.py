import os
import random
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a model small enough that a training step takes milliseconds on a CPU
TINY = [
    "--device=cpu",
    "--dtype=float32",
    "--compile=False",
    "--n_layer=2",
    "--n_head=2",
    "--n_kv_head=1",
    "--n_embd=64",
    "--intermediate_size=128",
    "--batch_size=4",
    "--block_size=64",
    "--gradient_accumulation_steps=2",
    "--val_tokens=1024",
    "--log_interval=1",
    "--warmup_iters=2",
    "--learning_rate=3e-3",
    "--min_lr=3e-4",
]


def run_script(*args, check=True, env=None):
    """Run one of the repository's scripts in a fresh interpreter, as a user would."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def pydocs_data(tmp_path_factory):
    """A small dataset from the embedded corpus (pydoc topics), written in the shard format directly."""
    import pydoc_data.topics

    from data import write_meta, write_shard
    from tokenizer import Tokenizer

    out = str(tmp_path_factory.mktemp("pydocs"))
    docs = list(pydoc_data.topics.topics.values())
    random.Random(0).shuffle(docs)
    tok = Tokenizer.train_bpe(docs, 512)

    def encode(ds):
        return np.array([i for ids in tok.encode_batch(ds) for i in ids + [tok.eot_id]], dtype=np.uint16)

    n_val = len(docs) // 10
    splits = {"val": encode(docs[:n_val]), "train": encode(docs[n_val:])}
    for split, tokens in splits.items():
        write_shard(os.path.join(out, f"{split}_000000.bin"), tokens)
    # the manifest, as prepare_data.py writes it: the loader reads exactly these shards, of these sizes
    write_meta(
        out,
        tok,
        shards={split: [f"{split}_000000.bin"] for split in splits},
        shard_tokens={split: [len(tokens)] for split, tokens in splits.items()},
        tokens={split: len(tokens) for split, tokens in splits.items()},
    )
    return out
