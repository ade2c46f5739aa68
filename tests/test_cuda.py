"""Where CUDA is: the GPU recipe's paths that no CPU test reaches. Skipped without CUDA (CI is CPU only);
`python gpu_check.py` runs this file first on a GPU machine.

The phase-1 shape at 2 layers trains compiled in bf16; attention runs SDPA's FlashAttention kernel (and flash-attn
agrees with it where installed); a SIGTERM saves the step reached and the resume ends where an uninterrupted run
ends; eval_mc on CUDA predicts what fp32 on the CPU predicts; a Muon step agrees with the CPU's; a 1-process
torchrun with NCCL trains, stops on SIGTERM and resumes. Each is small: the file runs in ~2 minutes on an H200.
"""

import json
import os
import random
import signal
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run_script
from test_signals import STEPS, TORCHRUN, finish, load, metrics, start, trained_to, wait_until

import model
from data import write_meta, write_shard
from model import LLaMA, ModelConfig
from muon import MuonAdamW
from tokenizer import EOT, SPLIT_PATTERN, Tokenizer, ranks_to_text

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU visible to torch here")

# conftest's tiny model on the GPU in bf16, what dtype auto picks there; eager, so each process starts in seconds
# (the compiled path is the phase-1 test's, and gpu_check.py's torchrun step)
CUDA_TINY = [a for a in TINY if not a.startswith(("--device=", "--dtype=", "--compile="))] + [
    "--device=cuda",
    "--dtype=bfloat16",
    "--compile=False",
]
N = 20  # steps of an uninterrupted run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """conftest.pydocs_data's corpus tokenized by bytes (256 byte ids and <|endoftext|>) instead of by a trained
    BPE: the GPU check's environment has no rustbpe, and these tests compare devices, not tokenizers."""
    import pydoc_data.topics

    out = str(tmp_path_factory.mktemp("pydocs_bytes"))
    tok = Tokenizer(
        {
            "kind": "bpe",
            "name": "bytes",
            "pattern": SPLIT_PATTERN,
            "ranks": ranks_to_text({bytes([i]): i for i in range(256)}),
            "special_tokens": {EOT: 256},
        }
    )
    docs = list(pydoc_data.topics.topics.values())
    random.Random(0).shuffle(docs)
    n_val = len(docs) // 10
    splits = {
        split: np.array([i for ids in tok.encode_batch(d) for i in ids + [tok.eot_id]], dtype=np.uint16)
        for split, d in (("val", docs[:n_val]), ("train", docs[n_val:]))
    }
    for split, tokens in splits.items():
        write_shard(os.path.join(out, f"{split}_000000.bin"), tokens)
    write_meta(
        out,
        tok,
        shards={split: [f"{split}_000000.bin"] for split in splits},
        shard_tokens={split: [len(tokens)] for split, tokens in splits.items()},
        tokens={split: len(tokens) for split, tokens in splits.items()},
    )
    return out


def train_args(data, out, *extra):
    return ["train.py", f"--data_dir={data}", f"--out_dir={out}", *CUDA_TINY, *STEPS, *extra]


# --- the training step ------------------------------------------------------------------------------------------


def test_phase1_shape_compiled_in_bf16_trains(data, tmp_path):
    # configs/phase1.py's shape (768 wide, 12 heads of 64, SwiGLU 2048) at 2 layers and 1024 tokens of context
    proc = run_script(
        "train.py",
        "configs/phase1.py",
        f"--data_dir={data}",
        f"--out_dir={tmp_path}",
        "--n_layer=2",
        "--block_size=1024",
        "--batch_size=8",
        "--gradient_accumulation_steps=1",
        "--max_iters=40",
        "--lr_decay_iters=40",
        "--warmup_iters=10",
        "--learning_rate=1e-3",
        "--eval_interval=40",
        "--val_tokens=8192",
        "--log_interval=1",
        "--dtype=auto",
        "--compile=True",
        "--device=cuda",
    )
    assert "compiling the model (torch.compile)" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = load(tmp_path)
    assert ckpt["config"]["dtype"] == "bfloat16" and ckpt["iter_num"] == 40  # auto picks bf16 on a GPU that has it
    losses = [e["loss"] for e in metrics(tmp_path) if "loss" in e]
    # from ~ln(320) = 5.8 nats (the padded byte vocabulary) to below 4 in 40 steps of 8k tokens: bytes' unigrams alone
    # are ~3.1 nats; a loss that does not fall means the compiled bf16 step does not learn
    assert len(losses) == 40 and losses[0] > 5 and sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    assert all(e["mfu"] is not None and 0 < e["mfu"] < 1 for e in metrics(tmp_path) if "loss" in e)


def test_sdpa_runs_a_fused_attention_kernel(monkeypatch):
    """On the phase-1 shape in bf16, plain dispatch picks a fused FlashAttention-style kernel, never the math
    fallback: the flash backend, or cuDNN's fused attention, which PyTorch prefers on Hopper (torch 2.11 on an H200
    ran aten::_scaled_dot_product_cudnn_attention: gpu_check.py at b9ea89e). The profiler names the kernel that ran.
    The model's forward and backward under it, and under the flash backend, equal the math backend's within bf16's
    tolerance."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(model, "flash_attn_func", None)  # SDPA, whether or not flash-attn is installed
    torch.manual_seed(0)
    m = LLaMA(ModelConfig(n_layer=2, vocab_size=512, block_size=1024)).cuda()
    x = torch.randint(0, 512, (2, 1024), device="cuda")

    def forward_backward():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = m(x, x)
        loss.backward()
        return logits.float(), {n: p.grad.float() for n, p in m.named_parameters()}

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward()
    ops = {e.name for e in prof.events()}
    fused = {
        "aten::_scaled_dot_product_flash_attention": SDPBackend.FLASH_ATTENTION,
        "aten::_scaled_dot_product_cudnn_attention": SDPBackend.CUDNN_ATTENTION,
    }
    dispatched = [backend for name, backend in fused.items() if name in ops]
    assert dispatched, sorted(o for o in ops if "attention" in o)
    with sdpa_kernel(SDPBackend.MATH):
        math = forward_backward()
    for backend in {dispatched[0], SDPBackend.FLASH_ATTENTION}:
        with sdpa_kernel(backend):  # raises "No available kernel" if the backend cannot take these inputs
            assert_close_bf16(forward_backward(), math)


def assert_close_bf16(a, b):
    """Logits and every gradient agree to bf16's precision, relative to each tensor's own scale: on this model bf16
    autocast moved the logits by 0.9% of their largest and each gradient by at most 1.3% against fp32 (measured on
    an AVX-512 BF16 CPU); two bf16 kernels differ by no more, so 3% and 4% leave room."""
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert (logits_a - logits_b).abs().max() <= 0.03 * logits_b.abs().max()
    for name in grads_b:
        diff = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm()
        assert diff < 0.04, (name, diff.item())


def test_flash_attn_equals_sdpa_forward_and_backward(monkeypatch):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed: model.py uses SDPA")
    torch.manual_seed(0)
    m = LLaMA(ModelConfig(n_layer=2, vocab_size=512, block_size=1024)).cuda()
    x = torch.randint(0, 512, (2, 1024), device="cuda")

    def forward_backward():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = m(x, x)
        loss.backward()
        return logits.float(), {n: p.grad.float() for n, p in m.named_parameters()}

    flash_attn = forward_backward()
    monkeypatch.setattr(model, "flash_attn_func", None)
    assert_close_bf16(flash_attn, forward_backward())


# --- stopping and resuming ----------------------------------------------------------------------------------------


def max_weight_difference(a, b):
    return max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])


def test_sigterm_saves_the_step_and_the_resume_ends_as_an_uninterrupted_run(data, tmp_path):
    """Two uninterrupted runs and a stopped one, side by side on the GPU. Two uninterrupted runs need not be bit-equal
    on CUDA: FlashAttention-2's backward adds up dQ with atomic adds, whose order varies from run to run (PyTorch's
    notes on reproducibility). The resume must end bit-equal to the uninterrupted run where two uninterrupted runs
    are bit-equal, and otherwise no farther from it than 10x their own distance: a resume that lost the optimizer
    state, the data position or the learning rate ends ~1e-2 away, not ~1e-6."""
    runs = {name: tmp_path / name for name in ("a", "b", "stopped")}
    procs = {
        name: start(train_args(data, out, f"--max_iters={N if name != 'stopped' else 1000000}"), f"{out}.log")
        for name, out in runs.items()
    }
    wait_until(trained_to(runs["stopped"], 3), procs["stopped"], "step 3")
    procs["stopped"].send_signal(signal.SIGTERM)
    rc, text, lines = finish(procs["stopped"], f"{runs['stopped']}.log")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in text
    k = load(runs["stopped"])["iter_num"]
    assert 3 <= k < N and max(e["iter"] for e in metrics(runs["stopped"])) == k  # the step it reached, none after
    assert lines[-1].startswith(f"stopped by SIGTERM at step {k} of 1000000: {runs['stopped'] / 'ckpt.pt'} holds it")
    for name in ("a", "b"):
        assert finish(procs[name], f"{runs[name]}.log")[0] == 0
    run_script(*train_args(data, runs["stopped"], f"--max_iters={N}", "--init_from=resume"))
    a, b, resumed = (load(out) for out in runs.values())
    assert resumed["iter_num"] == a["iter_num"] == N and resumed["loader"] == a["loader"]
    assert [e["iter"] for e in metrics(runs["stopped"]) if "loss" in e] == list(range(1, N + 1))
    floor = max_weight_difference(a, b)
    assert max_weight_difference(resumed, a) <= 10 * floor, (max_weight_difference(resumed, a), floor)


def test_torchrun_with_nccl_trains_stops_on_sigterm_and_resumes(data, tmp_path):
    launcher = [*TORCHRUN[:-1], "--nproc_per_node=1"]
    proc = start(train_args(data, tmp_path, "--max_iters=1000000"), tmp_path / "log", launcher=launcher)
    wait_until(trained_to(tmp_path, 3), proc, "step 3")
    proc.send_signal(signal.SIGTERM)  # to torchrun, as a scheduler does: it passes the signal on to its worker
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc != 0 and 'train.py", line' not in text  # torchrun reports its worker's status; no worker traceback
    k = load(tmp_path)["iter_num"]
    assert 3 <= k and f"stopped by SIGTERM at step {k} of 1000000" in text and "torchrun [the same options]" in text
    resume = subprocess.run(
        [*launcher, *train_args(data, tmp_path, f"--max_iters={k + 5}", "--init_from=resume")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "weights identical across 1 ranks" in resume.stderr and load(tmp_path)["iter_num"] == k + 5
    assert [e["iter"] for e in metrics(tmp_path) if "loss" in e] == list(range(1, k + 6))


# --- evaluation and the optimizer ---------------------------------------------------------------------------------


def test_eval_mc_on_cuda_predicts_what_fp32_on_the_cpu_predicts(tmp_path, capsys):
    """test_eval_mc's rows and tiny random Llama (its own fixtures), scored on the CPU in fp32, on CUDA in fp32 and
    in the GPU's auto dtype (bf16)."""
    from test_eval_mc import save_models, write_data

    import eval_mc

    data_dir = write_data(tmp_path / "rows")
    _, ours = save_models(str(tmp_path / "models"), add_bos=False)
    tasks = ",".join(eval_mc.TASKS)

    def samples(*args):
        out = str(tmp_path / "out.json")
        eval_mc.main(["--ckpt", ours, "--data_dir", data_dir, "--tasks", tasks, "--no_progress", "--out", out, *args])
        capsys.readouterr()
        with open(out) as f:
            scored = json.load(f)["samples"]
        return [s for task in eval_mc.TASKS for s in scored[task]]

    cpu = samples("--device", "cpu", "--dtype", "float32")
    gpu32 = samples("--device", "cuda", "--dtype", "float32")
    gpu_auto = samples("--device", "cuda")
    assert len(cpu) == len(gpu32) == len(gpu_auto) > 30
    for c, g in zip(cpu, gpu32):  # fp32 on both: the same numbers to rounding, so the same predictions
        assert g["loglikelihoods"] == pytest.approx(c["loglikelihoods"], abs=1e-4) and g["pred"] == c["pred"]
    # bf16 moves each log-likelihood by up to a few hundredths: the predictions must agree wherever the CPU's best
    # choice leads the next by more than twice that; and most rows must be such rows, or the check says nothing
    decided = 0
    for c, g in zip(cpu, gpu_auto):
        assert g["loglikelihoods"] == pytest.approx(c["loglikelihoods"], abs=0.05)
        best, second = sorted(c["loglikelihoods"], reverse=True)[:2]
        if best - second > 0.1:
            decided += 1
            assert g["pred"] == c["pred"]
    assert decided >= 0.8 * len(cpu)


def test_a_muon_step_on_cuda_agrees_with_the_cpu():
    """Three steps of MuonAdamW (Muon's matrices, AdamW's embedding and gains) on the same weights and gradients.
    fp32 Newton-Schulz agrees to rounding; bf16 (what a bf16 run uses on the GPU) moves the update by ~2% against
    fp32 (measured on an AVX-512 BF16 CPU), so it is held to 5%."""
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 512), (512, 256), (256, 256), (256, 256), (1000, 256), (256,)]
    start_weights = [0.02 * torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]

    def run(device, ns_dtype):
        ps = [torch.nn.Parameter(w.to(device, copy=True)) for w in start_weights]
        groups = [
            {"params": ps[:4], "weight_decay": 0.1, "muon": True},
            {"params": ps[4:5], "weight_decay": 0.1},
            {"params": ps[5:], "weight_decay": 0.0},
        ]
        opt = MuonAdamW(groups, lr=0.02, ns_dtype=ns_dtype)
        for step in grads:
            for p, grad in zip(ps, step):
                p.grad = grad.to(device)
            opt.step()
        return [(p.detach().cpu() - w) for p, w in zip(ps, start_weights)]  # the updates

    cpu = run("cpu", torch.float32)
    for ns_dtype, muon_tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        for i, (want, got) in enumerate(zip(cpu, run("cuda", ns_dtype))):
            diff = ((got - want).norm() / want.norm()).item()
            assert diff < (muon_tolerance if i < 4 else 1e-5), (ns_dtype, shapes[i], diff)  # AdamW: to rounding
