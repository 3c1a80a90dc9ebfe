"""Vision-language test data: solid-colour PNG images as data URLs, and conversations whose answer is the colour,
so only a model that reads the image can answer them."""

from __future__ import annotations

import base64
import io
from typing import Any

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
QUESTION = "What colour is this?"


def data_url(rgb: tuple[int, int, int], size: tuple[int, int] = (24, 24), kind: str = "PNG") -> str:
    """A solid-colour image as a `data:image/...;base64,` URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=kind)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[kind]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, text: str = QUESTION) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def colour_records(repeat: int = 4) -> list[dict[str, Any]]:
    """Conversations: an image of a colour and the question; the answer names the colour."""
    rows = []
    for _ in range(repeat):
        for name, rgb in COLOURS.items():
            rows.append(
                {
                    "messages": [
                        image_message(data_url(rgb)),
                        {"role": "assistant", "content": [{"type": "text", "text": f"{name}"}]},
                    ]
                }
            )
    return rows


def greedy_colours(folder: Any) -> list[str]:
    """The greedy answers of the vision-language model saved in `folder` (with its processor) to each colour's image."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tuneforge.data.tokenization.vision import decode_image

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for rgb in COLOURS.values():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[decode_image(data_url(rgb))], return_tensors="pt",
                           add_special_tokens=False)  # fmt: skip
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        reply = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(reply, skip_special_tokens=True).strip())
    return answers
