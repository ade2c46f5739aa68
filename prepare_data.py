"""
Prepare a token dataset: text documents -> tokenizer -> train/val shards + meta.json.

    python prepare_data.py                                    # pydocs (offline, ships with Python) -> data/pydocs
    python prepare_data.py --sources pystdlib --vocab_size 2048  # the stdlib's own source, ~10M tokens -> data/pystdlib
    python prepare_data.py --sources 'notes/*.txt' books.jsonl  # local files, read fully -> data/mix
    python prepare_data.py --sources a.jsonl@0.75 b.parquet@0.25 --max_tokens 1_000_000
    python prepare_data.py --sources 'hf:HuggingFaceFW/fineweb-edu:sample-10BT#COMMIT' --max_tokens 1_000_000_000
    python prepare_data.py --preset reference --max_tokens 9_000_000_000   # the hub blend -> data/reference

A source is a built-in corpus (`pydocs`, `pystdlib`: text that ships with Python), a local .txt/.jsonl/.json/.parquet
file (or a directory or glob of them), or a Hugging Face hub dataset `hf:org/name[:config][#REVISION]` (a commit,
branch or tag; main if not given), each optionally suffixed `@WEIGHT`. Local files and hub datasets go through one
code path, datasets.load_dataset(..., streaming=True), and are shuffled as they stream (SourceStream). Weighted
sources are interleaved until each has its share of --max_tokens; without a budget every source is read fully.

A run never destroys a dataset and never loses its work. It builds in OUT_DIR.partial, records its progress there
at every train shard (progress.json, and the unwritten start of the next shard of each split in its .part file),
and moves the finished dataset into out_dir, which until then keeps the dataset it had. Run again, the same
command continues an unfinished build where it stopped, to the same bytes as a run never stopped; finds a finished
one and has nothing to do; and any other command starts over, saying so. "The same" is the recipe: everything
that decides the bytes, each source pinned to what it was read from (a hub commit, a hash of local contents). A hub
source named by a branch stays at the commit its build started with, however the branch moves, until
--refresh_revisions looks it up again.

The story, main() at the bottom: check the arguments -> pin the sources -> done already? -> an unfinished build to
continue? -> tokenizer (tiktoken by name, a Hugging Face model's own, or a BPE trained with rustbpe on the train
side of the same mix) -> stream, shuffle, mix, encode in batches on all cores, send each document (plus
end-of-text) to train or val -> shards -> meta.json (data.py) -> swap into out_dir. One build per out_dir at a time:
a second run on it is refused at start (the lock OUT_DIR.lock, checkpoint.RunLock). Ctrl-C or SIGTERM stops a run in
one line (stopping.py), keeping the work done so far for the same command to continue.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal} before any shard was written: run the same command to start again")

import argparse
import ast
import glob
import hashlib
import importlib.util
import json
import os
import random
import re
import shlex
import sys
import time

import numpy as np
from tqdm import tqdm

from checkpoint import RunLock
from common import atomic_write, log, remove
from data import load_meta, read_shard, write_meta, write_shard
from tokenizer import TIKTOKEN, Tokenizer

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The reference model did not publish the ratio in which it mixed these four corpora, so these weights are our
# choice: FineWeb-Edu leads because educational filtering is what lifts small models on knowledge and reasoning
# benchmarks (FineWeb paper, 2024); plain FineWeb keeps the breadth of the web; Cosmopedia's synthetic textbooks
# help but are repetitive, so they get less; Wikipedia is high quality but small, 10%.
# At 9B tokens no share exceeds what its subset holds (~10B, ~28B, ~10B, ~5B tokens).
# #main: these revisions could not be looked up where this was written (no access to the hub), so each names the
# branch; a run resolves it to the commit it reads and records that in meta.json (sources[i].revision), and a rerun
# in the same out_dir keeps that commit (pin_hub_sources). Put those commits here, in place of main, to build the
# same dataset again elsewhere.
PRESETS = {
    "reference": [
        "hf:HuggingFaceFW/fineweb-edu:sample-10BT#main@0.4",
        "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2#main@0.2",
        "hf:HuggingFaceFW/fineweb:sample-10BT#main@0.3",
        "hf:wikimedia/wikipedia:20231101.en#main@0.1",
    ]
}
# A streamed source is read from this many of its pieces at a time, in turn, as datasets' own shuffle does
# (IterableDataset.shuffle's max_buffer_input_shards): a prefix of the stream then starts in 10 places of the
# source, not one. Each open piece holds a parquet row group in memory.
OPEN_PIECES = 10
# Bumped whenever a change here would build other bytes from the same arguments: a partial build of another
# version starts over instead of being continued.
BUILD_VERSION = 2
# The files this script writes in a dataset directory or its OUT_DIR.partial: the only ones it ever removes.
OWN_FILES = re.compile(r"(meta\.json|tokenizer\.tiktoken|progress\.json|(train|val)_\d{6}\.(bin|part))(\.tmp)?")


# -----------------------------------------------------------------------------------------------
# Built-in corpora: each `read_<name>(source) -> list of documents (str)`, registered in BUILTIN_CORPORA below.
# They are small, held in memory and shuffled whole (pin_sources).


def read_pydocs(source):
    """The English that ships inside every CPython, read without importing anything: pydoc's help topics plus
    every docstring of the standard library, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    seen = set()
    for name in sorted(sys.stdlib_module_names):
        # find_spec of a top-level name locates the module without running it (importing antigravity opens a browser)
        try:
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
        raise SystemExit(
            f"pystdlib: cannot read the standard library's source files: {root!r} holds no os.py "
            "(a zipped or stripped Python install); use another Python, or --sources pydocs"
        )
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
        log(
            f"warning: pystdlib: {root} has no test/ package (a distribution that ships it apart, e.g. Debian's "
            "libpython3.X-testsuite): the corpus is ~2/3 smaller"
        )
    source["provenance"] = {
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "stdlib": root,
        "files": len(paths),
        "documents": len(docs),
        "bytes": n_bytes,
        "tests_included": has_tests,
        "license": "PSF-2.0 (Python Software Foundation License; " + os.path.join(root, "LICENSE.txt") + ")",
    }
    return docs


# Every built-in corpus, named by a bare word on the command line and tokenized with a BPE trained on it by
# default. To add a corpus: write its reader above, list it here.
BUILTIN_CORPORA = {"pydocs": read_pydocs, "pystdlib": read_pystdlib}


# -----------------------------------------------------------------------------------------------
# Sources: parse a spec, pin it to what exactly it reads, then stream it as (document, is_val)


def parse_source(spec, text_column="text"):
    """A source spec (see the module docstring) -> {"spec", "weight", "kind", "name", ...what reading it needs}."""
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
        name, hash_sign, ref = spec[3:].partition("#")
        name, _, config = name.partition(":")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or (hash_sign and not ref):
            raise SystemExit(f"unknown source {spec!r}: a hub dataset is written hf:org/name[:config][#REVISION]")
        return source | {
            "kind": "hf",
            "name": name.split("/")[1],
            "path": name,
            "config": config or None,
            "ref": ref or "main",
        }
    if os.path.isdir(spec):
        files = sorted(p for ext in BUILDERS for p in glob.glob(os.path.join(spec, "*" + ext)))
    else:
        files = sorted(glob.glob(spec))
    if not files:
        if any(c in spec for c in "*?[") or os.path.isdir(spec):
            raise SystemExit(f"source {spec!r}: no .txt/.jsonl/.json/.parquet files match")
        if os.path.splitext(spec)[1] in BUILDERS:
            raise SystemExit(f"source {spec!r}: no such file")
        raise SystemExit(
            f"unknown source {spec!r}: expected {', '.join(BUILTIN_CORPORA)}, hf:org/name[:config][#REVISION], "
            "or a .txt/.jsonl/.json/.parquet file, directory or glob (each optionally @WEIGHT)"
        )
    for f in files:
        if os.path.splitext(f)[1] not in BUILDERS:
            raise SystemExit(f"unknown source {f!r}: local files must be .txt, .jsonl, .json or .parquet")
    name = os.path.splitext(os.path.basename(spec.rstrip("/")))[0].strip("*?[]") or "local"
    return source | {"kind": "local", "name": name, "files": files}


def pin_sources(sources, seed):
    """
    Set each source's "revision" to what exactly it reads, so that the recipe (and meta.json) names the data:
    a sha256 of local files' contents (a copy elsewhere is the same source; an edited file is not), a sha256 of a
    built-in corpus's documents (they depend on the Python that runs this); a hub dataset's commit is set by
    pin_hub_sources. A built-in corpus is read here, once (~2 s), and shuffled whole (seeded), so that its
    per-document train/val split is iid.
    """
    for source in sources:
        if source["kind"] == "hf":
            continue
        if source["kind"] == "local":
            digest = hashlib.sha256()
            for path in source["files"]:
                with open(path, "rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
            source["revision"] = "sha256:" + digest.hexdigest()[:16]
        else:
            docs = BUILTIN_CORPORA[source["kind"]](source)
            digest = hashlib.sha256()
            for doc in docs:
                data = doc.encode("utf-8", "surrogatepass")
                digest.update(len(data).to_bytes(8, "little") + data)
            source["revision"] = "sha256:" + digest.hexdigest()[:16]
            random.Random(seed).shuffle(docs)
            source["docs"] = docs


def pin_hub_sources(args, sources, tok):
    """
    Set each hub source's "revision" to the commit it reads, and return the recipe. A commit in the spec is used
    as it is. A branch or tag is resolved once, when a build starts, so the whole build reads that commit; a rerun
    goes on at the commits its build started with, which the unfinished build in OUT_DIR.partial (progress.json) or
    the finished dataset in OUT_DIR (meta.json) records, if the rest of the recipe is the same: the branch may have
    moved since (the reference preset names main), and reading it anew would change the recipe and throw the work
    away (hours of a 9B-token build) or rebuild a finished dataset. --refresh_revisions looks the branches up again.
    """
    named = [s for s in sources if s["kind"] == "hf" and not re.fullmatch(r"[0-9a-f]{40}", s["ref"])]
    for s in sources:
        if s["kind"] == "hf" and s not in named:
            s["revision"] = s["ref"]
    if named and not args.refresh_revisions:
        for where, recipe, commits in recorded_builds(args.out_dir):
            if all(s["spec"] in commits for s in named):
                for s in named:
                    s["revision"] = commits[s["spec"]]
                if recipe_of(args, sources, tok) == recipe:
                    log(
                        f"keeping the hub commits {where}: "
                        + ", ".join(f"{s['spec']} -> {s['revision'][:12]}" for s in named)
                        + " (--refresh_revisions looks the branches up again)"
                    )
                    return recipe
    for s in named:
        s["revision"] = hub_commit(s)
    return recipe_of(args, sources, tok)


def recorded_builds(out_dir):
    """(which, recipe, {spec: revision}) of the builds in out_dir: the unfinished one in out_dir.partial, then the
    finished dataset in out_dir."""
    found = []
    for where, path in (
        (f"the unfinished build in {out_dir}.partial started at", os.path.join(out_dir + ".partial", "progress.json")),
        (f"the dataset in {out_dir} was built from", os.path.join(out_dir, "meta.json")),
    ):
        try:
            with open(path) as f:
                record = json.load(f)
            revisions = record.get("revisions") or {s["spec"]: s["revision"] for s in record.get("sources", [])}
            found.append((where, record["recipe"], revisions))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none there, or unreadable: no record
            pass
    return found


def hub_commit(source):
    """The commit a hub source's branch or tag names now, as the hub resolves it."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(source["path"], revision=source["ref"]).sha
    except Exception as e:  # unknown dataset or revision, offline, unreachable
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(
            f"{source['spec']}: cannot read it: the hub did not resolve revision {source['ref']!r} "
            f"({type(e).__name__}: {reason}); check the name and the network, or, with the dataset in "
            "the Hugging Face cache, pin its commit: hf:org/name[:config]#<40-hex commit>"
        ) from None


def open_dataset(source, label):
    """
    The streamed dataset behind a label (a hub source's spec, or one local file: one load_dataset per file, so that
    an error names the file), split into its parquet row groups (reshard(); other formats stay one piece per file)
    and reduced to its text column. Returns (dataset, column).
    """
    from datasets import load_dataset  # imported here: slow to import, and pydocs does not need it

    if source["kind"] == "hf":
        args, kwargs = (source["path"], source["config"]), {"revision": source["revision"]}
        column = source["text_column"]
    elif label.endswith(".txt"):  # a .txt file is one document, whatever --text_column says
        args, kwargs, column = ("text",), {"data_files": label, "sample_by": "document"}, "text"
    else:
        args, kwargs, column = (BUILDERS[os.path.splitext(label)[1]],), {"data_files": label}, source["text_column"]
    try:
        dataset = load_dataset(*args, split="train", streaming=True, **kwargs).reshard()
    except Exception as e:  # unreadable, corrupt, unreachable: say which source and why, then stop
        raise SystemExit(read_error(label, e)) from e
    if dataset.column_names is None:  # not known before reading (text files): the rows will tell
        return dataset, column
    if column not in dataset.column_names:
        raise SystemExit(
            f"{label}: no column {column!r}; its columns are {sorted(dataset.column_names)} "
            "(pick one with --text_column)"
        )
    return dataset.select_columns([column]), column


def read_error(label, e):
    """The line that stops a run on a source it cannot read. Invalid UTF-8 in a local text file is named by its line
    (a .jsonl's record): the decoder's "position" counts from where datasets cut the chunk it was decoding."""
    if isinstance(e, UnicodeDecodeError) and label.endswith((".txt", ".jsonl", ".json")) and os.path.isfile(label):
        with open(label, "rb") as f:
            for number, line in enumerate(f, 1):  # a newline byte is never inside a UTF-8 sequence: lines decode alone
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return (
                        f"{label}, line {number}: not UTF-8 (byte {bad.start + 1} of the line, "
                        f"0x{line[bad.start]:02x}: {bad.reason}); re-encode the file as UTF-8 "
                        "(iconv -f ITS_ENCODING -t utf-8)"
                    )
    return f"{label}: cannot read it ({type(e).__name__}: {e})"


class SourceStream:
    """
    Source i's documents in the order they enter the dataset, each with its split: next() gives (text, is_val), or,
    given a tokenizer, (ids, is_val), encoded batch_docs documents at a time on all cores and ending with end-of-text.

    A built-in corpus is its list, shuffled by pin_sources. A streamed source is read in pieces (a parquet file's
    row groups, a .jsonl/.json file, a .txt file) in a random order, from OPEN_PIECES of them at a time in turn,
    and its documents are taken block_docs at a time, each block in a random order: a prefix of the stream is then
    a sample of the whole source, not its first files (docs/data.md measures how close). This is what datasets'
    IterableDataset.shuffle(seed, buffer_size) does too, but its state_dict() drops the buffer, so a resumed build
    would differ; here a block is read again instead. The orders are seeded by (seed, i, the block's number), so
    every pass over the source is the same. Each document goes to val with probability val_fraction, drawn from an
    RNG seeded by (seed, i): the k-th document gets the same decision in every pass, so a BPE trained on the train
    side never sees val. With block_docs = 0 nothing is shuffled: pieces and documents come in file order.

    state_dict() is small and holds no text: where the current block started (each open piece, with datasets' own
    state_dict() of it, which restarts it at a row without reading the rows before), how far into the block, and
    the split's RNG. load_state_dict() reads that block again and continues at the same document.
    """

    def __init__(self, source, i, args, tok=None):
        self.source, self.tok, self.batch_docs, self.val_fraction = source, tok, args.batch_docs, args.val_fraction
        self.seed = f"{args.seed}/{i}"
        self.split_rng = random.Random(self.seed)
        self.shuffle = args.shuffle_block > 0
        self.block_docs = args.shuffle_block or args.batch_docs  # unshuffled, a block only paces the reading
        self.datasets = {}  # label -> (dataset, column), each opened once
        self.lanes = []  # the pieces each open piece is taken from in turn: pieces[lane::OPEN_PIECES]
        self.block = []
        if "docs" in source:  # a built-in corpus: one block, shuffled already
            self.block = source["docs"]
        else:
            labels = [source["spec"]] if source["kind"] == "hf" else source["files"]
            pieces = [(label, k) for label in labels for k in range(self.count_pieces(label))]
            if self.shuffle:
                random.Random(f"{self.seed}/pieces").shuffle(pieces)
            open_pieces = OPEN_PIECES if self.shuffle else 1
            self.lanes = [pieces[lane::open_pieces] for lane in range(min(open_pieces, len(pieces)))]
        self.index = 0  # the next document of the block
        self.encoded = []  # the block's documents from index on, encoded, last first
        self.turn, self.at, self.readers = 0, [0] * len(self.lanes), [None] * len(self.lanes)  # where the reading is
        self.start = self.next_start = {"block": 0, **self.where()}  # where the current and the next block start

    def count_pieces(self, label):
        """How many pieces a label holds: only parquet has to be opened to tell (a .jsonl/.txt file is one)."""
        return self.dataset(label)[0].num_shards if self.source["kind"] == "hf" or label.endswith(".parquet") else 1

    def dataset(self, label):
        if label not in self.datasets:
            self.datasets[label] = open_dataset(self.source, label)
        return self.datasets[label]

    def open_piece(self, lane, rows_state):
        """A lane's current piece: (its dataset, an iterator over its texts), at rows_state if given."""
        label, k = self.lanes[lane][self.at[lane]]
        dataset, column = self.dataset(label)
        piece = dataset.shard(dataset.num_shards, k)
        if rows_state:
            piece.load_state_dict(rows_state)
        return piece, self.texts(label, piece, column)

    @staticmethod
    def texts(label, rows, column):
        try:
            for row in rows:
                text = row.get(column)
                if text is not None and not isinstance(text, str):
                    raise SystemExit(f"{label}: column {column!r} holds {type(text).__name__}, not text")
                yield text
        except SystemExit:
            raise
        except Exception as e:  # corrupt, unreachable, a dropped connection: say which piece and why, then stop
            raise SystemExit(read_error(label, e)) from e

    def where(self):
        """Where the reading is: whose turn it is, each lane's piece and datasets' state_dict() of it if open."""
        return {
            "turn": self.turn,
            "lanes": [
                {"piece": at, "rows": reader[0].state_dict() if reader else None}
                for at, reader in zip(self.at, self.readers)
            ],
        }

    def go_to(self, where):
        self.turn, self.at = where["turn"], [lane["piece"] for lane in where["lanes"]]
        self.readers = [
            self.open_piece(lane, state["rows"]) if state["rows"] else None for lane, state in enumerate(where["lanes"])
        ]

    def next_text(self):
        """The next row's text (None or "" too), from the open pieces in turn; StopIteration once all are read."""
        while any(at < len(pieces) for at, pieces in zip(self.at, self.lanes)):
            lane, self.turn = self.turn, (self.turn + 1) % len(self.lanes)
            while self.at[lane] < len(self.lanes[lane]):
                if self.readers[lane] is None:
                    self.readers[lane] = self.open_piece(lane, None)
                text = next(self.readers[lane][1], StopIteration)
                if text is not StopIteration:
                    return text
                self.at[lane], self.readers[lane] = self.at[lane] + 1, None
        return StopIteration

    def read_block(self):
        """The next block_docs documents from where the last block ended, shuffled; [] at the end of the source."""
        self.start, docs = self.next_start, []
        while len(docs) < self.block_docs and (text := self.next_text()) is not StopIteration:
            if text:  # an empty document would only add a stray end-of-text
                docs.append(text)
        self.next_start = {"block": self.start["block"] + 1, **self.where()}
        if self.shuffle:
            random.Random(f"{self.seed}/block {self.start['block']}").shuffle(docs)
        return docs

    def __iter__(self):
        return self

    def __next__(self):
        if self.index == len(self.block):
            self.block, self.index = self.read_block(), 0
            if not self.block:
                raise StopIteration
        doc, self.index = self.block[self.index], self.index + 1
        is_val = self.split_rng.random() < self.val_fraction
        if self.tok is None:
            return doc, is_val
        if not self.encoded:
            self.encoded = self.tok.encode_batch(self.block[self.index - 1 : self.index - 1 + self.batch_docs])[::-1]
        ids = self.encoded.pop()
        ids.append(self.tok.eot_id)
        return ids, is_val

    def state_dict(self):
        return {"start": self.start, "index": self.index, "split_rng": self.split_rng.getstate()}

    def load_state_dict(self, state):
        version, internal, gauss = state["split_rng"]
        self.split_rng.setstate((version, tuple(internal), gauss))
        if self.lanes:  # read the block the state is in again
            self.next_start = state["start"]
            self.go_to(state["start"])
            self.block = self.read_block()
        self.index, self.encoded = state["index"], []


def mix(streams, weights, budget, measure, state=None):
    """
    Interleave iterators by weight: next comes from the source furthest behind its share, so the mix is even
    all along (a cut anywhere holds the right proportions). With a budget, source i stops once measure() of its
    items reaches weights[i]/sum(weights) * budget; a source that runs out early just ends. Yields (i, item).
    state ({"used": measure so far per source, "live": sources not done}) is kept up to date with every item
    given out, so that a copy of it saved along with the streams' positions continues the same mix.
    """
    total = sum(weights)
    caps = [None if budget is None else budget * w / total for w in weights]
    state = state or {"used": [0] * len(streams), "live": list(range(len(streams)))}
    used, live = state["used"], state["live"]
    while live:
        i = min(live, key=lambda j: used[j] / weights[j])
        item = next(streams[i], None)
        if item is None:
            live.remove(i)
            continue
        used[i] += measure(item)
        if caps[i] is not None and used[i] >= caps[i]:
            live.remove(i)
        yield i, item


class ShardWriter:
    """
    Buffers one split's tokens and writes a shard of exactly shard_size tokens whenever the buffer fills. The
    buffer is the start of the next shard: state_dict() appends what it has not saved yet to that shard's .part
    file (a val buffer can hold most of a shard: it is written once, not at every save) and load_state_dict()
    reads it back, cut to the length the state names (a killed run may have appended more after its last save).
    """

    def __init__(self, out_dir, split, dtype, shard_size):
        self.out_dir, self.split, self.dtype, self.shard_size = out_dir, split, np.dtype(dtype), shard_size
        self.files, self.file_tokens, self.tokens = [], [], 0
        self.buf, self.n_buf, self.n_saved = [], 0, 0  # n_saved: tokens of the buffer already in the .part file

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
        write_shard(os.path.join(self.out_dir, name), buf[:n])
        self.files.append(name)
        self.file_tokens.append(int(n))
        self.buf, self.n_buf, self.n_saved = [buf[n:]], len(buf) - n, 0

    def part_path(self):
        return os.path.join(self.out_dir, f"{self.split}_{len(self.files):06d}.part")

    def state_dict(self):
        if self.n_buf > self.n_saved:
            self.buf = [np.concatenate(self.buf)]
            with open(self.part_path(), "ab" if self.n_saved else "wb") as f:  # wb: a killed run's stale part
                f.write(self.buf[0][self.n_saved :].tobytes())
            self.n_saved = self.n_buf
        return {"files": self.files, "file_tokens": self.file_tokens, "tokens": self.tokens, "buffered": self.n_buf}

    def load_state_dict(self, state):
        self.files, self.file_tokens, self.tokens = list(state["files"]), list(state["file_tokens"]), state["tokens"]
        self.n_buf = self.n_saved = state["buffered"]
        buffered = np.fromfile(self.part_path(), self.dtype, self.n_buf) if self.n_buf else np.zeros(0, self.dtype)
        if len(buffered) != self.n_buf:
            raise ValueError(f"{self.part_path()} holds {len(buffered)} of the {self.n_buf} tokens progress.json names")
        if self.n_buf:
            os.truncate(self.part_path(), self.n_buf * self.dtype.itemsize)
        self.buf = [buffered]


# -----------------------------------------------------------------------------------------------
# The steps of main(), in order


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\nA run never")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"SPEC: {' | '.join(BUILTIN_CORPORA)} | PATH/DIR/GLOB of .txt .jsonl .json .parquet | "
        "hf:org/name[:config][#REVISION], each optionally @WEIGHT",
    )
    p.add_argument("--sources", nargs="+", metavar="SPEC", help="what to read (default: pydocs)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named blend instead of --sources (reference: 4 hub corpora, needs --max_tokens)",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        metavar="N",
        help="token budget over train+val, shared by weight (equally without weights; default: read everything)",
    )
    p.add_argument("--out_dir", help="default: data/<preset or source name>, data/mix for several sources")
    p.add_argument(
        "--tokenizer",
        metavar="NAME",
        help=f"bpe, {', '.join(TIKTOKEN)}, or hf:DIR (a Hugging Face model's own "
        "tokenizer.json, to continue training that model); "
        "default: bpe for built-in corpora or with --vocab_size, gpt2 otherwise",
    )
    p.add_argument(
        "--vocab_size", type=int, metavar="N", help="train a BPE of this size (--tokenizer bpe; default 4096)"
    )
    p.add_argument(
        "--bpe_train_chars",
        type=int,
        default=200_000_000,
        metavar="N",
        help="at most this many characters of train text (mixed by weight) to train the BPE on (default: %(default)s)",
    )
    p.add_argument(
        "--text_column",
        default="text",
        help="column holding the text in .jsonl/.json/.parquet and hub rows (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", choices=["auto", "uint16", "uint32"], default="auto", help="auto: uint16 when the vocab fits"
    )
    p.add_argument(
        "--shard_size", type=int, default=100_000_000, metavar="N", help="tokens per shard (default: %(default)s)"
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        metavar="F",
        help="share of documents for val (default 0.05 for built-in corpora: "
        "pydocs' ~600k tokens need 5%% for a steady val loss; 0.005 otherwise, already millions of tokens at scale)",
    )
    p.add_argument(
        "--shuffle_block",
        type=int,
        default=10_000,
        metavar="N",
        help="streamed sources: read their pieces in a random order and shuffle every N documents; "
        "0: file order, no shuffling (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1337, help="shuffles and the train/val split (default: %(default)s)")
    p.add_argument(
        "--refresh_revisions",
        action="store_true",
        help="look hub sources named by a branch or tag up again: a rerun otherwise keeps the commits its build "
        "started with (the unfinished build's, or the finished dataset's); a branch that moved is then built anew",
    )
    p.add_argument(
        "--batch_docs", type=int, default=1024, metavar="N", help="documents per encode batch (default: %(default)s)"
    )
    return p.parse_args(argv)


def check_arguments(args):
    """Check everything that can be checked before reading any data, and fill in the defaults that depend on the
    sources (val_fraction, tokenizer, vocab_size, dtype, out_dir). Returns the parsed sources, and the tokenizer
    unless it is a BPE still to train (a named one is loaded now: a download that fails should fail first)."""
    if args.preset and args.sources:
        raise SystemExit("give either --preset or --sources, not both")
    sources = [
        parse_source(s, args.text_column) for s in (PRESETS[args.preset] if args.preset else args.sources or ["pydocs"])
    ]
    if any(s["weight"] is not None for s in sources) and args.max_tokens is None:
        raise SystemExit("source weights need a budget to share: add --max_tokens N")
    for flag in ("max_tokens", "shard_size", "batch_docs", "bpe_train_chars", "vocab_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.shuffle_block < 0:
        raise SystemExit(f"--shuffle_block must be 0 (no shuffling) or more, got {args.shuffle_block}")
    only_builtin = all(s["kind"] in BUILTIN_CORPORA for s in sources)
    if args.val_fraction is None:
        args.val_fraction = 0.05 if only_builtin else 0.005
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    # A vocab size only means something for a tokenizer we train, so asking for one asks for the BPE.
    kind = args.tokenizer = args.tokenizer or ("bpe" if only_builtin or args.vocab_size else "gpt2")
    if kind != "bpe" and args.vocab_size is not None:
        raise SystemExit(
            f"--vocab_size is the size of a BPE to train (--tokenizer bpe); {kind} comes with its own "
            "vocabulary: drop --vocab_size"
        )
    tok = None
    if kind.startswith("hf:"):
        try:
            tok = Tokenizer.from_hf(kind[3:])
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--tokenizer {kind}: {e}") from None
    elif kind not in ("bpe", *TIKTOKEN):
        raise SystemExit(f"unknown --tokenizer {kind!r}: choose bpe, {', '.join(TIKTOKEN)} or hf:DIR")
    if kind == "bpe":
        args.vocab_size = args.vocab_size or 4096
        if args.vocab_size < 258:
            raise SystemExit(
                f"--vocab_size {args.vocab_size} is too small: a byte-level BPE needs 256 byte tokens + <|endoftext|>"
            )
    vocab_size = args.vocab_size if kind == "bpe" else tok.vocab_size if tok else TIKTOKEN[kind][1]
    if args.dtype == "auto":
        args.dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if args.dtype == "uint16" and vocab_size > 2**16:
        raise SystemExit(
            f"vocab_size {vocab_size} ({kind}) does not fit --dtype uint16 (at most 65536 ids): use uint32 or auto"
        )
    if kind in TIKTOKEN:
        tok = load_tiktoken(kind)
    name = args.preset or (sources[0]["name"] if len(sources) == 1 else "mix")
    args.out_dir = os.path.normpath(args.out_dir or os.path.join("data", name))
    for path in (args.out_dir, args.out_dir + ".partial", args.out_dir + ".old"):  # replaced whole: only our files
        if os.path.isfile(path):
            raise SystemExit(f"--out_dir {args.out_dir}: {path} is a file; give another --out_dir")
        if os.path.isdir(path) and (other := sorted(f for f in os.listdir(path) if not OWN_FILES.fullmatch(f))):
            raise SystemExit(
                f"--out_dir {args.out_dir}: {path} holds files that are not a dataset's ({', '.join(other[:3])}"
                f"{', ...' if len(other) > 3 else ''}), which a build would replace: give another --out_dir"
            )
    return sources, tok


def load_tiktoken(kind):
    try:
        return Tokenizer.from_tiktoken(kind)
    except Exception as e:  # tiktoken downloads an encoding the first time and caches it
        raise SystemExit(
            f"cannot load the tiktoken encoding {kind!r} ({TIKTOKEN[kind][0]}): {type(e).__name__} while "
            "downloading it; offline, set TIKTOKEN_CACHE_DIR to a directory that holds its cached file, "
            "or use --tokenizer bpe (a BPE trained on your data)"
        ) from None


def recipe_of(args, sources, tok):
    """Everything that decides the bytes of the dataset, hashed: two runs with the same recipe build the same
    dataset. Not the out_dir, not --batch_docs (encoding in other batches gives the same ids)."""
    identity = {
        "version": BUILD_VERSION,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "max_tokens": args.max_tokens,
        "shuffle_block": args.shuffle_block,
        "sources": [{k: s[k] for k in ("spec", "weight", "revision", "text_column")} for s in sources],
        "tokenizer": (
            {"kind": "bpe", "vocab_size": args.vocab_size, "bpe_train_chars": args.bpe_train_chars}
            if args.tokenizer == "bpe"
            else tok.spec()
        ),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def finished_dataset(directory, recipe):
    """directory's meta.json if it holds the dataset of this recipe, complete (every shard it lists, at its size)."""
    try:
        meta = load_meta(directory)
        if meta.get("recipe") != recipe:
            return None
        for split, names in meta["shards"].items():
            for name, n in zip(names, meta["shard_tokens"][split], strict=True):
                if len(read_shard(os.path.join(directory, name))) != n:
                    return None
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: not this dataset
        return None
    return meta


def open_build(build, recipe, command):
    """The progress of the unfinished build of this recipe in build, or None after making build an empty directory
    (saying why when it held another command's build)."""
    try:
        with open(os.path.join(build, "progress.json")) as f:
            progress = json.load(f)
        if progress["recipe"] == recipe:
            done = progress.get("writers", {}).get("train", {}).get("files", [])
            log(f"continuing the unfinished build in {build}: {len(done)} train shards done")
            return progress
        log(f"{build} holds an unfinished build of another command ({progress['command']}); starting over")
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        log(f"{build}/progress.json is unreadable; starting over")
    remove(build)
    os.makedirs(build)
    return None


def save_progress(build, progress, writers=None, streams=(), mixing=None, counts=None):
    """Record where the build is: the writers' buffers first (their .part files), then progress.json in one rename,
    then drop the .part files of shards that are now written. Without writers: the tokenizer, before any shard."""
    if writers:
        progress |= {
            "writers": {split: w.state_dict() for split, w in writers.items()},
            "streams": [s.state_dict() for s in streams],
            "mix": mixing,
            "counts": counts,
        }
    with atomic_write(os.path.join(build, "progress.json")) as tmp, open(tmp, "w") as f:
        json.dump(progress, f)
    current = {os.path.basename(w.part_path()) for w in (writers or {}).values()}
    for name in os.listdir(build):
        if name.endswith(".part") and name not in current:
            remove(os.path.join(build, name))


def build_tokenizer(args, sources, weights):
    """A BPE trained on the train side of the mix (the same documents, in the same order, the shards will get)."""
    streams = [(doc for doc, is_val in SourceStream(s, i, args) if not is_val) for i, s in enumerate(sources)]
    texts = [doc for _, doc in mix(streams, weights, args.bpe_train_chars, len)]
    if not texts:
        raise SystemExit(f"empty corpus: {' '.join(s['spec'] for s in sources)} gave no train text")
    log(f"training a {args.vocab_size}-token BPE on {sum(map(len, texts)):,} chars of {len(texts):,} train documents")
    tok = Tokenizer.train_bpe(texts, args.vocab_size)
    if tok.vocab_size < args.vocab_size:
        log(
            f"warning: the text only supports {tok.vocab_size - 257} merges: "
            f"vocab is {tok.vocab_size}, not {args.vocab_size}"
        )
    return tok


def write_shards(args, sources, weights, tok, build, progress):
    """Stream, shuffle, mix and encode every source, send each document to train or val, write the shards, and
    save the progress at every train shard; continue from progress if it has any. Returns the writers of both
    splits, the streams and per-source counts of documents and tokens."""
    streams = [SourceStream(s, i, args, tok) for i, s in enumerate(sources)]
    writers = {split: ShardWriter(build, split, args.dtype, args.shard_size) for split in ("train", "val")}
    counts = [{"docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}} for _ in sources]
    mixing = None
    if "streams" in progress:
        for stream, state in zip(streams, progress["streams"]):
            stream.load_state_dict(state)
        for split, writer in writers.items():
            writer.load_state_dict(progress["writers"][split])
        counts, mixing = progress["counts"], progress["mix"]
    mixing = mixing or {"used": [0] * len(streams), "live": list(range(len(streams)))}
    written = {name for writer in writers.values() for name in writer.files}
    for name in os.listdir(build):  # shards a killed run wrote after its last save: they will be written again
        if name.endswith(".bin") and name not in written:
            remove(os.path.join(build, name))
    log(f"encoding {', '.join(s['spec'] for s in sources)} with {args.tokenizer} (vocab {tok.vocab_size}) into {build}")
    done = sum(w.tokens for w in writers.values())
    with tqdm(total=args.max_tokens, initial=done, unit="tok", unit_scale=True, file=sys.stderr, desc="tokens") as bar:
        for i, (ids, is_val) in mix(streams, weights, args.max_tokens, lambda item: len(item[0]), mixing):
            split = "val" if is_val else "train"
            train_shards = len(writers["train"].files)
            writers[split].add(ids)
            counts[i]["docs"][split] += 1
            counts[i]["tokens"][split] += len(ids)
            bar.update(len(ids))
            if len(writers["train"].files) > train_shards:
                save_progress(build, progress, writers, streams, mixing, counts)
    for split, writer in writers.items():
        if not writer.tokens:
            n_docs = sum(c["docs"]["train"] + c["docs"]["val"] for c in counts)
            raise SystemExit(
                f"empty corpus: no documents for {split} ({n_docs} documents in all, --val_fraction "
                f"{args.val_fraction}); give more data" + (" or a larger --val_fraction" if split == "val" else "")
            )
        writer.flush()
    return writers, streams, counts


def swap_in(build, out_dir):
    """Move the finished dataset into out_dir by two renames, the one there (if any) moved aside first and removed
    last, and say what became of it: out_dir holds the old dataset or the new one, but for the instant between the
    renames. A process that has the old shards open or memory-mapped keeps reading them: on POSIX a file outlives
    its name until it is closed."""
    for name in os.listdir(build):  # what only a build in progress needs, and temporaries a killed run left
        if name == "progress.json" or name.endswith((".part", ".tmp")):
            remove(os.path.join(build, name))
    old = out_dir + ".old"
    old_meta = None
    if os.path.exists(out_dir):
        try:
            old_meta = load_meta(out_dir)
        except (OSError, ValueError):
            pass
        remove(old)  # left by a swap killed between its renames (check_arguments made sure it holds only our files)
        os.replace(out_dir, old)
    os.replace(build, out_dir)
    if os.path.exists(old):
        remove(old)
        what = "the incomplete files it held"
        if old_meta:
            what = f"the dataset it held (fingerprint {old_meta.get('fingerprint')}, from: {old_meta.get('command')})"
        log(f"{out_dir}: replaced {what}; those files are removed (a process that has them open keeps reading them)")


def summary(out_dir, meta, seconds=None, tokens=None):
    """The one line a run prints on stdout."""
    n_shards = sum(map(len, meta["shards"].values()))
    line = (
        f"{out_dir}: {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens in {n_shards} shards "
        f"({meta['dtype']}, vocab {meta['vocab_size']})"
    )
    if seconds is None:
        return line + ": already prepared by this command, nothing to do"
    return line + f" in {seconds:.1f}s ({tokens / seconds:,.0f} tok/s)"


def build_dataset(args, sources, tok, recipe, command, build):
    """Build the dataset in build, or continue the unfinished build there; on any error or Ctrl-C the work done so
    far stays there for the next run of the same command. Returns its meta and the tokens it had already."""
    weights = [s["weight"] or 1.0 for s in sources]
    progress = open_build(build, recipe, command)
    try:
        if progress:
            tok = Tokenizer(progress["tokenizer"])
        else:
            tok = tok or build_tokenizer(args, sources, weights)
            revisions = {s["spec"]: s["revision"] for s in sources if s["kind"] == "hf"}  # pin_hub_sources reads them
            progress = {"recipe": recipe, "command": command, "tokenizer": tok.spec(), "revisions": revisions}
            save_progress(build, progress)
        stopping.on_stop(
            f"stopped by {{signal}}: {build} keeps the work done so far; run the same command to continue it"
        )
        done = sum(w["tokens"] for w in progress.get("writers", {}).values())
        writers, streams, counts = write_shards(args, sources, weights, tok, build, progress)
    except BaseException:
        if os.path.exists(os.path.join(build, "progress.json")):
            if not stopping.stopped:  # a signal's own line said so
                log(f"stopped: {build} keeps the work done so far; the same command continues it, another starts over")
        else:
            remove(build)
        raise
    meta = write_meta(
        build,
        tok,
        dtype=args.dtype,
        sources=[
            {
                "spec": s["spec"],
                "weight": w / sum(weights),
                "revision": s["revision"],
                **c,
                **({"pieces": sum(map(len, stream.lanes))} if stream.lanes else {}),
                **({"provenance": s["provenance"]} if "provenance" in s else {}),
            }
            for s, w, c, stream in zip(sources, weights, counts, streams)
        ],
        tokens={split: w.tokens for split, w in writers.items()},
        shards={split: w.files for split, w in writers.items()},
        shard_tokens={split: w.file_tokens for split, w in writers.items()},
        shard_size=args.shard_size,
        max_tokens=args.max_tokens,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shuffle={"block_docs": args.shuffle_block},
        recipe=recipe,
        command=command,
    )
    return meta, done


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.time()
    sources, tok = check_arguments(args)
    try:  # one build per out_dir: a second one stops here, before it reads or writes anything
        lock = RunLock(args.out_dir, path=args.out_dir + ".lock", user="another prepare_data.py")
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    pin_sources(sources, args.seed)
    recipe = pin_hub_sources(args, sources, tok)
    if meta := finished_dataset(args.out_dir, recipe):
        lock.release()
        print(summary(args.out_dir, meta))
        return meta
    build = args.out_dir + ".partial"
    if os.path.exists(args.out_dir):
        log(
            f"{args.out_dir} holds another dataset (or an incomplete one): it stays until the new one, built in "
            f"{build}, is complete"
        )
    if meta := finished_dataset(build, recipe):  # finished, but stopped before its swap
        done = sum(meta["tokens"].values())
    else:
        meta, done = build_dataset(args, sources, tok, recipe, shlex.join(["python", "prepare_data.py", *argv]), build)
    with stopping.deferred():  # out_dir is without a dataset between swap_in's two renames: a signal waits for them
        swap_in(build, args.out_dir)
    lock.release()
    dt = time.time() - t0
    print(summary(args.out_dir, meta, dt, sum(meta["tokens"].values()) - done))
    return meta


if __name__ == "__main__":
    main()
