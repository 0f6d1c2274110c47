"""Retraining mode: fine-tuning a micro toy LVLM with a token method in the loop."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlmprune.errors import VlmpruneError
from vlmprune.tokens import apply
from vlmprune.tokens.finetune import answer_loss, finetune
from vlmprune.toyworld import configs
from vlmprune.toyworld.processor import build_processor
from vlmprune.toyworld.tokenizers import build_llm_tokenizer, corpus
from vlmprune.toyworld.train import SequenceBuilder, _lvlm_batch

# Micro toy model: 2 vision + 2 LLM layers, 100 visual tokens. IVTP without the CLIP text encoder
# (the micro model has no trained CLIP), pruning in the encoder and at LLM layer 1.
IVTP = "ivtp:keep=0.11,instruction=ott,llm_group=1"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy small machine several threads per process are far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_llm_tokenizer(corpus(n_scenes=200)))


def _micro(processor):
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(configs.llava_config("micro", processor.tokenizer)).eval()


def _grads(model, pixels, batch, method=None):
    model.zero_grad()
    handle = None if method is None else apply(model, method)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                       use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    loss = answer_loss(logits, batch["input_ids"], batch["labels"], model.config.image_token_id)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("keep_all", ["fastv:layer=1,keep=100", "random:keep=100,where=vision,layers=1"])
def test_loss_and_gradients_through_a_keep_all_engine_equal_dense(processor, keep_all):
    """The engine's gathers, scatter and 4-D mask pass gradients exactly as the dense model does."""
    model = _micro(processor)
    pixels, batch = _lvlm_batch(random.Random(0), SequenceBuilder(processor), "instruct", 3, 3)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                    labels=batch["labels"]).loss
    dense_loss, dense = _grads(model, pixels, batch)
    assert torch.allclose(dense_loss, own, atol=1e-5)
    loss, grads = _grads(model, pixels, batch, keep_all)
    assert torch.allclose(loss, dense_loss, atol=1e-5)
    assert grads.keys() == dense.keys()
    projector = [name for name in grads if "multi_modal_projector" in name]
    assert projector and all(grads[name].abs().sum() > 0 for name in projector)
    for name in grads:
        assert torch.allclose(grads[name], dense[name], atol=1e-5), name


def test_finetune_with_ivtp_trains_and_cleans_up(processor):
    model = _micro(processor)
    frozen = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    head = model.lm_head.weight.clone()
    projector = model.model.multi_modal_projector.linear_1.weight.clone()
    report = finetune(model, processor, IVTP, steps=6, batch_size=4, lr=3e-3, seed=0, trainable="projector+llm")
    assert report.steps == 6 and len(report.losses) == len(report.step_seconds) == 6
    assert report.method.startswith("ivtp:keep=0.11")
    assert all(norm > 0 for norm in report.grad_norms)
    assert report.losses[-1] < report.losses[0]
    assert not torch.equal(model.lm_head.weight, head)
    # the projector learns through the engine's scatter of the kept patches and its gathers
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, projector)
    assert all(torch.equal(v, frozen[k]) for k, v in model.model.vision_tower.state_dict().items())
    assert getattr(model, "_vlmprune_engine", None) is None and not model.training
    assert all(p.requires_grad for p in model.parameters())      # flags as they were before
    assert report.median_step_s > 0 and report.peak_rss_delta_mb >= 0

    # the same first batch, dense and pruned, only the LLM trained
    dense_model = _micro(processor)
    projector = dense_model.model.multi_modal_projector.linear_1.weight.clone()
    dense = finetune(dense_model, processor, None, steps=1, batch_size=4, lr=3e-3, seed=0)
    pruned = finetune(_micro(processor), processor, IVTP, steps=1, batch_size=4, lr=3e-3, seed=0)
    assert dense.method is None
    assert torch.equal(dense_model.model.multi_modal_projector.linear_1.weight, projector)
    assert dense.losses[0] == pytest.approx(pruned.losses[0], rel=0.2)
    assert pruned.peak_saved_mb < 0.8 * dense.peak_saved_mb                 # pruning saves activations
    real = finetune(_micro(processor), processor, IVTP + ",real_pcls=true", steps=1, batch_size=4, lr=3e-3, seed=0)
    assert real.losses[0] == pytest.approx(pruned.losses[0], rel=0.2)        # the text stays aligned


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scanning gc objects touches deprecated torch names
def test_no_graph_outlives_a_finetuning_step(processor):
    """Scores that only choose tokens carry no graph: one would be a side branch that backward never
    frees, and with the saved-activation hooks it stayed alive (a leak of ~22 MB a step on toy-large)."""
    import gc

    model = _micro(processor)
    finetune(model, processor, IVTP, steps=2, batch_size=2, seed=0)
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    assert alive == []


@pytest.mark.parametrize("settings", [{"steps": 0}, {"steps": -2}, {"steps": 1, "batch_size": 0},
                                      {"steps": 1, "trainable": "vision"}, {"steps": 1, "lr": 0.0}])
def test_bad_settings_raise(processor, settings):
    model = _micro(processor)
    with pytest.raises(VlmpruneError):
        finetune(model, processor, IVTP, **settings)
    assert getattr(model, "_vlmprune_engine", None) is None
