"""Prefill latency, decode throughput, KV-cache bytes and FLOPs: dense against every token method.

A random-weight LLaVA-1.5-7B with its real widths (4096-wide Llama, CLIP ViT-L/14-336, 32k vocab)
but a quarter of its depth (8 LLM, 6 vision layers: the real 32 : 24, so the vision tower's share of the
work is the real model's), one 336 px image (576 visual tokens) and 64 text tokens. ``--model`` takes
LLaVA-NeXT-8B (anyres, 2928 visual tokens) or Qwen2-VL-7B (576 after the 2x2 merge) instead, at an
eighth of their depth, with the kept counts scaled to the same shares of the visual tokens.
``--batch`` repeats the prompt: at batch 1 this CPU's matrix products on a pruned sequence's few rows
are bound by streaming the weights, which the machine line's matmul probe shows; a batch fills them.
Every number is also given as a ratio against dense in the same run; times are medians. The scoring
share is the time spent inside the method's own scoring (``reduce`` and ``scoring_token``: attention
reads, rollout, similarities, IVTP's text encoder) over the dense prefill time.

Columns: measured prefill speedup (dense ms / method ms, median of the per-round ratios), the
FLOPs-ideal speedup (dense FLOPs / method FLOPs, both counted on the meta device), their ratio (1.0:
the whole FLOPs saving shows up as time), the free-selection speedup (FastV, IVTP, DivPrune and
FasterVLM at 64 of 576: the method's own sites and kept counts with picks that cost nothing,
:mod:`vlmprune.measure.attainable`) and the method's speedup over it (the share its scoring leaves),
the scorer's own time as a share of dense prefill, decode tokens/s and KV bytes. ``--profile`` instead runs ``torch.profiler`` on one prefill per setting and
reports where the time goes by engine step and by operator.

IVTP runs as plain ``ivtp:keep=64``: its text companion (CLIP ViT-L/14-336's text tower, 12 layers
768 wide) is found through ``vlmprune.models.companions`` like on a real checkpoint, here a random-weight
stand-in of the real width saved to a temporary directory, so IVTP's recorded cost includes the text encoder.

    python benchmarks/speed.py [--model llava-1.5-7b] [--llm-layers 8] [--vision-layers 6] [--batch 1]
                               [--repeats 5] [--keeps 64 128] [--tokens SPEC ...] [--threads 1]
                               [--markdown docs/BENCHMARKS.md] [--profile] [--ceiling] [--suite]

``--suite`` runs the set ``make bench`` records (:data:`SUITE`): 18 minutes on the 2-core build machine on
2026-12-07, a day its dense prefill ran 1.5x slower than on the quietest (14.6 minutes then, before the
free selections and the shared builds).
``--ceiling`` times the LLM decoder alone at the dense and the pruned lengths: the hardware's limit.

Prints a Markdown table and writes JSON (default benchmarks/results/speed.json, or speed_profile.json);
with ``--markdown`` the table replaces the block between ``<!-- speed:NAME -->`` and
``<!-- /speed:NAME -->`` in that file (NAME: the JSON file's stem), so no number is copied by hand.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from vlmprune import tokens
from vlmprune.errors import VlmpruneError
from vlmprune.measure.attainable import FreeSelection, free_selection
from vlmprune.measure.flops import count_flops
from vlmprune.measure.latency import (attached, first_token_ms, generation_timing, last_logits_only, median_seconds,
                                      prefill_ms)
from vlmprune.measure.memory import analytic_kv_cache_bytes, kv_cache_bytes
from vlmprune.measure.meta import counting_inputs
from vlmprune.models import companions
from vlmprune.models.presets import Preset, get_preset

DEFAULT_KEEPS = (64, 128)     # of 576 visual tokens: IVTP's main budget and the 2n rule's threshold
REFERENCE_VISUAL = 576        # the kept counts above are of LLaVA-1.5's 576; other models scale them
COST_SPECS = ("fastv:keep=64", "ivtp:keep=64")
PROFILED = ("fastv", "ivtp", "divprune", "fastervlm")   # the methods timed on every model, and profiled
# (LLM, vision) layers: a quarter of LLaVA-1.5-7B's 32 : 24 (the reference), an eighth of the others
DEPTHS = {"llava-1.5-7b": (8, 6), "llava-next-8b": (4, 3), "qwen2-vl-7b": (4, 4)}
# CLIP ViT-L/14-336's text tower and projection (the hub model LLaVA-1.5's companion table names)
CLIP_L_336_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_L_336_PROJECTION = 768


def default_specs(preset: Preset, keeps=DEFAULT_KEEPS) -> list[str]:
    """At every kept count (of 576, scaled to the model's visual tokens): every token method in the
    registry for LLaVA-1.5 (FastV at its layer 2), the :data:`PROFILED` ones for the other models."""
    names = sorted(tokens.REGISTRY) if preset.family == "llava" else PROFILED
    return [f"{name}:keep={scaled_keep(preset, keep)}" for keep in keeps for name in names]


def scaled_keep(preset: Preset, keep: int) -> int:
    """``keep`` of 576 visual tokens as the same share of ``preset``'s."""
    return round(keep * preset.geometry.llm_tokens / REFERENCE_VISUAL)


def reduced_preset(name: str, llm_layers: int, vision_layers: int) -> Preset:
    preset = get_preset(name)
    preset.config.text_config.num_hidden_layers = llm_layers
    vision = preset.config.vision_config
    setattr(vision, "depth" if hasattr(vision, "depth") else "num_hidden_layers", vision_layers)
    preset.name = f"{name} widths, {llm_layers} LLM / {vision_layers} vision layers"
    return preset


def _word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """Words ``w0 .. w{size-1}``, one id each, with character offsets (IVTP aligns the two tokenizers by them)."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", pad_token="w0")


def install_text_companion(model, directory: Path) -> None:
    """Save a random-weight CLIP of the real text width (its vision side the benchmark's tower config)
    and word-level tokenizers to ``directory``; register the CLIP as the family's text companion and
    the LLM tokenizer as the model's own, as a real checkpoint directory would provide them. Families
    without a companion (Qwen2-VL) get the tokenizer only."""
    _word_tokenizer(model.config.text_config.vocab_size).save_pretrained(directory / "llm")
    model.config._name_or_path = str(directory / "llm")
    if companions.TEXT_COMPANIONS.get(model.config.model_type) is None:
        return
    config = CLIPConfig(text_config=CLIP_L_336_TEXT, vision_config=model.config.vision_config.to_dict(),
                        projection_dim=CLIP_L_336_PROJECTION)
    CLIPModel(config).save_pretrained(directory / "clip")
    _word_tokenizer(CLIP_L_336_TEXT["vocab_size"]).save_pretrained(directory / "clip")
    companions.TEXT_COMPANIONS[model.config.model_type] = str(directory / "clip")


_LAST_BUILT: dict = {}


def built_model(preset: Preset, dtype: torch.dtype, device: str):
    """The random-weight model of ``preset`` (seed 0) with its text companion installed. Consecutive
    suite entries on one configuration share the build (about 28 s at LLaVA-1.5-7B widths and 8 / 6
    layers on the build machine); a new configuration frees the previous one first."""
    key = (preset.config.to_json_string(), str(dtype), device)
    if _LAST_BUILT.get("key") != key:
        _LAST_BUILT.clear()
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(preset.config, dtype=dtype).to(device).eval()
        directory = tempfile.TemporaryDirectory(prefix="vlmprune-speed-")   # removed with the build
        install_text_companion(model, Path(directory.name))
        _LAST_BUILT.update(key=key, model=model, directory=directory)
    model = _LAST_BUILT["model"]
    # the FLOPs count builds its meta model from preset.config, and IVTP finds the LLM tokenizer by its path
    preset.config._name_or_path = model.config._name_or_path
    return model


def real_inputs(preset: Preset, text_tokens: int, dtype: torch.dtype, batch: int = 1) -> dict[str, torch.Tensor]:
    """The counting prompt with random pixels in place of the meta placeholders, ``batch`` copies."""
    generator = torch.Generator().manual_seed(0)
    one = {key: torch.randn(value.shape, generator=generator, dtype=dtype) if value.device.type == "meta" else value
           for key, value in counting_inputs(preset, text_tokens).items()}
    return {key: torch.cat([value] * batch) for key, value in one.items()}


def static_measures(model, preset, inputs, spec, text_tokens, bytes_per_value) -> dict:
    """KV-cache bytes (measured and analytic) and counted FLOPs: no timing, one run each (a method
    that cannot run on this model fails here, before the timed rounds)."""
    counted = count_flops(preset, text_tokens, tokens.from_spec(spec) if spec else None, last_logits=True)
    return {
        "tokens": spec or "dense",
        "kv_bytes": kv_cache_bytes(model, inputs, tokens.from_spec(spec) if spec else None),
        "kv_bytes_analytic": inputs["input_ids"].shape[0] * analytic_kv_cache_bytes(
            preset.config.text_config, counted.schedule, bytes_per_value),
        "flops": counted.flops.as_dict()["total"],
        "llm_tokens_after_pruning": counted.schedule.llm[-1],
    }


class ScoringClock:
    """Time spent inside a method's own ``reduce`` and ``scoring_token`` (its attention reads, rollout,
    similarities and, for IVTP, the text encoder): the scorer's cost, apart from the shorter forward."""

    def __init__(self, method):
        self.seconds = 0.0
        for name in ("reduce", "scoring_token"):
            setattr(method, name, self._timed(getattr(method, name)))

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - start
        return timed

    def lap(self) -> float:
        """Milliseconds since the last lap."""
        seconds, self.seconds = self.seconds, 0.0
        return 1000 * seconds


def timed_rounds(model, inputs, rows: list[dict], rounds: int, new_tokens: int,
                 free: dict[str, FreeSelection] | None = None) -> None:
    """Prefill ms (the time to the first token of a greedy ``generate``) and decode tokens/s from the
    same generation, every method once per round, so that a change in the machine's load hits them
    all alike; each ratio is the median over rounds of value / dense in that round. A method with a
    :class:`FreeSelection` in ``free`` has it timed right after it, its time to first token only."""
    free = free or {}
    specs = [None if row["tokens"] == "dense" else row["tokens"] for row in rows]
    methods = [tokens.from_spec(spec) if spec else None for spec in specs]
    clocks = [ScoringClock(method) if method else None for method in methods]
    prefill = [[] for _ in specs]
    scoring = [[] for _ in specs]
    decode = [[] for _ in specs]
    free_prefill = {spec: [] for spec in free}
    generation_timing(model, inputs, 2)  # warm-up (forwards ran already)
    for _ in range(rounds):
        for index, (spec, method, clock) in enumerate(zip(specs, methods, clocks)):
            with attached(model, method):
                first_ms, rate = generation_timing(model, inputs, new_tokens)
            prefill[index].append(first_ms)
            scoring[index].append(clock.lap() if clock else 0.0)
            decode[index].append(rate)
            if spec in free:
                with attached(model, free[spec]):
                    free_prefill[spec].append(first_token_ms(model, inputs))
    for spec, row, times, scorer, rates in zip(specs, rows, prefill, scoring, decode):
        row["prefill_ms"] = statistics.median(times)
        row["scoring_ms"] = statistics.median(scorer)
        row["decode_tok_s"] = statistics.median(rates)
        row["prefill_ms_ratio"] = statistics.median(t / d for t, d in zip(times, prefill[0]))
        row["scoring_ms_ratio"] = statistics.median(s / d for s, d in zip(scorer, prefill[0]))
        row["decode_tok_s_ratio"] = statistics.median(r / d for r, d in zip(rates, decode[0]))
        if spec in free:
            row["free_selection_ms_ratio"] = statistics.median(t / d for t, d in zip(free_prefill[spec], prefill[0]))


# engine steps and scorer parts timed by --profile (inclusive times; a step may hold another)
ENGINE_STEPS = ("_vision_site", "_start_sequence", "_insert_scoring", "_llm_site", "_keep_visual",
                "_drop_scoring", "_rotary", "_mask", "_decode_layer")
SCORER_STEPS = (("vlmprune.tokens.scorers", None, ("grouped_rollout_row", "significance", "max_min_diverse", "top_indices")),
                ("vlmprune.models.base", "ModelAdapter", ("llm_qkv",)),
                ("vlmprune.models.base", "ClipTowerMixin", ("vision_qkv",)),
                ("vlmprune.tokens.methods.ivtp", "IVTP", ("_text_relevance", "_image_embedding")))


def _labelled(owner, name: str, label: str):
    """Wrap ``owner.name`` in a profiler label; returns the call that puts the original back."""
    function = inspect.getattr_static(owner, name) if isinstance(owner, type) else getattr(owner, name)
    plain = function.__func__ if isinstance(function, staticmethod) else function

    def run(*args, **kwargs):
        with torch.profiler.record_function(label):
            return plain(*args, **kwargs)
    setattr(owner, name, staticmethod(run) if isinstance(function, staticmethod) else run)
    return lambda: setattr(owner, name, function)


def label_steps() -> list:
    """Name the engine's steps and the scorers' parts for the profiler; returns the calls that undo it."""
    import importlib
    from vlmprune.tokens import engine
    undo = [_labelled(engine._Engine, name, f"engine.{name.lstrip('_')}") for name in ENGINE_STEPS]
    for module, owner, names in SCORER_STEPS:
        target = importlib.import_module(module)
        target = getattr(target, owner) if owner else target
        undo += [_labelled(target, name, f"{owner or 'scorers'}.{name.lstrip('_')}") for name in names]
    return undo


def label_stages(model) -> list:
    """Name the model's stages (vision tower, projector, LLM decoder) for the profiler: the time
    a pruned prefill still spends where no token was removed. Returns the hook handles."""
    from vlmprune.models import get_adapter
    adapter, handles = get_adapter(model), []
    for label, module in (("model.vision_tower", adapter.vision_tower), ("model.projector", adapter.projector),
                          ("model.llm_decoder", adapter.llm)):
        open_scopes = []
        handles.append(module.register_forward_pre_hook(
            lambda *_, label=label, scopes=open_scopes: scopes.append(torch.profiler.record_function(label).__enter__())))
        handles.append(module.register_forward_hook(
            lambda *_, scopes=open_scopes: scopes.pop().__exit__(None, None, None)))
    return handles


def profile_rows(model, inputs, specs: list[str | None]) -> list[dict]:
    """One warm and one profiled prefill per setting: time by model stage, by labelled engine step
    and scorer part, and the top operators."""
    undo = label_steps() + [handle.remove for handle in label_stages(model)]
    try:
        return [profile_one(model, inputs, spec) for spec in specs]
    finally:
        for step in undo:
            step()


def profile_one(model, inputs, spec: str | None) -> dict:
    method = tokens.from_spec(spec) if spec else None
    if method is not None:
        for name in ("reduce", "scoring_token"):
            _labelled(method, name, f"method.{name}")
    with attached(model, method), torch.no_grad():
        model(**inputs, use_cache=True, **last_logits_only(model))
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            model(**inputs, use_cache=True, **last_logits_only(model))
        total = 1000 * (time.perf_counter() - start)
    events = profiler.key_averages()
    steps = {e.key: e.cpu_time_total / 1000 for e in events if e.key.split(".")[0] in
             ("model", "engine", "method", "scorers", "ModelAdapter", "ClipTowerMixin", "IVTP")}
    operators = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return {"tokens": spec or "dense", "prefill_ms": total, "steps_ms": steps,
            "operators_self_ms": {e.key: e.self_cpu_time_total / 1000 for e in operators[:6]}}


def profile_table(rows: list[dict]) -> str:
    lines = ["| tokens | prefill ms (profiled) | step | ms | % of this prefill |", "|---|---:|---|---:|---:|"]
    for row in rows:
        steps = sorted(row["steps_ms"].items(), key=lambda item: (not item[0].startswith("model."), -item[1]))
        for index, (step, ms) in enumerate(steps):
            head = f"{row['tokens']} | {row['prefill_ms']:.0f}" if index == 0 else " | "
            lines.append(f"| {head} | {step} | {ms:.1f} | {100 * ms / row['prefill_ms']:.1f} |")
    lines += ["", "| tokens | top operators by self time (ms) |", "|---|---|"]
    for row in rows:
        ops = ", ".join(f"{name.removeprefix('aten::')} {ms:.0f}" for name, ms in row["operators_self_ms"].items())
        lines.append(f"| {row['tokens']} | {ops} |")
    return "\n".join(lines)


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator peak on a GPU; on the CPU the resident
    set sampled every millisecond by a thread (large tensors are mapped and unmapped one by one, so
    the sampled peak follows the live tensors; a short spike between samples can be missed)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, None

    def _rss(self) -> int:
        with open("/proc/self/statm") as stat:
            return int(stat.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import threading
        self._base, self._top, self._stop = self._rss(), 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._top = max(self._top, self._rss())
                self._stop.wait(0.001)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, self._rss()) - self._base


def cost_rows(args, dtype, specs: list[str]) -> list[dict]:
    """Prefill time and peak memory against the visual-token count: a LLaVA-1.5-7B-width model per
    image size (square CLIP grids: side / 14 patches a side), dense and each method alternating."""
    rows = []
    for tokens_count in args.visual_tokens:
        side = math.isqrt(tokens_count)
        if side * side != tokens_count:
            raise SystemExit(f"--visual-tokens {tokens_count}: LLaVA-1.5's CLIP grid is square; use a square count")
        preset = reduced_preset("llava-1.5-7b", args.llm_layers, args.vision_layers)
        preset.config.vision_config.image_size = 14 * side
        preset.image_size = (14 * side, 14 * side)
        preset.name += f", {14 * side} px"
        print(f"{tokens_count} visual tokens ...", file=sys.stderr, flush=True)
        model = built_model(preset, dtype, args.device)
        inputs = {k: v.to(args.device) for k, v in real_inputs(preset, args.text_tokens, dtype).items()}
        methods = [None, *(tokens.from_spec(spec) for spec in specs)]
        clocks = [ScoringClock(method) if method else None for method in methods]
        times, scoring, peaks = ([[] for _ in methods] for _ in range(3))
        for index, method in enumerate(methods):  # warm-up (IVTP loads its text encoder), then one prefill's peak
            prefill_ms(model, inputs, method, repeats=1, warmup=0)
            with PeakMemory(args.device) as memory:
                prefill_ms(model, inputs, method, repeats=1, warmup=0)
            peaks[index] = memory.peak
        for clock in clocks:
            if clock:
                clock.lap()
        for _ in range(args.repeats):
            for index, (method, clock) in enumerate(zip(methods, clocks)):
                times[index].append(prefill_ms(model, inputs, method, repeats=1, warmup=0))
                scoring[index].append(clock.lap() if clock else 0.0)
        for index, spec in enumerate([None, *specs]):
            rows.append({"visual_tokens": tokens_count, "tokens": spec or "dense",
                         "prefill_ms": statistics.median(times[index]),
                         "prefill_ms_ratio": statistics.median(t / d for t, d in zip(times[index], times[0])),
                         "scoring_ms": statistics.median(scoring[index]),
                         "scoring_ms_ratio": statistics.median(s / d for s, d in zip(scoring[index], times[0])),
                         "peak_bytes": peaks[index]})
    return rows


def cost_table(rows: list[dict]) -> str:
    lines = [("| visual tokens | tokens | prefill ms | x dense | scoring ms | scoring % of dense prefill | "
              "peak memory above the model, MiB |"), "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['visual_tokens']} | {row['tokens']} | {row['prefill_ms']:.0f} | "
                     f"{row['prefill_ms_ratio']:.2f} | {row['scoring_ms']:.0f} | {100 * row['scoring_ms_ratio']:.1f} | "
                     f"{row['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def cost_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(row["tokens"] for row in rows):
        mine = [row for row in rows if row["tokens"] == name]
        counts = [row["visual_tokens"] for row in mine]
        left.plot(counts, [row["prefill_ms"] / 1000 for row in mine], marker="o", label=name)
        right.plot(counts, [row["peak_bytes"] / 2**30 for row in mine], marker="o", label=name)
        if any(row["scoring_ms"] for row in mine):
            left.plot(counts, [row["scoring_ms"] / 1000 for row in mine], marker="x", linestyle=":",
                      label=f"{name}: scoring alone")
    left.set(xlabel="visual tokens", ylabel="prefill s (median)", title="prefill time")
    right.set(xlabel="visual tokens", ylabel="GiB above the loaded model", title="peak memory of one prefill")
    left.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def with_static_ratios(rows: list[dict]) -> list[dict]:
    """Ratios against dense, and the speedups: measured, FLOPs-ideal, and the share of the ideal
    that the measured one reaches."""
    dense = rows[0]
    for row in rows:
        for key in ("kv_bytes", "flops"):
            row[f"{key}_ratio"] = row[key] / dense[key]
        row["prefill_speedup"] = 1 / row["prefill_ms_ratio"]
        row["flops_speedup"] = 1 / row["flops_ratio"]
        row["speedup_of_ideal"] = row["prefill_speedup"] / row["flops_speedup"]
        if "free_selection_ms_ratio" in row:
            row["free_selection_speedup"] = 1 / row["free_selection_ms_ratio"]
            row["speedup_of_free"] = row["prefill_speedup"] / row["free_selection_speedup"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [("| tokens | LLM tokens | prefill ms | speedup | FLOPs-ideal speedup | speedup / ideal | "
              "free-selection speedup | speedup / free | scoring % of dense prefill | decode tok/s | KV MiB |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['tokens']} | failed: {row['error']} ||||||||||")
            continue
        free = (f"{row['free_selection_speedup']:.2f} | {row['speedup_of_free']:.2f}"
                if "free_selection_speedup" in row else " | ")
        lines.append(f"| {row['tokens']} | {row['llm_tokens_after_pruning']} | {row['prefill_ms']:.0f} | "
                     f"{row['prefill_speedup']:.2f} | {row['flops_speedup']:.2f} | {row['speedup_of_ideal']:.2f} | "
                     f"{free} | {100 * row['scoring_ms_ratio']:.1f} | {row['decode_tok_s']:.2f} | "
                     f"{row['kv_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def machine_line(report: dict) -> str:
    m = report["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_before"])
    busy = (f" (the suite's {report['after']} ran just before)" if report.get("after") else
            " (busy: above 1.5, other jobs ran beside it)" if m["load_before"][0] > 1.5 else "")
    batch = f"batch {report['batch']}; " if report.get("batch", 1) > 1 else ""
    probe = m.get("matmul_tflops")
    probe = ("; MLP-shaped matmul, TFLOP/s by rows: " + ", ".join(f"{rows} rows {tf:.2f}" for rows, tf in probe.items())
             if probe else "")
    return (f"{report['model']}; {report['visual_tokens']} visual + {report['text_tokens']} text tokens; {batch}"
            f"{report['dtype']} on {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}, "
            f"{m['torch_threads']} thread(s), torch {report['torch']}; medians of {report['rounds']} interleaved "
            f"rounds; 1/5/15-min load before the run {load}{busy}; {report['seconds']} s in all{probe}.")


def write_markdown(path: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- speed:NAME -->`` and ``<!-- /speed:NAME -->`` (appended when absent)."""
    start, end = f"<!-- speed:{name} -->", f"<!-- /speed:{name} -->"
    doc = path.read_text()
    block = f"{start}\n{text}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    path.write_text(pattern.sub(lambda _: block, doc) if pattern.search(doc) else f"{doc.rstrip()}\n\n{block}\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEPTHS), default="llava-1.5-7b", help="whose widths")
    parser.add_argument("--llm-layers", type=int, default=None, help="default: the model's entry in DEPTHS")
    parser.add_argument("--vision-layers", type=int, default=None, help="default: the model's entry in DEPTHS")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="copies of the prompt in one forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians over rounds)")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated for the decode rate")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--keeps", type=int, nargs="*", default=list(DEFAULT_KEEPS),
                        help="kept visual-token counts (of 576) for the default method set")
    parser.add_argument("--tokens", nargs="*", metavar="SPEC", help="token methods (default: see default_specs)")
    parser.add_argument("--profile", action="store_true", help="profile one prefill per setting instead of timing")
    parser.add_argument("--visual-tokens", type=int, nargs="*", default=None, metavar="N",
                        help="cost curve instead: prefill time and memory at these visual-token counts (squares)")
    parser.add_argument("--ceiling", action="store_true",
                        help="instead: the LLM decoder alone at the dense and the pruned lengths (no method, no engine)")
    parser.add_argument("--suite", action="store_true", help="run every table make bench records (SUITE)")
    parser.add_argument("--after", default=None, help=argparse.SUPPRESS)  # the suite entry that ran just before
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/speed[_profile].json)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table into this file's speed block")
    parser.add_argument("--render", type=Path, nargs="*", metavar="JSON",
                        help="measure nothing: write the tables of these result files into --markdown")
    args = parser.parse_args(argv)
    llm, vision = DEPTHS[args.model]
    args.llm_layers = args.llm_layers or llm
    args.vision_layers = args.vision_layers or vision
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: use 1 or more")
    return args


# make bench: (JSON stem, arguments); its measured time is in the module docstring
SUITE = (("speed", ["--new-tokens", "3"]),   # consecutive entries on one configuration share its build (built_model)
         ("speed_batch4", ["--batch", "4", "--keeps", "64", "--new-tokens", "2",
                           "--tokens", *(f"{name}:keep=64" for name in PROFILED)]),
         ("speed_ceiling", ["--ceiling"]),
         ("speed_profile", ["--profile"]),
         ("speed_cost", ["--visual-tokens", "576", "1156", "2304", "2916", "--repeats", "2"]),
         ("speed_llava-next-8b", ["--model", "llava-next-8b", "--keeps", "64", "--new-tokens", "2"]),
         ("speed_qwen2-vl-7b", ["--model", "qwen2-vl-7b", "--keeps", "64", "--new-tokens", "2"]))


def run_suite(argv: list[str]) -> int:
    """Every entry of :data:`SUITE` in turn, each writing its JSON and (with ``--markdown``) its block;
    the options given with ``--suite`` (threads, device, markdown) apply to all of them."""
    shared = [value for value in argv if value != "--suite"]
    for index, (stem, extra) in enumerate(SUITE):
        extra = [*extra, "--after", SUITE[index - 1][0]] if index else extra
        print(f"== {stem}", file=sys.stderr, flush=True)
        code = main([*shared, *extra, "--out", str(Path(__file__).parent / "results" / f"{stem}.json")])
        if code:
            return code
    return 0


def ceiling_rows(model, preset: Preset, args) -> list[dict]:
    """The hardware's own ceiling, with no token method and no engine: the model's LLM decoder alone
    (``inputs_embeds`` of random states, KV cache filled) on the dense prompt's length and on the
    lengths that 64 and 128 kept visual tokens leave, interleaved rounds. Its speedup over its
    FLOPs-ideal speedup is what any method pruning before the LLM can reach on this machine."""
    from vlmprune.measure.flops import TokenSchedule, analytic_flops, dense_schedule
    from vlmprune.models import get_adapter
    decoder = get_adapter(model).llm
    text, dense = preset.config.text_config, preset.geometry.llm_tokens + args.text_tokens
    lengths = [dense, *(scaled_keep(preset, keep) + args.text_tokens for keep in args.keeps)]
    generator = torch.Generator().manual_seed(0)
    states = {n: torch.randn(args.batch, n, text.hidden_size, generator=generator).to(model.dtype).to(args.device)
              for n in lengths}
    vision = dense_schedule(preset, args.text_tokens).vision
    flops = {n: analytic_flops(preset, args.text_tokens, TokenSchedule(
        vision=vision, crops=1, projector=0, llm=[n] * text.num_hidden_layers, head=0)).llm for n in lengths}
    times = {n: [] for n in lengths}
    with torch.no_grad():
        for index in range(args.repeats + 1):              # the first round warms up
            for n in lengths:
                seconds = median_seconds(lambda: decoder(inputs_embeds=states[n], use_cache=True), model, 1, 0)
                if index:
                    times[n].append(1000 * seconds)
    rows = []
    for n in lengths:
        ratio = statistics.median(t / d for t, d in zip(times[n], times[dense]))
        rows.append({"llm_tokens": n, "llm_ms": statistics.median(times[n]), "llm_ms_ratio": ratio,
                     "flops_ratio": flops[n] / flops[dense], "speedup_of_ideal": flops[n] / flops[dense] / ratio})
    return rows


def ceiling_table(rows: list[dict]) -> str:
    lines = ["| LLM tokens | LLM decoder ms | speedup | FLOPs-ideal speedup | speedup / ideal |", "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['llm_tokens']} | {row['llm_ms']:.0f} | {1 / row['llm_ms_ratio']:.2f} | "
                     f"{1 / row['flops_ratio']:.2f} | {row['speedup_of_ideal']:.2f} |")
    return "\n".join(lines)


def matmul_tflops(width: int, ffn: int, rows: list[int], dtype: torch.dtype, device: str) -> dict[int, float]:
    """Achieved TFLOP/s of one (rows x width) @ (width x ffn) product, the LLM's MLP shape, per row
    count: the hardware's own scaling, against which a pruned prefill's speedup is read."""
    layer = torch.nn.Linear(width, ffn, bias=False, dtype=dtype, device=device)
    result = {}
    for count in sorted(set(rows)):
        x = torch.randn(count, width, dtype=dtype, device=device)
        seconds = median_seconds(lambda: layer(x), layer, repeats=5, warmup=1)
        result[count] = round(2 * count * width * ffn / seconds / 1e12, 3)
    return result


def machine_facts(args: argparse.Namespace, load_before: list[float]) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "device": args.device, "load_before": load_before,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.render is not None:
        for path in args.render:
            render(path, args.markdown)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        return run_suite(argv)
    stem = ("speed_profile" if args.profile else "speed_cost" if args.visual_tokens else
            "speed_ceiling" if args.ceiling else "speed")
    out = args.out or Path(__file__).parent / "results" / f"{stem}.json"
    load_before = list(os.getloadavg())

    dtype = getattr(torch, args.dtype)
    if args.visual_tokens:
        return cost_main(args, dtype, out, load_before)
    preset = reduced_preset(args.model, args.llm_layers, args.vision_layers)
    started = time.time()
    model = built_model(preset, dtype, args.device)
    inputs = {k: v.to(args.device) for k, v in real_inputs(preset, args.text_tokens, dtype, args.batch).items()}
    specs = args.tokens if args.tokens is not None else (
        [f"{name}:keep={scaled_keep(preset, 64)}" for name in PROFILED] if args.profile else default_specs(preset, args.keeps))
    report = {"model": preset.name, "visual_tokens": preset.geometry.llm_tokens, "text_tokens": args.text_tokens,
              "batch": args.batch, "dtype": args.dtype, "rounds": 1 if args.profile else args.repeats,
              "new_tokens": args.new_tokens, "machine": machine_facts(args, load_before), "torch": torch.__version__,
              "after": args.after}
    if args.profile:
        rows = profile_rows(model, inputs, [None, *specs])
    elif args.ceiling:
        rows = ceiling_rows(model, preset, args)
        report["rounds"] = args.repeats
    else:
        bytes_per_value = torch.empty((), dtype=dtype).element_size()
        rows, failed = [], []
        for spec in [None, *specs]:
            print(f"measuring {spec or 'dense'} ...", file=sys.stderr, flush=True)
            try:
                rows.append(static_measures(model, preset, inputs, spec, args.text_tokens, bytes_per_value))
            except (VlmpruneError, RuntimeError, ValueError, NotImplementedError) as exc:
                if spec is None:
                    raise
                rows = [row for row in rows if row["tokens"] != spec]
                failed.append({"tokens": spec, "error": str(exc).splitlines()[0][:160]})
        referenced = {f"{name}:keep={scaled_keep(preset, 64)}" for name in PROFILED}
        free = {row["tokens"]: free_selection(model, inputs, tokens.from_spec(row["tokens"])) for row in rows
                if row["tokens"] in referenced}
        print(f"timing {len(rows)} settings and {len(free)} free selections x {args.repeats} rounds ...",
              file=sys.stderr, flush=True)
        timed_rounds(model, inputs, rows, args.repeats, args.new_tokens, free)
        rows = with_static_ratios(rows) + failed
        text = preset.config.text_config
        report["machine"]["matmul_tflops"] = matmul_tflops(
            text.hidden_size, text.intermediate_size,
            [args.batch * row["llm_tokens_after_pruning"] for row in rows if "error" not in row], dtype, args.device)
    report.update(seconds=round(time.time() - started, 1), results=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    text = report_text(report, out)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, out.stem, text)
    print(f"wrote {out}" + (f" and the {out.stem} block of {args.markdown}" if args.markdown else ""))
    return 0


def report_text(report: dict, path: Path) -> str:
    """The machine line and the table of a result file, whichever mode wrote it."""
    rows = report["results"]
    if rows and "steps_ms" in rows[0]:
        body = profile_table(rows)
    elif rows and "llm_ms" in rows[0]:
        body = ceiling_table(rows)
    elif rows and "peak_bytes" in rows[0]:
        body = f"{cost_table(rows)}\n\n![prefill time and memory against visual tokens](../benchmarks/results/{path.stem}.png)"
    else:
        body = table(rows)
    return f"{machine_line(report)}\n\n{body}"


def render(path: Path, markdown: Path | None) -> None:
    text = report_text(json.loads(path.read_text()), path)
    print(text)
    if markdown:
        write_markdown(markdown, path.stem, text)


def cost_main(args, dtype, out: Path, load_before: list[float]) -> int:
    started = time.time()
    rows = cost_rows(args, dtype, args.tokens if args.tokens is not None else list(COST_SPECS))
    report = {"model": reduced_preset(args.model, args.llm_layers, args.vision_layers).name, "visual_tokens": args.visual_tokens,
              "text_tokens": args.text_tokens, "dtype": args.dtype, "rounds": args.repeats,
              "machine": machine_facts(args, load_before), "torch": torch.__version__, "after": args.after, "seconds": round(time.time() - started, 1), "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot = out.with_suffix(".png")
    cost_plot(rows, plot)
    text = report_text(report, out)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, out.stem, text)
    print(f"wrote {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
