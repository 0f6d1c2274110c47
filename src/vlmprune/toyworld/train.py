"""Training the toy models from scratch, in LLaVA's stages, on an endless stream of fresh scenes.

1. ``clip``: CLIP contrastive loss on long captions, plus free per-patch labels (colour, shape, glyph,
   object centre, row, column) on the layer the LLM reads, plus a token-level term that makes each
   content word's projected text state similar to the image embedding of images containing it (so
   per-token CLIP relevance, which IVTP uses, is meaningful).
2. ``caption``: vision tower frozen; projector and LLM learn captions that name every object both ways
   ("the triangle is red", "the red one is a triangle"), with a curriculum from one object up.
3. ``instruct``: vision tower frozen; multi-turn conversations over the six tasks, plus captions.

Stages 2 and 3 add the grounding loss (patches resemble the words naming them), the two lookup
losses (a word attends to what it names, an answer to each object its question names) and the
position loss (the word and the answer hold where those objects are); see :func:`lvlm_losses`,
:func:`lookup_losses` and :func:`position_losses`.

toy-large and toy-small share the vision tower, so stages 2 and 3 train both on the same batches and
compute the (frozen) vision features once. Everything is seeded; step counts, not wall time, define
the schedule (``minutes`` only caps a stage).
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, LlavaForConditionalGeneration

from ..errors import VlmpruneError
from . import configs
from .processor import CLIP_MEAN, CLIP_STD, build_processor, build_prompt
from .scenes import COLOURS, GLYPHS, GRID, MAX_OBJECTS, PATCH_LABELS, SHAPES, patch_labels, render, sample_scene
from .tasks import TASKS, TEST_OBJECTS, ask, caption, sample_item
from .tokenizers import build_clip_tokenizer, build_llm_tokenizer, corpus

STAGES = ("clip", "caption", "instruct")
LVLMS = ("toy-large", "toy-small")
CAPTION_INSTRUCTION = "describe the image."
CONCEPTS = tuple(COLOURS) + SHAPES + GLYPHS  # the words whose CLIP relevance should follow the image
GROUNDED = {"colour": tuple(COLOURS), "shape": SHAPES, "glyph": GLYPHS}  # patch labels named by LLM words
GROUNDING_TEMPERATURE = 0.1
LOOKUP_HEAD = 0  # the head of the first LLM layer that the word lookup loss shows where to look
ANSWER_PHRASES = 2  # named objects per question whose position the answer start is taught to hold


@dataclass
class StageSettings:
    steps: int
    batch: int
    lr: float
    warmup: int = 100


# Planned for one float32 thread per process on a shared 2-core CPU (about 2 s a step for toy-large,
# 0.75 s for toy-small): CLIP ~20 min, then toy-large (~70 min) and toy-small (~25 min) in parallel.
DEFAULT_SETTINGS = {
    "toy-clip": {"clip": StageSettings(steps=1800, batch=32, lr=2e-3, warmup=50)},
    "toy-large": {"caption": StageSettings(steps=200, batch=24, lr=1.5e-3, warmup=30),
                  "instruct": StageSettings(steps=2000, batch=24, lr=1e-3, warmup=30)},
    "toy-small": {"caption": StageSettings(steps=200, batch=24, lr=1.5e-3, warmup=30),
                  "instruct": StageSettings(steps=2000, batch=24, lr=1e-3, warmup=30)},
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def pixel_values(images) -> torch.Tensor:
    """CLIP normalisation of 80 px RGB images, as the processor's image processor does it."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _lr_factor(step: int, settings: StageSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _max_objects(step: int, steps: int, ramp: float) -> int:
    """Curriculum: one object at first, all of them after ``ramp`` of the stage."""
    return min(MAX_OBJECTS, 1 + int(MAX_OBJECTS * step / max(1, ramp * steps)))


def save_atomically(obj, directory: str) -> None:
    """save_pretrained into a temporary sibling, then swap it in: no half-written checkpoint."""
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    obj.save_pretrained(tmp)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def save_half(model: nn.Module, processor_or_tokenizer, directory: str) -> None:
    """float16 safetensors plus the processor (or tokenizer), swapped in as one directory."""
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.half()
    try:
        model.save_pretrained(tmp)
    finally:
        model.float()
        model.load_state_dict(state)
    processor_or_tokenizer.save_pretrained(tmp)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)


# ---------------------------------------------------------------- stage 1: CLIP

def _word_concepts(text: str) -> list[tuple[int, int, int]]:
    """(start, end, concept index) of every concept word in ``text``."""
    index = {word: i for i, word in enumerate(CONCEPTS)}
    return [(m.start(), m.end(), index[m.group()]) for m in re.finditer(r"\w+", text.lower()) if m.group() in index]


def token_concepts(offsets: list[tuple[int, int]], text: str) -> list[int]:
    """Per CLIP token: its concept index, -1 for other words, -2 for special and padding tokens."""
    words = _word_concepts(text)
    labels = []
    for start, end in offsets:
        if end <= start:
            labels.append(-2)
            continue
        labels.append(next((c for s, e, c in words if s <= start < e), -1))
    return labels


def _scene_concepts(scene) -> set[int]:
    index = {word: i for i, word in enumerate(CONCEPTS)}
    present = set()
    for obj in scene.objects:
        present |= {index[obj.colour], index[obj.shape]}
        if obj.glyph:
            present.add(index[obj.glyph])
    return present


class ClipTrainer(nn.Module):
    """A CLIPModel plus the training-only heads: per-patch classifiers and the token-level logit scale."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip
        width = clip.config.vision_config.hidden_size
        self.patch_heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in PATCH_LABELS.items()})
        self.token_scale = nn.Parameter(torch.tensor(10.0))
        self.token_bias = nn.Parameter(torch.tensor(-5.0))

    def losses(self, pixels, patch_targets, captions, token_texts, presence, clip_tokenizer) -> dict:
        vision = self.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        patches = vision.hidden_states[-2][:, 1:]
        # Shape and glyph are learnt on object patches only: on the background they are trivially "none",
        # which would let the loss look low while the shape of an object stayed at chance.
        background = patch_targets["colour"] == 0
        losses = {}
        for name, head in self.patch_heads.items():
            target = patch_targets[name].masked_fill(background, -100) if name in ("shape", "glyph") else patch_targets[name]
            losses[f"patch_{name}"] = F.cross_entropy(head(patches).flatten(0, 1).float(), target.flatten())
        image_embeds = F.normalize(self.clip.visual_projection(vision.pooler_output).float(), dim=-1)

        enc = clip_tokenizer(captions, padding=True, truncation=True, max_length=configs.MAX_TEXT_POSITIONS, return_tensors="pt")
        text_out = self.clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        text_embeds = F.normalize(self.clip.text_projection(text_out.pooler_output).float(), dim=-1)
        logits = self.clip.logit_scale.exp() * text_embeds @ image_embeds.T
        target = torch.arange(len(captions))
        losses["contrastive"] = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

        enc = clip_tokenizer(token_texts, padding=True, truncation=True, max_length=configs.MAX_TEXT_POSITIONS,
                             return_tensors="pt", return_offsets_mapping=True)
        hidden = self.clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        token_embeds = F.normalize(self.clip.text_projection(hidden).float(), dim=-1)  # (T, L, D)
        concepts = torch.tensor([token_concepts([tuple(o) for o in offs], text)
                                 for offs, text in zip(enc["offset_mapping"].tolist(), token_texts)])
        valid = concepts >= -1
        cos = torch.einsum("tld,id->tli", token_embeds, image_embeds)  # every token against every image
        # Target 1 where the image contains the token's concept; 0 for other words and absent concepts.
        targets = presence[:, concepts.clamp(min=0)].permute(1, 2, 0) * (concepts >= 0)[..., None]
        bce = F.binary_cross_entropy_with_logits(self.token_scale * cos + self.token_bias, targets.float(),
                                                 reduction="none")
        losses["token"] = bce[valid].mean()
        return losses

    @torch.no_grad()
    def patch_accuracy(self, pixels, patch_targets) -> dict[str, float]:
        """Held-out accuracy of the patch heads on object patches (glyph: on patches of objects with a digit)."""
        patches = self.clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        on_object = patch_targets["colour"] > 0
        accuracy = {}
        for name in ("colour", "shape", "glyph"):
            target = patch_targets[name]
            mask = on_object & (target > 0)
            accuracy[name] = (self.patch_heads[name](patches).argmax(-1)[mask] == target[mask]).float().mean().item()
        return accuracy


def _clip_batch(rng: random.Random, batch: int, clip_tokenizer):
    # Every large circle and square carries a digit here: digits are the slowest patch label to
    # learn, and at the test distribution's rate (one object in twelve) the tower never learnt to read them.
    scenes = [sample_scene(rng, rng.randint(1, MAX_OBJECTS), glyph_rate=1.0) for _ in range(batch)]
    rendered = [render(s) for s in scenes]
    labels = [patch_labels(s, index_map) for s, (_, index_map) in zip(scenes, rendered)]
    patch_targets = {name: torch.from_numpy(np.stack([lab[name] for lab in labels])) for name in PATCH_LABELS}
    captions = [s.describe() for s in scenes]
    token_texts = []
    for scene in scenes:
        task = rng.choice(TASKS + ("caption",))
        posed = None if task == "caption" else ask(task, scene, rng)
        token_texts.append(posed[0] if posed else caption(scene, rng))
    presence = torch.zeros(batch, len(CONCEPTS), dtype=torch.bool)
    for i, scene in enumerate(scenes):
        presence[i, list(_scene_concepts(scene))] = True
    return pixel_values([img for img, _ in rendered]), patch_targets, captions, token_texts, presence


def train_clip(clip: CLIPModel, clip_tokenizer, settings: StageSettings, seed: int, deadline: float,
               bf16: bool = False) -> None:
    trainer = ClipTrainer(clip)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=settings.lr, weight_decay=0.01)
    rng = random.Random(f"clip-{seed}")
    held_out = _clip_batch(random.Random(f"clip-validation-{seed}"), 128, clip_tokenizer)[:2]
    trainer.train()
    for step in range(settings.steps):
        if time.time() > deadline:
            _log(f"clip: time cap reached at step {step}")
            break
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, settings)
        batch = _clip_batch(rng, settings.batch, clip_tokenizer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = trainer.losses(*batch, clip_tokenizer)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == settings.steps - 1:
            _log(f"clip step {step} loss {loss.item():.3f} " + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
        if (step + 1) % 200 == 0 or step == settings.steps - 1:
            accuracy = trainer.patch_accuracy(*held_out)
            _log(f"clip step {step + 1} held-out patch accuracy " + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    clip.eval()


# ---------------------------------------------------------------- stages 2 and 3: the LVLMs

class SequenceBuilder:
    """Token ids and labels for conversations, identical to what the processor gives for a prompt."""

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        self.image_id = processor.image_token_id
        self.n_image_tokens = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """``[(question, answer), ...]``: the image comes with the first question; answers are supervised."""
        ids = [self.tokenizer.bos_token_id] + self._ids("USER:") + [self.image_id] * self.n_image_tokens
        labels = [-100] * len(ids)
        for i, (question, answer) in enumerate(turns):
            prompt = self._ids(("" if i == 0 else "USER: ") + question + " ASSISTANT:")
            reply = self._ids(answer) + [self.tokenizer.eos_token_id]
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        return ids, labels

    def pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict:
        length = max(len(ids) for ids, _ in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in sequences])
        labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in sequences])
        mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in sequences])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _lvlm_batch(rng: random.Random, builder: SequenceBuilder, stage: str, batch: int, max_objects: int):
    scenes, sequences = [], []
    for _ in range(batch):
        scene = sample_scene(rng, rng.randint(1, max_objects))
        if stage == "caption" or rng.random() < 0.15:
            turns = [(CAPTION_INSTRUCTION, caption(scene, rng))]
        else:
            turns = []
            for _ in range(rng.randint(4, 8)):
                posed = ask(rng.choice(TASKS), scene, rng)
                if posed is not None:
                    turns.append(posed[:2])
            turns = turns or [(CAPTION_INSTRUCTION, caption(scene, rng))]
        scenes.append(scene)
        sequences.append(builder.conversation(turns))
    rendered = [render(scene) for scene in scenes]
    labels = [patch_labels(scene, index_map) for scene, (_, index_map) in zip(scenes, rendered)]
    batch = builder.pad(sequences)
    batch["patch_targets"] = {name: torch.from_numpy(np.stack([lab[name] for lab in labels])) for name in GROUNDED}
    return pixel_values([image for image, _ in rendered]), batch


def vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen tower's output that the projector reads: layer -2, [CLS] dropped."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


@dataclass
class NamingWords:
    """LLM token ids the grounding and lookup losses need: the words naming each class of the grounded
    patch labels (class k -> entry k-1) and the "?" that ends a question's stem (options come after it)."""
    ids: dict[str, torch.Tensor]
    question_end: int


def naming_words(tokenizer) -> NamingWords:
    return NamingWords({name: torch.tensor(tokenizer.convert_tokens_to_ids(list(words))) for name, words in GROUNDED.items()},
                       tokenizer.convert_tokens_to_ids("?"))


def lvlm_losses(model: LlavaForConditionalGeneration, features: torch.Tensor, batch: dict,
                words: NamingWords | None = None, readout: PositionReadout | None = None) -> dict[str, torch.Tensor]:
    """The text loss from the model's own forward, with the projected image features scattered into the
    input embeddings; with ``words``, also the grounding and lookup losses, and with ``readout`` as well,
    the position loss (:func:`position_losses`).

    Grounding: each projected patch must point, among the LLM's own input embeddings of the colour (shape,
    digit) words, to the word naming its object's colour (shape, digit). Visual tokens then resemble the
    words that name them, so finding "the triangle" becomes matching a word against image tokens, which
    the LLM learns as readily as copying text; without it the LLM learnt which colours were in a scene but
    not which belonged to the named shape.
    """
    table = model.get_input_embeddings()
    embeds = table(batch["input_ids"])
    image = model.model.multi_modal_projector(features)
    mask = (batch["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
    forward = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_attentions=words is not None, output_hidden_states=readout is not None)
    out = {"text": forward.loss}
    if words is not None:
        targets = name_targets(batch["input_ids"], batch["labels"], batch["patch_targets"], words)
        out.update(lookup_losses(forward.attentions, batch["input_ids"], model.config.image_token_id, targets))
        if readout is not None:
            out["where"] = position_losses(forward.hidden_states, targets, readout)
        patches = F.normalize(image.float(), dim=-1)
        terms = []
        for name, ids in words.ids.items():
            target = batch["patch_targets"][name]
            logits = patches @ F.normalize(table.weight[ids].float(), dim=-1).T / GROUNDING_TEMPERATURE
            on_object = target > 0
            if on_object.any():
                terms.append(F.cross_entropy(logits[on_object], target[on_object] - 1))
        out["grounding"] = sum(terms) / max(1, len(terms))
    return out


def named_patches(input_ids: torch.Tensor, patch_targets: dict[str, torch.Tensor],
                  words: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, patches): which patches each token names; all False for tokens that name nothing in the image."""
    named = torch.zeros(*input_ids.shape, patch_targets["colour"].shape[1], dtype=torch.bool)
    for name, ids in words.items():
        classes = torch.zeros(int(max(ids.max(), input_ids.max())) + 1, dtype=torch.long)
        classes[ids] = torch.arange(1, len(ids) + 1)
        kind = classes[input_ids]
        named |= (kind[..., None] == patch_targets[name][:, None, :]) & (kind > 0)[..., None]
    return named


def _minus_log_mass(weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log(attention mass on the targets) over the rows that have a target."""
    found = targets.any(dim=-1)
    if not found.any():
        return weights.new_zeros(())
    return -torch.log((weights.float() * targets)[found].sum(dim=-1).clamp(min=1e-6)).mean()


def _count_within_turn(flags: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Inclusive running count of ``flags`` along each row, restarted at every turn."""
    flags = flags.long()
    totals = torch.zeros(flags.shape[0], int(turn.max()) + 1, dtype=torch.long).scatter_add_(1, turn, flags)
    before_turn = totals.cumsum(dim=1) - totals
    return flags.cumsum(dim=1) - before_turn.gather(1, turn)


@dataclass
class NameTargets:
    named: torch.Tensor      # (B, L, patches): which patches each token names
    rows: torch.Tensor       # (R,) sample of each answer start
    positions: torch.Tensor  # (R,) position of each answer start
    phrases: torch.Tensor    # (R, L): phrase number (1, 2, ...) of each naming word of the answer's question stem


def name_targets(input_ids, labels, patch_targets, words: NamingWords) -> NameTargets:
    """What each token names, and for every answer start the naming phrases of its own question's stem
    (a phrase: adjacent naming words, "red triangle"; the options of a multiple choice come after "?").
    Computed once per batch for both :func:`lookup_losses` and :func:`position_losses`."""
    named = named_patches(input_ids, patch_targets, words.ids)
    # Answer starts: the last prompt token of each turn (its label is -100, the next one's is not).
    starts = torch.zeros_like(labels, dtype=torch.bool)
    starts[:, :-1] = (labels[:, :-1] == -100) & (labels[:, 1:] != -100)
    turn = torch.cumsum(starts.long(), dim=1) - starts.long()  # answers started before each position
    in_stem = (labels == -100) & (_count_within_turn(input_ids == words.question_end, turn) == 0)
    naming = named.any(dim=-1) & in_stem
    phrase_starts = naming.clone()
    phrase_starts[:, 1:] &= ~naming[:, :-1]
    phrase = torch.where(naming, _count_within_turn(phrase_starts, turn), 0)
    rows, positions = starts.nonzero(as_tuple=True)
    own_question = (turn[rows] == turn[rows, positions][:, None]) & (torch.arange(input_ids.shape[1]) < positions[:, None])
    return NameTargets(named, rows, positions, torch.where(own_question, phrase[rows], 0))


def lookup_losses(attentions, input_ids: torch.Tensor, image_token_id: int,
                  targets: NameTargets) -> dict[str, torch.Tensor]:
    """Attention hops that find objects by their names, each as minus the log of an attention mass.

    ``lookup``: head 0 of the first LLM layer, at every word naming a colour, shape or digit present in the
    image, attends to the patches of what it names. ``answer_lookup``: in the second layer, where an answer
    is predicted, head ``k`` attends to the ``k``-th naming phrase of its question's stem. Grounding makes
    a patch resemble the words naming it, but answering "what colour is the star?" also needs the word to
    be used as a query and what it found to be carried to the answer; learnt from the answers alone, that
    stayed at chance (a probe read the star's colour at the word "star", 92%, and not at the answer, 41%).
    One head per phrase, because "is the cross left of the circle?" compares two objects, and one head on
    both words gives their mean. Needs eager attention (``model.set_attn_implementation("eager")``).
    """
    if not attentions or any(a is None for a in attentions):
        raise VlmpruneError("the lookup losses need attention weights: set the model's attention to 'eager'")
    is_image = input_ids == image_token_id
    image_columns = is_image.nonzero()[:, 1].view(input_ids.shape[0], -1)
    first = attentions[0][:, LOOKUP_HEAD]
    on_image = first.gather(2, image_columns[:, None, :].expand(-1, first.shape[1], -1))
    losses = {"lookup": _minus_log_mass(on_image, targets.named)}
    second = attentions[1][targets.rows, :, targets.positions]                       # (R, heads, L)
    most = int(targets.phrases.max()) if targets.phrases.numel() else 0
    terms = [_minus_log_mass(second[:, head], targets.phrases == head + 1) for head in range(min(second.shape[1], most))]
    losses["answer_lookup"] = sum(terms) / len(terms) if terms else first.new_zeros(())
    return losses


class PositionReadout(nn.Module):
    """Training-only linear readouts of where named objects are (see :func:`position_losses`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.word = nn.Linear(hidden_size, 2)
        self.answer = nn.Linear(hidden_size, 2 * ANSWER_PHRASES)


def _centroids(patches: torch.Tensor) -> torch.Tensor:
    """(..., patches) bool -> (..., 2): mean (column, row) of the marked patches, scaled to [-1, 1]."""
    index = torch.arange(patches.shape[-1])
    coords = torch.stack([index % GRID, index // GRID], dim=-1).float() / (GRID - 1) * 2 - 1
    return (patches.float() @ coords) / patches.sum(dim=-1, keepdim=True).clamp(min=1)


def position_losses(hidden_states, targets: NameTargets, readout: PositionReadout) -> torch.Tensor:
    """``where``: after the first LLM layer, each naming word holds the position of what it names; after
    the second, each answer start holds the positions of its question's first two named objects (linear
    readouts, mean squared error). The lookups brought the named object's patches to the word, yet a probe
    read its column there with R^2 0.0: the LLM carried what the object was, not where, and spatial
    questions stayed at chance."""
    naming = targets.named.any(dim=-1)
    terms = [F.mse_loss(readout.word(hidden_states[1][naming].float()), _centroids(targets.named[naming]))] if naming.any() else []
    predicted = readout.answer(hidden_states[2][targets.rows, targets.positions].float()).view(-1, ANSWER_PHRASES, 2)
    for k in range(ANSWER_PHRASES):
        patches = ((targets.phrases == k + 1)[..., None] & targets.named[targets.rows]).any(dim=1)   # (R, P)
        found = patches.any(dim=-1)
        if found.any():
            terms.append(F.mse_loss(predicted[found, k], _centroids(patches[found])))
    return sum(terms) / len(terms) if terms else hidden_states[0].new_zeros(())


def validation_items(per_task: int, seed: int = 0):
    """Held-out items from their own seed (never the test split), for the curves in the log."""
    rng = random.Random(f"vlmprune-toy-validation-{seed}")
    return [sample_item(task, rng, rng.randint(*TEST_OBJECTS)) for task in TASKS for _ in range(per_task)]


@torch.no_grad()
def accuracy_by_task(model, processor, items, batch: int = 64) -> dict[str, float]:
    """Exact match of greedy answers, per task, through the real processor and ``generate``."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        inputs = processor(images=[it.image for it in chunk], text=[build_prompt(processor, it.question) for it in chunk],
                           padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for item, answer in zip(chunk, answers):
            hits.setdefault(item.task, []).append(answer.strip().lower() == item.answer)
    model.train()
    return {task: sum(v) / len(v) for task, v in hits.items()}


def new_lvlm(name: str, processor, clip: CLIPModel, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(configs.llava_config(name, processor.tokenizer))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def train_lvlm(model, processor, stage: str, settings: StageSettings, seed: int, deadline: float,
               save_to: str | None, bf16: bool = False, eval_every: int = 100, val_per_task: int = 24) -> None:
    """One LVLM through one stage; in ``instruct``, per-task validation accuracy and a save every ``eval_every``."""
    builder = SequenceBuilder(processor)
    words = naming_words(processor.tokenizer)
    readout = PositionReadout(model.config.text_config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(f"{stage}-{seed}")
    val = validation_items(val_per_task) if stage == "instruct" else []
    model.set_attn_implementation("eager")  # the lookup loss reads attention weights
    model.train()
    model.model.vision_tower.eval()
    ramp = 0.5 if stage == "caption" else 0.3
    start = time.time()
    for step in range(settings.steps):
        if time.time() > deadline:
            _log(f"{stage}: time cap reached at step {step}")
            break
        pixels, batch = _lvlm_batch(rng, builder, stage, settings.batch, _max_objects(step, settings.steps, ramp))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = lvlm_losses(model, vision_features(model, pixels), batch, words, readout)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 10 == 0:
            rate = (time.time() - start) / (step + 1)
            _log(f"{stage} step {step} " + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                 + f" ({rate:.2f} s/step)")
        if val and (step + 1) % eval_every == 0:
            _report(model, processor, val, step + 1)
            if save_to:
                save_half(model, processor, save_to)
    if val:
        _report(model, processor, val, settings.steps)
    model.set_attn_implementation("sdpa")
    if save_to:
        save_half(model, processor, save_to)


def _report(model, processor, val, step) -> None:
    acc = accuracy_by_task(model, processor, val)
    _log(f"eval step {step} avg {sum(acc.values()) / len(acc):.3f} " + " ".join(f"{t} {a:.2f}" for t, a in acc.items()))


# ---------------------------------------------------------------- all stages

def train(out: str, stages: tuple[str, ...] = STAGES, minutes: float | None = None, seed: int = 0,
          settings: dict[str, StageSettings] | None = None, config_names: dict[str, str] | None = None,
          lvlms: tuple[str, ...] = LVLMS, threads: int = 1, bf16: bool = False) -> dict:
    """Run ``stages`` in order, reading earlier stages' results from ``out``; returns seconds per stage.

    ``minutes`` caps each stage's wall time (the schedule is still the planned one). ``config_names``
    maps toy-clip/toy-large/toy-small to configs (tests use "micro"). ``lvlms`` picks which LVLMs the
    caption and instruct stages train, so the two can run in separate processes with identical data.
    One thread and float32 are the defaults: on a shared 2-core machine two threads per process ran
    8x slower, and bf16 autocast 1.4x slower, than one float32 thread.
    """
    unknown = [s for s in stages if s not in STAGES] + [m for m in lvlms if m not in LVLMS]
    if unknown:
        raise VlmpruneError(f"unknown stage or model {unknown[0]!r}; choose from {', '.join(STAGES + LVLMS)}")
    if minutes is not None and minutes <= 0:
        raise VlmpruneError(f"--minutes must be positive, got {minutes}")
    settings = {key: {**DEFAULT_SETTINGS[key], **(settings or {}).get(key, {})} for key in DEFAULT_SETTINGS}
    names = {"toy-clip": "toy-large", "toy-large": "toy-large", "toy-small": "toy-small", **(config_names or {})}
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    texts = corpus(seed=seed)
    timings = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        deadline = time.time() + (minutes * 60 if minutes else float("inf"))
        began = time.time()
        _log(f"stage {stage}")
        if stage == "clip":
            clip_tokenizer = build_clip_tokenizer(texts)
            torch.manual_seed(seed)
            clip = CLIPModel(configs.clip_config(names["toy-clip"], clip_tokenizer))
            train_clip(clip, clip_tokenizer, settings["toy-clip"][stage], seed, deadline, bf16)
            save_half(clip, clip_tokenizer, os.path.join(out, "toy-clip"))
        else:
            processor = build_processor(build_llm_tokenizer(texts))
            for name in lvlms:
                if stage == "caption":
                    model = new_lvlm(names[name], processor, _load(CLIPModel, out, "toy-clip", "clip"),
                                     seed + LVLMS.index(name))
                else:
                    model = _load(LlavaForConditionalGeneration, out, name, "caption")
                    model.model.vision_tower.requires_grad_(False)
                _log(f"{stage}: {name}")
                train_lvlm(model, processor, stage, settings[name][stage], seed, deadline, os.path.join(out, name), bf16)
        timings[stage] = time.time() - began
        _log(f"stage {stage} took {timings[stage] / 60:.1f} min")
    return timings


def _load(cls, out: str, name: str, producer: str):
    path = os.path.join(out, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise VlmpruneError(f"{path} is missing; run the '{producer}' stage first (--stage {producer})")
    return cls.from_pretrained(path, dtype=torch.float32)
