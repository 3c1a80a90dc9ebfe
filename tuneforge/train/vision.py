"""What training a vision-language model adds to training a causal LM: knowing one (its config has a vision tower),
its processor as the run's tokenizer, which modules are its vision tower, the pixel inputs of a batch, and the loss.

The vision tower (the image encoder) is frozen unless `train_vision`: full training then trains the language model
and the connector that projects image features into it; LoRA puts adapters on the language model only. With
`train_vision`, full training trains the tower too, and LoRA adapts the tower's linear layers as well.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.tokenization.vision import VisionTokenizer
from tuneforge.errors import InvalidRequestError
from tuneforge.train.loss import causal_lm, trained_positions_loss

# The names transformers gives a vision-language model's image encoder, and the module that maps its features
# into the language model (Idefics3/SmolVLM, Qwen2-VL/2.5-VL, Gemma 3, LLaVA, Mllama).
TOWERS = ("vision_model", "vision_tower", "visual", "vision_encoder")
CONNECTORS = ("connector", "multi_modal_projector", "merger")


def is_vision_config(config: Any) -> bool:
    """A transformers config of a vision-language model (one with a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def is_vision_model(folder: Path | str) -> bool:
    """Whether the model stored in `folder` is a vision-language model."""
    from transformers import AutoConfig

    return is_vision_config(AutoConfig.from_pretrained(str(folder)))


def load_processor(folder: Path | str) -> VisionTokenizer:
    """The model's own processor (tokenizer, image processor, chat template) as the run's tokenizer.

    Raises:
        InvalidRequestError: the processor cannot be loaded here (e.g. one that needs torchvision, as Qwen2-VL's
            video processor does) or has no chat template.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except Exception as exc:  # ImportError for a missing backend, ValueError/OSError for missing files
        raise InvalidRequestError(f"the vision-language model's processor cannot be loaded on this server: "
                                  f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    if not hasattr(processor, "image_processor") or not getattr(processor, "chat_template", None):
        kind = type(processor).__name__
        raise InvalidRequestError(f"the model folder has no image processor and chat template ({kind} loaded): a "
                                  "vision-language model needs its processor files")  # fmt: skip
    return VisionTokenizer(processor)


def lora_exclusions(train_vision: bool) -> str:
    """peft's `exclude_modules`: the modules inside the vision tower (unless it trains) and the connector."""
    names = CONNECTORS if train_vision else (*TOWERS, *CONNECTORS)
    return rf".*\b({'|'.join(names)})\b.*"


def freeze_tower(model: Any) -> int:
    """Freeze the vision tower's parameters for full training; returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(re.search(rf"(^|\.){tower}\.", name) for tower in TOWERS):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def pixel_inputs(tokenizer: VisionTokenizer, rows: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
    """The image processor's tensors for a batch whose row i shows the images `rows[i]` (data URLs); {} when no row
    has one. Rows without images get the processor's padding."""
    if not any(rows):
        return {}
    images = [[tokenizer.image(url) for url in row] for row in rows]
    out = tokenizer.processor.image_processor(images=images, return_tensors="np")
    tokenizer.forget()
    return {name: torch.from_numpy(value) for name, value in out.items() if hasattr(value, "shape")}


def vision_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`loss.trained_token_loss` for a vision-language model: its whole model (tower, connector, language model)
    reads the batch's ids and pixels; the head and the loss run on the trained positions only.

    The model builds its own positions (no packing here: one example a row, right-padded, so causal attention
    alone keeps padding unseen; Qwen2-VL's 3-D positions come from the image grid).
    """
    lm = causal_lm(model)
    inputs = {name: t for name, t in batch.items() if name not in ("targets", "position_ids")}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(lm.dtype)
    out = lm.model(**inputs, use_cache=False)
    return trained_positions_loss(lm, out.last_hidden_state, batch["targets"])
