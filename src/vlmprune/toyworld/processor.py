"""The toy LVLM processor: a real ``LlavaProcessor`` with a CLIP image processor and a chat template.

``processor(images=..., text=...)`` expands each ``<image>`` to the 100 patch tokens the LLM receives,
exactly as the processors of the real LLaVA checkpoints do.
"""
from __future__ import annotations

from transformers import CLIPImageProcessorPil, LlavaProcessor

from .scenes import IMAGE_SIZE, PATCH_SIZE
from .tokenizers import IMAGE_TOKEN

# "USER: <image>\n{question} ASSISTANT: {answer}</s>", turn after turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# The toy images are drawn in plain RGB; CLIP's own normalisation constants keep the real pipeline.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )


def build_processor(llm_tokenizer) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=llm_tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_prompt(processor, question: str) -> str:
    """The chat-formatted single-turn prompt with the image placeholder, ending where the answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
