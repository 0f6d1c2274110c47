"""Toy models: training steps on micro configs, the `toy train` CLI, and the shipped checkpoints."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPModel

from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.tokens.text_relevance import clip_token_relevance
from vlmprune.toyworld import build_prompt, checkpoint_dir, load, load_clip, test_split
from vlmprune.toyworld import configs
from vlmprune.toyworld.processor import build_processor
from vlmprune.toyworld.tokenizers import build_clip_tokenizer, build_llm_tokenizer, corpus
from vlmprune.toyworld.train import (ClipTrainer, NamingWords, PositionReadout, SequenceBuilder, StageSettings,
                                     _clip_batch, _lvlm_batch, accuracy_by_task, lookup_losses, lvlm_losses,
                                     name_targets, naming_words, new_lvlm, pixel_values, position_losses, train,
                                     vision_features)

MICRO = {"toy-clip": "micro", "toy-large": "micro", "toy-small": "micro"}


@pytest.fixture(scope="module")
def tokenizers():
    texts = corpus(n_scenes=300)
    return build_clip_tokenizer(texts), build_llm_tokenizer(texts)


def test_micro_clip_and_lvlm_losses_decrease(tokenizers):
    torch.manual_seed(0)
    clip_tokenizer, llm_tokenizer = tokenizers
    clip = CLIPModel(configs.clip_config("micro", clip_tokenizer))
    trainer = ClipTrainer(clip)
    batch = _clip_batch(random.Random(0), 6, clip_tokenizer)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = sum(trainer.losses(*batch, clip_tokenizer).values())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first

    processor = build_processor(llm_tokenizer)
    model = new_lvlm("micro", processor, clip, seed=0)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    pixels, batch = _lvlm_batch(random.Random(0), SequenceBuilder(processor), "instruct", 2, 3)
    readout = PositionReadout(model.config.text_config.hidden_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(readout.parameters()), lr=3e-3)
    words = naming_words(llm_tokenizer)
    with pytest.raises(VlmpruneError, match="eager"):
        lvlm_losses(model, vision_features(model, pixels), batch, words)
    model.set_attn_implementation("eager")
    losses = []
    for _ in range(8):
        parts = lvlm_losses(model, vision_features(model, pixels), batch, words, readout)
        assert set(parts) == {"text", "grounding", "lookup", "answer_lookup", "where"}
        loss = sum(parts.values())
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0]
    # The training loss path equals the model's own forward from pixel values.
    with torch.no_grad():
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        direct = model(pixel_values=pixels, **inputs).loss
        manual = lvlm_losses(model, vision_features(model, pixels), batch)["text"]
    assert torch.allclose(direct, manual, atol=1e-5)


def test_lookup_losses_are_minus_log_of_the_attention_mass_on_what_is_named():
    # [image x3, "red", "star", "blue", ":", answer "red"]: image token 5; red=10, blue=11, star=20, ":"=7.
    input_ids = torch.tensor([[5, 5, 5, 10, 20, 11, 7, 10]])
    labels = torch.tensor([[-100] * 7 + [10]])
    words = NamingWords({"colour": torch.tensor([10, 11]), "shape": torch.tensor([20])}, question_end=9)
    targets = {"colour": torch.tensor([[1, 0, 1]]), "shape": torch.tensor([[0, 1, 0]])}  # red patches 0, 2; star 1
    first = torch.zeros(1, 2, 8, 8)
    first[0, 0, 3, :3] = torch.tensor([0.1, 0.2, 0.3])    # "red": 0.4 on the red patches
    first[0, 0, 4, :3] = torch.tensor([0.5, 0.2, 0.1])    # "star": 0.2 on the star
    first[0, 0, 5, :3] = torch.tensor([0.3, 0.3, 0.3])    # "blue" names nothing in this image: no term
    first[0, 0, 7, :3] = torch.tensor([0.25, 0.0, 0.25])  # the answer "red" is a naming word too: 0.5
    second = torch.zeros(1, 2, 8, 8)
    second[0, 0, 6, 3:6] = torch.tensor([0.3, 0.2, 0.4])  # answer start: 0.5 on "red star", not "blue"
    losses = lookup_losses((first, second), input_ids, 5, name_targets(input_ids, labels, targets, words))
    assert losses["lookup"].item() == pytest.approx(-(math.log(0.4) + math.log(0.2) + math.log(0.5)) / 3, rel=1e-5)
    assert losses["answer_lookup"].item() == pytest.approx(-math.log(0.5), rel=1e-5)
    with pytest.raises(VlmpruneError, match="eager"):
        lookup_losses((None, None), input_ids, 5, name_targets(input_ids, labels, targets, words))


def test_answer_lookup_gives_each_named_object_of_the_stem_its_own_head():
    # Turn 1: [image x3, "star", "left", "circle", "?", option "red", ":"] answer "yes";
    # turn 2: ["circle", "?", ":"] answer "red". star=20, circle=21, red=10, "?"=9, ":"=7, yes=30.
    input_ids = torch.tensor([[5, 5, 5, 20, 8, 21, 9, 10, 7, 30, 21, 9, 7, 10]])
    labels = torch.tensor([[-100] * 9 + [30] + [-100] * 3 + [10]])
    words = NamingWords({"colour": torch.tensor([10, 11]), "shape": torch.tensor([20, 21])}, question_end=9)
    targets = {"colour": torch.tensor([[1, 0, 1]]), "shape": torch.tensor([[1, 2, 0]])}  # star 0, circle 1, red 0, 2
    first = torch.full((1, 2, 14, 14), 1 / 14)
    second = torch.zeros(1, 2, 14, 14)
    second[0, 0, 8, [3, 5, 7]] = torch.tensor([0.6, 0.3, 0.05])  # head 0 at the first answer: the star
    second[0, 1, 8, [3, 5]] = torch.tensor([0.1, 0.8])            # head 1: the circle; the option "red" is no phrase
    second[0, 0, 12, [5, 10]] = torch.tensor([0.2, 0.7])          # second answer: only its own "circle" counts
    losses = lookup_losses((first, second), input_ids, 5, name_targets(input_ids, labels, targets, words))
    head0 = -(math.log(0.6) + math.log(0.7)) / 2
    assert losses["answer_lookup"].item() == pytest.approx((head0 - math.log(0.8)) / 2, rel=1e-5)


def test_position_loss_targets_the_centre_of_what_each_word_and_each_question_names():
    # The conversation of the two-head test; patches 0, 1, 2 lie in the top row at columns 0, 1, 2,
    # which _centroids scales to -1, -7/9 and -5/9 (rows: -1). A zero readout predicts (0, 0).
    input_ids = torch.tensor([[5, 5, 5, 20, 8, 21, 9, 10, 7, 30, 21, 9, 7, 10]])
    labels = torch.tensor([[-100] * 9 + [30] + [-100] * 3 + [10]])
    words = NamingWords({"colour": torch.tensor([10, 11]), "shape": torch.tensor([20, 21])}, question_end=9)
    targets = {"colour": torch.tensor([[1, 0, 1]]), "shape": torch.tensor([[1, 2, 0]])}  # star 0, circle 1, red 0, 2
    readout = PositionReadout(4)
    for layer in (readout.word, readout.answer):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    hidden = tuple(torch.randn(1, 14, 4) for _ in range(3))
    star, circle, red = 1 + 1, (7 / 9) ** 2 + 1, (7 / 9) ** 2 + 1   # squared distances from (0, 0)
    words_term = (star + 2 * circle + 2 * red) / 10                   # star, circle, red, circle, red
    first = (star + circle) / 4                                       # answer 1: the star; answer 2: the circle
    second = circle / 2                                               # answer 1 only: the circle
    loss = position_losses(hidden, name_targets(input_ids, labels, targets, words), readout)
    assert loss.item() == pytest.approx((words_term + first + second) / 3, rel=1e-5)


def test_micro_train_writes_loadable_float16_checkpoints(tmp_path):
    tiny = StageSettings(steps=2, batch=2, lr=1e-3, warmup=1)
    settings = {"toy-clip": {"clip": tiny}, "toy-large": {"caption": tiny, "instruct": tiny},
                "toy-small": {"caption": tiny, "instruct": tiny}}
    timings = train(str(tmp_path), settings=settings, config_names=MICRO, lvlms=("toy-small",))
    assert set(timings) == {"clip", "caption", "instruct"}
    assert sorted(os.listdir(tmp_path)) == ["toy-clip", "toy-small"]
    with safe_open(str(tmp_path / "toy-small" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    model, processor = load(str(tmp_path / "toy-small"))
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    acc = accuracy_by_task(model, processor, test_split("counting", 2))
    assert set(acc) == {"counting"}


def test_toy_train_cli_rejects_bad_input(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["toy", "train", "--out", out, "--stage", "bogus"]) == 2
    assert main(["toy", "train", "--out", out, "--minutes", "0"]) == 2
    assert main(["toy", "train", "--out", out, "--threads", "0"]) == 2
    assert main(["toy", "train", "--out", out, "--stage", "instruct"]) == 2
    err = capsys.readouterr().err
    assert "--stage" in err and "--minutes" in err and "caption" in err
    assert os.listdir(out) == []  # nothing half-written
    with pytest.raises(SystemExit):
        main(["toy", "train", "--model", "toy-huge"])


def test_unknown_model_names_are_user_errors():
    with pytest.raises(VlmpruneError):
        load("toy-huge")
    with pytest.raises(VlmpruneError):
        checkpoint_dir("llava")
    with pytest.raises(VlmpruneError):
        configs.llava_config("nope", None)


def test_relevance_offsets_point_into_the_text(tokenizers):
    clip_tokenizer, _ = tokenizers
    torch.manual_seed(0)
    clip = CLIPModel(configs.clip_config("micro", clip_tokenizer)).eval()
    texts = ["what colour is the star?", "is there a red cross?"]
    pixels = pixel_values([item.image for item in test_split("existence", 2)])
    results = clip_token_relevance(clip, clip_tokenizer, pixels, texts)
    for text, (offsets, scores) in zip(texts, results):
        assert len(offsets) == len(scores) > 0
        assert "".join(text[s:e] for s, e in offsets) == text.replace(" ", "")
        assert scores.abs().max() <= 1.0
    with pytest.raises(VlmpruneError):
        clip_token_relevance(clip, clip_tokenizer, pixels[:1, 0], texts)


# ---------------------------------------------------------------- the shipped checkpoints

def test_shipped_checkpoints_are_small_float16_and_load():
    total = 0
    for name in ("toy-clip", "toy-large", "toy-small"):
        path = checkpoint_dir(name) / "model.safetensors"
        total += path.stat().st_size
        with safe_open(str(path), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in list(f.keys())[:5])
    assert total < 60e6
    large, processor = load("toy-large")
    small, _ = load("toy-small")
    assert large.config.text_config.num_hidden_layers >= 8
    assert 2 <= small.config.text_config.num_hidden_layers <= 3
    assert large.config.vision_config.num_hidden_layers >= 6
    # Both LVLMs share the CLIP vision tower.
    clip, _ = load_clip()
    weight = clip.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(large.model.vision_tower.embeddings.patch_embedding.weight, weight)
    assert torch.equal(small.model.vision_tower.embeddings.patch_embedding.weight, weight)


# The first 100 test items of each task, as recorded in docs/results/tokens.md (dense: 95.7% average).
RECORDED_DENSE = {"existence": 1.00, "attribute": 0.99, "counting": 0.88, "spatial": 1.00, "reading": 0.87,
                  "choice": 1.00}


def test_shipped_toy_large_keeps_its_recorded_accuracy():
    """A broken checkpoint, tokenizer or preprocessing change turns this red: dense toy-large on a fixed
    slice of every task stays within a few points of the recorded figures (about 12 s)."""
    from vlmprune.eval.harness import average, generate_answers, load_items, score

    model, processor = load("toy-large")
    items = load_items(list(RECORDED_DENSE), 100)
    replies = generate_answers(model, processor, [item for task in items.values() for item in task],
                               batch_size=50, progress=False)
    tasks = score(items, replies)
    for task, recorded in RECORDED_DENSE.items():
        assert tasks[task]["accuracy"] >= recorded - 0.08, f"{task}: {tasks[task]['accuracy']:.2f} (recorded {recorded:.2f})"
    assert average(tasks) >= 0.93


def test_shipped_clip_text_relevance_prefers_object_words():
    from vlmprune.toyworld.quality import relevance_figure

    clip, tokenizer = load_clip()
    items = test_split("attribute", 30) + test_split("existence", 30)
    assert relevance_figure(clip, tokenizer, items) >= 0.8
