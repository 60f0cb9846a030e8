"""Chat messages -> prompt text, byte-identical to the official Qwen2.5-VL chat template.

Messages may be Qwen style (what qwen-vl-utils and the cookbooks use) or OpenAI style;
`normalize_messages` turns both into one Qwen-style form, and everything else here reads that form:

    {"role": "system" | "user" | "assistant" | "tool",
     "content": [{"type": "text", "text": str}
                 | {"type": "image", "image": path | URL | data-URL | PIL.Image, **options}
                 | {"type": "video", "video": path | URL | [frames], **options}]}

`options` are the per-item keys (min_pixels, max_pixels, resized_height, resized_width, fps, nframes,
total_pixels, ...) that media.py / preprocess.py read. Nothing is loaded here.

Tool calls. The official Qwen2.5-VL template knows nothing of OpenAI `tool_calls`; we render them the
way the Qwen2.5 (text) template and the Qwen2.5-VL agent cookbooks do, appended to the assistant's text:
    <|im_start|>assistant\n{content}\n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>
(no "{content}\n" when the content is empty; several calls are joined by "\n"). Arguments given as a
string (OpenAI sends JSON text) are inserted verbatim, a dict/list is written with json.dumps. A `tool`
message renders as the official Qwen2.5-VL template does: `<|im_start|>tool\n{content}<|im_end|>\n`.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import InputError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
ROLES = ("system", "user", "assistant", "tool")

# The official Qwen2.5-VL chat_template.json (Qwen2.5-VL-{3,7,72}B-Instruct; the same as Qwen2-VL's).
# Not used for rendering (render_chat is native Python); written into tokenizer_config.json on save so
# that transformers' apply_chat_template works on checkpoints we write.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Keys that carry an item's media or type; every other key of an item is an option and is kept.
_SOURCE_KEYS = ("type", "image", "image_url", "video", "video_url", "text")


def normalize_messages(messages: Any) -> list[dict]:
    """Qwen- or OpenAI-style messages -> Qwen-style messages with list content (see the module doc).

    Raises InputError naming the message (and item) index for: a non-list or empty conversation,
    a message that is not a dict, an unknown or missing role, missing content, an unknown content type,
    a media item without its media, a non-string text.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}"
                         + (" of length 0" if isinstance(messages, (list, tuple)) else ""))
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InputError(f"{where}: a message must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role is None:
        raise InputError(f"{where}: missing 'role' (one of {', '.join(ROLES)})")
    if role not in ROLES:
        raise InputError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    tool_calls = message.get("tool_calls") if role == "assistant" else None
    content = message.get("content")
    if content is None:
        if not tool_calls:
            raise InputError(f"{where}: missing 'content' for role {role!r}")
        content = []
    if isinstance(content, str):
        items = [{"type": "text", "text": content}]
    elif isinstance(content, (list, tuple)):
        items = [_normalize_item(f"{where}.content[{j}]", item) for j, item in enumerate(content)]
    elif isinstance(content, dict):  # a single item given without the list
        items = [_normalize_item(f"{where}.content", content)]
    else:
        raise InputError(f"{where}: 'content' must be a string or a list of items, got {type(content).__name__}")
    if tool_calls:
        calls = tool_calls if isinstance(tool_calls, (list, tuple)) else [tool_calls]
        blocks = "\n".join(_render_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls))
        # As the Qwen2.5 template: "\n" between the content and the first call only if there is content.
        has_content = any(it["type"] != "text" or it["text"] for it in items)
        items.append({"type": "text", "text": ("\n" if has_content else "") + blocks})
    return {"role": role, "content": items}


def _normalize_item(where: str, item: Any) -> dict:
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise InputError(f"{where}: a content item must be a dict, got {type(item).__name__}")
    kind = item.get("type")
    if kind is None:  # Qwen style without "type": the key says what it is (template's order)
        kind = next((k for k in ("image", "image_url", "video", "video_url", "text") if k in item), None)
        if kind is None:
            raise InputError(f"{where}: content item has no 'type' and none of image/video/text: keys {sorted(item)}")
    options = {k: v for k, v in item.items() if k not in _SOURCE_KEYS}
    if kind in ("image", "image_url"):
        return {"type": "image", "image": _media_value(where, item, "image"), **options}
    if kind in ("video", "video_url"):
        return {"type": "video", "video": _media_value(where, item, "video"), **options}
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}: text item needs a string 'text', got {type(text).__name__}")
        return {"type": "text", "text": text}
    raise InputError(f"{where}: unknown content type {kind!r} (expected text, image, image_url, video, video_url)")


def _media_value(where: str, item: dict, kind: str):
    """The image/video of an item: item[kind], else item[kind_url] as a string or {"url": ...}."""
    value = item.get(kind)
    if value is None:
        url = item.get(f"{kind}_url")
        value = url.get("url") if isinstance(url, dict) else url
    if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
        raise InputError(f"{where}: {kind} item without a {kind} (give '{kind}' or '{kind}_url': {{'url': ...}})")
    return value


def _render_tool_call(where: str, call: Any) -> str:
    if not isinstance(call, dict):
        raise InputError(f"{where}: a tool call must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)  # OpenAI nests name/arguments under "function"; Qwen style does not
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: tool call without a function name")
    args = fn.get("arguments", {})
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args_text}}}\n</tool_call>'


def render_chat(messages: Any, add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
    """Prompt text for `messages` (any accepted style), as the official Qwen2.5-VL chat template renders it.

    Each image/video becomes one placeholder (one pad token, expanded later to the number of
    vision tokens); add_vision_id prefixes "Picture n: " / "Video n: ", counted over the whole conversation.
    """
    messages = normalize_messages(messages)
    out = []
    if messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    n_images = n_videos = 0
    for message in messages:
        out.append(f"<|im_start|>{message['role']}\n")
        for item in message["content"]:
            if item["type"] == "image":
                n_images += 1
                out.append(f"Picture {n_images}: {IMAGE_PLACEHOLDER}" if add_vision_id else IMAGE_PLACEHOLDER)
            elif item["type"] == "video":
                n_videos += 1
                out.append(f"Video {n_videos}: {VIDEO_PLACEHOLDER}" if add_vision_id else VIDEO_PLACEHOLDER)
            else:
                out.append(item["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def vision_items(messages: Any) -> list[dict]:
    """The image and video items of `messages` in order of appearance (the order of the pads in the prompt)."""
    return [item for m in normalize_messages(messages) for item in m["content"] if item["type"] in ("image", "video")]
