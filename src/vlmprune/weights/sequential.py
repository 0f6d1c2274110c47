"""The sequential pruning engine shared by every weight method.

Capture the inputs of LLM block 0 (hidden states and the keyword arguments the decoder layer
receives) for each calibration sample with a pre-hook that stops the forward; then, block by block:
the method gathers statistics by running the block with hooks, computes masks and zeros weights in
place; the pruned block is re-run so its outputs feed the next block. One block sits on the compute
device at a time.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import VlmpruneError
from ..models.forward_args import layer_hidden, without_cache
from ..progress import progress as report_progress
from .placement import block_on, rest_on


class _Stop(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded."""


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """Per calibration sample: block input (1, L, D), decoder-layer kwargs, visual-token mask (L,)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    visual: list[torch.Tensor]


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter, calibration: Sequence[Any], device: torch.device) -> BlockInputs:
    """Run each sample up to LLM block 0 and record what that block receives."""
    if not calibration:
        raise VlmpruneError("no calibration samples: pass a non-empty list of processor outputs (e.g. --nsamples 128)")
    captured = BlockInputs([], [], [])

    def stop(_module, args, kwargs):
        hidden = layer_hidden(args, kwargs)
        kwargs = {k: v for k, v in without_cache(kwargs).items() if k != "hidden_states"}
        captured.hidden.append(hidden.detach().to(device))
        captured.kwargs.append(_to(kwargs, device))
        raise _Stop

    handle = adapter.llm_layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with rest_on(model, adapter.llm_layers, device):
            for sample in calibration:
                inputs = {k: _to(v, device) for k, v in dict(sample).items()}
                if inputs["input_ids"].shape[0] != 1:
                    raise VlmpruneError("each calibration sample must have batch size 1 (one processor call per sample)")
                try:
                    model(**inputs, use_cache=False)
                except _Stop:
                    pass
                captured.visual.append(adapter.image_token_mask(inputs["input_ids"])[0].to(device))
    finally:
        handle.remove()
    return captured


def capture(model: nn.Module, calibration: Sequence[Any], device: torch.device | str | None = None) -> BlockInputs:
    """What LLM block 0 receives for each calibration sample. Pruning never changes the layers
    before block 0, so one capture can serve every ``prune(..., captured=...)`` of copies of the
    same model (a benchmark's rows), instead of running the vision tower again each time."""
    from ..models import get_adapter

    return capture_inputs(model, get_adapter(model), calibration, compute_device(model, device))


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


@dataclass
class BlockContext:
    """What a method sees of one decoder block while it is on the compute device."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]           # full module name -> target Linear of this block
    inputs: BlockInputs | None              # None when the method needs no calibration
    llm_config: Any
    device: torch.device
    on_sample: Callable[[torch.Tensor], None] | None = None

    @property
    def n_samples(self) -> int:
        return len(self.inputs.hidden)

    def hidden(self, i: int) -> torch.Tensor:
        return self.inputs.hidden[i][0]

    def visual(self, i: int) -> torch.Tensor:
        return self.inputs.visual[i]

    @torch.no_grad()
    def forward(self, i: int) -> torch.Tensor:
        """Run sample ``i`` through the block; returns (1, L, D)."""
        if self.on_sample is not None:
            self.on_sample(self.inputs.visual[i])
        return _output(self.block(self.inputs.hidden[i], **self.inputs.kwargs[i]))

    @contextlib.contextmanager
    def capture(self, outputs: bool = False) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
        """Inside, ``seen[name]`` holds the last (input (L, C_in), output (L, C_out) or None) of each target."""
        seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def hook(name):
            def record(_module, args, result):
                x = args[0].detach()
                y = result.detach().reshape(-1, result.shape[-1]) if outputs else None
                seen[name] = (x.reshape(-1, x.shape[-1]), y)
            return record

        handles = [linear.register_forward_hook(hook(name)) for name, linear in self.linears.items()]
        try:
            yield seen
        finally:
            for handle in handles:
                handle.remove()


def select_linears(model: nn.Module, adapter, targets: Sequence[str] | None, ignore: Sequence[str] | None) -> list[dict[str, nn.Linear]]:
    """Per LLM block, the Linear layers to prune: ``targets`` regexes (default: every Linear of the
    decoder layers) minus ``ignore`` regexes, matched with ``re.search`` on full module names.
    Only the LLM's decoder layers are walked, so the vision tower, projector and lm_head stay dense."""
    try:
        target_res = [re.compile(t) for t in (targets or [])]
        ignore_res = [re.compile(t) for t in (ignore or [])]
    except re.error as exc:
        raise VlmpruneError(f"bad target/ignore regex: {exc}") from None
    block_of = {}
    for b, layer in enumerate(adapter.llm_layers):
        for module in layer.modules():
            block_of[id(module)] = b
    per_block: list[dict[str, nn.Linear]] = [{} for _ in adapter.llm_layers]
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if target_res and not any(r.search(name) for r in target_res):
            continue
        if any(r.search(name) for r in ignore_res):
            continue
        if id(module) not in block_of:
            continue
        per_block[block_of[id(module)]][name] = module
    if not any(per_block):
        raise VlmpruneError("the targets match no Linear layer of the LLM; check --targets/--ignore regexes")
    return per_block


def compute_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` as a torch device; by default the device of the model's first weight."""
    if device is None:
        return next(model.parameters()).device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise VlmpruneError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None


def sweep(model: nn.Module, calibration: Sequence[Any], visit: Callable[[BlockContext], list[torch.Tensor] | None],
          *, device: torch.device | str | None = None, linears: list[dict[str, nn.Linear]] | None = None,
          on_sample: Callable[[torch.Tensor], None] | None = None, desc: str = "blocks",
          captured: BlockInputs | None = None, place: Callable = block_on) -> None:
    """Run the calibration samples block by block through the model as it is, calling ``visit``
    on each block. ``visit`` may return the block outputs it computed (else the engine computes
    them); those outputs feed the next block. ``captured``: block-0 inputs from :func:`capture`.
    ``place(block, device)``: the context that holds a block's weights on the device (:func:`prune`)."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    device = compute_device(model, device)
    per_block = linears if linears is not None else select_linears(model, adapter, None, None)
    inputs = captured if captured is not None else capture_inputs(model, adapter, calibration, device)
    for b in report_progress(range(len(adapter.llm_layers)), desc=desc, unit="block"):
        block = adapter.llm_layers[b]
        with place(block, device):
            ctx = BlockContext(b, block, per_block[b], inputs, adapter.llm.config, device, on_sample)
            outputs = visit(ctx)
            if outputs is None:
                outputs = [ctx.forward(i) for i in range(ctx.n_samples)]
        inputs = BlockInputs(outputs, inputs.kwargs, inputs.visual)


@dataclass
class PruneReport:
    """What a pruning run did: sparsity of each pruned layer, seconds per block and in total."""

    method: dict[str, Any]
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    block_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    zeros: int = 0
    weights: int = 0

    @property
    def sparsity(self) -> float:
        """Zeros over all pruned weights (each layer weighted by its size)."""
        return self.zeros / max(self.weights, 1)

    def record_block(self, linears: dict[str, nn.Linear]) -> None:
        for name, linear in linears.items():
            zeros = int((linear.weight == 0).sum())
            self.layer_sparsity[name] = zeros / linear.weight.numel()
            self.zeros += zeros
            self.weights += linear.weight.numel()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, "layer_sparsity": self.layer_sparsity,
                "block_seconds": self.block_seconds, "total_seconds": self.total_seconds}


def prune(model: nn.Module, method, calibration: Sequence[Any] | None = None, *, targets: Sequence[str] | None = None,
          ignore: Sequence[str] | None = None, device: torch.device | str | None = None,
          on_sample: Callable[[torch.Tensor], None] | None = None, captured: BlockInputs | None = None,
          place: Callable = block_on) -> PruneReport:
    """Prune ``model`` in place with ``method`` (a :class:`~vlmprune.weights.base.WeightMethod`).

    ``calibration``: list of processor outputs, one sample each (batch 1), image plus text.
    ``on_sample(visual_mask)`` runs before each sample enters a block (the MoT probe routes with it).
    ``captured``: the calibration's block-0 inputs from :func:`capture`, reused instead of recomputed.
    ``place(block, device)``: the context that holds one block's weights on ``device`` while it is
    processed (default: moved from where they sit and back; :mod:`.offload` reads them from storage).
    """
    from ..models import get_adapter

    adapter = get_adapter(model)
    device = compute_device(model, device)
    per_block = select_linears(model, adapter, targets, ignore)
    for linears in per_block:
        method.validate(linears)
    report = PruneReport(method=method.describe())
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if not method.needs_calibration:
            for b, linears in enumerate(report_progress(per_block, desc=method.name, unit="block")):
                tic = time.perf_counter()
                block = adapter.llm_layers[b]
                with place(block, device):
                    method.prune_block(BlockContext(b, block, linears, None, adapter.llm.config, device))
                    report.record_block(linears)
                report.block_seconds.append(time.perf_counter() - tic)
        else:
            if not calibration and captured is None:
                raise VlmpruneError(f"{method.name} needs calibration samples: pass a non-empty calibration list")
            if method.needs_dense_sweep:
                sweep(model, calibration, method.observe_dense, device=device, linears=per_block,
                      on_sample=on_sample, desc=f"{method.name} dense sweep", captured=captured, place=place)
                method.allocate(per_block)

            def visit(ctx: BlockContext) -> list[torch.Tensor]:
                tic = time.perf_counter()
                if ctx.linears:
                    method.prune_block(ctx)
                    report.record_block(ctx.linears)
                outputs = [ctx.forward(i) for i in range(ctx.n_samples)]
                report.block_seconds.append(time.perf_counter() - tic)
                return outputs

            sweep(model, calibration, visit, device=device, linears=per_block, on_sample=on_sample,
                  desc=method.name, captured=captured, place=place)
    finally:
        model.train(was_training)
    report.total_seconds = time.perf_counter() - start
    return report
