"""Retraining mode: instruction fine-tuning with a token method in the loop (IVTP's Table 3 setting).

IVTP trains LLaVA with its pruning active, so the LLM learns from the tokens it will see at test
time. :func:`finetune` does that on the toy world: the batches are the instruct stage's own
multi-turn conversations (``toyworld.train``), the vision tower stays frozen as in LLaVA's
instruction stage, and the method prunes through the engine in every forward. Because the engine
returns logits for the kept tokens only, the next-token loss is taken on the text positions (text
is never pruned, and no visual position carries a label), which equals the model's own loss
when nothing is pruned.

Memory is reported two ways: ``peak_rss_delta_mb``, the growth of the process's peak resident set
(``resource.getrusage(...).ru_maxrss``) over the run, which only means something in a fresh process
that has loaded its model; and ``peak_saved_mb``, the most memory that tensors saved for backward held at
once in any step (tracked through ``torch.autograd.graph.saved_tensors_hooks``, each storage once,
until its graph node is freed), which is the activation memory that token pruning shrinks.
"""
from __future__ import annotations

import random
import resource
import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import VlmpruneError
from ..models import get_adapter
from .base import ModelPlan, Reduction, Site, SiteContext, TokenMethod
from .engine import apply

TRAINABLE = ("llm", "projector+llm")


@dataclass
class FinetuneReport:
    """What one fine-tuning run measured; ``losses``, ``step_seconds`` and ``grad_norms`` per step."""

    method: str | None
    steps: int
    batch_size: int
    lr: float
    trainable: str
    losses: list[float]
    step_seconds: list[float]
    grad_norms: list[float]
    median_step_s: float
    peak_rss_delta_mb: float
    peak_saved_mb: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _PromptGuided(TokenMethod):
    """``method`` as it is, except that its scoring token (IVTP's pseudo-[CLS]) reads the prompt turns
    only: a training conversation also holds the supervised answers, which inference never has."""

    def __init__(self, method: TokenMethod):
        self.method = method
        self.name = method.name
        self.answers: torch.Tensor | None = None     # (B, L) bool, set before every forward

    def sites(self, plan: ModelPlan) -> list[Site]:
        return self.method.sites(plan)

    def recorded_layers(self, site: Site, plan: ModelPlan) -> list[int]:
        return self.method.recorded_layers(site, plan)

    def reduce(self, ctx: SiteContext) -> Reduction:
        return self.method.reduce(ctx)

    def scoring_token(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        prompt_only = inputs["attention_mask"] * (~self.answers).to(inputs["attention_mask"].dtype)
        return self.method.scoring_token(model, {**inputs, "attention_mask": prompt_only})

    def scoring_token_is_real(self) -> bool:
        return self.method.scoring_token_is_real()

    def spec(self) -> str:
        return self.method.spec()


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                image_token_id: int) -> torch.Tensor:
    """Mean next-token loss on the labelled tokens, from logits of a sequence whose visual block may
    have been shortened. Every sample holds one contiguous block of ``n`` image tokens of which the
    engine kept ``k`` in order (plus a real pseudo-[CLS] right after them, counted in ``k``), so the
    text positions of the logits are those outside ``[start, start + k)``; dropping the visual
    positions from both sides leaves every labelled token right after its predecessor (the token
    after the image is prompt, never labelled)."""
    is_image = input_ids == image_token_id
    batch, length = input_ids.shape
    n_text = length - int(is_image[0].sum())
    kept = logits.shape[1] - n_text
    if not 0 < kept <= length - n_text + 1 or bool((labels[is_image] != -100).any()):
        raise VlmpruneError("answer_loss needs one block of image tokens per sample, none of them labelled, "
                            f"and logits for the text plus 1..{length - n_text} kept visual tokens (and a pseudo-[CLS])")
    start = is_image.int().argmax(dim=1, keepdim=True)                     # (B, 1)
    rank = torch.arange(n_text, device=input_ids.device).expand(batch, -1)
    before = rank < start
    text_logits = logits.gather(1, torch.where(before, rank, rank + kept)[..., None].expand(-1, -1, logits.shape[-1]))
    text_labels = labels.gather(1, torch.where(before, rank, rank + (length - n_text)))
    return F.cross_entropy(text_logits[:, :-1].flatten(0, 1).float(), text_labels[:, 1:].flatten(), ignore_index=-100)


class _SavedActivations:
    """Peak bytes of the storages autograd holds for backward (each storage once). A saved tensor
    counts from when it is saved until its graph node is freed, so scoring work whose graph is
    dropped (a top-k selection is not differentiable) stops counting when it is released."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}      # storage address -> saved tensors holding it

    def _pack(self, tensor: torch.Tensor) -> "_Saved":
        storage = tensor.untyped_storage()
        address, size = storage.data_ptr(), storage.nbytes()
        if not self._holders.get(address):
            self.live += size
            self.peak = max(self.peak, self.live)
        self._holders[address] = self._holders.get(address, 0) + 1
        saved = _Saved(tensor)
        weakref.finalize(saved, self._release, address, size)
        return saved

    def _release(self, address: int, size: int) -> None:
        self._holders[address] -= 1
        if not self._holders[address]:
            self.live -= size

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)


class _Saved:
    """What the graph keeps in place of a saved tensor, so its release can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _trainable_parameters(model, trainable: str) -> list[torch.nn.Parameter]:
    """The LLM (with its head), plus the projector for ``projector+llm``; never the vision tower."""
    adapter = get_adapter(model)
    modules = [adapter.llm, adapter.lm_head] + ([adapter.projector] if trainable == "projector+llm" else [])
    params = {id(p): p for module in modules for p in module.parameters()}
    return list(params.values())


def finetune(model, processor, method: TokenMethod | str | None = None, *, steps: int, batch_size: int = 16,
             lr: float = 1e-4, seed: int = 0, trainable: str = "llm") -> FinetuneReport:
    """Fine-tune ``model`` in place (a toy-world LLaVA and its processor) for ``steps`` AdamW steps on
    fresh instruct-stage batches, with ``method`` (an object or a SPEC string) pruning every forward.

    The same ``seed`` gives the same batches whatever the method, so a dense and a pruned run see
    identical data. The step time covers forward (vision tower and scoring included), backward and the
    optimizer step, not building the batch. The model comes back in eval mode with its
    ``requires_grad`` flags restored and the method removed.
    """
    from ..toyworld.scenes import MAX_OBJECTS
    from ..toyworld.train import SequenceBuilder, _lvlm_batch

    if not isinstance(steps, int) or steps <= 0:
        raise VlmpruneError(f"finetune steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VlmpruneError(f"finetune batch_size must be a positive integer, got {batch_size!r}")
    if not lr > 0:
        raise VlmpruneError(f"finetune lr must be positive, got {lr!r}")
    if trainable not in TRAINABLE:
        raise VlmpruneError(f"finetune trainable={trainable!r}; choose one of: {', '.join(TRAINABLE)}")
    if isinstance(method, str):
        from . import from_spec
        method = from_spec(method)
    guided = None if method is None else _PromptGuided(method)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    params = _trainable_parameters(model, trainable)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    builder = SequenceBuilder(processor)
    rng = random.Random(f"vlmprune-finetune-{seed}")
    torch.manual_seed(seed)
    handle = None if guided is None else apply(model, guided)
    losses, seconds, norms, saved_peak = [], [], [], 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train()
    try:
        for _ in range(steps):
            pixels, batch = _lvlm_batch(rng, builder, "instruct", batch_size, MAX_OBJECTS)
            labels = batch["labels"]
            if guided is not None:
                guided.answers = labels != -100
            saved = _SavedActivations()
            began = time.perf_counter()
            with saved.hooks():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=pixels, use_cache=False).logits
                loss = answer_loss(logits, batch["input_ids"], labels, model.config.image_token_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            seconds.append(time.perf_counter() - began)
            losses.append(loss.item())
            norms.append(norm.item())
            saved_peak = max(saved_peak, saved.peak)
    finally:
        if handle is not None:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.eval()
    rss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before   # KiB on Linux
    return FinetuneReport(method=None if method is None else method.spec(), steps=steps, batch_size=batch_size,
                          lr=lr, trainable=trainable, losses=losses, step_seconds=seconds, grad_norms=norms,
                          median_step_s=statistics.median(seconds), peak_rss_delta_mb=rss_delta / 1024,
                          peak_saved_mb=saved_peak / 2**20)
