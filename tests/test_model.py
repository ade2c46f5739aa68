"""model.py against references: transformers' LlamaForCausalLM, and itself without a KV cache."""

import math

import pytest
import torch

from model import LLaMA, ModelConfig, sample_next

transformers = pytest.importorskip("transformers")


def tiny_pair(tie, n_kv_head, seed=0):
    cfg = ModelConfig(
        vocab_size=96,
        n_layer=3,
        n_head=4,
        n_kv_head=n_kv_head,
        n_embd=64,
        intermediate_size=160,
        block_size=32,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )
    hf_cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = LLaMA(cfg).eval()
    ours.load_state_dict(hf.state_dict())  # strict: every name must match one to one
    return ours, hf


@pytest.mark.parametrize("tie,n_kv_head", [(False, 4), (True, 2), (False, 1)])
def test_logits_match_transformers(tie, n_kv_head):
    ours, hf = tiny_pair(tie, n_kv_head)
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert (ref - got).abs().max().item() < 1e-5


def test_state_dict_names_are_llama_names():
    ours, hf = tiny_pair(False, 2)
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_loss_is_mean_cross_entropy():
    torch.manual_seed(0)
    m = LLaMA(
        ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, intermediate_size=64, block_size=16)
    )
    idx = torch.randint(0, 50, (3, 16))
    tgt = torch.randint(0, 50, (3, 16))
    logits, loss = m(idx, tgt)
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, tgt[..., None]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    # at init every token is about equally likely: loss near ln(vocab)
    assert abs(loss.item() - math.log(50)) < 0.1


def test_kv_cache_generation_equals_full_recompute():
    ours, _ = tiny_pair(False, 2)
    prompt = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    cached = torch.stack(list(ours.generate(prompt, 12, temperature=0)), dim=1)
    seq = prompt
    for _ in range(12):  # greedy decoding recomputing the whole sequence every step, no cache
        logits, _ = ours(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, 7:])


def test_chunked_prefill_matches_single_pass():
    """A prompt fed in two chunks through the cache gives the logits of one full pass."""
    from model import KVCache

    ours, _ = tiny_pair(True, 2)
    idx = torch.randint(0, 96, (1, 15))
    with torch.no_grad():
        full, _ = ours(idx)
        cache = KVCache(ours.config, 1, 15, "cpu", torch.float32)
        a, _ = ours(idx[:, :9], kv_cache=cache)
        b, _ = ours(idx[:, 9:], kv_cache=cache)
    assert (torch.cat([a, b], 1) - full).abs().max().item() < 1e-5


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, 0).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # softmax mass of [3,2,1,0] is about [.64,.24,.09,.03]: top_p=0.7 keeps exactly the first two
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}


def test_param_counts_and_flops():
    cfg = ModelConfig(vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, block_size=16)
    m = LLaMA(cfg)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # q,o + k,v (GQA) + mlp + 2 norms
    assert m.num_params(non_embedding=True) == 2 * per_layer + 32
    assert m.num_params() == 2 * per_layer + 32 + 2 * 100 * 32
    assert m.flops_per_token() == 6 * (2 * per_layer + 32 + 100 * 32) + 12 * 2 * 32 * 16


def test_rope_halves_equal_rotate_half_bit_for_bit():
    """apply_rope written per half gives exactly transformers' x * cos + rotate_half(x) * sin."""
    from model import apply_rope, rope_cache

    cos, sin = rope_cache(16, 10, 10000.0)
    x = torch.randn(2, 10, 3, 16)
    full_cos, full_sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), x * full_cos + rotated * full_sin)


def test_measured_peak_is_a_positive_rate():
    from common import measure_peak_flops

    peak = measure_peak_flops(torch.float32, "cpu", seconds=0.1)
    assert math.isfinite(peak) and peak > 1e8  # any CPU does 0.1 GFLOP/s


def test_keep_returns_the_logits_of_the_kept_positions():
    ours, _ = tiny_pair(False, 2)
    idx = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[0, 3], keep[1, 7:] = True, True
    with torch.no_grad():
        full, _ = ours(idx)
        kept, _ = ours(idx, keep=keep)
        none, _ = ours(idx, keep=torch.zeros_like(keep))
    assert kept.shape == (3, 96) and none.shape == (0, 96)
    assert (kept - full[keep]).abs().max() < 1e-5  # a matmul over fewer rows may round differently
