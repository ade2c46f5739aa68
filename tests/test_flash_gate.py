"""model.py's flash-attn gate, decided on a CPU with the GPU's compute capability and flash-attn's version faked:
flash-attn runs attention only where it works, anything else goes to SDPA, said once with the reason. (flash-attn
against SDPA, forward and backward, is tests/test_cuda.py's, where CUDA is.)"""

import pytest
import torch

import model


@pytest.mark.parametrize(
    "capability,dtype,head_dim,version,problem",
    [
        ((9, 0), torch.bfloat16, 64, "2.8.3", None),  # H100/H200
        ((8, 0), torch.float16, 256, "2.7.3", None),  # A100, the largest head_dim
        ((10, 0), torch.bfloat16, 128, "2.7.4.post1", None),  # B200
        ((7, 5), torch.float16, 64, "2.8.3", "this GPU's compute capability is 7.5, below Ampere's 8.0"),  # T4
        ((7, 0), torch.float16, 64, "2.8.3", "this GPU's compute capability is 7.0, below Ampere's 8.0"),  # V100
        ((9, 0), torch.bfloat16, 64, "2.6.3", "flash-attn 2.6.3 is older than 2.7.3"),  # torch.compile breaks on it
        ((10, 0), torch.bfloat16, 64, "2.7.0", "flash-attn 2.7.0 is older than 2.7.3"),  # refuses Blackwell
        ((9, 0), torch.float32, 64, "2.8.3", "it computes in bf16 or fp16, not float32"),
        ((9, 0), torch.bfloat16, 36, "2.8.3", "head_dim 36 is not a multiple of 8 up to 256"),
        ((9, 0), torch.bfloat16, 320, "2.8.3", "head_dim 320 is not a multiple of 8 up to 256"),
    ],
)
def test_flash_attn_runs_only_where_it_works(capability, dtype, head_dim, version, problem):
    assert model.flash_attn_problem(capability, dtype, head_dim, version) == problem


def test_each_refusal_is_said_once_and_compiles_to_a_constant(monkeypatch, capsys):
    """use_flash_attn asks the device once per (device, dtype, head_dim) and says a "no" once; torch.compile calls it
    while tracing and keeps its answer in the graph, without a graph break."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or (7, 5))
    monkeypatch.setattr(model, "flash_attn_version", "2.8.3")
    monkeypatch.setattr(model, "flash_attn_verdicts", {})
    device = torch.device("cuda", 0)
    assert [model.use_flash_attn(device, torch.float16, 64) for _ in range(3)] == [False] * 3
    assert asked == [device]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "flash-attn not used: this GPU's compute capability is 7.5, below Ampere's 8.0; "
        "attention runs on PyTorch's SDPA"
    ]

    # the same decision inside a compiled function (on a CPU tensor: only the gate's arguments matter here)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))

    def attend(q):
        return q * 2 if model.use_flash_attn(q.device, q.dtype, 64) else q * 3

    explained = torch._dynamo.explain(attend)(torch.ones(2, dtype=torch.bfloat16))
    assert explained.graph_break_count == 0
    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    assert compiled(torch.ones(2, dtype=torch.bfloat16)).tolist() == [2, 2]  # flash-attn's branch
    assert compiled(torch.ones(2)).tolist() == [3, 3]  # fp32: SDPA's branch, said once
    assert "flash-attn not used: it computes in bf16 or fp16, not float32" in capsys.readouterr().err
