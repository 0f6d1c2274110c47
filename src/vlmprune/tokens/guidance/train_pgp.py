"""Training PGP's guide on toy QA (METHODS.md 2.2): only the LoRA adapters and the bottleneck learn;
the large model takes no part.

Each step runs two passes over a batch laid out prompt, then image, then answer (:func:`pgp.image_last`):
pass 1 reads the final visual states ``V'`` and their ``KL_i``; pass 2 puts samples
``Z_i = mu_i + sigma_i * eps`` where the visual token embeddings were and takes the answer
cross-entropy. Loss = CE + (beta / m) * sum_i KL_i over the m visual tokens, averaged over the batch;
beta falls linearly from ``tau_max`` to ``tau_min`` over the first ``gamma`` of the steps.

Scaled to the toy world (the seed's settings are for a 2B guide and days of GPU time): batch 16
without gradient accumulation (the seed: 16 x 11), learning rate 1e-3 instead of 5e-5 (a few hundred
steps, the bottleneck from scratch); LoRA rank 32, alpha 64, AdamW with weight decay 0.01 as in the
seed. Two recipes (:data:`RECIPES`):

* ``shipped`` (the default; the guide in ``toyworld/checkpoints/toy-small-pgp``): 400 steps, the
  schedule exactly as specified from step 0. Its posteriors collapse onto the prior within ~30 steps
  (KL from ~160 nats per token at step 0 to below 1, CE stuck at 1.1-1.6): pass 2 feeds final hidden
  states where input embeddings were, which the untrained LoRA cannot read yet (CE 2.6 with them at
  step 0), so both terms push toward the prior. What is left is a faint, nearly flat KL map
  (effective width 93-97 of 100 tokens).
* ``uncollapsed``: 2000 steps (23 minutes on one shared CPU thread); ``warmup`` = 10% of the steps at
  beta = 0 (with it the LoRA reads the sampled states within ~60 steps), then the specified schedule
  (0.5 -> 0.2 over the next ``gamma``, then constant); the prior starts at the per-channel mean and
  standard deviation of a first batch's visual states; the visual tokens apart where ``V'`` is read
  (``PGPSettings.apart``). It still collapses when beta starts, then recovers CE (0.56-0.90) with a
  sparse KL map (0.004-0.015 nats per token), but the large model keeps worse tokens by it
  (docs/RESULTS.md), so the shipped guide is the ``shipped`` recipe's.
"""
from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import VlmpruneError
from ...progress import progress as report_progress
from ..scorers import gather_tokens
from .pairing import load_small, visual_positions
from .pgp import PGPGuide, PGPSettings, image_last, visual_tokens_apart

CURVE = "train_curve.json"
LOG_EVERY = 10


@dataclass
class PGPTraining:
    steps: int = 400
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    tau_max: float = 0.5
    tau_min: float = 0.2
    gamma: float = 0.2
    warmup: float = 0.0
    init_prior: bool = False
    apart: bool = False


RECIPES = {"shipped": PGPTraining(),
           "uncollapsed": PGPTraining(steps=2000, warmup=0.1, init_prior=True, apart=True)}


def beta_at(step: int, total: int, tau_max: float = 0.5, tau_min: float = 0.2, gamma: float = 0.2,
            warmup: float = 0.0) -> float:
    """The KL weight at ``step`` (0-based) of ``total``: 0 over the first ``warmup * total`` steps, then
    linear from tau_max to tau_min over the next ``gamma * total`` steps, then tau_min."""
    start = warmup * total
    if step < start:
        return 0.0
    ramp = gamma * total
    if ramp <= 0:
        return tau_min
    return tau_max - (tau_max - tau_min) * min(1.0, (step - start) / ramp)


def qa_batch(processor, small, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    """``size`` fresh toy QA items (the training generator, never the test split) as image-last prompts
    followed by the answer and ``</s>``, right-padded, with labels on the answer only."""
    from ...toyworld import TASKS, build_prompt
    from ...toyworld.tasks import TEST_OBJECTS, sample_item
    from ...toyworld.train import pixel_values

    tokenizer = processor.tokenizer
    items = [sample_item(rng.choice(TASKS), rng, rng.randint(*TEST_OBJECTS)) for _ in range(size)]
    rows, labels = [], []
    for item in items:
        prompt = processor(text=[build_prompt(processor, item.question)], images=[item.image], return_tensors="pt")
        ordered = image_last(small, {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]})
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ordered["input_ids"][0].tolist()
        rows.append(ids + answer)
        labels.append([-100] * len(ids) + answer)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
            "pixel_values": pixel_values([item.image for item in items])}


def _pass_one(guide: PGPGuide, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual positions (B, m) and final visual states (B, m, D) of the batch's image-last rows."""
    visual = visual_positions(guide.small, batch["input_ids"])
    with visual_tokens_apart(guide.small, batch) if guide.settings.apart else nullcontext():
        out = guide.small(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], output_hidden_states=True, use_cache=False)
    return visual, gather_tokens(out.hidden_states[-1], visual)


@torch.no_grad()
def init_prior(guide: PGPGuide, batch: dict[str, torch.Tensor]) -> None:
    """The prior at the per-channel mean and standard deviation of ``batch``'s final visual states."""
    states = _pass_one(guide, batch)[1].flatten(0, 1)
    guide.bottleneck.prior_mu.copy_(states.mean(0))
    guide.bottleneck.prior_log_sigma.copy_(states.std(0).clamp_min(1e-3).log())


def pgp_losses(guide: PGPGuide, batch: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """The two passes of one step: ``{"ce", "kl", "loss"}`` (kl: mean over tokens and batch)."""
    small = guide.small
    visual, states = _pass_one(guide, batch)
    mu, sigma = guide.bottleneck(states)
    kl = guide.bottleneck.kl(mu, sigma)                                        # (B, m)
    sample = mu + sigma * torch.randn_like(sigma)
    embeds = small.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.scatter(1, visual[..., None].expand_as(sample), sample.to(embeds.dtype))
    logits = small(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    kl_term = kl.sum(1).mean() / kl.shape[1]
    return {"ce": ce, "kl": kl_term, "loss": ce + beta * kl_term}


def train_pgp(out: str, base: str = "toy-small", training: PGPTraining | None = None, seed: int = 0,
              threads: int = 1, settings: PGPSettings | None = None, progress: bool = True) -> PGPGuide:
    """Train a guide on ``base`` (a toy small model) and save it to ``out`` (fp16 adapters and module)."""
    from ...toyworld import load

    training = training or PGPTraining()
    if training.steps < 1 or training.batch < 1 or not training.lr > 0:
        raise VlmpruneError(f"train-pgp needs steps >= 1, batch >= 1 and lr > 0; got {training}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    _, processor = load(base)  # the toy processor: training items come from the toy world
    guide = PGPGuide(load_small(base), settings or PGPSettings(base=base, apart=training.apart))
    guide.small.requires_grad_(False)
    params = guide.adapter_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    rng = random.Random(f"vlmprune-pgp-train-{seed}")
    if training.init_prior:
        init_prior(guide, qa_batch(processor, guide.small, rng, training.batch))
    guide.train()
    started = time.time()
    curve = []   # (step, beta, ce, kl) every LOG_EVERY steps, saved beside the guide
    for step in report_progress(range(training.steps), desc="train-pgp", unit="step", enabled=progress):
        beta = beta_at(step, training.steps, training.tau_max, training.tau_min, training.gamma, training.warmup)
        losses = pgp_losses(guide, qa_batch(processor, guide.small, rng, training.batch), beta)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        if step % LOG_EVERY == 0 or step == training.steps - 1:
            curve.append([step, beta, round(losses["ce"].item(), 4), round(losses["kl"].item(), 4)])
    guide.eval()
    guide.save(out)
    (Path(out) / CURVE).write_text(json.dumps({"training": asdict(training), "seed": seed,
                                               "columns": ["step", "beta", "ce", "kl"], "rows": curve}) + "\n")
    if progress:
        print(f"train-pgp: {training.steps} steps in {(time.time() - started) / 60:.1f} min -> {out}", flush=True)
    return guide
