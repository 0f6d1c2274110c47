"""Which device a module's weights sit on while it is processed: one decoder block at a time.

A block is moved to the compute device, processed and moved back, so a model larger than the
device's memory can be pruned. Blocks offloaded by accelerate (weights on the meta device, kept in
the hook's CPU weights map) are onloaded the same way and their pruned weights written back.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import VlmpruneError


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(hook is not None and getattr(hook, "offload", False))


@contextlib.contextmanager
def _onloaded(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Load offloaded weights onto ``device`` and pause their hooks' offloading, so forwards run
    on resident weights and pruning edits them; the edits are written back to the weights map."""
    from accelerate.utils import set_module_tensor_to_device

    paused = []
    try:
        for module in modules:
            hook = module._hf_hook
            paused.append((module, hook.execution_device))
            for name, _ in module.named_parameters(recurse=False):
                set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
            hook.offload, hook.execution_device = False, device
        yield
        for module, _ in paused:
            weights_map = module._hf_hook.weights_map
            for name, param in module.named_parameters(recurse=False):
                stored = weights_map[name]
                stored.copy_(param.data.to(stored.device, stored.dtype))
                if not torch.equal(weights_map[name], param.data.to(stored.device, stored.dtype)):
                    raise VlmpruneError("disk-offloaded weights cannot be pruned in place; offload to CPU memory instead")
    finally:
        for module, execution_device in paused:
            for name, _ in module.named_parameters(recurse=False):
                set_module_tensor_to_device(module, name, "meta")
            module._hf_hook.offload, module._hf_hook.execution_device = True, execution_device


@contextlib.contextmanager
def block_on(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Hold ``block``'s weights on ``device`` inside the context; changes to them are kept."""
    offloaded = [m for m in block.modules() if _offloaded(m)]
    if offloaded:
        with _onloaded(offloaded, device):
            yield
        return
    first = next(block.parameters(), None)
    original = first.device if first is not None else device
    if original == device:
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(original)


@contextlib.contextmanager
def rest_on(model: nn.Module, skip: nn.Module, device: torch.device) -> Iterator[None]:
    """Hold every weight of ``model`` outside ``skip`` (the decoder layers) on ``device``.

    Models dispatched by accelerate place themselves, so they are left alone."""
    if getattr(model, "hf_device_map", None):
        yield
        return
    skipped = {id(t) for t in list(skip.parameters()) + list(skip.buffers())}
    moved = [t for t in list(model.parameters()) + list(model.buffers())
             if id(t) not in skipped and t.device != device and t.device.type != "meta"]  # meta: offloaded
    originals = [t.device for t in moved]
    for tensor in moved:
        tensor.data = tensor.data.to(device)
    try:
        yield
    finally:
        for tensor, original in zip(moved, originals):
            tensor.data = tensor.data.to(original)
