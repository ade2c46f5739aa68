"""common.py: the compute dtype rule with the device's capabilities mocked each way, and MFU's peak."""

import pytest
import torch

import common

NO_BF16 = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False, "amx_tile": False}


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU reports: cpu(capability, **flags)."""

    def set_cpu(capability, **flags):
        monkeypatch.delenv("MTLM_AUTO_DTYPE", raising=False)  # the rule itself, not a forced choice
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_BF16 | flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)

    return set_cpu


@pytest.fixture
def gpu(monkeypatch):
    """Set the GPU's name and whether it has bf16: gpu(name, bf16)."""

    def set_gpu(name, bf16):
        monkeypatch.delenv("MTLM_AUTO_DTYPE", raising=False)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)

    return set_gpu


@pytest.mark.parametrize(
    "flags,capability,dtype,reason",
    [
        (
            {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx512_f": True},
            "AVX512",
            "bfloat16",
            "this CPU has AMX",
        ),
        ({"avx512_bf16": True, "avx512_f": True}, "AVX512", "bfloat16", "this CPU has AVX-512 BF16"),
        (
            {"avx512_f": True},
            "AVX512",
            "float32",
            "this CPU has no native bf16: AVX512",
        ),  # AVX-512 without BF16 (Skylake)
        ({}, "AVX2", "float32", "this CPU has no native bf16: AVX2"),
    ],
)
def test_cpu_rule(cpu, flags, capability, dtype, reason):
    cpu(capability, **flags)
    assert common.auto_dtype("cpu") == (dtype, reason)


def test_gpu_rule(gpu):
    gpu("NVIDIA H200", bf16=True)
    assert common.auto_dtype("cuda") == ("bfloat16", "NVIDIA H200 computes bf16")
    gpu("Tesla V100-SXM2-16GB", bf16=False)
    assert common.auto_dtype("cuda:0") == ("float16", "Tesla V100-SXM2-16GB has no bf16: fp16 with the grad scaler")


def test_resolve_says_its_choice_once_and_explicit_wins(cpu, capsys):
    cpu("AVX2")
    assert common.resolve_dtype("auto", "cpu") == "float32"
    assert capsys.readouterr().err == "dtype auto -> float32 (this CPU has no native bf16: AVX2)\n"
    for dtype in ("float32", "bfloat16", "float16"):  # an explicit dtype is taken as given, silently
        assert common.resolve_dtype(dtype, "cpu") == dtype
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16, float16, got 'bf16'"):
        common.resolve_dtype("bf16", "cpu")


def test_the_environment_can_force_auto_s_choice(cpu, gpu, monkeypatch, capsys):
    """MTLM_AUTO_DTYPE makes auto choose as another host kind would, on CPU and GPU alike; an explicit dtype wins."""
    cpu("AVX2")
    gpu("Tesla V100-SXM2-16GB", bf16=False)
    for name in ("bfloat16", "float32", "float16"):
        monkeypatch.setenv("MTLM_AUTO_DTYPE", name)
        assert (
            common.auto_dtype("cpu")
            == common.auto_dtype("cuda")
            == (name, f"MTLM_AUTO_DTYPE={name} in the environment")
        )
    monkeypatch.setenv("MTLM_AUTO_DTYPE", "bfloat16")
    assert common.resolve_dtype("auto", "cpu") == "bfloat16" and common.resolve_dtype("float32", "cpu") == "float32"
    assert capsys.readouterr().err == "dtype auto -> bfloat16 (MTLM_AUTO_DTYPE=bfloat16 in the environment)\n"
    monkeypatch.setenv("MTLM_AUTO_DTYPE", "bf16")
    with pytest.raises(ValueError, match="MTLM_AUTO_DTYPE must be one of float32, bfloat16, float16, got 'bf16'"):
        common.resolve_dtype("auto", "cpu")


def test_train_py_runs_in_the_rules_dtype(pydocs_data, tmp_path):
    """train.py's default dtype is the rule's: on this CPU whatever auto_dtype says, recorded in the checkpoint."""
    from conftest import TINY, run_here

    args = [a for a in TINY if not a.startswith("--dtype")]
    proc = run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path}",
        *args,
        "--max_iters=1",
        "--lr_decay_iters=1",
        "--eval_interval=1",
    )
    dtype, reason = common.auto_dtype("cpu")
    assert f"dtype auto -> {dtype} ({reason})" in proc.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["dtype"] == dtype


def test_datasheet_peaks():
    assert common.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert common.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert common.datasheet_peak("NVIDIA H100 NVL") == 835e12
    assert common.datasheet_peak("NVIDIA H200") == 989e12
    assert common.datasheet_peak("NVIDIA A100-SXM4-80GB") == common.datasheet_peak("NVIDIA A100 80GB PCIe") == 312e12
    assert common.datasheet_peak("NVIDIA A10") == 125e12
    assert common.datasheet_peak("NVIDIA A10G") is None  # not an A10 (nor an A100): unknown, so measured
    assert common.datasheet_peak("NVIDIA L4") == 121e12 and common.datasheet_peak("NVIDIA L40S") == 362e12
    assert common.datasheet_peak("Tesla T4") == 65e12
    assert common.datasheet_peak("NVIDIA GeForce RTX 3060") is None


def test_mfu_peak_datasheet_on_known_gpus_measured_elsewhere(gpu, monkeypatch):
    monkeypatch.setattr(common, "measure_peak_flops", lambda dtype, device: 700e12 if device.type == "cuda" else 5e10)
    gpu("NVIDIA H200", bf16=True)
    assert common.mfu_peak("bfloat16", "cuda") == (989e12, 700e12, "NVIDIA H200's datasheet dense bf16 peak")
    gpu("NVIDIA GeForce RTX 3060", bf16=True)
    peak, measured, what = common.mfu_peak("bfloat16", "cuda")
    assert peak == measured == 700e12 and "RTX 3060 is not in common.DATASHEET_PEAKS" in what
    assert common.mfu_peak("float32", "cpu") == (5e10, 5e10, "the measured float32 matmul peak")
