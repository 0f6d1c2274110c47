"""Offloaded weight pruning: the same weights as pruning the model in memory, in less memory than that needs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vlmprune as vp
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.models.tiny import build_tiny, sample
from vlmprune.weights.offload import INDEX, prune_offloaded
from vlmprune.weights.saving import CONFIG_KEY


def _calibration(make, n=3):
    batch = make(text_lens=tuple(5 + 2 * i for i in range(n)), seed=1)
    return [sample(batch, i) for i in range(n)]


def _state(directory):
    return AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).state_dict()


def _assert_same(expected: dict, directory) -> None:
    got = _state(directory)
    assert set(got) == set(expected)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


@pytest.mark.parametrize("family,spec", [("llava", "wanda:sparsity=0.5"), ("qwen2_vl", "sparsegpt:sparsity=0.5"),
                                         ("llava", "tamp:sparsity=0.5"), ("qwen2_vl", "magnitude:pattern=2:4")])
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_offloaded_prune_is_bit_exact(tmp_path, family, spec, offload):
    """Activations (SparseGPT's updates depend on them exactly), a dense sweep visiting each block twice
    (TAMP), no calibration (magnitude): every weight and mask equal to the in-memory prune's."""
    model, make = build_tiny(family, seed=0)
    source = tmp_path / "source"
    model.save_pretrained(source)
    calibration = _calibration(make)
    resident = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    expected = vp.weights.prune(resident, vp.weights.from_spec(spec), calibration=calibration)
    report = prune_offloaded(source, vp.weights.from_spec(spec), calibration, tmp_path / "out", offload=offload)
    assert report.layer_sparsity == expected.layer_sparsity
    _assert_same(resident.state_dict(), tmp_path / "out")
    index = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    assert sum(f.startswith("model-block-") for f in set(index.values())) == len(resident.model.language_model.layers)


def test_cli_offload_matches_the_in_memory_prune_on_toy_large(tmp_path):
    base = ["prune", "--model", "toy-large", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert main(base + ["--offload", "disk", "--out", str(tmp_path / "offloaded")]) == 0
    _assert_same(_state(tmp_path / "plain"), tmp_path / "offloaded")
    plain, offloaded = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "offloaded"))
    assert offloaded[CONFIG_KEY].pop("offload") == "disk"
    for config in (plain, offloaded):
        config[CONFIG_KEY].pop("seconds")
    assert plain == offloaded                      # the same record, stored dtype and source
    assert (tmp_path / "offloaded" / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv,text", [
    (["--offload", "disk", "--recipe", "toy-large-atv50-ivtp16"], "does not apply a --recipe"),
])
def test_cli_offload_errors_exit_2(tmp_path, capsys, argv, text):
    code = main(["prune", "--model", "toy-large", "--out", str(tmp_path / "out")] + argv)
    assert code == 2 and text in capsys.readouterr().err


def test_a_directory_without_safetensors_is_one_line(tmp_path):
    model, _ = build_tiny("llava", seed=0)
    model.config.save_pretrained(tmp_path / "config-only")
    with pytest.raises(VlmpruneError, match="no safetensors weights"):
        prune_offloaded(tmp_path / "config-only", vp.weights.from_spec("magnitude"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Run in a fresh process under an address-space cap set just before pruning (after the imports), so the
# cap binds what pruning itself maps: the weights read in, activations, temporaries.
CAPPED = """
import resource, sys, torch
torch.set_num_threads(1)
import accelerate.utils, safetensors.torch, transformers.conversion_mapping, transformers.core_model_loading
from transformers import AutoModelForImageTextToText
import vlmprune as vp
from vlmprune.models.tiny import build_tiny, sample
from vlmprune.weights.offload import prune_offloaded
mode, source, out, cap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
_, make = build_tiny("llava", seed=0, device="meta")
batch = make(text_lens=(5, 7), seed=1)
calibration = [sample(batch, i) for i in range(2)]
method = vp.weights.from_spec("wanda:sparsity=0.5")
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + cap, resource.RLIM_INFINITY))
try:
    if mode == "memory":
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
        vp.weights.prune(model, method, calibration=calibration)
    else:
        prune_offloaded(source, method, calibration, out, offload=mode)
except (MemoryError, RuntimeError) as exc:
    print("out of memory:", str(exc).splitlines()[0])
    sys.exit(3)
"""
CAP = 128 * 2 ** 20          # measured peaks above the imports: disk 80 MiB, cpu 174 MiB, in memory 198 MiB


def _capped(mode: str, source, out) -> subprocess.CompletedProcess:
    """One malloc arena and a fixed mmap threshold, so that freed blocks leave the address space at once
    (glibc otherwise keeps freed large blocks in its heap, and the cap would count those too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    return subprocess.run([sys.executable, "-c", CAPPED, mode, str(source), str(out), str(CAP)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def test_disk_offload_prunes_under_a_memory_cap_the_in_memory_prune_exceeds(tmp_path):
    """16 decoder blocks of 8.4 MiB each (135 MiB, float32) against a 128 MiB cap on the address space."""
    model, make = build_tiny("llava", seed=0, text_config={"hidden_size": 384, "intermediate_size": 1536,
                                                                "num_hidden_layers": 16})
    blocks = sum(p.numel() * p.element_size() for p in model.model.language_model.layers.parameters())
    assert blocks > CAP
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="20MB")
    del model
    in_memory = _capped("memory", source, tmp_path / "unused")
    assert in_memory.returncode == 3, in_memory.stdout + in_memory.stderr
    for mode, code in (("cpu", 3), ("disk", 0)):
        run = _capped(mode, source, tmp_path / mode)
        assert run.returncode == code, f"{mode}: {run.stdout}{run.stderr[-2000:]}"
    resident = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    batch = make(text_lens=(5, 7), seed=1)
    vp.weights.prune(resident, vp.weights.from_spec("wanda:sparsity=0.5"),
                     calibration=[sample(batch, i) for i in range(2)])
    _assert_same(resident.state_dict(), tmp_path / "disk")
