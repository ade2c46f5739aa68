"""
Prepare a token dataset: text documents -> tokenizer -> train/val shards + meta.json.

    python prepare_data.py                                    # pydocs (offline, ships with Python) -> data/pydocs
    python prepare_data.py --sources pystdlib --vocab_size 2048   # the stdlib's own source, ~10M tokens -> data/pystdlib
    python prepare_data.py --sources 'notes/*.txt' books.jsonl  # local files, read fully -> data/mix
    python prepare_data.py --sources a.jsonl@0.75 b.parquet@0.25 --max_tokens 1_000_000
    python prepare_data.py --preset reference --max_tokens 9_000_000_000   # the hub blend -> data/reference

A source is a built-in corpus (`pydocs`, `pystdlib`: text that ships with Python), a local .txt/.jsonl/.json/.parquet file (or a directory or glob of
them), or a Hugging Face hub dataset `hf:org/name[:config]`, each optionally suffixed `@WEIGHT`. Local files and
hub datasets go through one code path, datasets.load_dataset(..., streaming=True). Weighted sources are
interleaved until each has its share of --max_tokens; without a budget every source is read fully.

The story, main() at the bottom: check the arguments -> clear any stale dataset in out_dir -> tokenizer
(tiktoken by name, a Hugging Face model's own, or a BPE trained with rustbpe on the train side of the same mix)
-> stream, mix, encode in batches on all cores, send each document (plus end-of-text) to train or val -> shards
-> meta.json, written last (data.py). Until meta.json exists the directory is not a dataset; on any error the
files this run wrote are removed.
"""
import argparse
import ast
import glob
import importlib.util
import os
import random
import re
import shlex
import sys
import time
from itertools import islice

import numpy as np
from tqdm import tqdm

from common import log, remove
from data import write_meta, write_shard
from tokenizer import TIKTOKEN, Tokenizer

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The reference model did not publish the ratio in which it mixed these four corpora, so these weights are our
# choice: FineWeb-Edu leads because educational filtering is what lifts small models on knowledge and reasoning
# benchmarks (FineWeb paper, 2024); plain FineWeb keeps the breadth of the web; Cosmopedia's synthetic textbooks
# help but are repetitive, so they get less; Wikipedia is high quality but small, 10%.
# At 9B tokens no share exceeds what its subset holds (~10B, ~28B, ~10B, ~5B tokens).
PRESETS = {"reference": ["hf:HuggingFaceFW/fineweb-edu:sample-10BT@0.4", "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2@0.2",
                         "hf:HuggingFaceFW/fineweb:sample-10BT@0.3", "hf:wikimedia/wikipedia:20231101.en@0.1"]}


# -----------------------------------------------------------------------------------------------
# Readers: one per kind of source, each `read_<kind>(source) -> iterable of documents (str)`, where source is
# what parse_source made of its spec. They are registered in READERS, below them.

def read_pydocs(source):
    """The English that ships inside every CPython, read without importing anything: pydoc's help topics plus
    every docstring of the standard library, in a fixed order."""
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)]
    seen = set()
    for name in sorted(sys.stdlib_module_names):
        try:  # find_spec of a top-level name locates the module without running it (importing antigravity opens a browser)
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue  # built-in or C extension: no source to read
        paths = [spec.origin]
        for loc in spec.submodule_search_locations or []:  # a package: its submodules too, but not its tests
            for root, dirs, files in os.walk(loc):
                dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idle_test", "__pycache__"))
                paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
        for path in paths:
            if path in seen:
                continue
            seen.add(path)
            try:
                with open(path, "rb") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, ValueError):  # deliberately broken sample files exist in some Python versions
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
    return docs




def read_pystdlib(source):
    """The standard library's own source files, tests included (~31 MB on CPython 3.11): real Python with English
    comments and docstrings, ~20x pydocs and still offline. One document per .py file under the running Python's
    stdlib directory (site-packages excluded), in a fixed order: a directory's files sorted by name, then its
    subdirectories, sorted. Decoding is fixed: the file's PEP 263 coding cookie (UTF-8 by default), U+FFFD for
    bytes it cannot decode (a few test files are malformed on purpose), line ends normalised to \\n as Python's
    own reader does. The same Python version gives the same documents. Its provenance (Python version, bytes,
    files, license) goes into meta.json through source["provenance"]."""
    import sysconfig
    import tokenize
    root = sysconfig.get_path("stdlib")
    if not root or not os.path.isfile(os.path.join(root, "os.py")):
        raise SystemExit(f"pystdlib: cannot read the standard library's source files: {root!r} holds no os.py "
                         "(a zipped or stripped Python install); use another Python, or --sources pydocs")
    paths = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py")]
    docs, n_bytes = [], 0
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        n_bytes += len(raw)
        try:
            encoding = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)[0]
            text = raw.decode(encoding)
        except (SyntaxError, LookupError, UnicodeDecodeError):  # a bad cookie, or bytes that contradict it
            text = raw.decode("utf-8", errors="replace")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():  # empty __init__.py files would add only a stray end-of-text
            docs.append(text)
    if not docs:
        raise SystemExit(f"pystdlib: no readable .py files under {root!r}")
    has_tests = os.path.isdir(os.path.join(root, "test"))
    if not has_tests:
        log(f"warning: pystdlib: {root} has no test/ package (a distribution that ships it apart, e.g. Debian's "
            "libpython3.X-testsuite): the corpus is ~2/3 smaller")
    source["provenance"] = {
        "python": sys.version.split()[0], "implementation": sys.implementation.name, "stdlib": root,
        "files": len(paths), "documents": len(docs), "bytes": n_bytes, "tests_included": has_tests,
        "license": "PSF-2.0 (Python Software Foundation License; " + os.path.join(root, "LICENSE.txt") + ")"}
    return docs


def stream_texts(label, text_column, *args, **kwargs):
    """Documents of one dataset via load_dataset(streaming=True): the one path for local files and the hub."""
    from datasets import load_dataset  # imported here: slow to import, and pydocs does not need it
    try:
        for row in load_dataset(*args, split="train", streaming=True, **kwargs):
            if text_column not in row:
                raise SystemExit(f"{label}: no column {text_column!r}; its columns are {sorted(row)} (pick one with --text_column)")
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise SystemExit(f"{label}: column {text_column!r} holds {type(text).__name__}, not text")
            if text:  # an empty document would only add a stray end-of-text
                yield text
    except SystemExit:
        raise
    except Exception as e:  # unreadable, corrupt, unreachable: say which source and why, then stop
        raise SystemExit(f"{label}: cannot read it ({type(e).__name__}: {e})") from e


def read_hub(source):
    """A Hugging Face hub dataset, streamed."""
    return stream_texts(source["spec"], source["text_column"], source["path"], source["config"])


def read_local(source):
    """Local files, one load_dataset per file so that an error names the file; a .txt file is one document."""
    return (text for f in source["files"] for text in (
        stream_texts(f, "text", "text", data_files=f, sample_by="document") if f.endswith(".txt") else
        stream_texts(f, source["text_column"], BUILDERS[os.path.splitext(f)[1]], data_files=f)))


# Every kind of source and its reader. A built-in corpus is named by a bare word on the command line; it is
# small and held in memory, read once, shuffled (seeded, so that the per-document train/val split is iid) and
# tokenized with a BPE trained on it by default. To add a corpus: write its reader above, list it here.
BUILTIN_CORPORA = {"pydocs": read_pydocs, "pystdlib": read_pystdlib}
READERS = {**BUILTIN_CORPORA, "hf": read_hub, "local": read_local}


# -----------------------------------------------------------------------------------------------
# Sources: parse a spec, then open it as an iterator of document strings

def parse_source(spec, text_column="text"):
    """A source spec (see the module docstring) -> {"spec", "weight", "kind", "name", ...what its reader needs}."""
    head, _, tail = spec.rpartition("@")
    try:
        weight = float(tail) if head else None
    except ValueError:  # an @ that is part of a path
        weight = None
    if weight is not None:
        spec = head
        if not 0 < weight < float("inf"):
            raise SystemExit(f"source {spec!r}: weight must be a positive number, got {tail}")
    source = {"spec": spec, "weight": weight, "text_column": text_column}
    if spec in BUILTIN_CORPORA:
        return source | {"kind": spec, "name": spec}
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            raise SystemExit(f"unknown source {spec!r}: a hub dataset is written hf:org/name[:config]")
        return source | {"kind": "hf", "name": name.split("/")[1], "path": name, "config": config or None}
    if os.path.isdir(spec):
        files = sorted(p for ext in BUILDERS for p in glob.glob(os.path.join(spec, "*" + ext)))
    else:
        files = sorted(glob.glob(spec))
    if not files:
        if any(c in spec for c in "*?[") or os.path.isdir(spec):
            raise SystemExit(f"source {spec!r}: no .txt/.jsonl/.json/.parquet files match")
        if os.path.splitext(spec)[1] in BUILDERS:
            raise SystemExit(f"source {spec!r}: no such file")
        raise SystemExit(f"unknown source {spec!r}: expected {', '.join(BUILTIN_CORPORA)}, hf:org/name[:config], or a "
                         ".txt/.jsonl/.json/.parquet file, directory or glob (each optionally @WEIGHT)")
    for f in files:
        if os.path.splitext(f)[1] not in BUILDERS:
            raise SystemExit(f"unknown source {f!r}: local files must be .txt, .jsonl, .json or .parquet")
    name = os.path.splitext(os.path.basename(spec.rstrip("/")))[0].strip("*?[]") or "local"
    return source | {"kind": "local", "name": name, "files": files}


def open_source(source, seed):
    """An iterator over a source's documents (a built-in corpus is extracted once, ~2 s, and kept)."""
    if source["kind"] not in BUILTIN_CORPORA:
        return iter(READERS[source["kind"]](source))
    if "docs" not in source:
        source["docs"] = list(READERS[source["kind"]](source))
        random.Random(seed).shuffle(source["docs"])
    return iter(source["docs"])


def split_docs(source, i, seed, val_fraction):
    """(doc, is_val) for source i: each document goes to val with probability val_fraction. The source's k-th
    document gets the same decision in every pass over it, so the BPE trained on the train side never sees val."""
    rng = random.Random(f"{seed}/{i}")
    for doc in open_source(source, seed):
        yield doc, rng.random() < val_fraction


def mix(streams, weights, budget, measure):
    """
    Interleave iterators by weight: next comes from the source furthest behind its share, so the mix is even
    all along (a cut anywhere holds the right proportions). With a budget, source i stops once measure() of its
    items reaches weights[i]/sum(weights) * budget; a source that runs out early just ends. Yields (i, item).
    """
    total = sum(weights)
    caps = [None if budget is None else budget * w / total for w in weights]
    used = [0] * len(streams)
    live = list(range(len(streams)))
    while live:
        i = min(live, key=lambda j: used[j] / weights[j])
        item = next(streams[i], None)
        if item is None:
            live.remove(i)
            continue
        yield i, item
        used[i] += measure(item)
        if caps[i] is not None and used[i] >= caps[i]:
            live.remove(i)


def encoded(docs, tok, batch_docs):
    """(doc, is_val) -> (ids, is_val), encoding batch_docs documents at a time on all cores. Every document
    ends with end-of-text: that is what separates documents in a shard."""
    while batch := list(islice(docs, batch_docs)):
        for (_, is_val), ids in zip(batch, tok.encode_batch([d for d, _ in batch])):
            ids.append(tok.eot_id)
            yield ids, is_val


class ShardWriter:
    """Buffers one split's tokens and writes a shard of exactly shard_size tokens whenever the buffer fills."""

    def __init__(self, out_dir, split, dtype, shard_size, written):
        self.out_dir, self.split, self.dtype, self.shard_size = out_dir, split, dtype, shard_size
        self.written = written  # shared with main(), which removes these files if the run fails
        self.files, self.file_tokens, self.buf, self.n_buf, self.tokens = [], [], [], 0, 0

    def add(self, ids):
        self.buf.append(np.asarray(ids, dtype=self.dtype))
        self.n_buf += len(ids)
        self.tokens += len(ids)
        while self.n_buf >= self.shard_size:
            self.flush(self.shard_size)

    def flush(self, n=None):
        if not self.n_buf:
            return
        buf = np.concatenate(self.buf)
        n = len(buf) if n is None else n
        name = f"{self.split}_{len(self.files):06d}.bin"
        path = os.path.join(self.out_dir, name)
        self.written.append(path)  # before writing: a half-written .tmp gets cleaned up too
        write_shard(path, buf[:n])
        self.files.append(name)
        self.file_tokens.append(int(n))
        self.buf, self.n_buf = [buf[n:]], len(buf) - n



# -----------------------------------------------------------------------------------------------
# The steps of main(), in order

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\nThe story")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"SPEC: {' | '.join(BUILTIN_CORPORA)} | PATH/DIR/GLOB of .txt .jsonl .json .parquet | "
                                       "hf:org/name[:config], each optionally @WEIGHT")
    p.add_argument("--sources", nargs="+", metavar="SPEC", help="what to read (default: pydocs)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named blend instead of --sources (reference: 4 hub corpora, needs --max_tokens)")
    p.add_argument("--max_tokens", type=int, metavar="N", help="token budget over train+val, shared by weight (equally without weights; default: read everything)")
    p.add_argument("--out_dir", help="default: data/<preset or source name>, data/mix for several sources")
    p.add_argument("--tokenizer", metavar="NAME", help=f"bpe, {', '.join(TIKTOKEN)}, or hf:DIR (a Hugging Face model's own "
                   "tokenizer.json, to continue training that model); default: bpe for built-in corpora, gpt2 otherwise")
    p.add_argument("--vocab_size", type=int, default=4096, metavar="N", help="for --tokenizer bpe (default: %(default)s)")
    p.add_argument("--bpe_train_chars", type=int, default=200_000_000, metavar="N",
                   help="at most this many characters of train text (mixed by weight) to train the BPE on (default: %(default)s)")
    p.add_argument("--text_column", default="text", help="column holding the text in .jsonl/.json/.parquet and hub rows (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto", help="auto: uint16 when the vocab fits")
    p.add_argument("--shard_size", type=int, default=100_000_000, metavar="N", help="tokens per shard (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, metavar="F", help="share of documents for val (default 0.05 for built-in corpora: "
                   "pydocs' ~600k tokens need 5%% for a steady val loss; 0.005 otherwise, already millions of tokens at scale)")
    p.add_argument("--seed", type=int, default=1337, help="built-in corpus shuffle and train/val split (default: %(default)s)")
    p.add_argument("--batch_docs", type=int, default=1024, metavar="N", help="documents per encode batch (default: %(default)s)")
    return p.parse_args(argv)


def check_arguments(args):
    """Check everything that can be checked before the disk is touched, and fill in the defaults that depend on
    the sources (val_fraction, tokenizer, dtype, out_dir). Returns the parsed sources, and the tokenizer if it is
    a Hugging Face model's (loaded now: its vocab size decides the dtype)."""
    if args.preset and args.sources:
        raise SystemExit("give either --preset or --sources, not both")
    sources = [parse_source(s, args.text_column) for s in (PRESETS[args.preset] if args.preset else args.sources or ["pydocs"])]
    if any(s["weight"] is not None for s in sources) and args.max_tokens is None:
        raise SystemExit("source weights need a budget to share: add --max_tokens N")
    for flag in ("max_tokens", "shard_size", "batch_docs", "bpe_train_chars"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag} must be positive, got {getattr(args, flag)}")
    only_builtin = all(s["kind"] in BUILTIN_CORPORA for s in sources)
    if args.val_fraction is None:
        args.val_fraction = 0.05 if only_builtin else 0.005
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    kind = args.tokenizer = args.tokenizer or ("bpe" if only_builtin else "gpt2")
    hf_tokenizer = None
    if kind.startswith("hf:"):
        try:
            hf_tokenizer = Tokenizer.from_hf(kind[3:])
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--tokenizer {kind}: {e}")
    elif kind not in ("bpe", *TIKTOKEN):
        raise SystemExit(f"unknown --tokenizer {kind!r}: choose bpe, {', '.join(TIKTOKEN)} or hf:DIR")
    vocab_size = args.vocab_size if kind == "bpe" else hf_tokenizer.vocab_size if hf_tokenizer else TIKTOKEN[kind][1]
    if kind == "bpe" and vocab_size < 258:
        raise SystemExit(f"--vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens + <|endoftext|>")
    if args.dtype == "auto":
        args.dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if args.dtype == "uint16" and vocab_size > 2**16:
        raise SystemExit(f"vocab_size {vocab_size} ({kind}) does not fit --dtype uint16 (at most 65536 ids): use uint32 or auto")
    args.out_dir = args.out_dir or os.path.join("data", args.preset or (sources[0]["name"] if len(sources) == 1 else "mix"))
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise SystemExit(f"--out_dir {args.out_dir!r} is a file, not a directory: give another --out_dir")
    return sources, hf_tokenizer


def clear_stale_dataset(out_dir):
    """Remove an older dataset's files: old shards too, since a loader globs train_*.bin and would mix them in."""
    os.makedirs(out_dir, exist_ok=True)
    stale = [os.path.join(out_dir, n) for n in ("meta.json", "tokenizer.tiktoken")]
    stale += glob.glob(os.path.join(out_dir, "train_*.bin*")) + glob.glob(os.path.join(out_dir, "val_*.bin*"))
    for path in stale:
        remove(path)


def build_tokenizer(args, sources, weights, hf_tokenizer):
    """The tokenizer by name, the Hugging Face model's, or a BPE trained on the train side of the mix."""
    kind = args.tokenizer
    if hf_tokenizer:
        return hf_tokenizer
    if kind != "bpe":
        try:
            tok = Tokenizer.from_tiktoken(kind)
        except Exception as e:
            raise SystemExit(f"cannot load tiktoken encoding {kind!r} ({type(e).__name__}: {e}); "
                             "offline it needs a cache in TIKTOKEN_CACHE_DIR") from e
        assert args.dtype == "uint32" or tok.vocab_size <= 2**16, (kind, tok.vocab_size)  # TIKTOKEN is out of date
        return tok
    streams = [(d for d, is_val in split_docs(s, i, args.seed, args.val_fraction) if not is_val) for i, s in enumerate(sources)]
    texts = [doc for _, doc in mix(streams, weights, args.bpe_train_chars, len)]
    if not texts:
        raise SystemExit(f"empty corpus: {' '.join(s['spec'] for s in sources)} gave no train text")
    log(f"training a {args.vocab_size}-token BPE on {sum(map(len, texts)):,} chars of {len(texts):,} train documents")
    tok = Tokenizer.train_bpe(texts, args.vocab_size)
    if tok.vocab_size < args.vocab_size:
        log(f"warning: the text only supports {tok.vocab_size - 257} merges: vocab is {tok.vocab_size}, not {args.vocab_size}")
    return tok


def write_shards(args, sources, weights, tok, written):
    """Stream, mix and encode every source, send each document to train or val, write the shards.
    Returns the writers of both splits and per-source counts of documents and tokens."""
    log(f"encoding {', '.join(s['spec'] for s in sources)} with {args.tokenizer} (vocab {tok.vocab_size}) into {args.out_dir}")
    streams = [encoded(split_docs(s, i, args.seed, args.val_fraction), tok, args.batch_docs) for i, s in enumerate(sources)]
    writers = {split: ShardWriter(args.out_dir, split, args.dtype, args.shard_size, written) for split in ("train", "val")}
    counts = [{"docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}} for _ in sources]
    with tqdm(total=args.max_tokens, unit="tok", unit_scale=True, file=sys.stderr, desc="tokens") as bar:
        for i, (ids, is_val) in mix(streams, weights, args.max_tokens, lambda item: len(item[0])):
            split = "val" if is_val else "train"
            writers[split].add(ids)
            counts[i]["docs"][split] += 1
            counts[i]["tokens"][split] += len(ids)
            bar.update(len(ids))
    for split, writer in writers.items():
        if not writer.tokens:
            n_docs = sum(c["docs"]["train"] + c["docs"]["val"] for c in counts)
            raise SystemExit(f"empty corpus: no documents for {split} ({n_docs} documents in all, --val_fraction "
                             f"{args.val_fraction}); give more data" + (" or a larger --val_fraction" if split == "val" else ""))
        writer.flush()
    return writers, counts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.time()
    sources, hf_tokenizer = check_arguments(args)
    weights = [s["weight"] or 1.0 for s in sources]
    clear_stale_dataset(args.out_dir)  # from here on, out_dir holds no dataset until meta.json is written at the end
    written = []  # every shard this run starts, removed again if it fails
    try:
        tok = build_tokenizer(args, sources, weights, hf_tokenizer)
        writers, counts = write_shards(args, sources, weights, tok, written)
        meta = write_meta(
            args.out_dir, tok, dtype=args.dtype,
            sources=[{"spec": s["spec"], "weight": w / sum(weights), **c, **({"provenance": s["provenance"]} if "provenance" in s else {})}
                     for s, w, c in zip(sources, weights, counts)],
            tokens={split: w.tokens for split, w in writers.items()}, shards={split: w.files for split, w in writers.items()},
            shard_tokens={split: w.file_tokens for split, w in writers.items()},
            shard_size=args.shard_size, max_tokens=args.max_tokens, val_fraction=args.val_fraction, seed=args.seed,
            command=shlex.join(["python", "prepare_data.py", *argv]))
    except BaseException:  # errors and Ctrl-C alike: leave nothing that looks like (part of) a dataset
        for path in written + [os.path.join(args.out_dir, "tokenizer.tiktoken")]:
            remove(path)
            remove(path + ".tmp")
        raise
    dt = time.time() - t0
    total, n_shards = sum(meta["tokens"].values()), sum(map(len, meta["shards"].values()))
    print(f"{args.out_dir}: {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens in "
          f"{n_shards} shards ({args.dtype}, vocab {tok.vocab_size}) in {dt:.1f}s ({total / dt:,.0f} tok/s)")
    return meta


if __name__ == "__main__":
    main()
