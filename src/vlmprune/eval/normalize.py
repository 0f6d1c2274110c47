"""Answer normalisation and exact matching, following lmms-eval's scoring rules.

Free-form answers go through the VQA answer processing of the VQAv2 evaluation (lmms-eval's
``EvalAIAnswerProcessor``): lower case, punctuation removed or turned into spaces, number words
turned into digits, articles dropped, common contractions restored. Existence questions compare a
yes/no verdict (POPE); multiple-choice questions compare the option letter (MMBench/ScienceQA),
inferred from the reply as lmms-eval does: a lone letter, a leading ``B.``/``(B)``, or the text of
exactly one option.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "itll": "it'll", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're",
}
# Characters VQA evaluation deletes (when next to a space) or replaces by a space; "." and "'" are
# handled separately, as there.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# lmms-eval's pattern reads ``(?!<=\d)(\.)(?!\d)``: its first group is a lookahead, not a lookbehind,
# so in effect every period not followed by a digit goes ("3." -> "3", "3.5" stays).
_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        attached_to_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if attached_to_space or has_digit_comma else " ")
    return _PERIOD.sub("", out)


def vqa_normalize(text: str) -> str:
    """The VQAv2 answer processing used by lmms-eval for free-form answers."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()  # after the strip above, as there
    text = _strip_punctuation(text)
    words = [_NUMBERS.get(word, word) for word in text.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def yes_no(text: str) -> str:
    """``"yes"``/``"no"`` when the reply opens with one (``"Yes, there is."``), else the normalised reply."""
    words = vqa_normalize(text).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    return " ".join(words)


def _letters(count: int) -> str:
    return string.ascii_uppercase[:count]


def option_letter(text: str, options: Sequence[str]) -> str:
    """The option letter a reply picks among ``options`` (A, B, ...), or ``""`` when it picks none or several.

    A lone letter (``"b"``) or a capital letter labelled as an option (``"B."``, ``"(B) red"``) picks
    that letter, so the article in ``"A red square"`` is not read as option A; otherwise the reply picks an option when it equals exactly one option's text
    after VQA normalisation.
    """
    letters = _letters(len(options))
    reply = text.strip().lstrip("([{*").strip()
    if len(reply) == 1 and reply.upper() in letters:
        return reply.upper()
    if len(reply) > 1 and reply[0] in letters and reply[1] in ".):]}*":
        return reply[0]
    normalised = vqa_normalize(text)
    matches = [letter for letter, option in zip(letters, options) if vqa_normalize(option) == normalised]
    return matches[0] if len(matches) == 1 else ""


def is_correct(prediction: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """Exact match under the rule that fits the item: option letter, yes/no, or VQA normalisation.

    For a multiple-choice item ``answer`` is the correct letter (or the correct option's text)."""
    if options:
        expected = answer.strip().upper()
        if expected not in _letters(len(options)):
            expected = option_letter(answer, options)
        return option_letter(prediction, options) == expected
    if vqa_normalize(answer) in ("yes", "no"):
        return yes_no(prediction) == vqa_normalize(answer)
    return vqa_normalize(prediction) == vqa_normalize(answer)
