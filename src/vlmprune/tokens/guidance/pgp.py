"""PGP's guide: a small VLM with LoRA adapters and an information-bottleneck module over the final
hidden states of its visual tokens; a token's importance is how far its posterior moves from the prior.

Module (METHODS.md 2.2): a learnable per-channel prior ``N(mu_p, sigma_p^2)``; per token the posterior
``mu_i = sigmoid(I(V'_i)) * (V'_i - mu_p) + mu_p`` (``I`` a 2-layer MLP) with ``sigma_i`` from a second
head, and ``KL_i = KL(N(mu_i, sigma_i^2) || N(mu_p, sigma_p^2))`` summed over channels. A token whose
information the answer needs keeps its posterior away from the prior, at a KL price; the rest collapse.

Decision (prompt before the image): the guide sees the image *after* the whole prompt, so that its
visual states have read the question. Moving the image block to the end of the prompt works for any
prompt layout without knowing the chat template; training lays out its sequences the same way
(:func:`image_last`), and the answer follows the image.

Decision (visual tokens apart): where ``V'`` is read (pass 1 and inference), a visual token attends to
the prompt and to itself, not to the other visual tokens (:func:`visual_tokens_apart`). With the
model's causal attention a late patch's final state pools the earlier patches, and the first trained
guide put its information (and so its KL) in such pooling tokens: its top 5% lay on objects for 4-29%
of the tokens, less than the objects' share of the image (20-25%), so the large model kept background
patches. Apart, ``KL_i`` prices what patch ``i`` itself tells about the question. Pass 2 is the
model's ordinary attention.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contextlib import contextmanager, nullcontext

from ...errors import VlmpruneError
from ...models import get_adapter
from ..scorers import gather_tokens
from .pairing import guide_inputs, load_small, visual_positions

WEIGHTS = "pgp.safetensors"
SETTINGS = "pgp.json"
# Only the small LLM's projections get adapters (the shared vision tower and the projector stay as trained).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Token types that travel with an image block (Qwen2-VL's vision start/end around its image pads).
_BLOCK_TOKEN_KEYS = ("vision_start_token_id", "vision_end_token_id")


class InformationBottleneck(nn.Module):
    """Posterior ``N(mu_i, sigma_i^2)`` per visual state and its KL to the learnt per-channel prior."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or width
        self.prior_mu = nn.Parameter(torch.zeros(width))
        self.prior_log_sigma = nn.Parameter(torch.zeros(width))
        self.gate = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.log_sigma = nn.Linear(width, width)
        # start close to "keep every state, with little noise" so that pass 2 begins near the guide's own states
        nn.init.constant_(self.gate[-1].bias, 2.0)
        nn.init.constant_(self.log_sigma.bias, -1.0)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., D) states -> posterior mean and standard deviation, each (..., D)."""
        mu = torch.sigmoid(self.gate(states)) * (states - self.prior_mu) + self.prior_mu
        return mu, self.log_sigma(states).clamp(-10, 5).exp()

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(..., D) posterior -> (...) ``KL(N(mu, sigma^2) || prior)`` summed over channels."""
        prior_sigma = self.prior_log_sigma.exp()
        per_channel = (self.prior_log_sigma - sigma.log()
                       + (sigma ** 2 + (mu - self.prior_mu) ** 2) / (2 * prior_sigma ** 2) - 0.5)
        return per_channel.sum(-1)


@dataclass
class PGPSettings:
    """What rebuilds a trained guide: its base small model, the adapter and module shapes, and
    ``apart``: whether its visual states were trained (and so are read) with the visual tokens apart
    (:func:`visual_tokens_apart`; a guide saved before that setting existed was not)."""

    base: str = "toy-small"
    rank: int = 32
    alpha: int = 64
    hidden: int | None = None
    apart: bool = False


def lora_config(settings: PGPSettings):
    from peft import LoraConfig
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none")


def image_block_mask(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) True at the image tokens and the family's markers around them."""
    block = get_adapter(model).image_token_mask(input_ids)
    for key in _BLOCK_TOKEN_KEYS:
        token = getattr(model.config, key, None)
        if token is not None:
            block = block | (input_ids == token)
    return block


def image_last(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with each row's image block moved to the end of its prompt (padding stays in front,
    token order inside each part is kept); every per-token entry is permuted alike."""
    input_ids = inputs["input_ids"]
    block = image_block_mask(model, input_ids)
    order = torch.argsort(block.to(torch.int8), dim=1, stable=True)
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape and key != "pixel_values":
            out[key] = value.gather(1, order)
    return out


def apart_mask(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal over the valid tokens, except that a visual token sees no
    other visual token (every row sees itself, so a padding row stays finite)."""
    length = input_ids.shape[1]
    visual = get_adapter(model).image_token_mask(input_ids)
    valid = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=input_ids.device)
    allowed = causal & valid[:, None, :] & ~(visual[:, :, None] & visual[:, None, :] & ~itself)
    allowed = allowed | itself
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@contextmanager
def visual_tokens_apart(model: nn.Module, inputs: dict[str, Any]):
    """Within the block, ``model``'s decoder layers attend with :func:`apart_mask` for ``inputs``."""
    masks: dict[torch.dtype, torch.Tensor] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.dtype not in masks:
            masks[hidden.dtype] = apart_mask(model, inputs["input_ids"], inputs.get("attention_mask"), hidden.dtype)
        return args, {**kwargs, "attention_mask": masks[hidden.dtype]}

    hooks = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in get_adapter(model).llm_layers]
    try:
        yield
    finally:
        for handle in hooks:
            handle.remove()


class PGPGuide(nn.Module):
    """A small VLM with LoRA (through ``peft``) and the bottleneck over its final visual states."""

    def __init__(self, small: nn.Module, settings: PGPSettings):
        super().__init__()
        from peft import inject_adapter_in_model

        self.settings = settings
        self.small = inject_adapter_in_model(lora_config(settings), small)
        self.bottleneck = InformationBottleneck(small.config.text_config.hidden_size, settings.hidden)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What training updates: the LoRA matrices and the bottleneck, nothing of the base model."""
        return [p for name, p in self.small.named_parameters() if "lora_" in name] + list(self.bottleneck.parameters())

    def visual_states(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Final hidden states (B, V, D) of the visual tokens, in image order, of one forward on the
        image-last layout of ``inputs``."""
        ordered = image_last(self.small, guide_inputs(inputs))
        with visual_tokens_apart(self.small, ordered) if self.settings.apart else nullcontext():
            hidden = self.small(**ordered, output_hidden_states=True, use_cache=False).hidden_states[-1]
        return gather_tokens(hidden, visual_positions(self.small, ordered["input_ids"]))

    @torch.no_grad()
    def importance(self, inputs: dict[str, Any]) -> torch.Tensor:
        """(B, V) ``KL_i`` of every visual token (one forward, no decoding, no sampling)."""
        states = self.visual_states(inputs)
        return self.bottleneck.kl(*self.bottleneck(states))

    def save(self, directory: str | Path) -> None:
        """fp16 safetensors of the adapters and the module only, plus the settings to rebuild them."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: p.detach().half().contiguous() for name, p in self.small.named_parameters() if "lora_" in name}
        state.update({f"bottleneck.{k}": v.detach().half().contiguous() for k, v in self.bottleneck.state_dict().items()})
        save_file(state, str(directory / WEIGHTS))
        (directory / SETTINGS).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")


def load_guide(directory: str | Path, device: torch.device | str = "cpu") -> PGPGuide:
    """A trained guide from :meth:`PGPGuide.save`'s directory, float32, eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / SETTINGS).is_file():
        raise VlmpruneError(f"{directory} holds no PGP guide ({WEIGHTS} and {SETTINGS}); train one with "
                            "'vlmprune toy train-pgp'")
    settings = PGPSettings(**json.loads((directory / SETTINGS).read_text()))
    guide = PGPGuide(load_small(settings.base, device), settings)
    state = {k: v.float() for k, v in load_file(str(directory / WEIGHTS), device=str(device)).items()}
    guide.bottleneck.load_state_dict({k.removeprefix("bottleneck."): v for k, v in state.items()
                                      if k.startswith("bottleneck.")})
    params = dict(guide.small.named_parameters())
    for name, value in state.items():
        if name.startswith("bottleneck."):
            continue
        if name not in params:
            raise VlmpruneError(f"{directory / WEIGHTS} has {name!r}, which the guide {settings.base} lacks")
        params[name].data.copy_(value)
    return guide.to(device).eval()
