"""Pruning a model bigger than memory: its weights stay on disk or in CPU memory, one decoder block at a time
is materialised on the compute device, as llm-compressor's sequential pipeline does.

The model is built without weights (parameters on the meta device, buffers computed as usual). The parts
before LLM block 0 (embeddings, vision tower, projector) are read from the ``save_pretrained`` directory,
run once over the calibration samples to capture block 0's inputs, and dropped. Then the engine of
``sequential.py`` visits the blocks with :meth:`OffloadedModel.visit` as its placement: a block's weights are
read in, pruned, written out as that block's own safetensors shard, and dropped before the next. The result
is a ``save_pretrained`` directory holding what :func:`~vlmprune.weights.sequential.prune` followed by
``save_pretrained`` would have written, bit for bit: the blocks compute in the same dtype (float32, as
``vlmprune prune`` loads a model) from the same stored values.

``offload="disk"`` reads each tensor from the checkpoint when its block is visited (the checkpoint's shards
are memory-mapped one at a time); ``offload="cpu"`` reads the whole checkpoint into CPU memory first, in its
stored dtype, for a model that fits CPU memory but not the compute device.

Module-level imports are light, so that ``vlmprune prune --offload`` checks its input before torch loads.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import VlmpruneError

OFFLOADS = ("disk", "cpu")
INDEX = "model.safetensors.index.json"


def check_offload(offload: str) -> None:
    """Raise :class:`VlmpruneError` unless ``offload`` is a known mode and accelerate is installed."""
    if offload not in OFFLOADS:
        raise VlmpruneError(f"unknown offload {offload!r}: use {' or '.join(OFFLOADS)}")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise VlmpruneError("offloaded pruning needs accelerate: pip install 'vlmprune[offload]'") from None


class Checkpoint:
    """The tensors of a ``save_pretrained`` directory under the model's own parameter names (checkpoints
    keep older names, which transformers renames on load; the same renaming is applied here)."""

    def __init__(self, directory: str | Path, model):
        from safetensors import safe_open
        from safetensors.torch import _getdtype
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise VlmpruneError(f"{directory} has no safetensors weights: offloading reads model.safetensors "
                                "(or its sharded index)")
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        names = model.state_dict(keep_vars=True)
        self.key: dict[str, str] = {}           # model name -> checkpoint key
        self.file: dict[str, str] = {}          # checkpoint key -> shard file
        self.dtype: dict[str, Any] = {}         # checkpoint key -> stored torch dtype
        for file in files:
            with safe_open(self.directory / file, "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
                    if converted is not None:
                        raise VlmpruneError(f"{key} of {directory} is converted on load (not only renamed): "
                                            "offloaded pruning needs a checkpoint stored one tensor per weight")
                    self.key[name], self.file[key] = key, file
                    self.dtype[key] = _getdtype(handle.get_slice(key).get_dtype())

    def read(self, names: Sequence[str]) -> dict[str, Any]:
        """The stored tensors of ``names`` (model names), each shard opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file[self.key[name]], []).append(name)
        tensors = {}
        for file, group in by_file.items():
            with safe_open(self.directory / file, "pt") as handle:
                tensors.update({name: handle.get_tensor(self.key[name]) for name in group})
        return tensors


class OffloadedModel:
    """A model whose weights rest in a :class:`Checkpoint` (``disk``) or a CPU copy of it (``cpu``) and are
    materialised module by module; each block, once visited, is written into ``out`` as its own shard."""

    def __init__(self, directory: str | Path, offload: str, out: Path, dtype=None):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForImageTextToText

        from ..models import get_adapter

        check_offload(offload)
        config = AutoConfig.from_pretrained(directory)
        self.config_dtype = dtype or config.dtype
        with init_empty_weights():                 # parameters on meta; buffers (rotary tables) computed
            self.model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.adapter = get_adapter(self.model)
        self.checkpoint = Checkpoint(directory, self.model)
        self.resident = self.checkpoint.read(list(self.checkpoint.key)) if offload == "cpu" else None
        self.out, self.dtype = out, dtype
        self.files: dict[str, str] = {}            # model name -> output shard
        self.nbytes: dict[str, int] = {}           # model name -> bytes written
        self.index = {id(block): b for b, block in enumerate(self.adapter.llm_layers)}
        self.prefix = {id(m): name for name, m in self.model.named_modules()}

    def _names(self, module, skip: Sequence = ()) -> list[str]:
        """Full names of ``module``'s parameters and buffers, outside the ``skip`` modules."""
        skipped = tuple(self.prefix[id(m)] + "." for m in skip)
        base = self.prefix[id(module)]
        names = [f"{base}.{n}" if base else n for n, _ in
                 list(module.named_parameters()) + list(module.named_buffers())]
        return [n for n in names if not n.startswith(skipped)]

    def _tensor(self, name: str):
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module), attr)

    def _read(self, names: Sequence[str]) -> dict[str, Any]:
        if self.resident is not None:
            return {n: self.resident[n] for n in names}
        return self.checkpoint.read(names)

    @contextlib.contextmanager
    def materialised(self, names: Sequence[str], device) -> Iterator[None]:
        """Hold the tensors ``names`` on ``device`` inside the context: stored ones read from where they rest
        (cast to the model's float32 as ``from_pretrained`` casts them), the others (computed buffers) moved;
        after it, stored ones go back to meta, which frees them."""
        from accelerate.utils import set_module_tensor_to_device

        stored = [n for n in names if n in self.checkpoint.key]
        missing = [n for n in names if n not in self.checkpoint.key and self._tensor(n).device.type == "meta"]
        if missing:
            raise VlmpruneError(f"{self.checkpoint.directory} lacks the weight {missing[0]}")
        moved = {n: self._tensor(n).device for n in names if n not in self.checkpoint.key}
        values = self._read(stored)
        try:
            for name in stored:
                set_module_tensor_to_device(self.model, name, device, value=values.pop(name))
            for name in moved:
                set_module_tensor_to_device(self.model, name, device)
            yield
        finally:
            for name in stored:
                set_module_tensor_to_device(self.model, name, "meta")
            for name, original in moved.items():
                set_module_tensor_to_device(self.model, name, original)

    def capture(self, calibration, device):
        """Block 0's inputs for the calibration, with everything before it read in once and then dropped
        (the LM head is never read: capture stops at block 0)."""
        from .sequential import capture_inputs

        skip = (self.adapter.llm_layers, self.adapter.lm_head)
        with self.materialised(self._names(self.model, skip), device):
            return capture_inputs(self.model, self.adapter, calibration, device)

    @contextlib.contextmanager
    def visit(self, block, device) -> Iterator[None]:
        """The engine's placement: ``block`` on ``device`` inside the context, then written out and dropped
        (a block visited twice, by a dense sweep and then pruned, is written twice, the pruned one last)."""
        names = [n for n in self._names(block) if n in self.checkpoint.key]
        with self.materialised(self._names(block), device):
            yield
            self._save(f"model-block-{self.index[id(block)]:05d}.safetensors",
                       {n: self._tensor(n) for n in names})

    def _save(self, file: str, tensors: dict[str, Any]) -> None:
        """Write ``tensors`` (model names) under their checkpoint keys into shard ``file`` of ``out``, in the
        output dtype (``dtype``, else the dtype each was stored in)."""
        from safetensors.torch import save_file

        keyed = {}
        for name, tensor in tensors.items():
            key = self.checkpoint.key[name]
            tensor = tensor.detach().cpu()
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype or self.checkpoint.dtype[key])
            keyed[key] = tensor.contiguous()
            self.files[name], self.nbytes[name] = file, tensor.numel() * tensor.element_size()
        save_file(keyed, str(self.out / file), metadata={"format": "pt"})

    def finish(self, record: dict[str, Any], processor=None) -> None:
        """Copy the tensors no block holds (in shards no larger than a block's, unless one tensor is), and write the
        index, the config with the pruning ``record``, the generation config and the processor."""
        from .saving import CONFIG_KEY

        block_bytes: dict[str, int] = {}
        for name, file in self.files.items():
            block_bytes[file] = block_bytes.get(file, 0) + self.nbytes[name]
        limit, shards = max(block_bytes.values(), default=0), [[]]
        for name in (n for n in self.checkpoint.key if n not in self.files):
            size = self._tensor(name).numel() * self.checkpoint.dtype[self.checkpoint.key[name]].itemsize
            if shards[-1] and sum(s for _, s in shards[-1]) + size > limit:
                shards.append([])
            shards[-1].append((name, size))
        for count, shard in enumerate(s for s in shards if s):
            self._save(f"model-rest-{count:05d}.safetensors", self._read([name for name, _ in shard]))
        weight_map = {self.checkpoint.key[n]: f for n, f in sorted(self.files.items())}
        total = sum(self.nbytes.values())
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
        config = self.model.config
        config.dtype = self.config_dtype
        setattr(config, CONFIG_KEY, record)
        config.save_pretrained(self.out)
        if (self.checkpoint.directory / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(self.checkpoint.directory).save_pretrained(self.out)
        if processor is not None:
            processor.save_pretrained(self.out)


def prune_offloaded(directory: str | Path, method, calibration: Sequence[Any] | None, out: str | Path, *,
                    offload: str = "disk", record: dict[str, Any] | None = None, processor=None,
                    targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
                    device=None, dtype=None, overwrite: bool = False):
    """Prune the model saved in ``directory`` without holding it in memory, into the ``save_pretrained``
    directory ``out``; returns the :class:`~vlmprune.weights.sequential.PruneReport`.

    ``offload``: ``"disk"`` (weights read from ``directory`` block by block) or ``"cpu"`` (read into CPU
    memory once). ``device``: where each block computes (default cpu). ``dtype``: of the saved weights
    (default: as stored). ``record``: written under config.json's ``"vlmprune_pruning"``, given the report
    (``record(report)`` when callable). The rest as :func:`~vlmprune.weights.sequential.prune`.
    """
    import time

    from ..outputs import output_directory
    from .sequential import compute_device, prune

    check_offload(offload)
    start = time.perf_counter()
    with output_directory(out, overwrite=overwrite) as partial:
        offloaded = OffloadedModel(directory, offload, Path(partial), dtype)
        device = compute_device(offloaded.model, device or "cpu")
        captured = offloaded.capture(calibration, device) if method.needs_calibration and calibration else None
        report = prune(offloaded.model, method, targets=targets, ignore=ignore, device=device, captured=captured,
                       place=offloaded.visit)
        report.total_seconds = time.perf_counter() - start
        offloaded.finish(record(report) if callable(record) else (record or {}), processor)
    return report
