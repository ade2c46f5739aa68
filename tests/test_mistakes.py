"""No user mistake ends in a traceback: each mistake below, made the way a user makes it, ends every script with a
non-zero exit status and one line that names the problem (checked by a phrase of it)."""

import json
import os
import shutil

import pytest
from conftest import TINY, run_script


@pytest.fixture(scope="module")
def world(pydocs_data, tiny_run, tmp_path_factory):
    """What the mistakes are made with: a finished run (read only: every mistake is refused before it writes), broken
    datasets, files that are not what they are named as."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "afile").write_text("a file, not a directory\n")
    (root / "corrupt.pt").write_text("not a checkpoint\n")
    (root / "syntax.py").write_text("max_iters = 5\nbatch_size = = 3\n")
    (root / "name.py").write_text("max_iters = 5\nbatch_size = undefined_name\n")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "f").write_text("x")
    (root / "bad_eval.json").write_text('{"results": 3}')
    (root / "empty_out").mkdir()  # and no_run: an out_dir that does not exist
    shutil.copytree(pydocs_data, root / "missing_shard")
    os.remove(root / "missing_shard" / "val_000000.bin")  # an interrupted copy
    shutil.copytree(pydocs_data, root / "doubled")
    meta = json.loads((root / "doubled" / "meta.json").read_text())
    meta["shard_tokens"] = {split: [2 * n for n in counts] for split, counts in meta["shard_tokens"].items()}
    (root / "doubled" / "meta.json").write_text(json.dumps(meta))
    return dict(root=str(root), data=pydocs_data, run=str(tiny_run))


def train(out="{root}/new", data="{data}", *extra):
    return ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--peak_flops=1e12", *extra]


MISTAKES = {  # name: (command, a phrase of the one line that must say what is wrong)
    # train.py: the out_dir and the checkpoint to start from
    "train out_dir is a file": (train("{root}/afile"), "is a file, not a directory"),
    "train resume with no checkpoint": (
        train("{root}/empty_out", "{data}", "--init_from=resume"),
        "nothing to resume in",
    ),
    "train resume where out_dir is not": (
        train("{root}/no_run", "{data}", "--init_from=resume"),
        "nothing to resume in",
    ),
    "train init_from missing": (train("{root}/new", "{data}", "--init_from={root}/nowhere.pt"), "checkpoint not found"),
    "train init_from corrupt": (train("{root}/new", "{data}", "--init_from={root}/corrupt.pt"), "not a checkpoint"),
    "train init_from hf: not a model": (
        train("{root}/new", "{data}", "--init_from=hf:{root}/nonempty"),
        "no config.json",
    ),
    "train re-run a finished run, changed": (
        train("{run}", "{data}", "--learning_rate=1e-4"),
        "already holds a finished run",
    ),
    "train overwrite and resume": (
        train("{root}/new", "{data}", "--overwrite=True", "--init_from=resume"),
        "choose one",
    ),
    "train architecture over a checkpoint": (
        train("{root}/new", "{data}", "--init_from={run}", "--n_layer=3"),
        "the checkpoint fixes the architecture",
    ),
    # train.py: the data
    "train data_dir missing": (train("{root}/new", "{root}/nowhere"), "run prepare_data.py first"),
    "train listed shard missing": (train("{root}/new", "{root}/missing_shard"), "val_000000.bin is missing"),
    "train shard counts disagree": (
        train("{root}/new", "{root}/doubled"),
        "the shard and meta.json come from different builds",
    ),
    "train block_size beyond the shards": (
        train("{root}/new", "{data}", "--block_size=1000000"),
        "fewer than one step needs",
    ),
    # train.py: the config
    "train config file missing": (["train.py", "configs/nope.py"], "no config file 'configs/nope.py'"),
    "train config file syntax": (["train.py", "{root}/syntax.py"], "syntax.py, line 2: SyntaxError"),
    "train config file name error": (["train.py", "{root}/name.py"], "name.py, line 2: NameError"),
    "train key=value without --": (["train.py", "max_iters=5"], "no config file 'max_iters=5'"),
    "train unknown key": (train("{root}/new", "{data}", "--max_itres=5"), "unknown config key 'max_itres'"),
    "train wrong type": (train("{root}/new", "{data}", "--max_iters=fast"), "must be int, got 'fast'"),
    "train eval_interval 0": (train("{root}/new", "{data}", "--eval_interval=0"), "eval_interval must be >= 1"),
    "train beta2 1.5": (train("{root}/new", "{data}", "--beta2=1.5"), "beta2 must be in [0, 1)"),
    "train n_head not dividing n_embd": (train("{root}/new", "{data}", "--n_head=3"), "must divide by n_head"),
    "train device cuda without one": (
        train("{root}/new", "{data}", "--device=cuda"),
        "device 'cuda' is not usable here",
    ),
    # the other scripts
    "sample checkpoint missing": (["sample.py", "--ckpt={root}/nowhere"], "checkpoint not found"),
    "sample negative length": (["sample.py", "--ckpt={run}", "--max_new_tokens=-5"], "--max_new_tokens >= 1"),
    "sample device cuda without one": (
        ["sample.py", "--ckpt={run}", "--device=cuda"],
        "device 'cuda' is not usable here",
    ),
    "stack source corrupt": (["stack.py", "--src={root}/corrupt.pt", "--out={root}/g.pt"], "not a checkpoint"),
    "stack device cuda without one": (
        ["stack.py", "--src={run}", "--out={root}/g.pt", "--device=cuda"],
        "not usable here",
    ),
    "eval_mc device cuda without one": (["eval_mc.py", "--ckpt={run}", "--device=cuda"], "not usable here"),
    "eval_mc data_dir missing": (
        ["eval_mc.py", "--ckpt={run}", "--tasks=copa", "--data_dir={root}/nowhere"],
        "not found",
    ),
    "export_hf output not empty": (["export_hf.py", "--ckpt={run}", "--out={root}/nonempty"], "pass --force"),
    "export_hf eval file bad": (
        ["export_hf.py", "--ckpt={run}", "--out={root}/hf", "--eval={root}/bad_eval.json"],
        "'results' must map each task",
    ),
    "prepare_data source missing": (
        ["prepare_data.py", "--sources={root}/nowhere.txt", "--out_dir={root}/pd"],
        "nowhere.txt",
    ),
    "prepare_data out_dir is a file": (["prepare_data.py", "--out_dir={root}/afile"], "afile"),
    "bench config missing": (["bench.py", "configs/nope.py"], "no config file 'configs/nope.py'"),
    "study_growth data missing": (
        ["study_growth.py", "--data_dir={root}/nowhere", "--out_dir={root}/study"],
        "run prepare_data.py first",
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_ends_in_one_line_not_a_traceback(world, name):
    command, phrase = MISTAKES[name]
    proc = run_script(*[arg.format(**world) for arg in command], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert phrase.format(**world) in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]
