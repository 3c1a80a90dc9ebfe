"""Image data URLs in VLM datasets: prefix, size, base64 and a cheap Pillow check that the bytes are that image.

Knows one URL string at a time; nothing of messages, lines or files.
"""

from __future__ import annotations

import base64
import binascii
import io

MAX_IMAGES_PER_EXAMPLE = 10
MAX_IMAGE_BYTES = 10 * 2**20
PREFIXES = {
    "data:image/jpeg;base64,": "JPEG",
    "data:image/png;base64,": "PNG",
    "data:image/webp;base64,": "WEBP",
}
# The header plus base64 of MAX_IMAGE_BYTES: together.lib.constants.MAX_BASE64_IMAGE_LENGTH (13,981,036).
MAX_DATA_URL_CHARS = len("data:image/jpeg;base64,") + 4 * MAX_IMAGE_BYTES // 3


def check_data_url(url: str) -> str | None:
    """Return why `url` is not an acceptable image, or None when it is.

    Args:
        url: the `image_url.url` string of a content part.

    Returns:
        A message naming what is wrong and what is allowed, or None.
    """
    head, sep, _ = url.partition(",")
    kind = PREFIXES.get(head + sep)
    if kind is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        return (
            f'image URL "{shown}" is not allowed: it must be a data URL starting with '
            "data:image/jpeg;base64, data:image/png;base64, or data:image/webp;base64, (no remote URLs)"
        )
    if len(url) > MAX_DATA_URL_CHARS:
        return (
            f"image data URL is {len(url):,} characters; the limit is {MAX_DATA_URL_CHARS:,} "
            f"(about {MAX_IMAGE_BYTES // 2**20} MiB of image data)"
        )
    try:
        raw = base64.b64decode(url[len(head) + 1 :], validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"image data is not valid base64 ({exc})"
    if not raw:
        return "image data is empty"
    if len(raw) > MAX_IMAGE_BYTES:
        return f"image is {len(raw):,} bytes; the limit is {MAX_IMAGE_BYTES:,} bytes"
    return _check_image_bytes(raw, kind)


def _check_image_bytes(raw: bytes, kind: str) -> str | None:
    # Pillow only parses the header and verifies the structure (CRCs for PNG); no pixels are decoded.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            found = img.format
            if found == kind:
                img.verify()
    except UnidentifiedImageError:
        return f"image data declared as {kind.lower()} is not a readable image (no known image format)"
    except Exception as exc:  # any failure to parse untrusted bytes means "not that image"
        return f"image data declared as {kind.lower()} is not a readable image ({type(exc).__name__}: {exc})"
    if found != kind:
        return f"image data declared as {kind.lower()} is really {str(found).lower()}"
    return None
