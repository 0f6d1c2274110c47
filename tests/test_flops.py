"""FLOPs: the closed formula against a hand count, the counted (meta-device) FLOPs against the
formula for every family, the IVTP reference point, FastV's measured saving, and the CLI."""
from __future__ import annotations

import json

import pytest

from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.measure.flops import ScoringStep, TokenSchedule, analytic_flops, count_flops, dense_schedule
from vlmprune.models.presets import Preset, get_preset, preset_names
from vlmprune.models.tiny import FAMILIES, build_tiny

TINY_IMAGE = {"llava": (28, 28), "llava_next": (56, 56), "llava_onevision": (56, 56),
              "qwen2_vl": (56, 56), "qwen2_5_vl": (56, 56)}


def tiny_preset(family: str) -> Preset:
    model, _ = build_tiny(family, device="meta")
    return Preset(f"tiny-{family}", model.config, TINY_IMAGE[family])


def test_analytic_matches_a_hand_count_on_tiny_llava():
    preset = tiny_preset("llava")
    text = 10
    # vision: CLIP 28 px / 7 px patches -> 16 patches + [CLS]; width 32, MLP 64, 4 layers
    n, d, ff = 17, 32, 64
    conv = 2 * 16 * d * 3 * 7 * 7
    vision_layer = 4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * ff
    # projector: 16 features (CLS dropped), 32 -> 32 -> 32
    projector = 2 * 16 * (32 * 32 + 32 * 32)
    # LLM: 26 tokens, width 32, 4 heads x 8 = 32 for q, 2 kv heads x 8 = 16 for k and v, SwiGLU 64, vocab 128
    s = 16 + text
    llm_layer = 2 * s * 32 * (32 + 16 + 16 + 32) + 2 * 2 * s * s * 32 + 3 * 2 * s * 32 * 64
    head = 2 * s * 32 * 128
    flops = analytic_flops(preset, text)
    assert flops.vision == conv + 4 * vision_layer
    assert flops.projector == projector
    assert flops.llm == 4 * llm_layer + head
    assert flops.extra == 0
    assert flops.total == conv + 4 * vision_layer + projector + 4 * llm_layer + head


@pytest.mark.parametrize("family", FAMILIES)
def test_counted_matches_analytic_for_every_family(family):
    preset = tiny_preset(family)
    counted = count_flops(preset, 12).flops.as_dict()
    analytic = analytic_flops(preset, 12).as_dict()
    for part in ("vision", "projector", "llm", "total"):
        assert counted[part] > 0
        assert counted[part] == pytest.approx(analytic[part], rel=0.02), part
    assert counted["extra"] == 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_last_logits_count_the_lm_head_at_one_position(family):
    preset = tiny_preset(family)
    every, last = count_flops(preset, 12), count_flops(preset, 12, last_logits=True)
    text = preset.config.text_config
    positions = every.schedule.head
    assert last.schedule.head == 1 and positions > 1
    assert every.flops.llm - last.flops.llm == 2 * (positions - 1) * text.hidden_size * text.vocab_size
    assert last.flops.vision == every.flops.vision


def test_llava_13b_matches_the_ivtp_reference():
    preset = get_preset("llava-1.5-13b")
    assert preset.geometry.llm_tokens == 576
    counted = count_flops(preset, 128).flops
    analytic = analytic_flops(preset, 128)
    assert counted.total == pytest.approx(19.4e12, rel=0.05)
    assert counted.total == pytest.approx(analytic.total, rel=0.02)
    assert counted.llm == pytest.approx(analytic.llm, rel=0.02)


def test_fastv_saving_on_llava_7b_is_what_the_formula_predicts():
    from vlmprune import tokens

    preset = get_preset("llava-1.5-7b")
    dense = analytic_flops(preset, 128)
    pruned = count_flops(preset, 128, tokens.from_spec("fastv:layer=2,keep=0.5"))
    full, kept = 576 + 128, 288 + 128
    assert pruned.schedule.llm == [full, full] + [kept] * 30
    # FastV's own cost: one query row at layer 1, with that layer's q/k/v projections
    predicted = analytic_flops(preset, 128, TokenSchedule(
        vision=dense_schedule(preset, 128).vision, crops=1, projector=576, llm=[full, full] + [kept] * 30,
        head=kept, scoring=[ScoringStep("llm", full, 1)]))
    assert pruned.flops.total < dense.total
    assert dense.total - pruned.flops.total == pytest.approx(dense.total - predicted.total, rel=0.02)
    assert pruned.flops.vision == dense.vision and pruned.flops.projector == dense.projector
    assert pruned.flops.extra > 0


def test_anyres_and_qwen_geometry():
    assert get_preset("llava-next-8b").geometry.llm_tokens == 576 + 48 * 48 + 48
    assert get_preset("llava-onevision-7b").geometry.llm_tokens == 729 + 54 * 54 + 54
    assert get_preset("qwen2.5-vl-7b").geometry.llm_tokens == 576


def test_presets_and_unknown_names():
    assert {"llava-1.5-7b", "llava-1.5-13b", "llava-next-8b", "llava-onevision-7b", "qwen2-vl-7b",
            "qwen2.5-vl-7b", "toy-large", "toy-small"} == set(preset_names())
    assert get_preset("qwen2-vl-7b").config.text_config.num_hidden_layers == 28
    with pytest.raises(VlmpruneError, match="llava-1.5-7b"):
        get_preset("llava-9b")


def test_a_saved_config_directory_is_a_preset(tmp_path):
    tiny_preset("llava").config.save_pretrained(tmp_path)
    preset = get_preset(str(tmp_path))
    assert preset.family == "llava" and preset.image_size == (28, 28)


def test_cli_json(tmp_path, capsys):
    tiny_preset("llava").config.save_pretrained(tmp_path)
    assert main(["flops", "--model", str(tmp_path), "--text-tokens", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"analytic", "counted"}
    assert set(report["counted"]) == {"vision", "projector", "llm", "extra", "total"}
    assert report["counted"]["total"] == report["analytic"]["total"]


@pytest.mark.parametrize("argv", [["--model", "no-such-model"],
                                  ["--model", "llava-1.5-7b", "--tokens", "nomethod:keep=2"],
                                  ["--model", "llava-1.5-7b", "--tokens", "fastv:keep"],
                                  ["--model", "llava-1.5-7b", "--text-tokens", "0"]])
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(["flops", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmprune: error:") and "\n" not in err


@pytest.mark.parametrize("name", ["toy-large", "toy-small"])
def test_toy_presets_read_the_shipped_checkpoints(name):
    """The preset is the shipped model's own config (a missing checkpoint fails here, it is not skipped)."""
    import json

    from vlmprune.toyworld import checkpoint_dir

    shipped = json.loads((checkpoint_dir(name) / "config.json").read_text())
    preset = get_preset(name)
    assert preset.family == "llava"
    assert preset.config.text_config.num_hidden_layers == shipped["text_config"]["num_hidden_layers"]
    assert preset.config.text_config.hidden_size == shipped["text_config"]["hidden_size"]
    assert preset.config.vision_config.num_hidden_layers == shipped["vision_config"]["num_hidden_layers"]
    assert count_flops(preset, 16).flops.total == pytest.approx(analytic_flops(preset, 16).total, rel=0.02)


def test_a_guide_model_inside_the_forward_is_counted_as_extra_only():
    """PGP runs toy-small (same class and module names as toy-large) inside toy-large's forward. The
    large model's LLM part must be what any method keeping the same tokens at the same site costs
    (DivPrune, also before LLM layer 0), and the guide's whole cost must land in ``extra``: attribution
    by module name gave the large LLM 0 and moved it into ``extra``."""
    from vlmprune import toyworld
    from vlmprune.eval.harness import evaluate

    model, processor = toyworld.load("toy-large")
    flops = {spec: evaluate(model, processor, tokens=spec, tasks=["existence"], limit=1, progress=False)["flops"]
             for spec in ("divprune:keep=5", "pgp:keep=5")}
    divprune, pgp = flops["divprune:keep=5"], flops["pgp:keep=5"]
    assert pgp["llm"] == divprune["llm"] > 0
    assert (pgp["vision"], pgp["projector"]) == (divprune["vision"], divprune["projector"])
    # the guide: toy-small's 2 LLM layers over the whole prompt and its projector, several times DivPrune's scoring
    assert pgp["extra"] > 10 * divprune["extra"]
    assert pgp["total"] == pgp["vision"] + pgp["projector"] + pgp["llm"] + pgp["extra"]
