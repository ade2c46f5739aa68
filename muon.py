"""
Muon for the blocks' matrices and AdamW for everything else, in one torch optimizer (train.py's `muon = True`).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; the modded-nanogpt speedrun and
nanochat train with it) keeps SGD momentum for each matrix and replaces the update by the nearest semi-orthogonal
matrix, U V^T of its SVD, approximated by five Newton-Schulz iterations. A raw gradient of a transformer matrix is
dominated by a few directions; the orthogonalized one moves the weights along every direction it has by about as
much, which is what lets the rare directions learn. It is defined for matrices only: the embedding (also the tied
lm_head) and the RMSNorm gains stay with AdamW, as in the speedrun.

The update is scaled by 0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical AdamW update (Liu et al.
2025, "Muon is Scalable for LLM Training"), so one learning rate, schedule and weight decay serve both kinds of
group. On the quick start's 4 x 96 model it ended phase 1 (2.5M tokens) at 1.703 bits per byte where AdamW ended at
1.837; its Newton-Schulz cost ~20 ms of that model's ~115 ms step on 2 AVX2 cores at f677f9d (docs/performance.md),
0.86x that in fp32 since tall matrices are batched with the wide ones (one thread, AVX-512 BF16 host, 6f7b384).

One optimizer rather than two keeps what the rest of train.py relies on: one state dict (a resume restores it), one
list of param_groups (the schedule sets each group's lr), one GradScaler.step. State per parameter: Muon's
"momentum_buffer", or AdamW's "step", "exp_avg", "exp_avg_sq".
"""

import math

import torch

# the quintic's coefficients (Jordan et al.): chosen for the steepest slope at zero, so five steps bring even tiny
# singular values to about 1 (they end in ~0.7-1.2, not exactly 1, which does not hurt the model)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """U V^T of G (or of each matrix of a stack) by Newton-Schulz: X <- aX + (bA + cA^2)X with A = X X^T."""
    a, b, c = NS_COEFFICIENTS
    wide = G.size(-2) <= G.size(-1)
    X = G if wide else G.mT  # iterate on the wide orientation: A is the smaller square
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm: every singular value <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


class MuonAdamW(torch.optim.Optimizer):
    """Groups with muon=True take Muon steps (their params must be matrices), the others AdamW steps.

    ns_dtype: the dtype of the Newton-Schulz matmuls; bf16 where the device computes it natively (the speedrun's
    choice), fp32 elsewhere (on an AVX2 CPU bf16 matmuls run 7-20x slower than fp32)."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8, ns_dtype=torch.float32):
        for group in groups:
            if group.get("muon") and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalizes matrices: a muon group holds a parameter that is not 2-D")
        defaults = dict(lr=lr, weight_decay=0.0, betas=betas, eps=eps, momentum=momentum, muon=False)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group, params):
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        # matrices of one shape are orthogonalized together, one batched matmul instead of a Python loop over layers;
        # a tall matrix joins the wide ones of its size transposed (U V^T of G^T is that of G, transposed): the MLP's
        # up, gate and down projections are one batch (2 Newton-Schulz calls a step for the tiny model instead of 3)
        by_shape = {}
        for p in params:
            by_shape.setdefault(tuple(sorted(p.shape)), []).append(p)
        for shape, ps in by_shape.items():
            grads = [p.grad for p in ps]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            nesterov = [g.lerp(buf, momentum) for g, buf in zip(grads, bufs)]
            tall = [p.size(0) > p.size(1) for p in ps]
            nesterov = torch.stack([n.mT if t else n for n, t in zip(nesterov, tall)])
            update = orthogonalize(nesterov.to(self.ns_dtype)).to(ps[0].dtype)
            updates = [u.mT if t else u for u, t in zip(update.unbind(0), tall)]
            torch._foreach_mul_(ps, 1 - lr * wd)  # decoupled weight decay, as AdamW's
            torch._foreach_add_(ps, updates, alpha=-lr * 0.2 * math.sqrt(max(shape)))

    def _adamw(self, group, params):
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                # the step a CPU tensor, as torch's AdamW keeps it: every state value is a tensor
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"].item()
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
