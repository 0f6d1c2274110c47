"""Decoding without the KV cache: the reference that cached generation must reproduce."""
import torch

from vlmprune.tokens import TokenMethod


def append_token(inputs: dict, token: torch.Tensor) -> dict:
    """``inputs`` with one more text token (B, 1) at the end of every row."""
    inputs = dict(inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], token], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token).int()], 1)
    return inputs


def greedy_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """(B, steps) greedy tokens, each from a full forward of the prompt and the tokens so far."""
    new = []
    for _ in range(steps):
        with torch.no_grad():
            token = model(**inputs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        inputs = append_token(inputs, token)
    return torch.cat(new, 1)


def logits_without_cache(model, inputs: dict, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The last-position logits (B, V) of a full forward before each of ``tokens`` (B, T) is appended."""
    out = []
    for step in range(tokens.shape[1]):
        with torch.no_grad():
            out.append(model(**inputs, use_cache=False).logits[:, -1])
        inputs = append_token(inputs, tokens[:, step:step + 1])
    return out


class Frozen(TokenMethod):
    """``method`` deciding in the first forward (a prefill or ``generate``) and those decisions replayed
    in every later forward once ``replaying`` is set.

    A method that ranks by the last prompt token or by the instruction (FastV, IVTP) decides
    differently when a no-cache forward sees the generated tokens as part of the prompt; replaying
    the prefill's keep sets and scoring token gives the no-cache computation that cached decoding
    must equal."""

    name = "frozen"

    def __init__(self, method: TokenMethod):
        self.method = method
        self.replaying = False
        self._reductions: dict = {}
        self._scoring = None

    def sites(self, plan):
        return self.method.sites(plan)

    def recorded_layers(self, site, plan):
        return self.method.recorded_layers(site, plan)

    def reduce(self, ctx):
        if not self.replaying:
            self._reductions[ctx.site] = self.method.reduce(ctx)
        return self._reductions[ctx.site]

    def scoring_token(self, model, inputs):
        if not self.replaying:
            self._scoring = self.method.scoring_token(model, inputs)
        return self._scoring

    def scoring_token_is_real(self):
        return self.method.scoring_token_is_real()
