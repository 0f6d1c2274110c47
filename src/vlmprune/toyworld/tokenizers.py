"""Two different fast tokenizers, as in real LVLMs: a word-level one for the LLM and a BPE one for CLIP.

Both are built with the ``tokenizers`` library from a fixed, seeded corpus of every text the toy world
produces, both lower-case their input and both report character offsets (IVTP aligns the two by them).
"""
from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .scenes import MAX_OBJECTS, sample_scene
from .tasks import TASKS, ask, caption

IMAGE_TOKEN = "<image>"
LLM_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
CLIP_SPECIALS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")
CLIP_VOCAB_SIZE = 160
# Words of the chat template and of instructions that the scene generators never produce.
EXTRA_WORDS = ("user", "assistant", ":", "describe", "image", ".", ",", "?")


def corpus(n_scenes: int = 1500, seed: int = 0) -> list[str]:
    """Every kind of text the toy world produces, from a fixed seed."""
    rng = random.Random(seed)
    texts = list(EXTRA_WORDS)
    for i in range(n_scenes):
        scene = sample_scene(rng, 1 + i % MAX_OBJECTS)
        texts += [scene.describe(), caption(scene, rng)]
        for task in TASKS:
            posed = ask(task, scene, rng)
            if posed is not None:
                texts += [posed[0], posed[1]]
    return texts


def _normalise_and_split(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()


def build_llm_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level: one id per word or punctuation mark; a BOS is prepended, answers end with ``</s>``."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in (texts or corpus()) for w, _ in splitter.pre_tokenize_str(text.lower())})
    vocab = {token: i for i, token in enumerate(LLM_SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    _normalise_and_split(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="left",
    )


def build_clip_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Subword BPE (CLIP style, ``</w>`` marks a word end) with start and end tokens around the text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    _normalise_and_split(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=CLIP_VOCAB_SIZE, special_tokens=list(CLIP_SPECIALS), end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or corpus(), trainer)
    start, end = CLIP_SPECIALS[2], CLIP_SPECIALS[3]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}",
        special_tokens=[(start, tokenizer.token_to_id(start)), (end, tokenizer.token_to_id(end))],
    )
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=start, eos_token=end, unk_token="<unk>", pad_token="<pad>",
        padding_side="right",
    )
