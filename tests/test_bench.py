"""bench.py runs the training step of a config and prints one table row per mode (figures, never asserted)."""

import bench


def test_bench_prints_a_row_per_mode(tmp_path, capsys):
    config = tmp_path / "small.py"
    config.write_text(
        "n_layer = 2\nn_head = 2\nn_kv_head = 1\nn_embd = 32\nintermediate_size = 64\n"
        "block_size = 16\nbatch_size = 2\nout_dir = 'ignored'\n"
    )
    bench.main([str(config), "--vocab_size", "64", "--modes", "fp32,bf16", "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr()
    rows = [line.split("|")[1:-1] for line in out.out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["fp32", "bf16"]
    assert all(float(r[1].replace(",", "")) > 0 and r[4].strip().endswith("%") for r in rows)
    assert "2 layers x 32, vocab 64" in out.err


def test_bench_refuses_unknown_modes(capsys):
    import pytest

    for modes in ("fp8", "bf16+fast", ","):
        with pytest.raises(SystemExit):
            bench.main(["--modes", modes])
        assert "--modes takes" in capsys.readouterr().err


def test_auto_mode_is_the_dtype_train_py_would_choose():
    from common import auto_dtype

    assert bench.parse_mode("auto", "cpu") == (auto_dtype("cpu")[0], False)
    assert bench.parse_mode("auto+compile", "cpu") == (auto_dtype("cpu")[0], True)
    assert bench.parse_mode("fp16", "cpu") == ("float16", False)


def test_params_are_counted_by_hand(tmp_path, capsys):
    config = tmp_path / "small.py"
    config.write_text("n_layer = 2\nn_head = 2\nn_kv_head = 1\nn_embd = 32\nintermediate_size = 64\nblock_size = 16\n")
    bench.main([str(config), "--vocab_size", "64", "--params"])
    # per layer: q, o 32x32; k, v 32x16 (one kv head of 16); SwiGLU 3 x 32x64; two RMSNorm gains of 32
    layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    total = 64 * 32 + 2 * layer + 32 + 64 * 32  # embedding, layers, final norm, untied lm_head
    flops = 6 * (total - 64 * 32) + 12 * 2 * 32 * 16  # 6 per matmul weight (the lookup is none) + attention (PaLM)
    assert capsys.readouterr().out == (
        f"2 layers x 32, vocab 64: {total:,} parameters ({total - 2 * 64 * 32:,} "
        f"non-embedding), {flops:,} training FLOPs per token at 16 tokens of context\n"
    )
