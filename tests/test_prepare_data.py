"""prepare_data.py: documents survive the trip to shards and back, sources mix by weight, bad input fails cleanly."""

import collections
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import prepare_data
from data import ShardLoader, load_tokenizer, read_shard
from tokenizer import Tokenizer

DOCS = [
    "Hello, world.",
    "naïve café, Zürich, Ελληνικά, 日本語のテキスト, русский",
    "emoji 🎉🐍👩‍💻 and flags 🇫🇷",
    "whitespace   runs\t\ttabs\n\n\nblank lines   \n  trailing   ",
    "  leading spaces and a lone \r carriage return",
    "a literal <|endoftext|> inside the text stays text",
    "x",
] + [f"document number {i}: {'lorem ipsum ' * (i % 7)}the end" for i in range(40)]


def write_jsonl(path, texts, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({column: t}) + "\n")
    return str(path)


def prepare(out_dir, *args):
    return prepare_data.main([*map(str, args), "--out_dir", str(out_dir)])


def split_docs(out_dir, split):
    """The documents of a split, decoded: the shards concatenated, cut after each end-of-text."""
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    tok = load_tokenizer(out_dir)
    ids = np.concatenate([read_shard(os.path.join(out_dir, f)) for f in meta["shards"][split]]).tolist()
    assert ids[-1] == tok.eot_id  # every document, the last one included, ends with end-of-text
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == tok.eot_id:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    return docs


def leftovers(out_dir):
    if not os.path.exists(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if f == "meta.json" or f.endswith((".bin", ".tmp", ".tiktoken")))


@pytest.mark.parametrize("dtype,itemsize", [("auto", 2), ("uint32", 4)])
def test_round_trip(tmp_path, dtype, itemsize):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    meta = prepare(
        out,
        "--sources",
        src,
        "--tokenizer",
        "bpe",
        "--vocab_size",
        300,
        "--dtype",
        dtype,
        "--val_fraction",
        0.3,
        "--shuffle_block",
        0,
    )
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert train and val
    assert collections.Counter(train + val) == collections.Counter(DOCS)
    # unshuffled (--shuffle_block 0), each split keeps the source order
    assert train == [d for d in DOCS if d in train] and val == [d for d in DOCS if d in val]
    # meta and the shard headers agree with what is on disk
    tok = load_tokenizer(out)
    assert meta == json.load(open(out / "meta.json"))
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["eot_id"] == tok.eot_id == 299
    assert meta["dtype"] == ("uint16" if dtype == "auto" else "uint32")
    assert meta["tokenizer"]["kind"] == "bpe" and os.path.exists(out / "tokenizer.tiktoken")
    for split in ("train", "val"):
        path = out / meta["shards"][split][0]
        header = open(path, "rb").read(24)
        assert header[:8] == b"MTLMTOKS"
        version, size, n = struct.unpack("<IIQ", header[8:24])
        assert (version, size, n) == (1, itemsize, meta["tokens"][split])
        assert read_shard(path).dtype.itemsize == itemsize
    (source,) = meta["sources"]
    assert source["spec"] == src and source["tokens"] == meta["tokens"]
    assert source["docs"] == {"train": len(train), "val": len(val)}
    assert "--dtype" in meta["command"] and meta["command"].startswith("python prepare_data.py")


def test_deterministic(tmp_path):
    """Same input and seed, same bytes: the split and the BPE depend on nothing else."""
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    metas = [
        prepare(tmp_path / d, "--sources", src, "--tokenizer", "bpe", "--vocab_size", 300, "--val_fraction", 0.3)
        for d in ("one", "two")
    ]
    assert metas[0]["shards"] == metas[1]["shards"]
    for f in ["tokenizer.tiktoken", *metas[0]["shards"]["train"], *metas[0]["shards"]["val"]]:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
    other = prepare(
        tmp_path / "three",
        "--sources",
        src,
        "--tokenizer",
        "bpe",
        "--vocab_size",
        300,
        "--val_fraction",
        0.3,
        "--seed",
        7,
    )
    assert other["sources"][0]["docs"] != metas[0]["sources"][0]["docs"]  # the seed does pick the split


def test_txt_and_parquet_sources(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    txt = ["first file\n\nwith a blank line and trailing spaces   \n", "second file: ünïcödé 🐍"]
    for i, t in enumerate(txt):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    rows = [f"parquet row {i} ✓" for i in range(30)]
    pq.write_table(pa.table({"content": rows, "id": list(range(30))}), tmp_path / "rows.parquet")
    out = tmp_path / "out"
    # a .txt file is one document whatever --text_column says; the parquet's text is in "content"
    meta = prepare(
        out,
        "--sources",
        tmp_path / "*.txt",
        tmp_path / "rows.parquet",
        "--text_column",
        "content",
        "--tokenizer",
        "bpe",
        "--vocab_size",
        270,
        "--val_fraction",
        0.2,
    )
    got = split_docs(out, "train") + split_docs(out, "val")
    assert collections.Counter(got) == collections.Counter(txt + rows)
    assert [s["docs"]["train"] + s["docs"]["val"] for s in meta["sources"]] == [2, 30]


def test_weights_share_a_token_budget(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha document {i} " + "aa bb " * 20 for i in range(1000)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"beta document {i} " + "cc dd " * 20 for i in range(1000)])
    budget = 20_000
    meta = prepare(
        tmp_path / "out",
        "--sources",
        f"{a}@0.75",
        f"{b}@0.25",
        "--max_tokens",
        budget,
        "--tokenizer",
        "bpe",
        "--vocab_size",
        300,
        "--bpe_train_chars",
        20_000,
    )
    per_source = [sum(s["tokens"].values()) for s in meta["sources"]]
    assert [s["weight"] for s in meta["sources"]] == [0.75, 0.25]
    assert 2.7 < per_source[0] / per_source[1] < 3.3
    total = sum(meta["tokens"].values())
    assert total == sum(per_source)
    assert budget <= total < budget * 1.05  # each source stops within one document past its share
    assert 0 < meta["tokens"]["val"] < total


def test_exhausted_source_just_ends_and_no_budget_reads_all(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [f"small {i}" for i in range(5)])
    big = write_jsonl(tmp_path / "big.jsonl", [f"big document {i} with some words" for i in range(300)])
    meta = prepare(
        tmp_path / "w",
        "--sources",
        f"{small}@0.9",
        f"{big}@0.1",
        "--max_tokens",
        5000,
        "--tokenizer",
        "bpe",
        "--vocab_size",
        280,
        "--val_fraction",
        0.2,
    )
    docs = [sum(s["docs"].values()) for s in meta["sources"]]
    assert docs[0] == 5 and 0 < sum(meta["sources"][1]["tokens"].values()) <= 600
    meta = prepare(
        tmp_path / "all", "--sources", small, big, "--tokenizer", "bpe", "--vocab_size", 280, "--val_fraction", 0.2
    )
    assert [sum(s["docs"].values()) for s in meta["sources"]] == [5, 300]


def test_many_shards(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 5)
    out = tmp_path / "out"
    meta = prepare(
        out, "--sources", src, "--tokenizer", "bpe", "--vocab_size", 300, "--shard_size", 500, "--val_fraction", 0.2
    )
    for split in ("train", "val"):
        files = meta["shards"][split]
        assert files == [f"{split}_{i:06d}.bin" for i in range(len(files))]
        sizes = [len(read_shard(out / f)) for f in files]
        assert sum(sizes) == meta["tokens"][split]
        assert all(s == 500 for s in sizes[:-1]) and 0 < sizes[-1] <= 500  # a shard each time the buffer fills
    assert len(meta["shards"]["train"]) > 3
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == sorted(
        meta["shards"]["train"] + meta["shards"]["val"]
    )
    assert collections.Counter(split_docs(out, "train") + split_docs(out, "val")) == collections.Counter(DOCS * 5)
    x, y = ShardLoader(str(out), "train", 2, 16).next_batch()  # the loader reads what we wrote
    assert x.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_stale_dataset_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("meta.json", "train_000007.bin", "val_000003.bin", "train_000001.bin.tmp"):
        (out / name).write_text("stale")
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    meta = prepare(out, "--sources", src, "--tokenizer", "bpe", "--vocab_size", 300, "--val_fraction", 0.3)
    assert leftovers(out) == sorted(
        ["meta.json", "tokenizer.tiktoken", *meta["shards"]["train"], *meta["shards"]["val"]]
    )


def test_pydocs_documents():
    docs = prepare_data.read_pydocs(prepare_data.parse_source("pydocs"))
    assert sum(map(len, docs)) > 1_500_000 and len(docs) > 5000
    assert all(isinstance(d, str) and d for d in docs)
    assert "antigravity" not in sys.modules  # read, never imported
    assert docs == prepare_data.read_pydocs(prepare_data.parse_source("pydocs"))  # deterministic


def test_pydocs_default_source(tmp_path):
    meta = prepare(tmp_path / "out", "--vocab_size", 512)
    assert [s["spec"] for s in meta["sources"]] == ["pydocs"]
    assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert meta["tokens"]["train"] > 400_000 and meta["tokens"]["val"] > 4097  # enough for configs/tiny.py's eval
    assert meta["val_fraction"] == 0.05


def test_tiktoken_table_sizes_are_the_encodings_own():
    """tokenizer.TIKTOKEN knows each encoding's vocab size up front (a dtype that is too small fails before a
    download): check it against every encoding that loads here."""
    import tiktoken

    import tokenizer

    checked = []
    for name, (encoding, size) in tokenizer.TIKTOKEN.items():
        try:
            enc = tiktoken.get_encoding(encoding)
        except Exception:  # not in the offline cache
            continue
        assert enc.n_vocab == size, name
        checked.append(name)
    if not checked:
        pytest.skip("no tiktoken encoding loadable offline (set TIKTOKEN_CACHE_DIR)")


def gpt2_available():
    try:
        Tokenizer.from_tiktoken("gpt2")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not gpt2_available(), reason="gpt2 encoding not loadable offline (set TIKTOKEN_CACHE_DIR)")
def test_gpt2_is_the_default_for_files(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    meta = prepare(out, "--sources", src, "--val_fraction", 0.3)
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"} and meta["eot_id"] == 50256
    assert not os.path.exists(out / "tokenizer.tiktoken")
    assert collections.Counter(split_docs(out, "train") + split_docs(out, "val")) == collections.Counter(DOCS)


# --- bad input: a clear SystemExit naming the problem, and nothing left that looks like a dataset


def bad_cases(tmp):
    good = write_jsonl(tmp / "good.jsonl", DOCS)
    empty = write_jsonl(tmp / "empty.jsonl", ["", ""])
    (tmp / "broken.parquet").write_bytes(b"this is not parquet" * 10)
    (tmp / "notes.csv").write_text("a,b\n1,2\n")
    mixed = tmp / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", DOCS * 3)
    write_jsonl(mixed / "z.jsonl", ["no text here"], column="body")  # read after a.jsonl: shards exist by then
    bpe = ["--tokenizer", "bpe", "--vocab_size", "300"]
    return {
        "empty corpus": ([empty, *bpe], "empty corpus"),
        "missing file": ([str(tmp / "nope.jsonl"), *bpe], "no such file"),
        "glob without match": ([str(tmp / "*.parquet.gz"), *bpe], "no .txt/.jsonl/.json/.parquet files match"),
        "unreadable file": ([str(tmp / "broken.parquet"), *bpe], "broken.parquet: cannot read"),
        "missing column mid-run": (
            [
                str(mixed),
                *bpe,
                "--bpe_train_chars",
                "300",
                "--shard_size",
                "50",
                "--batch_docs",
                "10",
                "--shuffle_block",
                "0",
            ],
            "z.jsonl: no column 'text'; its columns are ['body']",
        ),
        "unknown source": (["fineweb", *bpe], "unknown source 'fineweb'"),
        "unknown extension": ([good, str(tmp / "notes.csv"), *bpe], "notes.csv': local files must be .txt"),
        "vocab too large for dtype": (
            [good, "--tokenizer", "cl100k_base", "--dtype", "uint16"],
            "does not fit --dtype uint16",
        ),
        "bpe vocab too large for dtype": (
            [good, "--tokenizer", "bpe", "--vocab_size", "70000", "--dtype", "uint16"],
            "does not fit",
        ),
        "weights without budget": ([f"{good}@0.5", f"{good}@0.5", *bpe], "--max_tokens"),
        "zero weight": ([f"{good}@0", f"{good}@1", "--max_tokens", "100", *bpe], "weight must be a positive number"),
        "empty val split": ([write_jsonl(tmp / "one.jsonl", ["only one document"]), *bpe], "no documents for val"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty corpus",
        "missing file",
        "glob without match",
        "unreadable file",
        "missing column mid-run",
        "unknown source",
        "unknown extension",
        "vocab too large for dtype",
        "bpe vocab too large for dtype",
        "weights without budget",
        "zero weight",
        "empty val split",
    ],
)
def test_bad_input_fails_cleanly(tmp_path, case):
    args, message = bad_cases(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prepare(out, "--sources", *args)
    assert message in str(e.value.code)
    assert leftovers(out) == []
    if case in (
        "missing column mid-run",
        "empty val split",
    ):  # failed after the tokenizer: the work waits in out.partial
        partial = os.listdir(tmp_path / "out.partial")
        assert "progress.json" in partial and "meta.json" not in partial
        assert case != "missing column mid-run" or "train_000001.bin" in partial  # shards were written before the error
    else:  # failed before anything a rerun could continue
        assert not os.path.exists(tmp_path / "out.partial")


def test_cli_exit_code_and_streams(tmp_path):
    """As a command: non-zero exit and the message on stderr; on success one summary line on stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda *a: subprocess.run(
        [sys.executable, os.path.join(root, "prepare_data.py"), *a],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    r = run("--sources", "hf:nobody/nothing", "--tokenizer", "bpe")  # the hub path, offline
    assert r.returncode != 0 and "hf:nobody/nothing: cannot read it" in r.stderr and r.stdout == ""
    assert not os.path.exists(tmp_path / "data/nothing/meta.json")
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    r = run("--sources", src, "--tokenizer", "bpe", "--vocab_size", "300", "--val_fraction", "0.3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "train" in r.stdout and "tok/s" in r.stderr
    assert os.path.exists(tmp_path / "data/docs/meta.json")  # default out_dir: data/<source name>


# --- pystdlib: the standard library's source files


def fake_stdlib(root):
    """A small standard library: sorted walk, a coding cookie, bytes that contradict it, CRLF, an empty file,
    and a site-packages directory that must be left out."""
    files = {
        "os.py": b'"""OS routines."""\nimport sys\n',
        "json/__init__.py": b"",  # empty: no document
        "json/decoder.py": b"def decode(s):\r\n    return s  # CRLF line ends\r\n",
        "test/test_latin1.py": "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n".encode("latin-1"),
        "test/bad_coding.py": b"# -*- coding: utf-8 -*-\nx = '\xff\xfe'\n",  # invalid UTF-8 despite the cookie
        "site-packages/numpy/core.py": b"not part of the standard library\n",
        "README.txt": b"not a source file\n",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_pystdlib_documents_and_provenance(tmp_path, monkeypatch):
    import sysconfig

    files = fake_stdlib(tmp_path / "lib")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path / "lib"))
    source = prepare_data.parse_source("pystdlib")
    docs = prepare_data.read_pystdlib(source)
    provenance = source["provenance"]
    assert docs == [  # a directory's files (sorted), then its subdirectories (sorted); decoded by the fixed rules
        '"""OS routines."""\nimport sys\n',
        "def decode(s):\n    return s  # CRLF line ends\n",
        "# -*- coding: utf-8 -*-\nx = '\ufffd\ufffd'\n",
        "# -*- coding: latin-1 -*-\nname = 'café'\n",
    ]
    in_stdlib = [data for name, data in files.items() if name.endswith(".py") and not name.startswith("site-packages")]
    assert provenance["files"] == 5 and provenance["documents"] == 4
    assert provenance["bytes"] == sum(map(len, in_stdlib))
    assert provenance["python"] == sys.version.split()[0] and provenance["tests_included"]
    assert provenance["license"].startswith("PSF-2.0")


def test_pystdlib_dataset_is_deterministic(tmp_path, monkeypatch):
    import sysconfig

    fake_stdlib(tmp_path / "lib")
    for i in range(40):  # enough documents for both splits
        (tmp_path / "lib" / f"mod{i:02d}.py").write_text(
            f"def f{i}(x):\n    return x * {i}  # module {i}\n" * (i % 5 + 1)
        )
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path / "lib"))
    metas = [
        prepare(tmp_path / f"out{k}", "--sources", "pystdlib", "--vocab_size", 300, "--val_fraction", 0.2)
        for k in range(2)
    ]
    assert metas[0]["tokenizer"]["kind"] == "bpe"  # a built-in source gets our own BPE, as pydocs does
    provenance = metas[0]["sources"][0]["provenance"]
    assert provenance["files"] == 45 and provenance["license"].startswith("PSF-2.0")
    assert metas[0]["command"] != metas[1]["command"]  # only the out_dir differs
    for name in metas[0]["shards"]["train"] + metas[0]["shards"]["val"] + ["tokenizer.tiktoken"]:
        assert (tmp_path / "out0" / name).read_bytes() == (tmp_path / "out1" / name).read_bytes()
    drop = lambda m: {k: v for k, v in m.items() if k != "command"}
    assert drop(metas[0]) == drop(metas[1])


def test_pystdlib_refuses_an_unreadable_stdlib(tmp_path, monkeypatch):
    import sysconfig

    (tmp_path / "lib").mkdir()  # a stripped install: no source files
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path / "lib"))
    with pytest.raises(SystemExit) as e:
        prepare(tmp_path / "out", "--sources", "pystdlib", "--vocab_size", 300)
    assert "pystdlib: cannot read the standard library" in str(e.value.code)
    assert leftovers(tmp_path / "out") == []
