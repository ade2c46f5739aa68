"""muon.py: Newton-Schulz against an SVD, Muon's steps against a float64 hand computation, its AdamW groups against
torch's AdamW, and train.py / stack.py with muon=True (exact resume, a flipped flag refused, moments carried)."""

import math

import pytest
import torch
from conftest import TINY, run_here

import checkpoint
import stack
from model import LLaMA, ModelConfig
from muon import MuonAdamW, orthogonalize


def polar(G):
    """U V^T of the thin SVD, in float64: what orthogonalize approximates."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (48, 48)])
def test_orthogonalize_approximates_the_polar_factor(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    Q = orthogonalize(G)
    assert Q.shape == G.shape and Q.dtype == G.dtype
    s = torch.linalg.svdvals(Q.double())
    # Jordan et al.'s quintic does not converge to 1: it leaves every singular value in about (0.7, 1.2)
    assert 0.6 < s.min() and s.max() < 1.25, s
    P = polar(G)
    cosine = (Q.double() * P).sum() / (Q.double().norm() * P.norm())
    assert cosine > 0.98
    # the same singular vectors: Q's projection on P's row space is Q
    assert torch.allclose(
        Q.double() @ (P.T @ P if shape[0] <= shape[1] else torch.eye(shape[1], dtype=torch.float64)),
        Q.double(),
        atol=1e-5,
    )
    # scale-invariant, and a stack of matrices is orthogonalized one by one
    assert torch.allclose(orthogonalize(1000 * G), Q, atol=1e-5)
    stacked = orthogonalize(torch.stack([G, 2 * G.flip(0)]))
    assert torch.allclose(stacked[0], Q, atol=1e-6) and torch.allclose(stacked[1], orthogonalize(G.flip(0)), atol=1e-6)


def test_muon_steps_match_a_float64_hand_computation():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 40))
    W0 = W.detach().double().clone()
    lr, wd, m = 0.01, 0.1, 0.95
    opt = MuonAdamW([{"params": [W], "weight_decay": wd, "muon": True}], lr=lr, momentum=m)
    G1, G2 = torch.randn(16, 40), torch.randn(16, 40)
    scale = lr * 0.2 * math.sqrt(40)  # the update gets AdamW's RMS: 0.2 sqrt(max(rows, cols))
    # step 1: momentum (1-m) G1, Nesterov look-ahead G1 + m (buf - G1) = (1 - m^2) G1, whose polar factor is G1's
    W.grad = G1.clone()
    opt.step()
    W1 = W0 * (1 - lr * wd) - scale * orthogonalize(G1.double())
    assert torch.allclose(W.detach().double(), W1, atol=1e-5)
    buf = (1 - m) * G1.double()
    assert torch.allclose(opt.state[W]["momentum_buffer"].double(), buf, atol=1e-7)
    # step 2: buf <- m buf + (1-m) G2, look-ahead (1-m) G2 + m buf
    W.grad = G2.clone()
    opt.step()
    buf = m * buf + (1 - m) * G2.double()
    W2 = W1 * (1 - lr * wd) - scale * orthogonalize((1 - m) * G2.double() + m * buf)
    assert torch.allclose(W.detach().double(), W2, atol=1e-5)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = MuonAdamW(
        [{"params": [a[0]], "weight_decay": 0.1}, {"params": [a[1]], "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95)
    )
    ref = torch.optim.AdamW(
        [{"params": [b[0]], "weight_decay": 0.1}, {"params": [b[1]], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        foreach=False,
    )
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_configure_optimizer_puts_only_the_blocks_matrices_under_muon():
    model = LLaMA(
        ModelConfig(
            vocab_size=64,
            n_layer=2,
            n_head=2,
            n_kv_head=1,
            n_embd=32,
            intermediate_size=64,
            block_size=16,
            tie_embeddings=True,
        )
    )
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group, embed, gains = opt.param_groups
    assert muon_group["muon"] and not embed["muon"] and not gains["muon"]
    assert len(muon_group["params"]) == 2 * 7  # q k v o gate up down in each layer
    assert all(names[id(p)].startswith("model.layers.") and p.dim() == 2 for p in muon_group["params"])
    assert [names[id(p)] for p in embed["params"]] == ["model.embed_tokens.weight"]  # also the tied lm_head
    assert gains["weight_decay"] == 0.0 and all(p.dim() == 1 for p in gains["params"])
    with pytest.raises(ValueError, match="not 2-D"):
        MuonAdamW([{"params": gains["params"], "muon": True}], lr=1e-3)


def train(data, out, *extra, check=True):
    return run_here("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--muon=True", *extra, check=check)


def test_train_with_muon_learns_and_resumes_bit_exact(pydocs_data, tmp_path):
    common = ["--lr_decay_iters=12", "--eval_interval=6"]
    train(pydocs_data, tmp_path / "straight", "--max_iters=12", *common)
    train(pydocs_data, tmp_path / "split", "--max_iters=6", *common)
    train(pydocs_data, tmp_path / "split", "--max_iters=12", "--init_from=resume", *common)
    a, b = (checkpoint.load(str(tmp_path / d)) for d in ("straight", "split"))
    assert a["config"]["muon"] is True and a["iter_num"] == b["iter_num"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    kinds = [sorted(s) for s in a["optimizer"]["state"].values()]
    assert ["momentum_buffer"] in kinds and ["exp_avg", "exp_avg_sq", "step"] in kinds
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # resuming Muon's state as AdamW's (or the reverse) is refused in one line, naming the flag
    proc = run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path / 'split'}",
        *TINY,
        "--max_iters=14",
        "--init_from=resume",
        *common,
        check=False,
    )
    assert proc.returncode != 0 and "made with muon=True, this run has muon=False" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stack_optim_copy_carries_muon_momentum(pydocs_data, tmp_path):
    source = tmp_path / "src"
    train(pydocs_data, source, "--n_layer=2", "--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3")
    src = checkpoint.load(str(source))
    stack.main(["--src", str(source), "--out", str(tmp_path / "g.pt"), "--optim", "copy"])
    grown = checkpoint.load(str(tmp_path / "g.pt"))
    model = LLaMA(ModelConfig(**grown["model_args"]))
    names = [n for group in stack.optimizer_names(grown["model_args"], True) for n in group]
    src_ids = {n: i for i, n in enumerate(n for g in stack.optimizer_names(src["model_args"], True) for n in g)}
    assert len(grown["optimizer"]["state"]) == len(names) == len(list(model.parameters()))
    for j, name in enumerate(names):
        if name.startswith("model.layers."):  # stack: new layer i copies source layer i % 2
            i, rest = name.split(".", 3)[2:]
            name = f"model.layers.{int(i) % 2}.{rest}"
        origin = src["optimizer"]["state"][src_ids[name]]
        assert grown["optimizer"]["state"][j].keys() == origin.keys()
        assert all(torch.equal(grown["optimizer"]["state"][j][k], origin[k]) for k in origin)
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path / 'b'}",
        f"--init_from={tmp_path / 'g.pt'}",
        *[a for a in TINY if not a.startswith("--n_layer")],
        "--muon=True",
        "--max_iters=2",
        "--lr_decay_iters=2",
        "--eval_interval=2",
    )
    after = checkpoint.load(str(tmp_path / "b"))
    assert {float(s["step"]) for s in after["optimizer"]["state"].values() if "step" in s} == {5.0}  # 3 + 2: carried
