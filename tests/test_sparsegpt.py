"""SparseGPT: agreement with the reference algorithm (IST-DASLab/sparsegpt, re-derived below), a
hand-computed OBS case, and the ``atv`` calibration pool for its Hessian."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlmprune as vp
from vlmprune.models import get_adapter
from vlmprune.models.tiny import build_tiny
from vlmprune.weights.sequential import BlockContext, capture_inputs, prune
from vlmprune.weights.sparsegpt import sparsegpt_weight
from vlmprune.weights.statistics import Hessian, pooled_statistics


def reference_sparsegpt(weight, hessian, sparsity=0.0, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01,
                        inclusive=True):
    """The reference algorithm written out plainly, in float64: after zeroing dead inputs and damping ``H`` by
    ``percdamp`` of its mean diagonal, take ``U`` upper with ``H^-1 = U^T U``. Column by column,
    a pruned weight's error ``w_j / U_jj`` is subtracted along row ``j`` of ``U`` from every
    column to its right at once (no lazy batching). Unstructured masks are set at the start of each
    ``blocksize`` run of columns from ``w^2 / U_jj^2``: the reference prunes every saliency ``<=``
    the sorted saliencies' value at index ``floor(numel * sparsity)`` (``inclusive``), else
    exactly that many lowest. ``prune_n`` of every ``prune_m`` columns are pruned per row, chosen
    when the run's first column is reached, from the weights as updated so far."""
    W = weight.double().clone()
    H = hessian.double().clone()
    cols = W.shape[1]
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if prune_n == 0 and j % blocksize == 0:
            block = slice(j, min(j + blocksize, cols))
            saliency = W[:, block] ** 2 / U.diagonal()[block] ** 2
            threshold = saliency.flatten().sort().values[int(saliency.numel() * sparsity)]
            mask[:, block] = saliency <= threshold if inclusive else saliency < threshold
        if prune_n and (j % blocksize) % prune_m == 0:
            saliency = W[:, j:j + prune_m] ** 2 / U.diagonal()[j:j + prune_m] ** 2
            lowest = saliency.argsort(dim=1)[:, :prune_n]
            mask[:, j:j + prune_m] = torch.zeros_like(saliency, dtype=torch.bool).scatter(1, lowest, True)
        error = torch.where(mask[:, j], W[:, j], 0.0) / U[j, j]
        W[:, j:] -= error[:, None] * U[j, j:][None, :]
        W[mask[:, j], j] = 0.0
    return W.float()


def random_problem(rows, cols, seed, dead=()):
    """Weights and a correlated calibration Hessian ``2/n X^T X``; ``dead`` inputs are always 0."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(3 * cols, cols, generator=gen) @ (torch.randn(cols, cols, generator=gen) * 0.3 + torch.eye(cols))
    x[:, list(dead)] = 0
    return weight, 2 * x.T @ x / x.shape[0]


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows, cols, blocksize, dead", [(24, 96, 32, ()), (40, 80, 32, (5, 70)), (16, 64, 128, (0,))])
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_n_m_agrees_with_reference(rows, cols, blocksize, dead, pattern):
    weight, hessian = random_problem(rows, cols, seed=cols, dead=dead)
    n, m = pattern
    ours = sparsegpt_weight(weight, hessian, 1 - n / m, pattern, blocksize=blocksize)
    theirs = reference_sparsegpt(weight, hessian, prune_n=m - n, prune_m=m, blocksize=blocksize)
    assert torch.equal(ours == 0, theirs == 0)
    assert relative(ours, theirs) < 1e-5
    assert relative(ours, weight.masked_fill(ours == 0, 0)) > 0.05      # the update moved the kept weights


@pytest.mark.parametrize("rows, cols, blocksize, dead", [(24, 96, 32, ()), (40, 80, 32, (5, 70)), (16, 64, 128, (0,))])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_agrees_with_reference_up_to_its_threshold(rows, cols, blocksize, dead, sparsity):
    """Pruning exactly ``floor(sparsity * numel)`` per block, the engine is the reference; the
    reference's ``<=`` threshold prunes one weight more per block (no ties in random data), which
    is the whole of the difference seen beside it."""
    weight, hessian = random_problem(rows, cols, seed=cols + 1, dead=dead)
    ours = sparsegpt_weight(weight, hessian, sparsity, None, blocksize=blocksize)
    exact = reference_sparsegpt(weight, hessian, sparsity, blocksize=blocksize, inclusive=False)
    assert torch.equal(ours == 0, exact == 0)
    assert relative(ours, exact) < 1e-5
    blocks = math.ceil(cols / blocksize)
    per_block = sum(int(rows * min(blocksize, cols - b) * sparsity) for b in range(0, cols, blocksize))
    assert int((ours == 0).sum()) == per_block
    theirs = reference_sparsegpt(weight, hessian, sparsity, blocksize=blocksize)
    assert int((theirs == 0).sum()) == per_block + blocks
    first = slice(0, min(blocksize, cols))
    assert int(((ours == 0) != (theirs == 0))[:, first].sum()) == 1


def test_hessian_scale_cancels():
    """The reference divides ``sum x x^T`` by the number of sequences, the engine by the number of
    tokens: a constant factor, which the relative damping, the mask and the update all cancel."""
    weight, hessian = random_problem(16, 64, seed=3)
    for pattern, sparsity in ((None, 0.5), ((2, 4), 0.5)):
        base = sparsegpt_weight(weight, hessian, sparsity, pattern, blocksize=32)
        scaled = sparsegpt_weight(weight, 37.0 * hessian, sparsity, pattern, blocksize=32)
        assert torch.equal(base == 0, scaled == 0)
        assert relative(scaled, base) < 1e-5


def test_zero_sparsity_keeps_every_weight():
    weight, hessian = random_problem(8, 32, seed=4)
    assert torch.allclose(sparsegpt_weight(weight, hessian, 0.0, None, blocksize=16), weight, atol=1e-6)


# Hand case: 2x4 weights, 4x4 Hessian, one block. ``[H_{j:,j:}^-1]_00`` is what the Cholesky
# diagonal of ``H^-1`` squares to; OBS removes w_q and moves the later weights by
# ``-w_q / [H_{q:,q:}^-1]_00 * [H_{q:,q:}^-1]_{0,:}``.
HAND_H = torch.tensor([[4.0, 2.0, 0.0, 0.0], [2.0, 3.0, 1.0, 0.0], [0.0, 1.0, 2.0, 0.5], [0.0, 0.0, 0.5, 1.0]],
                      dtype=torch.float64)
HAND_W = torch.tensor([[1.0, 0.45, 0.9, 0.6], [0.3, 1.2, -0.35, 0.5]], dtype=torch.float64)


def test_hand_computed_obs_case():
    damped = HAND_H + 0.01 * 2.5 * torch.eye(4, dtype=torch.float64)        # mean diagonal (4+3+2+1)/4
    trailing_inverse = [torch.linalg.inv(damped[j:, j:]) for j in range(4)]
    d = torch.tensor([inv[0, 0] for inv in trailing_inverse], dtype=torch.float64)
    saliency = HAND_W ** 2 / d
    # d = [0.4164, 0.4059, 0.5615, 0.9756]: saliencies [[2.40, 0.499, 1.44, 0.369], [0.216, 3.55, 0.218, 0.256]];
    # the 4 lowest of the block go; magnitude alone (0.2025 at [0, 1] below 0.36 at [0, 3]) and w^2 / sqrt(d)
    # (0.318 below 0.364) would prune [0, 1] instead
    expected_mask = torch.tensor([[False, False, False, True], [True, False, True, True]])
    assert torch.equal(saliency <= saliency.flatten().sort().values[3], expected_mask)
    expected = HAND_W.clone()
    for row in range(2):
        for q in range(4):
            if expected_mask[row, q]:
                inv = trailing_inverse[q]
                expected[row, q:] -= expected[row, q] / inv[0, 0] * inv[0, :]
    # the one kept weight that moves: pruning w[1, 0] re-fits the rest by least squares, + w_0 H_{0,1:} H_{1:,1:}^-1
    refit = 0.3 * damped[0, 1:] @ torch.linalg.inv(damped[1:, 1:])
    assert expected[1, 1] == pytest.approx(1.2 + refit[0].item(), abs=1e-12)
    got = sparsegpt_weight(HAND_W.float(), HAND_H.float(), 0.5, None, blocksize=4)
    assert torch.equal(got == 0, expected_mask)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert not torch.allclose(got.double(), HAND_W.masked_fill(expected_mask, 0), atol=1e-2)


@pytest.fixture(scope="module")
def tiny_block():
    """Block 0 of a tiny LLaVA with three calibration samples, as the engine presents it."""
    model, make = build_tiny("llava", seed=0)
    calibration = [make(text_lens=(12 + 3 * s,), seed=s) for s in range(3)]
    adapter = get_adapter(model)
    inputs = capture_inputs(model, adapter, calibration, torch.device("cpu"))
    block = adapter.llm_layers[0]
    linears = {"q_proj": block.self_attn.q_proj, "down_proj": block.mlp.down_proj}
    return BlockContext(0, block, linears, inputs, adapter.llm.config, torch.device("cpu")), calibration


@torch.no_grad()
def test_atv_pool_hessian_is_xtx_over_atv_tokens(tiny_block):
    ctx, _ = tiny_block
    block = ctx.block
    seen = {}
    handle = block.mlp.down_proj.register_forward_hook(lambda _m, args, _o: seen.update(down=args[0][0]))
    outputs, down_inputs = [], []
    try:
        for i in range(ctx.n_samples):
            outputs.append(ctx.forward(i)[0])
            down_inputs.append(seen["down"])
    finally:
        handle.remove()
    # ATV by hand: drift 1 - cos(in, out) of visual tokens, sbar over all of them, K_n = round(sbar * N_text)
    drifts = [1 - F.cosine_similarity(ctx.hidden(i)[ctx.visual(i)], outputs[i][ctx.visual(i)], dim=-1)
              for i in range(ctx.n_samples)]
    sbar = float(torch.cat(drifts).mean())
    selected = []
    for i, s in enumerate(drifts):
        visual = ctx.visual(i)
        k = min(int(visual.sum()), math.floor(min(1.0, sbar) * int((~visual).sum()) + 0.5))
        assert 0 < k < int(visual.sum())                          # a real choice among the visual tokens
        keep = ~visual
        keep[visual.nonzero().flatten()[s.argsort(descending=True)[:k]]] = True
        selected.append(keep)
    q_inputs = [block.input_layernorm(ctx.hidden(i)) for i in range(ctx.n_samples)]
    hessians = pooled_statistics(ctx, Hessian, "atv")
    for name, xs in (("q_proj", q_inputs), ("down_proj", down_inputs)):
        x = torch.cat([xi[keep] for xi, keep in zip(xs, selected)])
        expected = 2 * x.T @ x / x.shape[0]
        assert hessians[name].tokens == x.shape[0]
        assert torch.allclose(hessians[name].value, expected, rtol=1e-4, atol=1e-5)


def test_wanda_over_atv_pool_is_atv(tiny_block):
    """The pool is ATV's own selection: Wanda's statistics over it give ATV's masks."""
    _, calibration = tiny_block
    masks = {}
    for spec in ("atv:sparsity=0.5", "wanda:sparsity=0.5,pool=atv", "wanda:sparsity=0.5"):
        model, _ = build_tiny("llava", seed=0)
        prune(model, vp.weights.from_spec(spec), calibration=calibration, targets=[r"layers\.[01]\."])
        layers = get_adapter(model).llm_layers[:2]
        masks[spec] = [m.weight == 0 for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.equal(a, b) for a, b in zip(masks["atv:sparsity=0.5"], masks["wanda:sparsity=0.5,pool=atv"]))
    assert not all(torch.equal(a, b) for a, b in zip(masks["atv:sparsity=0.5"], masks["wanda:sparsity=0.5"]))


def test_sparsegpt_atv_pool_runs_and_records_pool(tiny_block):
    _, calibration = tiny_block
    model, _ = build_tiny("llava", seed=0)
    report = prune(model, vp.weights.from_spec("sparsegpt:sparsity=0.5,pool=atv"), calibration=calibration,
                   targets=[r"layers\.0\."])
    assert report.method["pool"] == "atv"
    assert report.sparsity == pytest.approx(0.5)
