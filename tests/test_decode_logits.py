"""Cached decoding after a pruned prefill equals recomputing without the cache, logit for logit.

For every family, a method of each kind (an LLM-site method, IVTP with its scoring-only pseudo-[CLS],
a before-the-LLM method, an in-encoder method where the family has in-encoder sites), both position
modes, one unpadded sample and a left-padded batch of two: the logits of every generated step
(``output_logits=True``) agree with a full forward of the prompt and the tokens so far within 1e-4
(float32). Argmax agreement alone lets a decode step that silently re-runs the prefill path pass.
The reference replays the prefill's own pruning decisions (``Frozen``), so the comparison tests the
cache, masks and positions, not whether a method would choose the same tokens for a longer prompt.
"""
import inspect

import pytest
import torch

import vlmprune as vp
from vlmprune.models.forward_args import output_cache
from vlmprune.models.tiny import FAMILIES

from decoding import Frozen, append_token, logits_without_cache

STEPS = 3
METHODS = {
    "fastv": "fastv:layer=1,keep=0.5",
    "ivtp": "ivtp:keep=4,instruction=ott+rt",       # the scoring-only pseudo-[CLS] up to LLM layer 3
    "divprune": "divprune:keep=0.5",
    "topk-in-encoder": "topk:keep=0.5",
}
BATCHES = {"one-unpadded": (5,), "two-padded": (3, 6)}
CASES = [(family, method) for family in FAMILIES for method in METHODS
         if method != "topk-in-encoder" or family == "llava"]     # the only family with in-encoder sites


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("family,method", CASES)
def test_every_generated_step_has_the_no_cache_logits(tiny, family, method, positions, batch):
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=BATCHES[batch], seed=3)
    frozen = Frozen(vp.tokens.from_spec(METHODS[method]))
    with vp.tokens.apply(model, frozen, positions=positions), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[:, -STEPS:]
        frozen.replaying = True
        reference = logits_without_cache(model, inputs, tokens)
    assert len(out.logits) == STEPS
    for step, (cached, recomputed) in enumerate(zip(out.logits, reference)):
        error = (cached - recomputed).abs().max().item()
        assert error <= 1e-4, f"step {step}: cached and recomputed logits differ by {error:.2e}"


def test_the_cases_prune_something(tiny):
    """Guards the table above: each case really shortens the prompt, so the comparison is not dense vs dense."""
    for family, method in CASES:
        model, make_inputs = tiny(family)
        inputs = make_inputs(text_lens=(5,), seed=3)
        with vp.tokens.apply(model, METHODS[method]), torch.no_grad():
            length = model(**inputs).logits.shape[1]
        assert length < inputs["input_ids"].shape[1], f"{method} on {family} pruned nothing"


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_a_hand_written_decode_loop_without_position_ids(tiny, family):
    """A user's own loop passes the returned cache back with no position ids: the LLM would number the
    new token by the first layer's (pruned) cache length; the engine gives it its original position."""
    model, make_inputs = tiny(family)
    inputs = make_inputs(text_lens=(5,), seed=3)
    frozen = Frozen(vp.tokens.from_spec("divprune:keep=0.5"))
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24
    with vp.tokens.apply(model, frozen), torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, step_inputs, cached = output_cache(out), dict(inputs), [out.logits[:, -1]]
        tokens = []
        for _ in range(STEPS - 1):
            token = cached[-1].argmax(-1, keepdim=True)
            tokens.append(token)
            step_inputs = append_token(step_inputs, token)
            out = model(input_ids=token, attention_mask=step_inputs["attention_mask"], use_cache=True,
                        **{cache_keyword: cache})
            cached.append(out.logits[:, -1])
        frozen.replaying = True
        reference = logits_without_cache(model, inputs, torch.cat(tokens + [tokens[-1]], 1))
    for step, (a, b) in enumerate(zip(cached, reference)):
        assert (a - b).abs().max() <= 1e-4, f"step {step}"
