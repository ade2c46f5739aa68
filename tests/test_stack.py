"""stack.py: each operator's layer mapping weight by weight, zero's exact function, DUS depth, carried AdamW
state (and train.py loading it), a grown checkpoint training on, and every refusal."""

import os

import pytest
import torch
from conftest import ROOT, TINY, run_here

import checkpoint
import stack
from model import LLaMA, ModelConfig

# the hand-written maps for a 4-layer source: new layer i starts from source layer EXPECTED[i]
EXPECTED = {
    ("stack", 2): [0, 1, 2, 3, 0, 1, 2, 3],
    ("stack", 3): [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
    ("interleave", 2): [0, 0, 1, 1, 2, 2, 3, 3],
    ("zero", 2): [0, 0, 1, 1, 2, 2, 3, 3],
    ("dus", 2): [0, 1, 2, 1, 2, 3],  # m = 1: the first copy loses layer 3, the second layer 0
    ("dus", 3): [0, 1, 2, 1, 2, 1, 2, 3],  # the middle copy loses a layer at both seams
}


@pytest.fixture(scope="module")
def source(pydocs_data, tmp_path_factory):
    """A 4-layer model trained a few steps by train.py: a real checkpoint with optimizer, loader and history."""
    out = tmp_path_factory.mktemp("source")
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={out}",
        *TINY,
        "--n_layer=4",
        "--max_iters=3",
        "--lr_decay_iters=3",
        "--eval_interval=3",
    )
    return str(out)


def grow(source, out, *flags):
    stack.main(["--src", source, "--out", str(out), *flags])
    return checkpoint.load(str(out))


@pytest.mark.parametrize("method,factor", list(EXPECTED))
def test_layer_mapping_weight_by_weight(source, tmp_path, method, factor):
    src = checkpoint.load(source)
    flags = ["--method", method, "--factor", str(factor)] + (["--drop", "1"] if method == "dus" else [])
    grown = grow(source, tmp_path / "g.pt", *flags)
    expected = EXPECTED[method, factor]
    assert grown["model_args"] == dict(src["model_args"], n_layer=len(expected))
    per_layer = [k[len("model.layers.0.") :] for k in src["model"] if k.startswith("model.layers.0.")]
    assert len(per_layer) == 9
    for i, s in enumerate(expected):
        first = s not in expected[:i]
        for rest in per_layer:
            new, old = grown["model"][f"model.layers.{i}.{rest}"], src["model"][f"model.layers.{s}.{rest}"]
            if method == "zero" and not first and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                assert not new.any(), (i, rest)  # LLaMA Pro: the added block writes nothing to the residual stream
            else:
                assert torch.equal(new, old), (i, rest)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(grown["model"][name], src["model"][name])
    assert len(grown["model"]) == len(src["model"]) + 9 * (len(expected) - 4)
    # what the next phase needs is carried over; the stacking is recorded
    assert grown["tokenizer"] == src["tokenizer"] and grown["loader"] == src["loader"]
    assert grown["config"]["data_dir"] == src["config"]["data_dir"] and grown["optimizer"] is None
    assert grown["history"][:-1] == src["history"]
    measured = {"val_loss_source": None, "val_loss": None, "val_bpb_source": None, "val_bpb": None}
    assert grown["history"][-1] | {"source": None, "out": None} | measured == dict(
        event="stack",
        method=method,
        factor=factor,
        drop=1 if method == "dus" else 0,
        optim="reset",
        noise=0.0,
        source=None,
        out=None,
        n_layer=[4, len(expected)],
        **measured,
    )


def test_dus_depth_arithmetic():
    # SOLAR 10.7B: 32 layers, m = 8 -> 48 layers (layers 0-23 of one copy, 8-31 of the other)
    assert stack.layer_map("dus", 32, 2, 8) == list(range(24)) + list(range(8, 32))
    for L, g, m in [(4, 2, 1), (12, 2, 3), (12, 3, 5), (7, 4, 3)]:
        assert len(stack.layer_map("dus", L, g, m)) == g * L - 2 * m * (g - 1)


def test_noise_touches_copies_only_and_zero_stays_exact(source, tmp_path, capsys):
    src = checkpoint.load(source)
    noisy = grow(source, tmp_path / "noisy.pt", "--noise", "0.2")
    for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        orig = src["model"][f"model.layers.1.{rest}"]
        first, copy = (noisy["model"][f"model.layers.{i}.{rest}"] for i in (1, 5))  # stack: layer 5 copies layer 1
        assert torch.equal(first, orig)
        rel = (copy - orig).std() / orig.std()  # N(0, (0.2 std)^2) noise: relative std 0.2
        assert 0.15 < rel < 0.25, (rest, rel)
    # zero with noise: the noise lands on the copies' inner weights, their outputs stay zero: same function
    capsys.readouterr()
    zero = grow(source, tmp_path / "zero", "--method", "zero", "--noise", "0.2", "--factor", "3")
    out = capsys.readouterr().out
    model_src, model_zero = checkpoint.build_model(src), checkpoint.build_model(zero)
    idx = torch.randint(0, src["model_args"]["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model_src(idx)[0], model_zero(idx)[0])
    # stdout carries the comparison on the source's own val batches: identical for zero
    line = next(ln for ln in out.splitlines() if ln.startswith("val loss:"))
    loss_src, loss_grown = (float(x.split()[-1]) for x in line.split("(")[0][len("val loss: ") :].split(","))
    assert loss_src == loss_grown and zero["history"][-1]["val_loss"] == zero["history"][-1]["val_loss_source"]
    assert "12 layers" in out and os.path.exists(tmp_path / "zero" / "ckpt.pt")


def test_val_check_measures_train_py_s_val_set_and_can_be_skipped(source, tmp_path, capsys):
    """stack.py's source loss is the source's last val loss in train.py (the same val set, dtype and batches), in
    nats per token and bits per byte; --val_tokens 0 skips the check."""
    last = [e for e in checkpoint.read_metrics(source) if "val_loss" in e][-1]
    capsys.readouterr()
    grown = grow(source, tmp_path / "g.pt", "--dtype", "float32")
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert (
        f"source {last['val_loss']:.4f}" in lines["val loss"]
        and "on the first 1,024 val tokens of" in lines["val loss"]
    )
    assert f"source {last['val_bpb']:.4f}" in lines["val bpb"]
    entry = grown["history"][-1]
    assert entry["val_loss_source"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert entry["val_bpb_source"] == pytest.approx(last["val_bpb"], abs=1e-6)
    assert entry["val_bpb"] / entry["val_loss"] == pytest.approx(last["val_bpb"] / last["val_loss"])  # the same tokens
    skipped = grow(source, tmp_path / "skip.pt", "--val_tokens", "0")
    assert "val loss: skipped, --val_tokens 0" in capsys.readouterr().out
    assert skipped["history"][-1]["val_loss"] is None and skipped["best_val_loss"] == float("inf")


def test_optim_copy_shapes_and_train_py_loads_them(source, pydocs_data, tmp_path):
    src = checkpoint.load(source)
    grown = grow(source, tmp_path / "g.pt", "--method", "interleave", "--optim", "copy")
    model = LLaMA(ModelConfig(**grown["model_args"]))
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    params = [p for group in opt.param_groups for p in group["params"]]
    state = grown["optimizer"]["state"]
    assert sorted(state) == list(range(len(params)))
    assert [len(g["params"]) for g in grown["optimizer"]["param_groups"]] == [
        len(g["params"]) for g in opt.param_groups
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    src_model = LLaMA(ModelConfig(**src["model_args"]))
    src_opt = src_model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    src_names = {id(p): n for n, p in src_model.named_parameters()}
    src_ids = {src_names[id(p)]: i for i, p in enumerate(p for group in src_opt.param_groups for p in group["params"])}
    for j, p in enumerate(params):
        name = names[id(p)]
        assert state[j]["exp_avg"].shape == state[j]["exp_avg_sq"].shape == p.shape, name
        # new layer i of interleave copies source layer i // 2: same moments
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2:]
            name = f"model.layers.{int(i) // 2}.{rest}"
        origin = src["optimizer"]["state"][src_ids[name]]
        assert torch.equal(state[j]["exp_avg"], origin["exp_avg"]) and torch.equal(
            state[j]["exp_avg_sq"], origin["exp_avg_sq"]
        )
    # train.py keeps the moments: AdamW's step count goes on from the source's 3 steps
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path / 'b'}",
        f"--init_from={tmp_path / 'g.pt'}",
        *[a for a in TINY if not a.startswith("--n_layer")],
        "--max_iters=2",
        "--lr_decay_iters=2",
        "--eval_interval=2",
    )
    after = checkpoint.load(str(tmp_path / "b"))
    assert {float(s["step"]) for s in after["optimizer"]["state"].values()} == {5.0}
    assert after["optimizer"]["param_groups"][0]["weight_decay"] == 0.1  # this phase's settings, not stale ones


def test_grown_checkpoint_trains_on(source, pydocs_data, tmp_path):
    src = checkpoint.load(source)
    proc = run_here("stack.py", "--src", source, "--out", str(tmp_path / "grown"), "--method", "dus")
    assert "grown:  6 layers" in proc.stdout and "val loss: source" in proc.stdout and "wrote" in proc.stdout
    assert "dus: 4 -> 6 layers" in proc.stderr and "dus:" not in proc.stdout  # results on stdout, logs on stderr
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path / 'b'}",
        f"--init_from={tmp_path / 'grown'}",
        *[a for a in TINY if not a.startswith("--n_layer")],
        "--max_iters=2",
        "--lr_decay_iters=2",
        "--eval_interval=2",
    )
    after = checkpoint.load(str(tmp_path / "b"))
    assert after["model_args"]["n_layer"] == 6 and after["iter_num"] == 2
    assert [h["event"] for h in after["history"]] == ["train", "stack", "train"]
    # the new phase continued the data stream where the source stopped (2 steps x 2 micro-steps x 4 x 64 tokens)
    assert after["loader"]["offset"] == src["loader"]["offset"] + 2 * 2 * 4 * 64
    assert {float(s["step"]) for s in after["optimizer"]["state"].values()} == {2.0}  # --optim reset: a fresh AdamW


def test_without_val_data_the_comparison_is_skipped(source, tmp_path, capsys):
    ckpt = checkpoint.load(source)
    ckpt["config"]["data_dir"] = str(tmp_path / "gone")
    checkpoint.write(ckpt, str(tmp_path / "src.pt"))
    grow(str(tmp_path / "src.pt"), tmp_path / "g.pt")
    assert "val loss: skipped, the source's data_dir" in capsys.readouterr().out


def refuse(capsys, *args):
    """stack.py must exit non-zero with a message; returns the message."""
    with pytest.raises(SystemExit) as e:
        stack.main(list(args))
    assert e.value.code not in (0, None)
    return str(e.value.code) + capsys.readouterr().err


def test_refusals_name_the_problem_and_write_nothing(source, tmp_path, capsys):
    out = str(tmp_path / "out.pt")
    assert "checkpoint not found" in refuse(capsys, "--src", str(tmp_path / "missing.pt"), "--out", out)
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    assert "corrupt" in refuse(capsys, "--src", str(tmp_path / "corrupt.pt"), "--out", out)
    assert "integer >= 2, got 1" in refuse(capsys, "--src", source, "--out", out, "--factor", "1")
    assert "integer >= 2, got '1.5'" in refuse(capsys, "--src", source, "--out", out, "--factor", "1.5")
    assert "integer >= 2, got 'two'" in refuse(capsys, "--src", source, "--out", out, "--factor", "two")
    assert "between 1 and 1" in refuse(capsys, "--src", source, "--out", out, "--method", "dus", "--drop", "2")
    assert "between 1 and 1" in refuse(capsys, "--src", source, "--out", out, "--method", "dus", "--drop", "0")
    assert "dus only" in refuse(capsys, "--src", source, "--out", out, "--drop", "1")
    assert "--noise must be >= 0" in refuse(capsys, "--src", source, "--out", out, "--noise", "-0.1")
    assert os.listdir(tmp_path) == ["corrupt.pt"]  # nothing written by any refusal
    # an existing output is kept unless --force: another growth is refused, the same one reused
    grow(source, tmp_path / "out.pt")
    before = os.path.getmtime(out)
    assert "already exists (not this growth of" in refuse(
        capsys, "--src", source, "--out", out, "--method", "interleave"
    )
    assert "pass --force to overwrite it" in refuse(capsys, "--src", source, "--out", out, "--noise", "0.1")
    with pytest.raises(SystemExit) as reused:
        stack.main(["--src", source, "--out", out])
    assert (
        reused.value.code == 0
        and capsys.readouterr().out.strip()
        == f"{out} already holds {source} grown by stack x2: reusing it (--force grows it again)"
    )
    assert os.path.getmtime(out) == before
    assert checkpoint.load(out)["model_args"]["n_layer"] == 8
    grow(source, tmp_path / "out.pt", "--force", "--factor", "3")
    assert checkpoint.load(out)["model_args"]["n_layer"] == 12
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt", "out.pt"]  # no temp file left behind
    # a directory as --out means out_dir/ckpt.pt, and is refused the same way when it exists
    grow(source, tmp_path / "d")
    assert "already exists" in refuse(capsys, "--src", source, "--out", str(tmp_path / "d"), "--factor", "3")


def test_no_arguments_is_the_recipe_step(source, tmp_path, monkeypatch, capsys):
    """`python stack.py` grows out/phase1 into out/stacked.pt (what configs/phase2.py starts from) and says so."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"checkpoint not found: 'out/phase1'.*train phase 1 first"):
        stack.main([])
    os.makedirs("out")
    os.symlink(source, "out/phase1")
    stack.main([])
    out = capsys.readouterr()
    assert "out/phase1 into out/stacked.pt (the recipe's step: configs/phase2.py starts from it)" in out.err
    assert out.out.strip().splitlines()[-1] == "wrote out/stacked.pt; next: python train.py configs/phase2.py"
    grown = checkpoint.load("out/stacked.pt")
    assert grown["model_args"]["n_layer"] == 8 and grown["history"][-1]["method"] == "stack"
    config = {}
    exec(open(os.path.join(ROOT, "configs", "phase2.py")).read(), config)
    assert config["init_from"] == "out/stacked.pt"
