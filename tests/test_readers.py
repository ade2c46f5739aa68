"""What a practitioner and a learner rely on (issue 26): an out-of-memory error answered in one line with settings that
keep the tokens per step, the warning of a scaled-down schedule, the loader's line (and metrics.jsonl field) when it
starts a new pass over the data, eval_mc's CUDA default, bench.py's shape and memory of a phase, the growth study's
plots from its JSON, and the SLURM script that requeues itself until a phase is done."""

import json
import os
import re
import shutil
import subprocess
import sys

import matplotlib
import pytest
import torch
from conftest import ROOT, TINY, run_here, run_script

import bench
import eval_mc
import study_growth
from model import LLaMA, ModelConfig

MEMORY_DOCS = "docs/training.md#memory-what-fits-on-one-gpu"

# train.py in a fresh interpreter whose model raises in its first training forward (evaluation, under no_grad, runs):
# the error a GPU gives when a micro-batch does not fit, simulated on the CPU
RAISING = """
import runpy, sys, torch
sys.path.insert(0, {root!r})
import model
real_forward = model.LLaMA.forward
def forward(self, *args, **kwargs):
    if torch.is_grad_enabled():
{raise_it}
    return real_forward(self, *args, **kwargs)
model.LLaMA.forward = forward
sys.argv = {argv!r}
runpy.run_path({train!r}, run_name="__main__")
"""
RAISE = {
    "out of memory": '        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.14 GiB")',
    # as torch.compile reports an error inside a compiled step: its own exception, raised from the original
    "out of memory, wrapped": (
        "        try:\n"
        '            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.14 GiB")\n'
        "        except torch.cuda.OutOfMemoryError as e:\n"
        '            raise RuntimeError("backend compiler failed") from e'
    ),
    "another error": '        raise ValueError("not a memory problem")',
}


def train_raising(data, out, error, *extra):
    argv = ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=5", "--lr_decay_iters=5"]
    argv += ["--peak_flops=1e12", *extra]  # a given MFU peak: no matmul timing at start-up
    code = RAISING.format(root=ROOT, raise_it=RAISE[error], argv=argv, train=os.path.join(ROOT, "train.py"))
    return run_script("-c", code, check=False)


@pytest.mark.parametrize(
    "error, batch, answer",
    [
        ("out of memory", 4, "keep the 512 tokens per step with --batch_size=2 --gradient_accumulation_steps=4"),
        (
            "out of memory, wrapped",
            3,
            "keep the 384 tokens per step with --batch_size=1 --gradient_accumulation_steps=6",
        ),
    ],
)
def test_out_of_memory_is_answered_in_one_line_with_settings_that_keep_the_tokens_per_step(
    pydocs_data, tmp_path, error, batch, answer
):
    proc = train_raising(pydocs_data, tmp_path, error, f"--batch_size={batch}")  # TINY: 2 micro-steps of 64 tokens
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: out of memory on cpu with batch_size={batch} x block_size=64: {answer} (what fits on which GPU: "
        f"{MEMORY_DOCS})"
    )
    assert "warning: max_iters" not in proc.stderr  # max_iters and lr_decay_iters agree: no schedule warning
    heading = MEMORY_DOCS.split("#")[1].replace("-", " ")
    assert any(
        line.strip().lower().replace(":", "") == f"## {heading}"
        for line in open(os.path.join(ROOT, "docs/training.md"))
    )


def test_another_error_keeps_its_traceback(pydocs_data, tmp_path):
    proc = train_raising(pydocs_data, tmp_path, "another error")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: not a memory problem" in proc.stderr
    assert "out of memory" not in proc.stderr


def test_a_scaled_down_schedule_is_said_and_a_new_pass_over_the_data_is_logged_and_recorded(listed_data, tmp_path):
    out = tmp_path / "out"
    proc = run_here(
        "train.py",
        f"--data_dir={listed_data}",
        f"--out_dir={out}",
        *TINY,
        "--max_iters=12",
        "--lr_decay_iters=200",
        "--warmup_iters=20",
        "--eval_interval=100",
    )
    end_lr = 3e-3 * 12 / 21  # get_lr(11): still in the linear warmup, (it + 1) / (warmup_iters + 1) of the peak
    assert (
        f"warning: max_iters=12 but lr_decay_iters=200: the schedule is sized for 200 steps, so this run ends at lr "
        f"{end_lr:.2e} (peak 3.00e-03, min_lr 3.00e-04), still warming up; to scale it to the run, add "
        "--lr_decay_iters=12 --warmup_iters=1"
    ) in proc.stderr
    # 18 windows a pass, 2 micro-steps a step: the 19th window, in step 10, is the first of the second pass
    lines = [line for line in proc.stderr.splitlines() if "over it begins" in line]
    assert lines == [f"the train split of {listed_data} ends: pass 2 over it begins (its tokens are seen again)"]
    steps = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert [(e["iter"], e["epoch"]) for e in steps] == [(i, int(i >= 10)) for i in range(1, 13)]


def test_eval_mc_takes_cuda_when_there_is_one_as_every_script(monkeypatch):
    seen = []
    monkeypatch.setattr(eval_mc, "device_error", lambda device: seen.append(device) or "stop here")
    for available in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        with pytest.raises(SystemExit):
            eval_mc.main(["--ckpt", "x", "--tasks", "copa"])
    assert list(dict.fromkeys(seen)) == ["cuda", "cpu"]  # the device it checks, first with a GPU, then without


def write_config(path, **keys):
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in keys.items()))
    return str(path)


def test_bench_params_of_a_phase_that_starts_from_a_checkpoint_is_the_checkpoints_shape(tmp_path, capsys):
    grown = ModelConfig(vocab_size=512, n_layer=6, n_head=2, n_kv_head=1, n_embd=64, intermediate_size=128)
    torch.save({"model": {}, "model_args": vars(grown)}, tmp_path / "grown.pt")
    config = write_config(tmp_path / "phase2.py", init_from=str(tmp_path / "grown.pt"), block_size=32, batch_size=2)
    bench.main([config, "--params"])
    model = LLaMA(ModelConfig(**{**vars(grown), "block_size": 32}))
    assert capsys.readouterr().out == (
        f"6 layers x 64, vocab 512: {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} "
        f"non-embedding), {model.flops_per_token(32):,} training FLOPs per token at 32 tokens of context\n"
    )
    (tmp_path / "grown.pt").unlink()
    with pytest.raises(SystemExit):
        bench.main([config, "--params"])
    assert f"takes its model's shape from {tmp_path / 'grown.pt'}" in capsys.readouterr().err


def saved_bytes(model, batch_size):
    """Bytes that autograd saves for backward in a forward of batch_size sequences (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        T = model.config.block_size
        model(torch.zeros(batch_size, T, dtype=torch.long), torch.zeros(batch_size, T, dtype=torch.long))
    return sum(storages.values())


def test_bench_memory_measures_the_peak_of_a_step_and_says_what_fits(tmp_path, capsys, monkeypatch):
    config = ModelConfig(
        vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, intermediate_size=128, block_size=64
    )
    torch.manual_seed(0)
    model = LLaMA(config)
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    peaks = [bench.step_peak(model, optimizer, "float32", False, b, "cpu") for b in (1, 2)]
    # what one more sequence costs: at least what autograd saves of it for backward (measured apart, by hooks), and
    # at most that plus the cross-entropy's gradients, three fp32 tensors of block_size x vocab
    saved = [saved_bytes(model, b) for b in (1, 2)]
    per_sequence = peaks[1] - peaks[0]
    assert saved[1] - saved[0] <= per_sequence <= saved[1] - saved[0] + 3 * 4 * 64 * 512
    state = 2 * 4 * model.num_params()  # AdamW's two fp32 moments
    assert peaks[0] >= 4 * model.num_params() + state  # the weights and the moments are in it
    # what fits: a step of 2 GiB plus 5 GiB a sequence, 32 sequences a step (8 x 4), 10% of each GPU kept free
    gib = 2**30
    monkeypatch.setattr(bench, "step_peak", lambda model, opt, dtype, compile, b, device: (2 + 5 * b) * gib)
    config_file = write_config(
        tmp_path / "c.py",
        **dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, intermediate_size=128, vocab_size=512, block_size=64),
        **dict(batch_size=8, gradient_accumulation_steps=4),
    )
    bench.main([config_file, "--memory", "--modes", "fp32", "--device", "cpu"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+ GiB \|", line)]
    # 24 GiB: 2 + 5 x 2 = 12 <= 21.6 < 22 (4 sequences); 40: 22 <= 36 < 42; 80: 42 <= 72 < 82
    assert [(r[0], int(r[1]), int(r[2]), r[3]) for r in rows] == [
        ("| 24 GiB", 2, 16, "12.0 GiB |"),
        ("| 40 GiB", 4, 8, "22.0 GiB |"),
        ("| 80 GiB", 8, 4, "42.0 GiB |"),
    ]


def test_the_growth_plots_are_drawn_from_the_json_alone(tmp_path):
    shutil.copy(os.path.join(ROOT, "assets", "growth_study.json"), tmp_path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    study_growth.main(["--report", f"--out_dir={tmp_path}"])
    assert (tmp_path / "crossover.png").stat().st_size > 0 and (tmp_path / "growth_study.png").stat().st_size > 0
    crossover, growth = (plt.figure(n) for n in plt.get_fignums())
    ax = crossover.axes[0]
    assert ax.get_title() == "Crossover: small vs large from scratch (1 seed per budget)"  # no dots promised
    assert ax.get_xlim()[1] > 2e13  # the growth study's budget is on the axis, with its runs
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "8 layers at the growth study's budget: scratch, 2 seeds" in labels
    labels = [t.get_text() for a in growth.axes for t in a.get_legend().get_texts()]
    assert "interleave (8 layers, 1 seed)" in labels and not any("1 seeds" in label for label in labels)


@pytest.mark.skipif(shutil.which("bash") is None, reason="the SLURM script is bash")
@pytest.mark.parametrize("status, requeued", [(143, True), (0, False), (1, False)])
def test_the_slurm_script_requeues_itself_until_the_phase_is_done(tmp_path, status, requeued):
    """train.sbatch with srun, torchrun and scontrol stubbed: each records how it was called."""
    stubs, calls = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir()
    for name, body in {
        "srun": 'exec "$@"',
        "torchrun": f'echo "torchrun $*" >> {calls}; exit {status}',
        "scontrol": f'echo "scontrol $*" >> {calls}',
    }.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    (stubs / "python").symlink_to(sys.executable)
    config = write_config(tmp_path / "phase.py", out_dir=str(tmp_path / "out"))
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "2"}

    def sbatch(*args):
        return subprocess.run(["bash", "train.sbatch", *args], cwd=ROOT, env=env, capture_output=True, text=True)

    proc = sbatch(config, "--batch_size=8")  # a first job: nothing saved yet, so no resume
    assert proc.returncode == status
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"")
    sbatch(config, f"--out_dir={tmp_path / 'other'}")  # another out_dir, without a checkpoint
    sbatch(config)  # the requeued job: it resumes
    run = "torchrun --standalone --nproc_per_node=2 --shutdown-timeout=240 train.py " + config
    expected = [f"{run} --batch_size=8"] + ["scontrol requeue 42"] * requeued
    expected += [f"{run} --out_dir={tmp_path / 'other'}"] + ["scontrol requeue 42"] * requeued
    expected += [f"{run} --init_from=resume"] + ["scontrol requeue 42"] * requeued
    assert calls.read_text().splitlines() == expected
    missing = sbatch(str(tmp_path / "nope.py"))
    assert missing.returncode == 1 and missing.stderr.startswith(f"error: no config file '{tmp_path / 'nope.py'}'")
