"""The engine's conversation format as a Jinja chat template, for an upstream that renders chats
itself (`vllm serve ... --chat-template t.jinja`): `apet chat-template --engine DIR > t.jinja`.

What it renders is exactly what `apet serve` builds locally for the same request (runtime/serve/chat.py
`conversation`): the manifest's `prompt_template` with its image slot holding one image token per
image (one a line) and `{prompt}` the request's text parts joined with "\\n", preceded and followed by
the special tokens the engine's tokenizer adds by itself (BOS for LLaMA tokenizers): an upstream
tokenizes a rendered chat without adding special tokens, the engine's runtime with them. The
template reads OpenAI-format content (a list of parts; vLLM hands each image or image_embeds part
to it as `{"type": "image"}`), so vLLM picks the "openai" content format; plain string content is
one text part. One user message, as the engine's format holds; anything else is refused with
`raise_exception` (vLLM answers 400).
"""

from __future__ import annotations

import json


def special_affixes(tokenizer) -> tuple[str, str]:
    """The text of the special tokens the tokenizer adds around a text by itself (prefix, suffix)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain) :]
            return (
                tokenizer.decode(prefix, skip_special_tokens=False),
                tokenizer.decode(suffix, skip_special_tokens=False),
            )
    raise ValueError("the tokenizer's special tokens are not a prefix and a suffix of the text")


def render_template(prompt_template: str, image_token: str, prefix: str = "", suffix: str = "") -> str:
    """A Jinja chat template rendering `prompt_template` for one user message (module docstring)."""
    if prompt_template.count(image_token) != 1 or prompt_template.count("{prompt}") != 1:
        raise ValueError(f"prompt_template {prompt_template!r} must hold {image_token!r} and '{{prompt}}' once each")
    before, after = prompt_template.split(image_token)
    if "{prompt}" not in after:
        raise ValueError(f"prompt_template {prompt_template!r}: the image slot must come before '{{prompt}}'")
    middle, end = after.split("{prompt}")

    def lit(text: str) -> str:
        return json.dumps(text)  # a JSON string is a Jinja string literal

    return (
        "{#- apet-trt: the engine's prompt_template as a chat template (apet chat-template) -#}\n"
        "{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}\n"
        "{{- raise_exception('this model\\'s conversation format holds one user message') -}}\n"
        "{%- endif -%}\n"
        "{%- set content = messages[0]['content'] -%}\n"
        "{%- set ns = namespace(images=0, texts=[]) -%}\n"
        "{%- if content is string -%}{%- set ns.texts = [content] -%}\n"
        "{%- else -%}{%- for part in content -%}\n"
        "{%- if part['type'] == 'text' -%}{%- set ns.texts = ns.texts + [part['text']] -%}\n"
        "{%- elif part['type'] in ['image', 'image_url', 'image_embeds'] -%}{%- set ns.images = ns.images + 1 -%}\n"
        "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
        f"{{{{- {lit(prefix + before)} -}}}}\n"
        "{%- for i in range(ns.images) -%}"
        f"{{{{- {lit(image_token)} if loop.first else {lit(chr(10) + image_token)} -}}}}"
        "{%- endfor -%}\n"
        f"{{{{- {lit(middle)} + (ns.texts | join({lit(chr(10))})) + {lit(end + suffix)} -}}}}\n"
    )


def engine_chat_template(engine: str) -> str:
    """The chat template for an engine directory (its manifest's prompt_template, its tokenizer)."""
    from transformers import AutoTokenizer

    from ..manifest import load_manifest

    manifest = load_manifest(engine)
    tokenizer = AutoTokenizer.from_pretrained(str(manifest.tokenizer_dir))
    prefix, suffix = special_affixes(tokenizer)
    return render_template(manifest.prompt_template, manifest.image_token, prefix, suffix)
