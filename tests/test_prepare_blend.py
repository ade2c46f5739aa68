"""
prepare_data.py at scale, proven small: a rebuild never destroys the dataset there, a killed build continues to the
same bytes, streamed sources are shuffled so that a prefix is a sample of the whole, and every source is pinned.

Everything streams local parquet/jsonl/txt through load_dataset(..., streaming=True), the path the hub takes too.
Run as a script, this file measures the mix of a prefix on a larger corpus (the figure in docs/data.md):
    PYTHONPATH=. python tests/test_prepare_blend.py
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

import prepare_data
from data import ShardLoader, compute_fingerprint, load_tokenizer, read_shard

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def write_sorted_corpus(directory, n_docs, n_labels, n_files, row_group):
    """n_docs documents "label L doc I ..." in parquet files, sorted by label (as Wikipedia comes in page-id order):
    file f holds the f-th run of documents, in row groups of row_group rows."""
    os.makedirs(directory, exist_ok=True)
    per_file = n_docs // n_files
    for f in range(n_files):
        rows = [
            f"label {i * n_labels // n_docs} doc {i} " + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(i % 23))
            for i in range(f * per_file, (f + 1) * per_file)
        ]
        pq.write_table(
            pa.table({"text": rows, "id": list(range(len(rows)))}),
            os.path.join(directory, f"part{f:03d}.parquet"),
            row_group_size=row_group,
        )
    return str(directory)


def write_mixed_sources(root):
    """Three kinds of local source: parquet files in row groups, a .jsonl file (with empty rows), .txt files."""
    corpus = write_sorted_corpus(root / "pq", 1200, 6, 3, 50)
    with open(root / "notes.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"note {i}: " + " ".join(WORDS[: i % 11]) if i % 17 else ""}) + "\n")
    (root / "txt").mkdir()
    for i in range(5):
        (root / "txt" / f"{i}.txt").write_text(f"plain text file {i}\n\n" + "kappa lambda " * i)
    return [f"{corpus}@0.5", f"{root / 'notes.jsonl'}@0.3", f"{root / 'txt'}@0.2"]


# a small blend with every moving part: weights and a budget, blocks and encode batches that do not line up,
# shards far smaller than the data (a progress save at each train shard), and val shards that fill too
BLEND = [
    "--max_tokens",
    "40000",
    "--tokenizer",
    "bpe",
    "--vocab_size",
    "300",
    "--bpe_train_chars",
    "5000",
    "--shard_size",
    "1000",
    "--shuffle_block",
    "64",
    "--batch_docs",
    "7",
    "--val_fraction",
    "0.1",
]


def prepare(out_dir, *args):
    return prepare_data.main([*map(str, args), "--out_dir", str(out_dir)])


def dataset_files(out_dir):
    """Every file of a dataset directory and its bytes, meta.json without its command (which names the out_dir)."""
    files = {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir))}
    meta = json.loads(files.pop("meta.json"))
    meta.pop("command")
    return files, meta


def labels(out_dir, split):
    """The label of each document of a split, in order (write_sorted_corpus's documents start "label L")."""
    meta = json.load(open(out_dir / "meta.json"))
    tok = load_tokenizer(out_dir)
    ids = np.concatenate([read_shard(out_dir / name) for name in meta["shards"][split]])
    starts = np.concatenate([[0], np.flatnonzero(ids == tok.eot_id)[:-1] + 1])
    return [int(tok.decode(ids[s : s + 4].tolist()).split()[1]) for s in starts]


def total_variation(sample, whole):
    """Total-variation distance between the label distributions of two lists: 0 the same, 1 disjoint."""
    a, b = collections.Counter(sample), collections.Counter(whole)
    return 0.5 * sum(abs(a[k] / len(sample) - b[k] / len(whole)) for k in a.keys() | b.keys())


def prefix_distances(train, percents=(1, 10, 50)):
    return [total_variation(train[: max(1, len(train) * p // 100)], train) for p in percents]


# --- never destroy a dataset, never lose the work


def test_sigkilled_build_continues_to_the_same_bytes(tmp_path, capsys):
    """A real process killed with SIGKILL after its third train shard, then the same command again: the dataset is
    byte for byte the one a run never stopped writes (meta.json too, but for the command that names the out_dir)."""
    sources = write_mixed_sources(tmp_path)
    reference = prepare(tmp_path / "reference", "--sources", *sources, *BLEND)
    out = tmp_path / "out"
    command = [
        sys.executable,
        os.path.join(ROOT, "prepare_data.py"),
        "--sources",
        *sources,
        *BLEND,
        "--out_dir",
        str(out),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    progress, done = tmp_path / "out.partial" / "progress.json", 0
    while proc.poll() is None and done < 3:
        try:
            done = len(json.loads(progress.read_text())["writers"]["train"]["files"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed mid-way"
    assert not out.exists() and 3 <= done < len(reference["shards"]["train"])
    prepare(out, "--sources", *sources, *BLEND)  # the same command again (in this process: it starts faster)
    assert "continuing the unfinished build" in capsys.readouterr().err
    assert dataset_files(out) == dataset_files(tmp_path / "reference")
    assert not (tmp_path / "out.partial").exists()


def test_stopped_at_any_save_continues_to_the_same_bytes(tmp_path, monkeypatch):
    """Stopped (Ctrl-C) right after each of many progress saves in turn, then run again: always the same dataset."""
    sources = write_mixed_sources(tmp_path)
    saves = len(prepare(tmp_path / "reference", "--sources", *sources, *BLEND)["shards"]["train"])  # 1 + full shards
    reference = dataset_files(tmp_path / "reference")
    save = prepare_data.save_progress
    for stop_at in (1, 2, 9, saves):  # 1: the tokenizer only, before any shard; saves: after the last full shard
        saves = []

        def save_then_stop(*args, saves=saves, stop_at=stop_at, **kwargs):
            save(*args, **kwargs)
            saves.append(1)
            if len(saves) == stop_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(prepare_data, "save_progress", save_then_stop)
        out = tmp_path / f"out{stop_at}"
        with pytest.raises(KeyboardInterrupt):
            prepare(out, "--sources", *sources, *BLEND)
        monkeypatch.setattr(prepare_data, "save_progress", save)
        prepare(out, "--sources", *sources, *BLEND)
        assert dataset_files(out) == reference, stop_at


def test_existing_dataset_survives_a_failed_rebuild(tmp_path, capsys):
    """A rebuild by another command that fails mid-way leaves the dataset in out_dir as it was, readable all along."""
    sources = write_mixed_sources(tmp_path)
    out = tmp_path / "out"
    prepare(out, "--sources", *sources, *BLEND)
    before = dataset_files(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i} " * 20}) + "\n" for i in range(200)))
    (bad / "z.jsonl").write_text(json.dumps({"body": "no text column"}) + "\n")  # read after a.jsonl
    with pytest.raises(SystemExit, match="z.jsonl: no column 'text'"):
        prepare(
            out, "--sources", bad, "--tokenizer", "bpe", "--vocab_size", 300, "--shard_size", 500, "--shuffle_block", 0
        )
    assert dataset_files(out) == before
    assert "it stays until the new one" in capsys.readouterr().err
    x, y = ShardLoader(str(out), "train", 2, 16).next_batch()  # still a dataset the loader reads
    assert (x[:, 1:] == y[:, :-1]).all()


def test_replaced_dataset_stays_readable_where_open(tmp_path, capsys):
    """The swap removes the old dataset's files, and a process that has one memory-mapped (as the loader has its
    current shard) or open keeps reading the old bytes: on POSIX a file outlives its name until it is closed."""
    sources = write_mixed_sources(tmp_path)
    out = tmp_path / "out"
    old = prepare(out, "--sources", *sources, *BLEND)
    mapped = read_shard(out / "train_000000.bin")
    opened = open(out / "train_000001.bin", "rb")
    expected = (np.array(mapped), (out / "train_000001.bin").read_bytes())
    new = prepare(out, "--sources", *sources, *BLEND, "--seed", 7)  # another dataset at the same path
    assert "replaced the dataset it held (fingerprint " + old["fingerprint"] in capsys.readouterr().err
    assert new["fingerprint"] != old["fingerprint"] and not (tmp_path / "out.old").exists()
    assert not np.array_equal(read_shard(out / "train_000000.bin"), expected[0])  # the path holds the new dataset
    assert np.array_equal(mapped, expected[0]) and opened.read() == expected[1]  # the old bytes, still readable
    opened.close()


def test_same_command_has_nothing_to_do_and_another_starts_over(tmp_path, capsys, monkeypatch):
    sources = write_mixed_sources(tmp_path)
    out = tmp_path / "out"
    first = prepare(out, "--sources", *sources, *BLEND)
    inode = os.stat(out / "train_000000.bin").st_ino
    again = prepare(out, "--sources", *sources, *BLEND, "--batch_docs", 100)  # batching changes no byte: same recipe
    assert again == first and os.stat(out / "train_000000.bin").st_ino == inode
    assert "already prepared by this command, nothing to do" in capsys.readouterr().out
    (out / "train_000003.bin").unlink()  # a damaged dataset is not "already prepared"
    assert prepare(out, "--sources", *sources, *BLEND)["fingerprint"] == first["fingerprint"]
    assert (out / "train_000003.bin").exists()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "write_shards", stop)  # leave an unfinished build of seed 1 behind
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "other", "--sources", *sources, *BLEND, "--seed", 1)
    monkeypatch.undo()
    capsys.readouterr()
    prepare(tmp_path / "other", "--sources", *sources, *BLEND, "--seed", 2)
    assert "holds an unfinished build of another command (python prepare_data.py" in capsys.readouterr().err


def test_out_dir_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("mine")
    with pytest.raises(SystemExit, match="holds files that are not a dataset's \\(todo.md\\)"):
        prepare(tmp_path / "notes", "--vocab_size", 300)
    assert (tmp_path / "notes" / "todo.md").read_text() == "mine"


# --- sources mixed, not in file order


def test_a_prefix_is_a_sample_of_the_whole(tmp_path):
    """
    4,000 documents sorted by label (10 labels) in 4 files of 20-row row groups. In file order the first 10% of
    train documents hold one label (total-variation distance 0.9 from the whole) and the first half 5 of them (0.5).
    Shuffled (200 row groups in a random order, blocks of 200 documents), a prefix holds random row groups: 0.20
    at 10% (the first 19 row groups: about what any 19 of the 200 drawn at random give) and 0.09 at 50%. The val
    split, drawn from the same shuffled stream, is about as close to the whole as 185 documents can be.
    """
    corpus = write_sorted_corpus(tmp_path / "sorted", 4000, 10, 4, 20)
    common = [
        "--sources",
        corpus,
        "--tokenizer",
        "bpe",
        "--vocab_size",
        280,
        "--bpe_train_chars",
        20_000,
        "--val_fraction",
        0.05,
    ]
    prepare(tmp_path / "in_order", *common, "--shuffle_block", 0)
    meta = prepare(tmp_path / "shuffled", *common, "--shuffle_block", 200)
    in_order, shuffled = labels(tmp_path / "in_order", "train"), labels(tmp_path / "shuffled", "train")
    assert sorted(in_order) == in_order
    everything = lambda out: sorted(labels(out, "train") + labels(out, "val"))
    assert everything(tmp_path / "shuffled") == everything(tmp_path / "in_order")  # the same documents, reordered
    assert prefix_distances(in_order)[1:] == pytest.approx([0.9, 0.5], abs=0.02)
    at_10, at_50 = prefix_distances(shuffled)[1:]
    assert at_10 < 0.3 and at_50 < 0.12
    assert total_variation(labels(tmp_path / "shuffled", "val"), shuffled) < 0.15  # 185 documents: 0.12
    assert meta["shuffle"] == {"block_docs": 200} and meta["sources"][0]["pieces"] == 200


# --- reproducible: every source pinned, the recipe and the fingerprint cover it


def test_local_sources_are_pinned_by_content(tmp_path):
    corpus = write_sorted_corpus(tmp_path / "a", 400, 4, 2, 50)
    args = ["--tokenizer", "bpe", "--vocab_size", 280, "--val_fraction", 0.1]
    first = prepare(tmp_path / "one", "--sources", corpus, *args)
    revision = first["sources"][0]["revision"]
    assert revision.startswith("sha256:") and len(revision) == 7 + 16
    os.rename(tmp_path / "a", tmp_path / "b")  # the same files elsewhere: the same revision
    moved = prepare(tmp_path / "two", "--sources", tmp_path / "b", *args)
    assert moved["sources"][0]["revision"] == revision
    table = pq.read_table(tmp_path / "b" / "part001.parquet")
    pq.write_table(table.slice(1), tmp_path / "b" / "part001.parquet")  # one row less: another revision
    edited = prepare(tmp_path / "two", "--sources", tmp_path / "b", *args)
    assert edited["sources"][0]["revision"] != revision and edited["fingerprint"] != moved["fingerprint"]
    spec = load_tokenizer(tmp_path / "two").spec()
    assert compute_fingerprint(edited, spec) == edited["fingerprint"]
    assert compute_fingerprint(edited | {"shuffle": {"block_docs": 1}}, spec) != edited["fingerprint"]


def test_hub_revision_is_resolved_once_and_recorded(tmp_path, monkeypatch):
    """The hub path offline: the branch is resolved to its commit once, load_dataset reads that commit, meta.json
    records it; a 40-hex commit is used as it is, without asking the hub."""
    import datasets
    import huggingface_hub

    local = write_sorted_corpus(tmp_path / "hub", 300, 3, 1, 50) + "/part000.parquet"
    commit = "0123456789abcdef0123456789abcdef01234567"
    asked, loaded = [], []

    def dataset_info(self, repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        return type("DatasetInfo", (), {"sha": commit})()

    def load_dataset(path, name=None, revision=None, **kwargs):
        loaded.append((path, name, revision))
        return load(path="parquet", data_files=local, **kwargs)

    load = datasets.load_dataset
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = ["--tokenizer", "bpe", "--vocab_size", 280, "--val_fraction", 0.1, "--max_tokens", 2000]
    meta = prepare(tmp_path / "out", "--sources", "hf:org/name:config#v1.0@1", *args)
    assert asked == [("org/name", "v1.0")] and set(loaded) == {("org/name", "config", commit)}
    assert meta["sources"][0]["revision"] == commit and meta["sources"][0]["spec"] == "hf:org/name:config#v1.0"
    asked.clear()
    pinned = prepare(tmp_path / "pinned", "--sources", f"hf:org/name:config#{commit}", *args)
    assert asked == [] and pinned["sources"][0]["revision"] == commit


def test_a_rerun_keeps_the_hub_commits_its_build_started_with(tmp_path, monkeypatch, capsys):
    """A source named by a branch: the branch moves (the hub resolves it to another commit the second time), yet a
    stopped build continues at its first commit, and the finished dataset is reused, without asking the hub again;
    --refresh_revisions asks, and builds the new commit."""
    import datasets
    import huggingface_hub

    local = write_sorted_corpus(tmp_path / "hub", 600, 3, 1, 50) + "/part000.parquet"
    commits = iter(["a" * 40, "b" * 40])
    asked, loaded = [], []

    def dataset_info(self, repo_id, revision=None, **kwargs):
        asked.append(revision)
        return type("DatasetInfo", (), {"sha": next(commits)})()

    def load_dataset(path, name=None, revision=None, **kwargs):
        loaded.append(revision)
        return load(path="parquet", data_files=local, **kwargs)

    load = datasets.load_dataset
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = ["--sources", "hf:org/name:config#main", *BLEND[2:], "--max_tokens", 12000]
    save, saves = prepare_data.save_progress, []

    def save_then_stop(*a, **kw):
        save(*a, **kw)
        saves.append(1)
        if len(saves) == 3:  # the tokenizer and two train shards saved
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "save_progress", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "out", *args)
    monkeypatch.setattr(prepare_data, "save_progress", save)
    assert asked == ["main"] and set(loaded) == {"a" * 40}
    capsys.readouterr()
    meta = prepare(tmp_path / "out", *args)  # main has moved to bbbb...: the build goes on at aaaa...
    err = capsys.readouterr().err
    assert asked == ["main"] and set(loaded) == {"a" * 40} and meta["sources"][0]["revision"] == "a" * 40
    assert (
        f"keeping the hub commits the unfinished build in {tmp_path / 'out'}.partial started at: "
        f"hf:org/name:config#main -> aaaaaaaaaaaa (--refresh_revisions looks the branches up again)"
    ) in err
    assert "continuing the unfinished build" in err and "starting over" not in err
    inode = os.stat(tmp_path / "out" / "train_000000.bin").st_ino
    again = prepare(tmp_path / "out", *args)  # finished: reused as it is
    assert again == meta and asked == ["main"] and os.stat(tmp_path / "out" / "train_000000.bin").st_ino == inode
    assert f"keeping the hub commits the dataset in {tmp_path / 'out'} was built from" in capsys.readouterr().err
    fresh = prepare(tmp_path / "out", *args, "--refresh_revisions")  # asked for: the branch's new commit, rebuilt
    assert asked == ["main", "main"] and fresh["sources"][0]["revision"] == "b" * 40 and loaded[-1] == "b" * 40
    assert fresh["fingerprint"] != meta["fingerprint"]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("hf:org/name", ("org/name", None, "main", None)),
        ("hf:org/name:config@0.4", ("org/name", "config", "main", 0.4)),
        ("hf:wikimedia/wikipedia:20231101.en#b04c8d1@0.1", ("wikimedia/wikipedia", "20231101.en", "b04c8d1", 0.1)),
        ("hf:org/name#refs/convert/parquet", ("org/name", None, "refs/convert/parquet", None)),
    ],
)
def test_hub_spec_syntax(spec, expected):
    source = prepare_data.parse_source(spec)
    assert (source["path"], source["config"], source["ref"], source["weight"]) == expected


def test_preset_names_a_revision_for_every_source():
    for spec in prepare_data.PRESETS["reference"]:
        assert "#" in spec and prepare_data.parse_source(spec)["ref"]


# --- the tokenizer flags say what they do (issue 17, item 7)


def test_vocab_size_alone_means_the_trained_bpe(tmp_path):
    for i in range(20):
        (tmp_path / f"note{i}.txt").write_text(f"note {i}: some notes to train a tokenizer on, " * 20)
    meta = prepare(tmp_path / "out", "--sources", tmp_path / "*.txt", "--vocab_size", 300, "--val_fraction", 0.3)
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["name"] == "rustbpe-300"
    with pytest.raises(SystemExit, match="--vocab_size is the size of a BPE to train"):
        prepare(tmp_path / "gpt2", "--sources", tmp_path / "note0.txt", "--tokenizer", "gpt2", "--vocab_size", 300)


def test_tiktoken_offline_says_what_to_do(tmp_path, monkeypatch):
    import tokenizer

    def unreachable(name):
        raise ConnectionError(
            "HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max retries\n..."
        )

    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", unreachable)
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(SystemExit) as e:
        prepare(tmp_path / "out", "--sources", tmp_path / "notes.txt")
    message = str(e.value.code)
    assert "\n" not in message and "TIKTOKEN_CACHE_DIR" in message and "--tokenizer bpe" in message
    assert "'gpt2'" in message and not (tmp_path / "out.partial").exists()


if __name__ == "__main__":  # docs/data.md's figure: how far a prefix's label mix is from the whole, per shuffle
    import glob
    import pathlib
    import tempfile

    from datasets import load_dataset

    n_docs, n_labels, n_files, row_group, block = 200_000, 10, 20, 1000, 10_000
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sorted_corpus(os.path.join(tmp, "sorted"), n_docs, n_labels, n_files, row_group)
        print(
            f"{n_docs:,} documents sorted by label ({n_labels} labels) in {n_files} parquet files of {row_group}-row "
            "row groups: total-variation distance of the label mix of the first 1% / 10% / 50% of train documents "
            "from all of them"
        )
        for shuffle_block in (0, block):
            out = pathlib.Path(tmp) / f"shuffle{shuffle_block}"
            prepare(
                out,
                "--sources",
                corpus,
                "--tokenizer",
                "bpe",
                "--vocab_size",
                300,
                "--bpe_train_chars",
                1_000_000,
                "--shuffle_block",
                shuffle_block,
            )
            train, val = labels(out, "train"), labels(out, "val")
            print(
                f"prepare_data.py --shuffle_block {shuffle_block}: "
                f"{' / '.join(f'{d:.3f}' for d in prefix_distances(train))}"
                f"; its val split ({len(val)} documents) from its train split: {total_variation(val, train):.3f}"
            )
        files = sorted(glob.glob(os.path.join(corpus, "*.parquet")))
        for reshard in (False, True):  # by file, or (as prepare_data) by row group
            stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
            stream = (stream.reshard() if reshard else stream).shuffle(seed=1337, buffer_size=block)
            order = [int(row["text"].split()[1]) for row in stream]
            print(
                f"datasets' IterableDataset{'.reshard()' if reshard else ''}.shuffle(seed, buffer_size={block}): "
                f"{' / '.join(f'{d:.3f}' for d in prefix_distances(order))}"
            )
        rng = np.random.default_rng(0)
        uniform = np.mean([prefix_distances(list(rng.permutation(order))) for _ in range(5)], axis=0)
        print(f"a uniformly random order (mean of 5): {' / '.join(f'{d:.3f}' for d in uniform)}")
