"""The val set (data.ValSet) and bits per byte: every tokenizer kind's byte table against real text, one val set
whatever the process count or script, and val_bpb in metrics.jsonl recomputed from the shard by hand."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run_here

from data import ShardLoader, ValSet, load_tokenizer, read_shard, write_meta, write_shard
from tokenizer import Tokenizer

# text of every kind a byte count can trip on: multi-byte characters, emoji sequences, whitespace runs, code
TEXTS = [
    "Hello, world!",
    "naïve café, Straße, 日本語のテキスト, 한국어, русский, العربية",
    "emoji 🤖🎉 👩‍👩‍👧 🇫🇷 👍🏽",
    "tabs\tand  spaces   \n\n\r\n",
    "def f(x):\n    return x ** 2  # square\n",
    "\u00a0nbsp\u200bzero\ufeffbom ½ ∑∫√",
]


def pydoc_texts():
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def sentencepiece_tokenizer():
    """A Llama-2 / TinyLlama-style tokenizer.json: "▁" for spaces, a prepended dummy space, and <0xNN> byte tokens
    for what its merges do not cover (byte fallback)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    tk = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.train_from_iterator(
        pydoc_texts()[:300], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # sentencepiece's byte pieces, as Llama 2's vocabulary has them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer({"kind": "hf", "tokenizer_json": json.dumps(spec), "bos_token_id": 1, "eos_token_id": 2})


def tokenizers():
    import export_hf

    bpe = Tokenizer.train_bpe(pydoc_texts(), 600)
    byte_level = Tokenizer(
        {"kind": "hf", "tokenizer_json": export_hf.hf_tokenizer(bpe).to_str(), "eos_token_id": bpe.eot_id}
    )
    kinds = {"bpe": bpe, "hf byte-level": byte_level, "hf sentencepiece": sentencepiece_tokenizer()}
    try:
        kinds["tiktoken gpt2"] = Tokenizer.from_tiktoken("gpt2")
    except Exception:  # needs the tiktoken cache (TIKTOKEN_CACHE_DIR) or the network
        pass
    return kinds


@pytest.mark.parametrize("kind,tok", list(tokenizers().items()))
def test_token_bytes_add_up_to_the_text(kind, tok):
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,)
    # sentencepiece counts the dummy space it puts before a text (and drops when decoding): one byte per text
    prefix = 1 if kind == "hf sentencepiece" else 0
    for text in TEXTS + pydoc_texts()[:200]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert table[ids].sum() == len(text.encode()) + prefix, (kind, text[:40])
    assert table[tok.eot_id] == 0  # special tokens stand for no text
    if kind == "hf sentencepiece":
        # the byte pieces were used
        assert any(tok.enc.id_to_token(i).startswith("<0x") for i in tok.encode("日本語"))


def test_unknown_decoder_has_no_byte_table():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tk.train_from_iterator(pydoc_texts()[:100], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    assert Tokenizer({"kind": "hf", "tokenizer_json": tk.to_str()}).token_bytes() is None


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """A val split of two shards (1000 and 300 tokens) of a 512-token tokenizer's ids."""
    out = str(tmp_path_factory.mktemp("val2"))
    tok = Tokenizer.train_bpe(pydoc_texts()[:200], 512)
    rng = np.random.default_rng(0)
    write_shard(os.path.join(out, "val_000000.bin"), rng.integers(0, 511, 1000).astype(np.uint16))
    write_shard(os.path.join(out, "val_000001.bin"), rng.integers(0, 511, 300).astype(np.uint16))
    write_shard(os.path.join(out, "train_000000.bin"), rng.integers(0, 511, 3000).astype(np.uint16))
    write_meta(out, tok)
    return out


def test_val_set_windows_ranks_and_bytes(two_shards):
    shards = [np.asarray(read_shard(os.path.join(two_shards, f"val_00000{i}.bin"))).astype(np.int64) for i in (0, 1)]
    # 64-token windows: 15 fit in the first shard (each needs 65 tokens), 4 in the second
    whole = ValSet(two_shards, 10_000, 64)
    assert whole.tokens == 19 * 64 and whole.windows[14:16] == [(0, 14 * 64), (1, 0)]
    assert ValSet(two_shards, 700, 64).tokens == 640  # rounded down to whole windows
    # ranks take disjoint parts that together are the set, and batch them as asked
    parts = [ValSet(two_shards, 10_000, 64, rank, 3) for rank in range(3)]
    seen = [tuple(row) for part in parts for x, _ in part.batches(4) for row in x.tolist()]
    assert len(seen) == 19 and sorted(seen) == sorted(tuple(row) for x, _ in whole.batches(100) for row in x.tolist())
    x, y = next(whole.batches(2))
    assert (
        x.shape == (2, 64)
        and torch.equal(x[0], torch.from_numpy(shards[0][:64]))
        and torch.equal(y[1], torch.from_numpy(shards[0][65:129]))
    )
    # bytes of the targets, counted by hand
    table = load_tokenizer(two_shards).token_bytes()
    targets = np.concatenate(
        [shards[0][1 + 64 * k : 65 + 64 * k] for k in range(15)]
        + [shards[1][1 + 64 * k : 65 + 64 * k] for k in range(4)]
    )
    assert whole.bytes == table[targets].sum()
    assert whole.losses(2.0 * whole.tokens) == (2.0, 2.0 * whole.tokens / (math.log(2) * whole.bytes))
    with pytest.raises(
        ValueError, match="val set of .* is empty: val_tokens \\(10\\) must be at least block_size \\(64\\)"
    ):
        ValSet(two_shards, 10, 64)


def test_val_set_is_the_study_s_old_batches(two_shards):
    """study_growth.py's runs measured the first eval_iters batches of batch_size x block_size that ShardLoader
    reads: asked for that many tokens, the val set is those batches exactly."""
    loader = ShardLoader(two_shards, "val", 3, 64)
    old = [loader.next_batch() for _ in range(5)]
    new = list(ValSet(two_shards, 5 * 3 * 64, 64).batches(3))
    assert len(new) == 5 and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(old, new))


def read_evals(out):
    return [e for e in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "val_loss" in e]


def test_val_bpb_in_metrics_and_one_val_set_at_any_process_count(pydocs_data, tmp_path):
    common = [f"--data_dir={pydocs_data}", *TINY, "--val_tokens=1000", "--max_iters=0"]
    proc = run_here("train.py", f"--out_dir={tmp_path / 'one'}", *common)
    one = read_evals(tmp_path / "one")[0]
    # bits per byte by hand: the first 15 windows of 64 tokens (960 <= 1000), their targets' bytes
    tokens = np.asarray(read_shard(os.path.join(pydocs_data, "val_000000.bin"))).astype(np.int64)
    target_bytes = load_tokenizer(pydocs_data).token_bytes()[tokens[1:961]].sum()
    assert one["val_bpb"] == pytest.approx(one["val_loss"] * 960 / (math.log(2) * target_bytes), rel=1e-12)
    assert f"val bpb {one['val_bpb']:.4f}" in proc.stderr and "val set: the first 960 tokens" in proc.stderr
    # two processes measure the same 960 tokens, each half of them (the weights at step 0 are rank 0's in both)
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            f"--out_dir={tmp_path / 'two'}",
            *common,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    two = read_evals(tmp_path / "two")[0]
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5) and two["val_bpb"] == pytest.approx(
        one["val_bpb"], abs=1e-5
    )
