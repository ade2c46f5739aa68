"""plot_run.py: a grown model's phases joined on one token axis from its checkpoint's history, into a PNG."""

import os
import shutil

import pytest
from conftest import TINY, run_here

import checkpoint
import plot_run


@pytest.fixture(scope="module")
def grown_run(pydocs_data, tmp_path_factory):
    """phase 1 (2 layers, 6 steps) -> stack.py -> phase 2 (4 layers, 4 steps), as the quick start does it."""
    tmp = tmp_path_factory.mktemp("grown")
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp / 'p1'}",
        *TINY,
        "--max_iters=6",
        "--lr_decay_iters=6",
        "--eval_interval=3",
    )
    run_here("stack.py", "--src", str(tmp / "p1"), "--out", str(tmp / "stacked.pt"))
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp / 'p2'}",
        *[a for a in TINY if "n_layer" not in a],
        f"--init_from={tmp / 'stacked.pt'}",
        "--max_iters=4",
        "--lr_decay_iters=4",
        "--eval_interval=2",
    )
    return tmp


def test_phases_join_on_one_token_axis(grown_run):
    history = checkpoint.load(str(grown_run / "p2"))["history"]
    trains, growths = plot_run.phases(history)
    per_step = 2 * 4 * 64  # accumulation x batch x block
    assert [(offset, entry["out_dir"]) for offset, entry, _ in trains] == [
        (0, str(grown_run / "p1")),
        (6 * per_step, str(grown_run / "p2")),
    ]
    assert [(offset, entry["n_layer"]) for offset, entry in growths] == [(6 * per_step, [2, 4])]
    assert [e["iter"] for e in trains[1][2] if "val_loss" in e] == [0, 2, 4]


def test_png_is_written_and_a_missing_phase_is_left_out(grown_run, tmp_path, capsys):
    plot_run.main([str(grown_run / "p2")])
    path = grown_run / "p2" / "curves.png"
    assert capsys.readouterr().out == f"{path}\n"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    shutil.copytree(grown_run / "p2", tmp_path / "p2")  # a copy whose phase 1 has no metrics.jsonl where it says
    os.remove(tmp_path / "p2" / "curves.png")
    history = checkpoint.load(str(tmp_path / "p2"))["history"]
    history[0]["out_dir"] = str(tmp_path / "gone")
    trains, growths = plot_run.phases(history)
    assert [offset for offset, _, _ in trains] == [6 * 2 * 4 * 64] and len(growths) == 1
    assert f"no metrics.jsonl in {tmp_path / 'gone'}" in capsys.readouterr().err
    plot_run.main([str(grown_run / "p2"), "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit, match="checkpoint not found"):
        plot_run.main([str(tmp_path / "nowhere")])
