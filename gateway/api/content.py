"""What every front door accepts alike: message content as text or OpenAI-style parts (text,
image_url), and the bound on a reply's tokens."""

from __future__ import annotations

import re
from typing import Any

from gateway.api.common import check_text
from gateway.errors import BadRequest

# max_tokens is added to the prompt estimate in bigint SQL (the daily reservation): bounded here,
# where a larger one is a 400, not an overflow (500) later
MAX_TOKENS_LIMIT = 2**31 - 1

MAX_PARTS = 100
IMAGE_DETAILS = ("auto", "low", "high")
# a data URL's media type and base64 payload: what an Anthropic upstream needs to build its image source
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]{1,40};base64,[A-Za-z0-9+/]+={0,2}", re.ASCII)


def _part(part: Any, where: str) -> str:
    """One OpenAI-style content part, checked exactly (it is stored as sent); its text, if any."""
    if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
        raise BadRequest(f"{where} must be a text or image_url part")
    if part["type"] == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise BadRequest(f"{where} must be {{\"type\": \"text\", \"text\": string}}")
        return check_text(part["text"], f"{where}.text")
    image = part.get("image_url")
    if (set(part) != {"type", "image_url"} or not isinstance(image, dict) or not set(image) <= {"url", "detail"}
            or not isinstance(image.get("url"), str)):
        raise BadRequest(f"{where} must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": string, "
                         f"\"detail\"?}}}}")
    url = image["url"]
    if not (_DATA_URL.fullmatch(url) or (url.startswith(("https://", "http://")) and url.isascii()
                                         and url.isprintable() and " " not in url)):
        raise BadRequest(f"{where}.image_url.url must be an http(s) URL or a base64 data:image/... URL")
    if "detail" in image and image["detail"] not in IMAGE_DETAILS:
        raise BadRequest(f"{where}.image_url.detail must be auto, low or high")
    return ""


def parse_content(content: Any) -> tuple[str, list[dict[str, Any]] | None]:
    """`content`: a non-blank string, or a list of OpenAI-style parts (text, image_url) with something
    in it. Returns the text (of the text parts, joined by spaces) and the parts (None for a string)."""
    if isinstance(content, str):
        if not content.strip():
            raise BadRequest("content must not be empty")
        return check_text(content, "content"), None
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of content parts")
    if not 0 < len(content) <= MAX_PARTS:
        raise BadRequest(f"content must have 1 to {MAX_PARTS} parts")
    texts = [_part(part, f"content[{i}]") for i, part in enumerate(content)]
    text = " ".join(t for t in texts if t)
    if not text.strip() and all(p["type"] == "text" for p in content):
        raise BadRequest("content must not be empty")
    return text, content
