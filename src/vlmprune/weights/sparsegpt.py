"""SparseGPT: prune with the inverse-Hessian saliency ``W^2 / diag(Hinv)^2`` and spread each
pruned column's error over the columns still to come (Frantar & Alistarh, 2023).

The algorithm is the reference implementation's (IST-DASLab/sparsegpt): dead inputs zeroed,
damping by ``percdamp`` of the mean diagonal, ``Hinv`` as the upper Cholesky factor of ``H^-1``,
masks chosen per ``blocksize`` run of columns, lazy updates of the columns after a run; N:M
masks and weights agree with it (``tests/test_sparsegpt.py``). One deliberate difference: an
unstructured run prunes exactly ``floor(sparsity * numel)`` weights, where the reference prunes
every saliency ``<=`` the sorted value at that index, one weight more per run (and one per run
even at sparsity 0). That extra weight moves its row's later columns, so the weights differ by
up to about 2% in relative norm, while the exact count keeps the sparsity asked for and reconstructs
slightly better. The scale of ``H`` cancels out (the reference divides by sequences, ``Hessian``
by tokens)."""
from __future__ import annotations

import torch

from .base import PooledMethod
from .masks import Pattern
from .statistics import Hessian, pooled_statistics


@torch.no_grad()
def sparsegpt_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern | None,
                     blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The pruned and error-compensated weight (float32, same shape); pruned entries are 0."""
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if pattern is not None:
        blocksize = max(pattern[1], blocksize - blocksize % pattern[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            saliency = (W1 ** 2 / diag[None, :] ** 2).flatten()
            count = int(saliency.numel() * sparsity)
            if count:
                mask1.view(-1)[torch.topk(saliency, count, largest=False).indices] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                saliency = W1[:, i:i + m] ** 2 / diag[None, i:i + m] ** 2
                mask1.scatter_(1, i + torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


class SparseGPT(PooledMethod):
    """``pool`` picks the tokens ``H`` sums over; ``pool=atv`` takes ATV-Pruning's selection (every text
    token and each block's most drifting visual tokens) at the cost of one more dense pass per block."""

    name = "sparsegpt"

    def __init__(self, sparsity: float | None = None, pattern=None, pool: str = "mixed", blocksize: int = 128,
                 percdamp: float = 0.01):
        super().__init__(sparsity, pattern, pool)
        self.blocksize = int(blocksize)
        self.percdamp = float(percdamp)

    def prune_block(self, ctx) -> None:
        hessians = pooled_statistics(ctx, Hessian, self.pool)
        for name, linear in ctx.linears.items():
            pruned = sparsegpt_weight(linear.weight, hessians[name].value, self.layer_sparsity(name), self.pattern,
                                      self.blocksize, self.percdamp)
            linear.weight.data.copy_(pruned.to(linear.weight.dtype))
