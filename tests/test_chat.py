"""render_chat must equal the official Qwen2.5-VL Jinja chat template rendered by jinja2 (as transformers does)."""
import json

import jinja2.sandbox
import pytest

from qwenvl.chat import (CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, normalize_messages,
                         render_chat, vision_items)
from qwenvl.errors import InputError

# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json, verbatim (the independent reference).
OFFICIAL_TEMPLATE = json.loads(r'''{
  "chat_template": "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
}''')["chat_template"]

# The assistant/tool_calls branch of the official Qwen2.5 (text) chat template, for our tool-call rendering.
QWEN25_TOOL_CALL_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
)


def jinja_render(template, messages, **kwargs):
    # transformers' settings (utils/chat_template_utils.py): sandboxed, trim_blocks, lstrip_blocks, tojson w/o ASCII escapes
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=messages, **kwargs)


def official(messages, **kwargs):
    return jinja_render(OFFICIAL_TEMPLATE, messages, **kwargs)


USER_IMAGE = {"role": "user", "content": [{"type": "image", "image": "file:///tmp/dog.jpg"},
                                          {"type": "text", "text": "What kind of dog is this?"}]}
CASES = {
    "text_only": [{"role": "user", "content": "Hello! 你好"}],
    "system_given": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
    "system_as_items": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, USER_IMAGE],
    "image": [USER_IMAGE],
    "multi_turn": [
        {"role": "system", "content": "sys"},
        USER_IMAGE,
        {"role": "assistant", "content": "A golden retriever."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": "b.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A poodle."}]},
        {"role": "user", "content": "Thanks\nbye"},
    ],
    "many_images_videos": [
        {"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image", "image": "a.png", "min_pixels": 3136, "max_pixels": 12845056},
            {"type": "image", "image": "b.png", "resized_height": 280, "resized_width": 420},
            {"type": "video", "video": "clip.mp4", "fps": 1.0},
            {"type": "video", "video": ["f0.jpg", "f1.jpg", "f2.jpg", "f3.jpg"]},
            {"type": "text", "text": " and tell me."},
        ]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "image", "image": "c.png"}, {"type": "video", "video": "d.mp4", "nframes": 8}]},
    ],
    "no_type_keys": [{"role": "user", "content": [{"image": "a.png"}, {"video": "v.mp4"}, {"text": "describe"}]}],
    "tool_message": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},
                     {"role": "tool", "content": '{"temp": 21}'}],
    "empty_text": [{"role": "user", "content": ""}],
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_matches_official_template(name, add_generation_prompt, add_vision_id):
    messages = CASES[name]
    ours = render_chat(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    kwargs = dict(add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    assert ours == official(messages, **kwargs)
    assert ours == official(normalize_messages(messages), **kwargs)  # normalised form renders the same


def test_reference_example_and_constants():
    # REFERENCE.md §4.2 example
    assert render_chat([USER_IMAGE]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What kind of dog is this?<|im_end|>\n<|im_start|>assistant\n")
    assert DEFAULT_SYSTEM_PROMPT == "You are a helpful assistant."
    assert IMAGE_PLACEHOLDER == "<|vision_start|><|image_pad|><|vision_end|>"
    assert VIDEO_PLACEHOLDER == "<|vision_start|><|video_pad|><|vision_end|>"
    assert CHAT_TEMPLATE == OFFICIAL_TEMPLATE
    images_and_videos = render_chat(CASES["many_images_videos"], add_vision_id=True)
    assert "Picture 3: " + IMAGE_PLACEHOLDER in images_and_videos and "Video 3: " + VIDEO_PLACEHOLDER in images_and_videos


def test_openai_style():
    openai = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
            {"type": "image_url", "image_url": "https://example.com/cat.jpg"},
            {"type": "video_url", "video_url": {"url": "file:///tmp/v.mp4"}},
        ]},
    ]
    qwen = [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image", "image": "data:image/png;base64,iVBORw0KGgo="},
            {"type": "image", "image": "https://example.com/cat.jpg"},
            {"type": "video", "video": "file:///tmp/v.mp4"},
        ]},
    ]
    assert normalize_messages(openai) == qwen
    for vid in (False, True):
        assert render_chat(openai, add_vision_id=vid) == official(qwen, add_vision_id=vid, add_generation_prompt=True)
    # images alone: the official template itself understands image_url items
    images_only = [{"role": "user", "content": openai[1]["content"][:3]}]
    assert render_chat(images_only) == official(images_only, add_generation_prompt=True)


def test_vision_items_keep_order_options_and_objects():
    frame = object()  # stands for a PIL image: passed through, never copied or loaded
    messages = CASES["many_images_videos"] + [{"role": "user", "content": [{"image": frame, "max_pixels": 100352}]}]
    items = vision_items(messages)
    assert [(it["type"], it.get("image", it.get("video"))) for it in items] == [
        ("image", "a.png"), ("image", "b.png"), ("video", "clip.mp4"), ("video", ["f0.jpg", "f1.jpg", "f2.jpg", "f3.jpg"]),
        ("image", "c.png"), ("video", "d.mp4"), ("image", frame)]
    assert items[0] == {"type": "image", "image": "a.png", "min_pixels": 3136, "max_pixels": 12845056}
    assert items[1]["resized_height"] == 280 and items[2]["fps"] == 1.0 and items[5]["nframes"] == 8
    assert items[6]["image"] is frame and items[6]["max_pixels"] == 100352
    assert vision_items([{"role": "user", "content": "no media"}]) == []


def test_tool_calls():
    call = {"name": "computer_use", "arguments": {"action": "left_click", "coordinate": [935, 406], "text": "é"}}
    openai_call = {"id": "c1", "type": "function", "function": call}
    for content in (None, "", "Clicking now."):
        msgs = [{"role": "user", "content": "Click OK"},
                {"role": "assistant", "content": content, "tool_calls": [openai_call, {"function": call}]}]
        rendered = render_chat(msgs, add_generation_prompt=False)
        assistant = rendered[rendered.index("<|im_start|>assistant"):]
        assert assistant == jinja_render(QWEN25_TOOL_CALL_TEMPLATE, msgs), content
    # OpenAI sends arguments as JSON text: inserted verbatim (as the Qwen3 template does)
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "content": "ok"}]
    assert render_chat(msgs).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\nok<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "robot", "content": "x"}], "messages[0]: unknown role 'robot'"),
    ([{"role": "user", "content": "x"}, {"content": "y"}], "messages[1]: missing 'role'"),
    ([{"role": "user"}], "messages[0]: missing 'content'"),
    ([{"role": "assistant", "content": None}], "messages[0]: missing 'content'"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "messages[0].content[0]: unknown content type 'audio'"),
    ([{"role": "user", "content": [{"foo": 1}]}], "messages[0].content[0]: content item has no 'type'"),
    ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content[0]: image item without"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}], "video item without"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "needs a string 'text'"),
    ([{"role": "user", "content": 42}], "'content' must be a string or a list"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}], "without a function name"),
    (["hello"], "messages[0]: a message must be a dict"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_bad_messages_raise(messages, fragment):
    with pytest.raises(InputError) as err:
        render_chat(messages)
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)
