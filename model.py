"""
A Llama-style decoder in one file, written to be read top to bottom.

    tokens -> embedding -> n_layer x [ x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x)) ] -> RMSNorm -> lm_head

It learns next-token prediction: at each position t it scores (a logit per vocabulary entry) which token comes at
t + 1, having seen tokens 0..t only, and training lowers the cross-entropy of the true next token (LLaMA.forward).
x, the vector each position carries from block to block, is the residual stream: each block adds its output to it.

References: Llama (Touvron et al., 2023), RMSNorm (Zhang & Sennrich, 2019), SwiGLU (Shazeer, 2020),
RoPE (Su et al., 2021), grouped-query attention (Ainslie et al., 2023).

Parameter names and conventions match transformers' LlamaForCausalLM one to one (RoPE in the
"rotate half" layout, RMSNorm computed in fp32, no biases), so a state dict moves between the two
unchanged: export_hf.py and hf: imports are a copy, not a translation. Training reads first; what only decoding and
scoring use (the KV cache, a faster one-token matmul, sampling) is at the bottom, under "Inference".
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import log
from muon import MuonAdamW

try:  # FlashAttention 2 (Dao, 2023), used where it works (flash_attn_problem); never required
    from flash_attn import __version__ as flash_attn_version
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func, flash_attn_version = None, None


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12  # < n_head: grouped-query attention; each K/V head serves n_head/n_kv_head queries
    n_embd: int = 768
    intermediate_size: int = 2048  # SwiGLU's hidden width: ~8/3 * n_embd, so 3 matrices cost what GPT's 2 of 4x do
    block_size: int = 1024  # longest sequence the model is trained on (RoPE itself has no hard limit)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with lm_head (saves vocab_size*n_embd params)

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}), "
                f"and n_head by n_kv_head ({self.n_kv_head})"
            )
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head_dim must be even for RoPE")


class RMSNorm(nn.Module):
    """x / rms(x) * weight. No mean subtraction, no bias: cheaper than LayerNorm and as good (Zhang & Sennrich)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 for a bf16 model, as transformers does: the mean of squares loses precision in bf16.
        # In training the residual stream is fp32 (autocast casts only matmul inputs), so both casts are no-ops.
        # F.rms_norm fuses x * rsqrt(mean(x^2) + eps) into one op: fewer dispatches per token when decoding
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_cache(head_dim, max_len, theta, device=None):
    """cos and sin of position * frequency, each (max_len, head_dim/2): one angle per rotated pair."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) by its position's angle: transformers' "rotate half" layout, where pairs
    are the two halves of a head, not adjacent (i, i+1). x: (B, T, H, D); cos/sin: (T, D/2).
    Written out per half, the rotation needs no rotated copy of x (torch.cat((-x2, x1))) and gives the same bits
    as x * cos + rotate_half(x) * sin. Computed in x's dtype, as transformers does."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal self-attention: softmax(Q K^T / sqrt(head_dim) + M) V, where M[i, j] = 0 if j <= i else -inf is the
    causal mask: position i sees tokens 0..i, never the ones it is trained to predict. Q and K are first rotated by
    their positions (RoPE: apply_rope), so Q K^T depends on how far apart two tokens are. n_head heads work side by
    side on head_dim-wide slices; with n_kv_head < n_head (grouped-query attention, GQA) each K/V head serves
    n_head / n_kv_head query heads, a smaller KV cache. Linear: a bias-free nn.Linear (at the bottom)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = Linear(config.n_embd, config.n_head * self.head_dim)
        self.k_proj = Linear(config.n_embd, config.n_kv_head * self.head_dim)
        self.v_proj = Linear(config.n_embd, config.n_kv_head * self.head_dim)
        self.o_proj = Linear(config.n_head * self.head_dim, config.n_embd)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if (
            flash_attn_func is not None
            and q.is_cuda
            and kv_cache is None
            and use_flash_attn(q.device, q.dtype, self.head_dim)
        ):
            # flash-attn takes (B, T, H, D), the layout RoPE was applied in, and handles GQA itself
            return self.o_proj(flash_attn_func(q, k, v, causal=True).reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is None:  # training: the formula above, M implied by is_causal (no mask tensor is built)
            mask, causal = None, True
        else:  # inference: this step's k, v join the cache, and the queries attend to all of it
            mask, causal = kv_cache.mask(T, x.device)
            k, v = kv_cache.update(self.layer_idx, k, v)
        # SDPA picks a fused kernel on a GPU (FlashAttention; cuDNN's on Hopper); enable_gqa shares K/V heads, no copies
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate lets each hidden unit switch itself off smoothly."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.n_embd, config.intermediate_size)
        self.up_proj = Linear(config.n_embd, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: each sublayer reads a normalized copy and adds its output to the stream."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                norm=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE tables are derived, not learned: a non-persistent buffer stays out of the state dict.
        # 2x block_size leaves room for generation past the training length.
        cos, sin = rope_cache(config.n_embd // config.n_head, 2 * config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scheme: every projection that writes into the residual stream (o_proj, down_proj) gets
        # std 0.02/sqrt(2*n_layer), so the stream's variance does not grow with depth at init.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # N(0, 0.02) for every matrix, as GPT-2 and transformers' Llama (initializer_range=0.02); norms start at 1
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None, keep=None):
        """idx: (B, T) token ids -> logits (B, T, vocab): at t, each token's score as the one after idx[:, t]; given
        targets (the next tokens: data.py shifts the stream by one), also their mean cross-entropy in nats per token,
        the training loss. Inference only: with a kv_cache, idx holds the new tokens and the cache the past; keep, a
        (B, T) boolean mask, asks for those positions' logits only, as (n_kept, vocab): scoring a few tokens after a
        long input need not pay for the lm_head everywhere (over a 49k vocabulary it costs several layers' worth)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0  # positions already in the cache
        if start + T > self.rope_cos.size(0):
            raise ValueError(
                f"sequence of {start + T} tokens is longer than this model's RoPE table ({self.rope_cos.size(0)})"
            )
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.model.embed_tokens(idx)  # the residual stream, (B, T, n_embd)
        for block in self.model.layers:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        if keep is not None:
            x = x[keep]
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self, non_embedding=False):
        """Parameter count; non_embedding leaves out the token embedding (and an untied lm_head),
        the convention of Kaplan et al. (2020) for scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's score and value
        matmuls, 12 * n_layer * n_embd * T (PaLM, Chowdhery et al. 2022, appendix B). The embedding lookup
        is not a matmul, so it is left out; the lm_head is one."""
        c = self.config
        T = seq_len or c.block_size
        n_matmul = self.num_params() - self.model.embed_tokens.weight.numel() * (not c.tie_embeddings)
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * T

    # --- optimization -------------------------------------------------------------------------
    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, muon=False, dtype="float32"):
        """AdamW with weight decay on matrices only: norms' gains have no reason to shrink toward zero.
        muon=True: the blocks' matrices take Muon steps instead (muon.py); the embedding and the gains stay AdamW.
        Muon's Newton-Schulz matmuls run in bf16 when the run computes in bf16 (dtype), else in fp32."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if muon:
            blocks = [p for n, p in params if p.dim() == 2 and n.startswith("model.layers.")]
            embed = [p for n, p in params if p.dim() == 2 and not n.startswith("model.layers.")]
            gains = [p for n, p in params if p.dim() < 2]
            groups = [
                {"params": blocks, "weight_decay": weight_decay, "muon": True},
                {"params": embed, "weight_decay": weight_decay},
                {"params": gains, "weight_decay": 0.0},
            ]
            ns_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
            return MuonAdamW(groups, lr=learning_rate, betas=betas, ns_dtype=ns_dtype)
        decay = [p for n, p in params if p.dim() >= 2]
        no_decay = [p for n, p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for the whole update instead of a loop of ~10 ops per tensor (CUDA, and CPUs since 2.4)
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    # --- generation (inference: the KV cache and sample_next are at the bottom) -------------------
    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot_id=None, generator=None):
        """Yield new token ids (a (B,) tensor per step) after the prompt idx (B, T), using a KV cache:
        the prompt is encoded once, then each step feeds only the newest token.
        temperature 0 is greedy; top_k keeps the k likeliest; top_p keeps the smallest set whose mass
        reaches p (nucleus sampling, Holtzman et al. 2019). Stops early when every row emitted eot_id."""
        B, T = idx.shape
        param = next(self.parameters())
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, param.dtype)
        logits, _ = self(idx, kv_cache=cache)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            yield next_id
            if eot_id is not None:
                done |= next_id == eot_id
                if done.all():
                    return
            logits, _ = self(next_id[:, None], kv_cache=cache)


# -----------------------------------------------------------------------------------------------
# flash-attn (Attention's first branch): where it runs. Elsewhere PyTorch's SDPA does, with its own fused kernels.


def flash_attn_problem(capability, dtype, head_dim, version):
    """None if flash-attn runs this attention, else why not. Its kernels need compute capability 8.0 (Ampere) or
    later, bf16 or fp16, and a head_dim that is a multiple of 8 up to 256 (csrc/flash_attn/flash_api.cpp). 2.7.0 made
    them custom ops that torch.compile traces (before, every call broke the graph), and 2.7.3 is the first to run on
    every GPU from Ampere on (2.7.0-2.7.2 refuse all but compute capability 8.x and 9.0: Blackwell among them)."""
    if tuple(int(n) for n in re.findall(r"\d+", version)[:3]) < (2, 7, 3):
        return f"flash-attn {version} is older than 2.7.3"
    if capability < (8, 0):
        return f"this GPU's compute capability is {capability[0]}.{capability[1]}, below Ampere's 8.0"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it computes in bf16 or fp16, not {str(dtype).removeprefix('torch.')}"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 8 up to 256"
    return None


flash_attn_verdicts = {}  # (device, dtype, head_dim) -> whether flash-attn runs it


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing, and the graph keeps its answer
def use_flash_attn(device, dtype, head_dim):
    """Whether flash-attn runs attention on this CUDA device, in this dtype, at this head_dim; each "no" is said once,
    with its reason (PyTorch's SDPA runs it instead, with its own FlashAttention kernel where it can)."""
    key = (device, dtype, head_dim)
    if key not in flash_attn_verdicts:
        problem = flash_attn_problem(torch.cuda.get_device_capability(device), dtype, head_dim, flash_attn_version)
        if problem:
            log(f"flash-attn not used: {problem}; attention runs on PyTorch's SDPA")
        flash_attn_verdicts[key] = problem is None
    return flash_attn_verdicts[key]


# -----------------------------------------------------------------------------------------------
# Inference: decoding (sample.py, generate) and scoring (eval_mc.py). Training uses none of this.


class KVCache:
    """Keys and values of the tokens seen so far, preallocated so decoding never reallocates."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled

    def update(self, layer, k, v):
        """Store this step's k, v for one layer; return all keys and values up to now."""
        T = k.size(2)
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def mask(self, T, device):
        """(attn_mask, is_causal) for T new queries after the pos cached positions."""
        if self.pos == 0:  # the first chunk of a prompt: plain causal attention, as in training
            return None, True
        if T == 1:  # one new token attends to everything cached
            return None, False
        # a chunk after a cached prefix: query i sees keys up to pos + i
        return torch.ones(T, self.pos + T, dtype=torch.bool, device=device).tril(diagonal=self.pos), False


class Linear(nn.Linear):
    """A bias-free nn.Linear with a fast path for decoding one token in bf16 on CPU: PyTorch's
    matrix-vector kernel streams bf16 weights ~1.3-2x faster than the matmul path does for a single
    row (bench_decode.py). Same parameter, same name: the state dict does not change."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if x.numel() == x.size(-1) and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token id per row from (B, vocab) logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # drop a token once the mass before it reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
