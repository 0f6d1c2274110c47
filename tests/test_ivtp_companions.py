"""IVTP's text companion found by family (tiny CLIP / SigLIP saved to a temp directory stand in for the
hub), an explicit one winning, the offline error, the fallback for towers without [CLS], and SigLIP's
own relevance."""
import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from vlmprune.errors import VlmpruneError
from vlmprune.models import companions
from vlmprune.tokens import apply
from vlmprune.tokens.methods.ivtp import IVTP
from vlmprune.tokens.text_relevance import clip_token_embeddings

from test_ivtp import WORDS, _bpe_tokenizer, _word_tokenizer

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            pad_token_id=0)


def _tower_clip(llava):
    """A tiny CLIP whose vision model is ``llava``'s tower, and a subword tokenizer."""
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=dict(TEXT, max_position_embeddings=64, bos_token_id=1, eos_token_id=1),
                                vision_config=llava.config.vision_config.to_dict(), projection_dim=8)).eval()
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    return clip, _bpe_tokenizer([" ".join(WORDS[1:])] * 3)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """``hub(family, path)``: point the companion table's entry for ``family`` at ``path``."""
    def point(family, path):
        monkeypatch.setitem(companions.TEXT_COMPANIONS, family, str(path))
        return str(path)
    return point


def _run(model, inputs, method):
    counts, reduce = [], method.reduce

    def recording(ctx):
        reduction = reduce(ctx)
        counts.append((ctx.site.where, reduction.keep.shape[1]))
        return reduction

    method.reduce = recording
    with apply(model, method), torch.no_grad():
        logits = model(**inputs).logits
    return logits, counts


def _tower_clip_on_the_hub(model, hub, directory):
    """The tower's CLIP and its tokenizer saved to ``directory``, which the table names for LLaVA."""
    clip, clip_tokenizer = _tower_clip(model)
    clip.save_pretrained(directory)
    clip_tokenizer.save_pretrained(directory)
    hub("llava", directory)
    return clip


def test_plain_ivtp_finds_the_towers_clip_through_the_table(tiny, hub, tmp_path):
    model, make_inputs = tiny("llava")
    clip = _tower_clip_on_the_hub(model, hub, tmp_path / "clip")
    method = IVTP(keep=4, tokenizer=_word_tokenizer(WORDS))
    logits, counts = _run(model, make_inputs(text_lens=(5, 3)), method)
    assert counts == [("vision", 10), ("llm", 4)] and torch.isfinite(logits).all()
    found = method._clip
    assert isinstance(found, CLIPModel)
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), clip.state_dict().values()))
    assert companions.text_companion("llava")[0] is found          # loaded once per process


def test_the_companion_runs_in_the_towers_dtype(tiny, hub, tmp_path):
    model, make_inputs = tiny("llava")
    clip = _tower_clip_on_the_hub(model, hub, tmp_path / "clip")
    half = type(model)(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    method = IVTP(keep=4, tokenizer=_word_tokenizer(WORDS))
    logits, counts = _run(half, make_inputs(text_lens=(5, 3)), method)
    assert counts == [("vision", 10), ("llm", 4)] and torch.isfinite(logits.float()).all()
    assert method._clip.dtype == torch.bfloat16
    assert companions.text_companion("llava")[0].dtype == torch.float32   # the float32 copy is its own


def test_counting_flops_first_leaves_the_shared_companion_usable(tiny, hub, tmp_path):
    """A shape-only FLOPs count (meta model) runs the cached companion without moving it to meta, so the
    real forward after it still has weights; the count includes the text encoder."""
    from vlmprune.measure.flops import count_flops
    from vlmprune.models.presets import Preset, default_image_size

    model, make_inputs = tiny("llava")
    clip = _tower_clip_on_the_hub(model, hub, tmp_path / "clip")
    preset = Preset("tiny-llava", model.config, default_image_size(model.config))
    counted = count_flops(preset, 6, IVTP(keep=4, tokenizer=_word_tokenizer(WORDS))).flops
    without_text = count_flops(preset, 6, IVTP(keep=4, instruction="ott")).flops
    assert counted.extra > without_text.extra
    logits, counts = _run(model, make_inputs(text_lens=(5, 3)), IVTP(keep=4, tokenizer=_word_tokenizer(WORDS)))
    assert counts == [("vision", 10), ("llm", 4)] and torch.isfinite(logits).all()


def test_an_explicit_clip_wins_over_the_table(tiny, hub, tmp_path):
    model, make_inputs = tiny("llava")
    clip, clip_tokenizer = _tower_clip(model)
    hub("llava", tmp_path / "absent")                             # resolving would fail
    method = IVTP(keep=4, clip=clip, clip_tokenizer=clip_tokenizer, tokenizer=_word_tokenizer(WORDS))
    _, counts = _run(model, make_inputs(text_lens=(5, 3)), method)
    assert counts == [("vision", 10), ("llm", 4)] and method._clip is clip


def test_a_companion_missing_offline_names_the_id_and_the_alternative(tiny, hub, tmp_path):
    model, make_inputs = tiny("llava")
    missing = hub("llava", tmp_path / "absent")
    with pytest.raises(VlmpruneError) as error:
        _run(model, make_inputs(text_lens=(5, 3)), IVTP(keep=4, tokenizer=_word_tokenizer(WORDS)))
    message = str(error.value)
    assert missing in message and "instruction=ott+rt" in message and "\n" not in message


def test_the_table_names_the_towers_own_text_encoders():
    assert companions.TEXT_COMPANIONS["llava"] == companions.TEXT_COMPANIONS["llava_next"] \
        == "openai/clip-vit-large-patch14-336"
    assert companions.TEXT_COMPANIONS["llava_onevision"] == "google/siglip-so400m-patch14-384"
    assert companions.text_companion("qwen2_vl") is None and companions.text_companion("qwen2_5_vl") is None


def test_qwen_has_no_text_encoder_and_falls_back_with_a_notice(tiny):
    model, make_inputs = tiny("qwen2_vl")
    with pytest.warns(UserWarning, match="falls back to ott") as notices:
        _, counts = _run(model, make_inputs(text_lens=(5, 3)), IVTP(keep=2))
    assert counts[-1] == ("llm", 2)
    assert len(notices) == 1 and "\n" not in str(notices[0].message)


def test_siglip_relevance_is_its_sigmoid_of_scaled_cosine_plus_bias():
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(text_config=dict(TEXT, max_position_embeddings=6),
                                      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, image_size=28, patch_size=14))).eval()
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(2.0))
        siglip.logit_bias.fill_(-0.5)
    tokenizer = _bpe_tokenizer([" ".join(WORDS[1:])] * 3)
    text = "w5 w17 w93 w44 w61 w120"
    [(_, embeds, _)] = clip_token_embeddings(siglip, tokenizer, torch.randn(1, 16), [text])
    # a token matched with itself (cos 1) scores sigmoid(2 - 0.5); its opposite (cos -1) sigmoid(-2 - 0.5)
    [(_, _, same)] = clip_token_embeddings(siglip, tokenizer, embeds[:1], [text])
    [(_, _, opposite)] = clip_token_embeddings(siglip, tokenizer, -embeds[:1], [text])
    assert torch.isclose(same[0], torch.sigmoid(torch.tensor(1.5)), atol=1e-5)
    assert torch.isclose(opposite[0], torch.sigmoid(torch.tensor(-2.5)), atol=1e-5)
    cosines = torch.nn.functional.cosine_similarity(embeds, embeds[:1], dim=-1)
    assert torch.allclose(same, torch.sigmoid(2 * cosines - 0.5), atol=1e-5)
    # per-token embeddings are SigLIP's own text embedding where it has one: the last of a full-length text
    ids = tokenizer(text, truncation=True, max_length=6, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 6
    [(_, full, _)] = clip_token_embeddings(siglip, tokenizer, embeds[:1], [text])
    with torch.no_grad():
        pooled = siglip.get_text_features(input_ids=ids)
    pooled = getattr(pooled, "pooler_output", pooled)
    assert torch.allclose(full[-1], pooled[0], atol=1e-5)
