import pytest
import torch
from torch import nn

from vlmprune import VlmpruneError
from vlmprune.models import get_adapter
from vlmprune.models.tiny import IMAGE_TOKEN, build_tiny


def test_accessors_point_at_the_right_modules(tiny, family):
    model, make_inputs = tiny(family)
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.model is model
    assert isinstance(adapter.llm_layers, nn.ModuleList) and len(adapter.llm_layers) == 4
    assert adapter.llm_layers is adapter.llm.layers
    assert adapter.lm_head is model.lm_head
    assert adapter.image_token_id == IMAGE_TOKEN
    assert adapter.vision_tower is not None and adapter.projector is not None
    assert adapter.has_cls == (family in ("llava", "llava_next"))
    assert (adapter.vision_layers is not None) == (family == "llava")


def test_image_mask_and_spans_match_the_features(tiny, family):
    model, make_inputs = tiny(family)
    adapter = get_adapter(model)
    inputs = make_inputs(text_lens=(3, 6))
    mask = adapter.image_token_mask(inputs["input_ids"])
    with torch.no_grad():
        features = model.model.get_image_features(**{k: v for k, v in inputs.items()
                                                     if k in ("pixel_values", "image_sizes", "image_grid_thw")})
    counts = adapter.image_feature_counts(features)
    assert mask.sum(1).tolist() == counts
    spans = adapter.image_spans(inputs["input_ids"])
    assert [[end - start for start, end in row] for row in spans] == [[c] for c in counts]
    rows, cols = adapter.patch_grid(inputs)
    assert rows * cols <= counts[0]


def test_llava_feature_layer_is_non_negative(tiny):
    adapter = get_adapter(tiny("llava")[0])
    assert adapter.vision_feature_layer == len(adapter.vision_layers) - 2


def test_llava_reading_several_layers_or_cls_has_no_encoder_sites():
    several = get_adapter(build_tiny("llava", vision_feature_layer=[-3, -2])[0])
    assert several.vision_layers is None and several.vision_feature_layer == 2
    full = get_adapter(build_tiny("llava", vision_feature_select_strategy="full")[0])
    assert full.vision_layers is None and full.vision_feature_layer == 2


def test_unsupported_model_raises_one_line():
    with pytest.raises(VlmpruneError, match="unsupported model class Linear"):
        get_adapter(nn.Linear(2, 2))
