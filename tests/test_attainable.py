"""The free selection a method's speed is read against: the method's own sites and kept counts,
the first tokens kept, nothing scored; the method itself left as it was."""
from __future__ import annotations

import pytest
import torch

from vlmprune import tokens
from vlmprune.measure.attainable import FreeSelection, free_selection
from vlmprune.measure.memory import kv_cache_bytes
from vlmprune.tokens import Site


class Recording(FreeSelection):
    def reduce(self, ctx):
        reduction = super().reduce(ctx)
        self.__dict__.setdefault("seen", []).append((ctx.site, ctx.visual.shape[1], reduction.keep))
        return reduction


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=0.5", "divprune:keep=5", "fastervlm:keep=4",
                                  "random:keep=3,where=vision,layers=1/2"])
def test_free_selection_leaves_the_cache_the_method_leaves(tiny, spec):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(6, 4))
    method = tokens.from_spec(spec)
    free = free_selection(model, inputs, method)
    assert kv_cache_bytes(model, inputs, free) == kv_cache_bytes(model, inputs, tokens.from_spec(spec))
    assert kv_cache_bytes(model, inputs, free) < kv_cache_bytes(model, inputs)


def test_free_selection_keeps_the_first_tokens_at_each_of_ivtps_sites(tiny):
    model, make_inputs = tiny("llava")
    inputs = make_inputs(text_lens=(6, 4))
    method = tokens.from_spec("ivtp:keep=4,instruction=ott,llm_layers=2,llm_group=2")
    free = free_selection(model, inputs, method)
    assert "reduce" not in vars(method)                      # the counting wrapper is gone
    replay = Recording(free._counts)
    with tokens.apply(model, replay), torch.no_grad():
        model(**inputs)
    sites = [site for site, _, _ in replay.seen]
    assert sites[-1] == Site("llm", 2) and [site.where for site in sites[:-1]] == ["vision"] * (len(sites) - 1)
    previous = 16                                            # the tiny LLaVA's visual tokens
    for site, present, keep in replay.seen:
        assert present == previous
        assert torch.equal(keep, torch.arange(free._counts[site]).expand(2, -1))
        previous = keep.shape[1]
    assert previous == 4
