"""Images in the SDK's prompts: OpenAI-style content parts and `{"prompt", "images"}` prompts.

Chat messages may hold content parts (OpenAI's shape):
    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   (or a path, an
        http(s) URL; `image_url` may be the URL string itself)
    {"type": "image", "image": <path, bytes, PIL image or URL>}                (Hugging Face's)
The chat template sees Hugging Face's parts (`{"type": "image"}`, `{"type": "text", ...}`), as
transformers' processors render them, and writes the model's image placeholder for each.
"""

from typing import Any

from relaxlm.errors import RelaxlmError


def has_images(messages: list[dict]) -> bool:
    """Whether any message holds an image content part."""
    return any(
        isinstance(part, dict) and part.get("type") in ("image", "image_url")
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )


def split_images(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """(messages with image parts as `{"type": "image"}` for the template, the image sources in
    the order they appear)."""
    images: list[Any] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind in ("image", "image_url"):
                images.append(_source(part, i))
                parts.append({"type": "image"})
            else:
                raise RelaxlmError(
                    f"messages[{i}].content has a part of type {kind!r}; parts are "
                    '{"type": "text", "text": ...} or {"type": "image_url", "image_url": '
                    '{"url": ...}}'
                )
        out.append({**message, "content": parts})
    return out, images


def _source(part: dict, index: int) -> Any:
    if part["type"] == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
    else:
        url = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if url is None:
        raise RelaxlmError(
            f"messages[{index}].content has an image part without an image; send "
            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'
        )
    return url


def prompt_images(prompt: dict) -> tuple[Any, list[Any]]:
    """A `{"prompt": text or ids, "images": [...]}` prompt -> (prompt, images)."""
    unknown = set(prompt) - {"prompt", "images"}
    if "prompt" not in prompt or unknown:
        raise RelaxlmError(
            'a prompt dict is {"prompt": text or token ids, "images": [sources]}; got keys '
            f"{sorted(prompt)}"
        )
    images = prompt.get("images") or []
    if not isinstance(images, list | tuple):
        images = [images]
    return prompt["prompt"], list(images)
