"""Conversations with images, tokenized by a vision-language model's own processor.

`VisionTokenizer` wraps the processor (`AutoProcessor.from_pretrained` of the model folder) so that it is a
`Tokenizer` (`tokenizer.py`) like any other: `chat.conversation_tokens` locates each turn and masks the loss exactly
as for text. Its `apply_chat_template` takes messages whose content keeps its parts (`{"type": "image_url"}` parts
become the template's `{"type": "image"}`), renders them with the processor's chat template and, when asked for
tokens, lets the processor expand each image into the tokens the model reads for it. So every prefix of a
conversation (the renderings masking compares) holds exactly the images it shows, each as many tokens as in the
whole conversation.

An example keeps its images as the data URLs of the record (`TokenizedExample.images`); the training loop turns a
batch's images into pixel inputs with the same processor (`train/vision.py`). Knows no torch and no storage.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from tuneforge.data.tokenization.tokenizer import as_ids


class VisionTokenizer:
    """A processor (tokenizer + image processor + chat template) as a `Tokenizer` that takes images."""

    takes_images = True

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._decoded: dict[str, Any] = {}

    # -- the Tokenizer protocol ------------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id  # type: ignore[no-any-return]

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id  # type: ignore[no-any-return]

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id  # type: ignore[no-any-return]

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(text, *args, **kwargs)

    def convert_ids_to_tokens(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.convert_ids_to_tokens(ids, *args, **kwargs)

    def decode(self, ids: Any, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, *args, **kwargs)  # type: ignore[no-any-return]

    def apply_chat_template(
        self, conversation: Sequence[dict[str, Any]], tools: list[Any] | None = None, *, tokenize: bool = True,
        add_generation_prompt: bool = False, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The processor's chat template over `conversation`; token ids (images expanded) when `tokenize`."""
        messages, urls = template_messages(conversation)
        extra = {"tools": tools} if tools else {}
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **extra)  # fmt: skip
        if not tokenize:
            return text
        return self.encode_rendered(text, urls)

    # -- images ----------------------------------------------------------------------------------------------------
    def encode_rendered(self, text: str, urls: Sequence[str]) -> list[int]:
        """The ids of rendered `text` whose image placeholders stand for `urls`, in order."""
        images = [self.image(u) for u in urls]
        out = self.processor(text=text, images=images or None, add_special_tokens=False)
        return as_ids(out)

    def image(self, url: str) -> Any:
        """The RGB image of a data URL (decoded once while `forget` is not called)."""
        if url not in self._decoded:
            self._decoded[url] = decode_image(url)
        return self._decoded[url]

    def forget(self) -> None:
        """Drop the decoded images (the tokenizer calls it after each record)."""
        self._decoded.clear()

    @property
    def image_token_id(self) -> int | None:
        """The token the processor repeats for an image's features, where it names one."""
        value = getattr(self.processor, "image_token_id", None)
        return int(value) if isinstance(value, int) else None

    def images_cut(self, ids: Sequence[int], max_seq_length: int) -> bool:
        """Whether cutting `ids` to `max_seq_length` would cut into an image (the model needs each image whole);
        without a known image token any cut of an example with images counts."""
        if len(ids) <= max_seq_length:
            return False
        token = self.image_token_id
        return token is None or token in ids[max_seq_length:]

    def save_pretrained(self, folder: Any) -> Any:
        """Saved with the weights: tokenizer, image processor and chat template, as the model's processor."""
        return self.processor.save_pretrained(folder)


def template_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages as multimodal chat templates take them (content a list of `text` and `image` parts) and the image
    URLs in the order they appear."""
    out: list[dict[str, Any]] = []
    urls: list[str] = []
    for message in messages:
        m = dict(message)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    urls.append(str((part.get("image_url") or {}).get("url", "")))
                    parts.append({"type": "image"})
                elif isinstance(part, dict) and part.get("type") == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
            m["content"] = parts or [{"type": "text", "text": ""}]
        else:
            m["content"] = [{"type": "text", "text": "" if content is None else str(content)}]
        out.append(m)
    return out, urls


def image_urls(messages: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The data URLs of a conversation's images, in order."""
    return tuple(template_messages(messages)[1])


def decode_image(url: str) -> Any:
    """A `data:image/...;base64,` URL as an RGB Pillow image.

    Raises:
        ValueError: not base64 image data that Pillow can open.
    """
    from PIL import Image

    _, sep, data = url.partition(",")
    try:
        raw = base64.b64decode(data, validate=True) if sep else b""
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")
    except Exception as exc:  # binascii.Error, PIL.UnidentifiedImageError, OSError
        raise ValueError(f"an image could not be decoded ({exc})") from exc
