"""Chat messages -> what the engine answers: the user's text and the images in the order they came.

The engine directory's conversation format is its manifest's `prompt_template` (LLaVA-1.5: "USER:
<image>\\n{prompt} ASSISTANT:"), one user turn with the image first. So a request here is one `user`
message whose content is a string or a list of parts: `text` parts (joined with "\\n"), `image_url`
parts and `image_embeds` parts (vLLM's or trtllm-serve's format, runtime/serve/payload.py). With
several images the template's image slot repeats once per image, one per line, before the text (as
vLLM places placeholders the text does not). One image and text X give exactly the text
`Pipeline.generate(image, X)` builds. System and assistant turns are refused with a 400 saying so.
In `--upstream` mode the upstream renders the conversation; only the image parts are read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

IMAGE_PARTS = ("image_url", "image_embeds")


@dataclass
class ImagePart:
    """An image part of a request: where it sits (message, part) and what it carries."""

    message: int
    part: int
    kind: str  # "image_url" | "image_embeds"
    body: dict[str, Any]

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


@dataclass
class UserTurn:
    text: str
    images: list[ImagePart] = field(default_factory=list)


def image_parts(messages: list[dict], max_images: int) -> list[ImagePart]:
    """Every image part of every message, in order; unknown part types are refused."""
    found: list[ImagePart] = []
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in IMAGE_PARTS:
                found.append(ImagePart(m, p, kind, part))
            elif kind != "text":
                raise bad_request(
                    f"messages[{m}].content[{p}]: content part type {kind!r} is not supported "
                    "(text, image_url, image_embeds)",
                    param=f"messages[{m}].content",
                )
    if len(found) > max_images:
        raise bad_request(
            f"{len(found)} images in the request; this server takes at most {max_images}",
            param="messages",
            code="too_many_images",
        )
    return found


def user_turn(messages: list[dict], max_images: int, image_token: str) -> UserTurn:
    if len(messages) != 1 or messages[0].get("role") != "user":
        roles = [m.get("role") for m in messages]
        raise bad_request(
            f"messages with roles {roles}: this engine's conversation format holds one user turn; send one "
            "message with role 'user'",
            param="messages",
        )
    content = messages[0].get("content")
    images = image_parts(messages, max_images)
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if any(not isinstance(t, str) for t in texts):
            raise bad_request("a text part without a string 'text'", param="messages[0].content")
    else:
        raise bad_request("messages[0].content must be a string or a list of parts", param="messages[0].content")
    text = "\n".join(texts)
    if image_token in text:
        raise bad_request(
            f"the text contains the image token {image_token!r}; send images as image_url or image_embeds parts",
            param="messages[0].content",
        )
    if not images:
        raise bad_request("this engine answers about images: send at least one image_url or image_embeds part")
    return UserTurn(text, images)
