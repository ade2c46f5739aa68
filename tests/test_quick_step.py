"""What makes the quick start's training step cheap on a CPU (docs/performance.md, "The quick start per host kind"):
Muon's tall and wide matrices orthogonalized in one batch, attention in fp32 when training in bf16, and glibc keeping
the step's freed memory."""

import platform
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import model as model_module
from model import LLaMA, ModelConfig
from muon import MuonAdamW, orthogonalize


def test_tall_and_wide_matrices_batched_together_step_as_each_alone():
    torch.manual_seed(0)
    shapes = [(24, 10), (10, 24), (10, 24), (6, 6)]  # tall and wide of one size share a batch, transposed
    together = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    opt = MuonAdamW([{"params": together, "weight_decay": 0.1, "muon": True}], lr=0.01)
    opts = [MuonAdamW([{"params": [p], "weight_decay": 0.1, "muon": True}], lr=0.01) for p in alone]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(together, alone):
        assert torch.allclose(p, q, atol=1e-6)
    # which holds because a tall matrix's polar factor is the transpose of its transpose's
    G = torch.randn(24, 10)
    assert torch.allclose(orthogonalize(G), orthogonalize(G.mT).mT, atol=1e-6)


def test_attention_runs_in_fp32_only_when_training_in_bf16_on_a_cpu(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        y = sdpa(q, k, v, **kwargs)
        seen.append((q.dtype, y.dtype))
        return y

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_sdpa)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64)
    m = LLaMA(config)
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(x, x)  # training: autocast would run it in bf16, the model asks for fp32
    loss.backward()
    assert seen == [(torch.float32, torch.float32)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)  # evaluation keeps bf16 (the forward kernel is not the slow one)
    m(x)  # fp32 stays fp32
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    seen.clear()
    m.bfloat16()
    logits, loss = m(x, x)  # bf16 weights, no autocast: the result goes back to bf16 for o_proj
    loss.backward()
    assert seen == [(torch.float32, torch.float32)] and logits.dtype == torch.bfloat16


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc"
)
def test_keep_freed_memory_stops_a_training_step_page_faulting():
    # in a process of its own: the allocator's settings are the process's. The step is the quick start's shape
    # (1,024 tokens, vocab 2048), which frees ~20 MB of buffers and allocates them again every step: glibc's default
    # faulted 1,400-2,600 pages a step back in here (AVX-512 BF16 host, commit 1e62797), keeping them 0-210
    code = """
import resource, torch
from common import keep_freed_memory
from model import LLaMA, ModelConfig
assert keep_freed_memory()
m = LLaMA(ModelConfig(vocab_size=2048, n_layer=1, n_head=3, n_kv_head=3, n_embd=96, intermediate_size=256))
x = torch.randint(0, 2048, (8, 128))
def step():
    m(x, x)[1].backward()
    m.zero_grad(set_to_none=True)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""
    faults_per_step = float(run_script("-c", code).stdout)
    assert faults_per_step < 500
