"""
Token shards on disk, the loader that streams them into training batches, and the val set every val loss is
measured on (ValSet).

A shard is a flat array of token ids behind a 256-byte header:
    bytes 0..7    magic b"MTLMTOKS"
    bytes 8..11   format version (uint32, little-endian), currently 1
    bytes 12..15  bytes per token (uint32): 2 for uint16, 4 for uint32
    bytes 16..23  number of tokens (uint64)
    bytes 24..255 zero
then the tokens, little-endian. Documents are separated by the tokenizer's end-of-text id.

A dataset is a directory (written by prepare_data.py, read by train.py and stack.py) holding
    train_000000.bin, ...    the train split's shards, val_000000.bin, ... the val split's
    meta.json                {"version": 1, "tokenizer": spec, "vocab_size", "eot_id", "fingerprint", ...}: the
                             tokenizer's spec (tokenizer.py), the dataset's identity (compute_fingerprint), then what
                             prepare_data.py records (sources with the revision each was read at, shards and their
                             token counts, the shuffle, the recipe it was built from, command)
    tokenizer.tiktoken       a "bpe" tokenizer's merge ranks, which meta.json's spec names as "file" (too long
                             for JSON you would read); tiktoken's own format
meta.json is written last: a directory without it is not (yet) a dataset, and it is the manifest: the loader reads
exactly the shards it lists and checks each one's token count against it. This module is the one reader and
writer of all three, so a format change happens here only. Every file is written by common.atomic_write.
"""

import glob
import hashlib
import json
import math
import os
import struct
from contextlib import nullcontext

import numpy as np
import torch

from common import atomic_write, log
from tokenizer import Tokenizer

MAGIC = b"MTLMTOKS"
VERSION = 1
HEADER_BYTES = 256
DTYPES = {2: np.uint16, 4: np.uint32}
META_VERSION = 1
TOKENIZER_FILE = "tokenizer.tiktoken"


def write_shard(path, tokens):
    """Write a shard atomically: under a temporary name, renamed only once complete."""
    tokens = np.asarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard tokens must be uint16 or uint32, got {tokens.dtype}")
    header = MAGIC + struct.pack("<IIQ", VERSION, tokens.dtype.itemsize, len(tokens))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())


def read_shard(path):
    """Memory-map a shard's tokens (no copy); checks the header against the file size."""
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise ValueError(f"{path} is not a token shard (bad magic); re-run prepare_data.py")
    version, itemsize, n = struct.unpack("<IIQ", header[8:24])
    if version != VERSION or itemsize not in DTYPES:
        raise ValueError(f"{path}: unsupported shard version {version} / token size {itemsize}")
    expected = HEADER_BYTES + n * itemsize
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {os.path.getsize(path)} bytes, header says {expected}")
    return np.memmap(
        path, dtype=np.dtype(DTYPES[itemsize]).newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(n,)
    )


def check_vocab(path, tokens, vocab_size):
    """A token id the model has no embedding for would fail deep inside torch.embedding ("index out of range
    in self"); say which shard holds it instead. One vectorized pass over the memmap: ~0.1 s per 100M tokens."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise ValueError(
            f"{path}: token id {int(tokens[where])} at position {where:,} is outside the dataset's vocabulary "
            f"of {vocab_size} (meta.json): the shard is corrupt or was written with another tokenizer; "
            "re-run prepare_data.py"
        )


# -----------------------------------------------------------------------------------------------
# meta.json and the tokenizer beside it


def write_meta(data_dir, tokenizer, **fields):
    """Write the tokenizer's file (for "bpe") and then meta.json: the last file of a dataset."""
    spec = tokenizer.spec()
    meta = {
        "version": META_VERSION,
        "tokenizer": spec,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        **fields,
    }
    meta["fingerprint"] = compute_fingerprint(meta, spec)  # of the full spec: a bpe's ranks are part of its identity
    if "ranks" in spec:
        with atomic_write(os.path.join(data_dir, TOKENIZER_FILE)) as tmp, open(tmp, "w") as f:
            f.write(spec.pop("ranks"))
        spec["file"] = TOKENIZER_FILE
    with atomic_write(os.path.join(data_dir, "meta.json")) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_meta(data_dir):
    """A dataset's meta.json, checked to be one."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no dataset at {data_dir!r} ({path} missing): run prepare_data.py first")
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta.get("tokenizer"), dict) or not isinstance(meta.get("vocab_size"), int):
            raise ValueError("no tokenizer spec or vocab_size")
    except (ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError; AttributeError: not an object
        raise ValueError(f"{path} is not a dataset's meta.json ({e}): re-run prepare_data.py") from None
    eot_id = meta.get("eot_id")
    if eot_id is not None and not (isinstance(eot_id, int) and 0 <= eot_id < meta["vocab_size"]):
        # the separator of every document: outside the vocabulary, each one would fail inside the model's embedding
        raise ValueError(
            f"{path}: eot_id {eot_id!r} is outside the vocabulary of {meta['vocab_size']}: "
            "meta.json is damaged or was edited; re-run prepare_data.py"
        )
    return meta


def compute_fingerprint(meta, tokenizer_spec):
    """A dataset's identity: a hash of what was built (the full tokenizer, the sources with their weights and
    revisions, the seed, val fraction and shuffle, the shards' names and token counts), not of where it lives. Two
    directories with the same fingerprint hold the same token stream, so a new phase may continue a checkpoint's
    loader position on it; a re-prepared dataset at the same path gets a new one."""
    identity = {
        "tokenizer": tokenizer_spec,
        "seed": meta.get("seed"),
        "val_fraction": meta.get("val_fraction"),
        "shuffle": meta.get("shuffle"),
        "sources": [{k: s.get(k) for k in ("spec", "weight", "revision")} for s in meta.get("sources") or []],
        "shards": meta.get("shards"),
        "shard_tokens": meta.get("shard_tokens"),
        "tokens": meta.get("tokens"),
        "vocab_size": meta.get("vocab_size"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(data_dir):
    """The fingerprint meta.json records, or, for a dataset prepared before fingerprints, one computed from it."""
    meta = load_meta(data_dir)
    return meta.get("fingerprint") or compute_fingerprint(meta, load_tokenizer(data_dir).spec())


def load_tokenizer(data_dir):
    """The tokenizer a dataset was prepared with."""
    spec = load_meta(data_dir)["tokenizer"]
    if "file" in spec:
        path = os.path.join(data_dir, spec["file"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing (meta.json names it as the tokenizer): re-run prepare_data.py")
        with open(path) as f:
            spec = {k: v for k, v in spec.items() if k != "file"} | {"ranks": f.read()}
    return Tokenizer(spec)


# -----------------------------------------------------------------------------------------------
# The loader


def shard_paths(data_dir, split):
    """The split's shards, in order: exactly those meta.json lists. A listed shard that is missing, or a shard in the
    directory that meta.json does not list (an interrupted copy, or the rest of another dataset), is an error naming
    the file: either would change the token stream without a word. A dataset prepared before meta.json listed its
    shards (or one written by hand) has its {split}_*.bin files, in name order."""
    meta_path = os.path.join(data_dir, "meta.json")
    found = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
    listed = (load_meta(data_dir).get("shards") or {}).get(split)
    if listed is None:
        if not found:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir!r}: run prepare_data.py first")
        return found
    paths = [os.path.join(data_dir, name) for name in listed]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} is missing ({len(missing)} of the {len(paths)} {split} shards {meta_path} "
            "lists): the dataset is incomplete; copy it again, or re-run prepare_data.py"
        )
    unlisted = sorted(set(map(os.path.basename, found)) - set(listed))
    if unlisted:
        raise ValueError(
            f"{os.path.join(data_dir, unlisted[0])} is not one of the {split} shards {meta_path} lists"
            f"{f' ({len(unlisted)} such files)' if len(unlisted) > 1 else ''}: it belongs to another dataset; "
            "remove it, or re-run prepare_data.py"
        )
    if not paths:
        raise FileNotFoundError(f"{meta_path} lists no {split} shards: re-run prepare_data.py")
    return paths


def shard_sizes(data_dir, split, paths):
    """Each shard's token count, from its header, checked against what meta.json recorded when it was written: a
    count that disagrees means the shard or meta.json comes from another build. meta.json has per-shard counts
    (shard_tokens) since fingerprints; an older one has only each split's total, which is checked instead."""
    meta, meta_path = load_meta(data_dir), os.path.join(data_dir, "meta.json")
    sizes = [len(read_shard(path)) for path in paths]
    expected = (meta.get("shard_tokens") or {}).get(split)
    if expected is not None and len(expected) != len(paths):
        raise ValueError(
            f"{meta_path} lists {len(paths)} {split} shards but {len(expected)} token counts: it is damaged; "
            "re-run prepare_data.py"
        )
    if expected is not None:
        for path, n, want in zip(paths, sizes, expected):
            if n != want:
                raise ValueError(
                    f"{path} holds {n:,} tokens, but {meta_path} says {want:,}: the shard and meta.json come "
                    "from different builds; copy the dataset again, or re-run prepare_data.py"
                )
    total = (meta.get("tokens") or {}).get(split)
    if expected is None and total is not None and sum(sizes) != total:
        raise ValueError(
            f"the {split} shards of {data_dir!r} hold {sum(sizes):,} tokens, but {meta_path} says {total:,}: "
            "the shards and meta.json come from different builds; copy the dataset again, or re-run prepare_data.py"
        )
    return sizes


class ShardLoader:
    """
    Reads (x, y) batches of shape (B, T) sequentially through the shards of a split.

    Under DDP each step consumes world_size consecutive windows of B*T tokens and rank r takes the r-th,
    so the ranks see disjoint data. The position (shard, offset, epoch) is plain ints: state_dict()
    goes into the checkpoint and load_state_dict() resumes exactly where the run stopped.
    A window never crosses a shard boundary; the unused tail of a shard is skipped.
    It reads exactly the shards meta.json lists, each checked against its recorded token count (shard_paths,
    shard_sizes), and each shard's token ids against the vocabulary the first time it is opened. The state also
    holds the dataset's fingerprint, so a position is never applied to another dataset's stream (train.py).
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, device="cpu"):
        self.vocab_size = load_meta(data_dir)["vocab_size"]
        self.fingerprint = fingerprint(data_dir)
        self.checked = set()  # shards whose ids were checked against the vocabulary
        self.paths = shard_paths(data_dir, split)
        self.B, self.T, self.rank, self.world_size, self.device = batch_size, block_size, rank, world_size, device
        self.split = split
        self.window = batch_size * block_size
        self.step_tokens = self.window * world_size + 1  # +1: the target of the last position
        sizes = shard_sizes(data_dir, split, self.paths)
        if max(sizes) < self.step_tokens:
            raise ValueError(
                f"{split} split of {data_dir!r} has at most {max(sizes)} tokens in a shard, fewer than one "
                f"step needs ({self.step_tokens} = batch_size*block_size*world_size+1): lower batch_size/block_size"
            )
        self.shard, self.offset, self.epoch = 0, 0, 0
        self.tokens = self.open(0)

    def open(self, shard):
        path = self.paths[shard]
        tokens = read_shard(path)
        if path not in self.checked:
            check_vocab(path, tokens, self.vocab_size)
            self.checked.add(path)
        return tokens

    def state_dict(self):
        return {"shard": self.shard, "offset": self.offset, "epoch": self.epoch, "fingerprint": self.fingerprint}

    def load_state_dict(self, state):
        if not 0 <= state["shard"] < len(self.paths):
            raise ValueError(
                f"the loader position (shard {state['shard']}) is outside this dataset's {len(self.paths)} "
                f"shards ({os.path.dirname(self.paths[0])}): the position belongs to another dataset"
            )
        self.shard, self.offset, self.epoch = state["shard"], state["offset"], state["epoch"]
        self.tokens = self.open(self.shard)

    def reset(self):
        self.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})

    def next_batch(self):
        while self.offset + self.step_tokens > len(self.tokens):  # move on to the next shard with room
            self.shard += 1
            if self.shard == len(self.paths):  # the end of the split: the next pass repeats what was trained on
                self.shard, self.epoch = 0, self.epoch + 1
                where = f"the {self.split} split of {os.path.dirname(self.paths[0])}"
                log(f"{where} ends: pass {self.epoch + 1} over it begins (its tokens are seen again)")
            self.offset = 0
            self.tokens = self.open(self.shard)
        start = self.offset + self.rank * self.window
        buf = torch.from_numpy(self.tokens[start : start + self.window + 1].astype(np.int64))
        self.offset += self.window * self.world_size
        # the model learns next-token prediction: y is x shifted by one position, so y[b, t] is the token that follows
        # x[b, t] in the text (hence the window's +1 token: the target of its last position)
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


class ValSet:
    """
    The val set: the first `tokens` target tokens of the val split, read as consecutive windows of block_size
    (a window's targets are its tokens shifted by one; a window never crosses a shard, a shard's tail is skipped,
    as ShardLoader reads them). A val loss means these tokens wherever it is measured: train.py at every evaluation
    and in every phase, stack.py before and after growing, at any number of processes. Under DDP rank r takes
    windows r, r + world_size, ...: disjoint parts that together are the set. `tokens` is rounded down to whole
    windows and to what the split holds; self.tokens is the set's size, self.bytes the UTF-8 bytes of text its
    targets stand for (None when the tokenizer's are unknown: Tokenizer.token_bytes).
    """

    def __init__(self, data_dir, tokens, block_size, rank=0, world_size=1):
        vocab_size = load_meta(data_dir)["vocab_size"]
        paths = shard_paths(data_dir, "val")
        shard_sizes(data_dir, "val", paths)  # the shards meta.json lists, with the token counts it recorded
        self.shards, self.windows, self.block_size = [], [], block_size  # windows: (shard index, offset)
        for path in paths:
            wanted = tokens // block_size - len(self.windows)
            if wanted <= 0:
                break
            shard = read_shard(path)
            check_vocab(path, shard, vocab_size)
            self.windows += [
                (len(self.shards), k * block_size) for k in range(min(wanted, (len(shard) - 1) // block_size))
            ]
            self.shards.append(shard)
        if not self.windows:
            raise ValueError(
                f"the val set of {data_dir!r} is empty: val_tokens ({tokens:,}) must be at least block_size "
                f"({block_size}), and a val shard must hold more than block_size tokens"
            )
        self.tokens = len(self.windows) * block_size
        self.mine = self.windows[rank::world_size]
        token_bytes = load_tokenizer(data_dir).token_bytes()
        self.bytes = (
            None
            if token_bytes is None
            else sum(
                int(token_bytes[self.rows(self.windows[i : i + 1024])[:, 1:]].sum())
                for i in range(0, len(self.windows), 1024)
            )
        )

    def rows(self, windows):
        """(len(windows), block_size + 1) int64 tokens: each window with the target of its last position."""
        return np.stack([self.shards[s][o : o + self.block_size + 1] for s, o in windows]).astype(np.int64)

    def batches(self, batch_size, device="cpu"):
        """This rank's windows as (x, y) batches of up to batch_size windows."""
        for i in range(0, len(self.mine), batch_size):
            buf = torch.from_numpy(self.rows(self.mine[i : i + batch_size]))
            yield buf[:, :-1].contiguous().to(device), buf[:, 1:].contiguous().to(device)

    @torch.no_grad()
    def nats(self, model, batch_size, device="cpu", autocast=None):
        """model's loss summed over this rank's targets, in nats: a 0-d float32 tensor on device (to all-reduce).
        model(x, y) returns (logits, mean loss), as model.LLaMA does."""
        autocast = nullcontext() if autocast is None else autocast
        total = torch.zeros((), device=device)
        for x, y in self.batches(batch_size, device):
            with autocast:
                total += model(x, y)[1].float() * y.numel()
        return total

    def losses(self, nats):
        """(nats per token, bits per byte or None) from the set's summed nats: bits per byte = nats / (ln 2 * bytes),
        a loss that compares across tokenizers (nanochat's; its special tokens count no bytes, as here, but it also
        drops their nats, which we keep: a model has to predict where a document ends)."""
        return nats / self.tokens, nats / (math.log(2) * self.bytes) if self.bytes else None
