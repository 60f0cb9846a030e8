"""GUI agents: the cookbook `computer_use` / `mobile_use` tools, the Qwen2.5 function-calling
system prompt, tool-call parsing, typed actions, coordinate mapping and a small step loop.

Schemas are those of `cookbooks/utils/agent_function_call.py` as released with Qwen2.5-VL (the
later Qwen3-VL file adds triple_click/hscroll/answer; we accept those when parsing but do not
advertise them). The screen size in the tool description is the *smart-resized* screenshot's, and
so are the coordinates the model answers with; `scale_action` maps them to the real screen.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Sequence

from ..errors import InputError
from ._json import find_objects, loads_lenient

# ----------------------------------------------------------------------------- tool schemas

_COORD_DESC = "(x, y): The x (pixels from the left edge) and y (pixels from the top edge) coordinates to move the mouse to."
_STATUS = {"description": "The status of the task. Required only by `action=terminate`.",
           "type": "string", "enum": ["success", "failure"]}

COMPUTER_USE_ACTIONS = ("key", "type", "mouse_move", "left_click", "left_click_drag", "right_click",
                        "middle_click", "double_click", "scroll", "wait", "terminate")
MOBILE_USE_ACTIONS = ("key", "click", "long_press", "swipe", "type", "system_button", "open", "wait", "terminate")


def computer_use_tool(display_width_px: int, display_height_px: int) -> dict:
    """The cookbook's `computer_use` function (Qwen-Agent `BaseTool.function` layout)."""
    description = f"""
Use a mouse and keyboard to interact with a computer, and take screenshots.
* This is an interface to a desktop GUI. You do not have access to a terminal or applications menu. You must click on desktop icons to start applications.
* Some applications may take time to start or process actions, so you may need to wait and take successive screenshots to see the results of your actions. E.g. if you click on Firefox and a window doesn't open, try wait and taking another screenshot.
* The screen's resolution is {display_width_px}x{display_height_px}.
* Whenever you intend to move the cursor to click on an element like an icon, you should consult a screenshot to determine the coordinates of the element before moving the cursor.
* If you tried clicking on a program or link but it failed to load, even after waiting, try adjusting your cursor position so that the tip of the cursor visually falls on the element that you want to click.
* Make sure to click any buttons, links, icons, etc with the cursor tip in the center of the element. Don't click boxes on their edges unless asked.
""".strip()
    action_desc = """
The action to perform. The available actions are:
* `key`: Performs key down presses on the arguments passed in order, then performs key releases in reverse order.
* `type`: Type a string of text on the keyboard.
* `mouse_move`: Move the cursor to a specified (x, y) pixel coordinate on the screen.
* `left_click`: Click the left mouse button.
* `left_click_drag`: Click and drag the cursor to a specified (x, y) pixel coordinate on the screen.
* `right_click`: Click the right mouse button.
* `middle_click`: Click the middle mouse button.
* `double_click`: Double-click the left mouse button.
* `scroll`: Performs a scroll of the mouse scroll wheel.
* `wait`: Wait specified seconds for the change to happen.
* `terminate`: Terminate the current task and report its completion status.
""".strip()
    parameters = {
        "properties": {
            "action": {"description": action_desc, "enum": list(COMPUTER_USE_ACTIONS), "type": "string"},
            "keys": {"description": "Required only by `action=key`.", "type": "array"},
            "text": {"description": "Required only by `action=type`.", "type": "string"},
            "coordinate": {"description": _COORD_DESC + " Required only by `action=mouse_move` and `action=left_click_drag`.",
                           "type": "array"},
            "pixels": {"description": "The amount of scrolling to perform. Positive values scroll up, negative values "
                                      "scroll down. Required only by `action=scroll`.", "type": "number"},
            "time": {"description": "The seconds to wait. Required only by `action=wait`.", "type": "number"},
            "status": dict(_STATUS),
        },
        "required": ["action"],
        "type": "object",
    }
    return _function("computer_use", description, parameters)


def mobile_use_tool(display_width_px: int, display_height_px: int) -> dict:
    """The cookbook's `mobile_use` function (Qwen-Agent `BaseTool.function` layout)."""
    description = f"""
Use a touchscreen to interact with a mobile device, and take screenshots.
* This is an interface to a mobile device with touchscreen. You can perform actions like clicking, typing, swiping, etc.
* Some applications may take time to start or process actions, so you may need to wait and take successive screenshots to see the results of your actions.
* The screen's resolution is {display_width_px}x{display_height_px}.
* Make sure to click any buttons, links, icons, etc with the cursor tip in the center of the element. Don't click boxes on their edges unless asked.
""".strip()
    action_desc = """
The action to perform. The available actions are:
* `key`: Perform a key event on the mobile device.
    - This supports adb's `keyevent` syntax.
    - Examples: "volume_up", "volume_down", "power", "camera", "clear".
* `click`: Click the point on the screen with coordinate (x, y).
* `long_press`: Press the point on the screen with coordinate (x, y) for specified seconds.
* `swipe`: Swipe from the starting point with coordinate (x, y) to the end point with coordinates2 (x2, y2).
* `type`: Input the specified text into the activated input box.
* `system_button`: Press the system button.
* `open`: Open an app on the device.
* `wait`: Wait specified seconds for the change to happen.
* `terminate`: Terminate the current task and report its completion status.
""".strip()
    parameters = {
        "properties": {
            "action": {"description": action_desc, "enum": list(MOBILE_USE_ACTIONS), "type": "string"},
            "coordinate": {"description": _COORD_DESC + " Required only by `action=click`, `action=long_press`, and "
                                                        "`action=swipe`.", "type": "array"},
            "coordinate2": {"description": _COORD_DESC + " Required only by `action=swipe`.", "type": "array"},
            "text": {"description": "Required only by `action=key`, `action=type`, and `action=open`.", "type": "string"},
            "time": {"description": "The seconds to wait. Required only by `action=long_press` and `action=wait`.",
                     "type": "number"},
            "button": {"description": "Back means returning to the previous interface, Home means returning to the "
                                      "desktop, Menu means opening the application background menu, and Enter means "
                                      "pressing the enter. Required only by `action=system_button`",
                       "enum": ["Back", "Home", "Menu", "Enter"], "type": "string"},
            "status": dict(_STATUS),
        },
        "required": ["action"],
        "type": "object",
    }
    return _function("mobile_use", description, parameters)


def _function(name: str, description: str, parameters: dict) -> dict:
    return {"name_for_human": name, "name": name, "description": description, "parameters": parameters,
            "args_format": "Format the arguments as a JSON object."}


TOOLS = {"computer_use": computer_use_tool, "mobile_use": mobile_use_tool}


def make_tool(name: str, display_width_px: int, display_height_px: int) -> dict:
    if name not in TOOLS:
        raise InputError(f"unknown agent tool {name!r}; use one of {sorted(TOOLS)}")
    return TOOLS[name](display_width_px, display_height_px)


# ----------------------------------------------------------------------------- prompts

DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen-Agent NousFnCallPrompt (the format Qwen2.5 models were trained on for function calling)
_FN_CALL_TEMPLATE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tool_descs}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tools_system_prompt(tools: Sequence[dict], system: str = DEFAULT_SYSTEM) -> str:
    """System message text: `system`, a blank line, then the # Tools block with one JSON line per tool."""
    descs = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    tools_block = _FN_CALL_TEMPLATE.format(tool_descs=descs)
    return f"{system}\n\n{tools_block}" if system else tools_block


def _history_entry(item: Any) -> str:
    if isinstance(item, ToolCall):
        item = {"name": item.name, "arguments": item.arguments}
    return item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)


def user_query(task: str, history: Sequence[Any] = ()) -> str:
    """The mobile_agent cookbook's user turn: the task, then the previous steps' tool calls
    ("Step 1: {...}; Step 2: {...}; "). History items: ToolCall, dict, or preformatted str."""
    text = f"The user query: {task}"
    if history:
        steps = "".join(f"Step {i}: {_history_entry(h)}; " for i, h in enumerate(history, 1))
        text += "\nTask progress (You have done the following operation on the current device): " + steps
    return text


def build_messages(task: str, screenshot: Any, tool: dict, history: Sequence[Any] = (),
                   system: str = DEFAULT_SYSTEM) -> list[dict]:
    """Qwen-style messages for one agent step: system with the tool, user with query then screenshot."""
    return [
        {"role": "system", "content": tools_system_prompt([tool], system)},
        {"role": "user", "content": [{"type": "text", "text": user_query(task, history)},
                                     {"type": "image", "image": screenshot}]},
    ]


# ----------------------------------------------------------------------------- tool calls

@dataclass
class ToolCall:
    """One `<tool_call>` block. `error` is set (and name may be None) when it could not be read."""
    name: str | None
    arguments: dict = field(default_factory=dict)
    error: str | None = None
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def _call_from_value(value: Any, raw: str) -> ToolCall:
    if not isinstance(value, dict):
        return ToolCall(None, {}, "tool call is not a JSON object", raw)
    name = value.get("name")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        args = loads_lenient(args)
    if not isinstance(name, str) or not name:
        return ToolCall(None, args if isinstance(args, dict) else {}, "tool call has no \"name\"", raw)
    if not isinstance(args, dict):
        return ToolCall(name, {}, "tool call \"arguments\" is not a JSON object", raw)
    return ToolCall(name, args, None, raw)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{"name": .., "arguments": {..}}</tool_call>` in the text, in order. A block
    without its closing tag runs to the next `<tool_call>` or the end; unreadable JSON (truncated,
    garbage) gives a ToolCall with `error` set instead of raising. With no tags at all, a bare JSON
    object carrying "name" and "arguments" is accepted."""
    if "<tool_call>" not in text:
        objs = [o for o in find_objects(text) if "name" in o and ("arguments" in o or "parameters" in o)]
        return [_call_from_value(o, json.dumps(o, ensure_ascii=False)) for o in objs]
    calls = []
    for chunk in text.split("<tool_call>")[1:]:
        body = chunk.split("</tool_call>")[0].strip()
        value = loads_lenient(body)
        if value is None:
            objs = find_objects(body)  # prose or a stray token around the object
            value = objs[0] if objs else None
        if value is None:
            calls.append(ToolCall(None, {}, f"unreadable tool call JSON: {body[:80]!r}", body))
        else:
            calls.append(_call_from_value(value, body))
    return calls


# ----------------------------------------------------------------------------- typed actions

@dataclass
class Click:
    """click / left_click / right_click / middle_click / double_click. x, y None = where the cursor is."""
    x: float | None
    y: float | None
    button: str = "left"
    clicks: int = 1


@dataclass
class LongPress:
    x: float
    y: float
    seconds: float = 1.0


@dataclass
class Swipe:
    x: float
    y: float
    x2: float
    y2: float


@dataclass
class Drag:
    """left_click_drag: press at the cursor, drag to (x, y)."""
    x: float
    y: float


@dataclass
class MouseMove:
    x: float
    y: float


@dataclass
class Type:
    text: str


@dataclass
class Key:
    keys: tuple  # pressed in order, released in reverse (e.g. ("ctrl", "c")); mobile: one adb keyevent


@dataclass
class Scroll:
    pixels: float  # positive = up
    x: float | None = None
    y: float | None = None


@dataclass
class SystemButton:
    button: str  # Back, Home, Menu, Enter


@dataclass
class Open:
    app: str


@dataclass
class Wait:
    seconds: float


@dataclass
class Terminate:
    status: str  # success | failure


@dataclass
class Answer:
    text: str


Action = Any  # one of the dataclasses above
_CLICKS = {"click": ("left", 1), "left_click": ("left", 1), "right_click": ("right", 1),
           "middle_click": ("middle", 1), "double_click": ("left", 2), "triple_click": ("left", 3)}


def _xy(args: dict, key: str, action: str, required: bool = True) -> tuple[float | None, float | None]:
    value = args.get(key)
    if value is None and not required:
        return None, None
    if isinstance(value, str):
        value = re.findall(r"-?\d+(?:\.\d+)?", value)
    try:
        x, y = (float(v) for v in value)
        return x, y
    except (TypeError, ValueError):
        raise InputError(f"action {action!r} needs {key!r} as [x, y], got {value!r}") from None


def _need(args: dict, key: str, action: str) -> Any:
    if args.get(key) is None:
        raise InputError(f"action {action!r} needs {key!r}")
    return args[key]


def _number(args: dict, key: str, action: str, default: float | None = None) -> float:
    value = args.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"action {action!r} needs a number for {key!r}, got {value!r}") from None


def to_action(call: ToolCall) -> Action:
    """A parsed tool call -> typed action (coordinates still in resized-screenshot pixels).
    Raises InputError naming the action and the missing/bad argument."""
    if not call.ok:
        raise InputError(f"cannot act on a broken tool call: {call.error}")
    args = call.arguments
    action = args.get("action")
    if action in _CLICKS:
        button, clicks = _CLICKS[action]
        # mobile click always needs a point; computer_use clicks may act at the cursor position
        return Click(*_xy(args, "coordinate", action, required=action == "click"), button=button, clicks=clicks)
    if action == "long_press":
        return LongPress(*_xy(args, "coordinate", action), seconds=_number(args, "time", action, 1.0))
    if action == "swipe":
        return Swipe(*_xy(args, "coordinate", action), *_xy(args, "coordinate2", action))
    if action == "left_click_drag":
        return Drag(*_xy(args, "coordinate", action))
    if action == "mouse_move":
        return MouseMove(*_xy(args, "coordinate", action))
    if action == "type":
        return Type(str(_need(args, "text", action)))
    if action == "key":
        keys = args.get("keys", args.get("text"))
        if keys is None or keys == [] or keys == "":
            raise InputError("action 'key' needs 'keys' (computer_use) or 'text' (mobile_use)")
        return Key(tuple(str(k) for k in keys) if isinstance(keys, (list, tuple)) else (str(keys),))
    if action in ("scroll", "hscroll"):
        return Scroll(_number(args, "pixels", action), *_xy(args, "coordinate", action, required=False))
    if action == "system_button":
        return SystemButton(str(_need(args, "button", action)))
    if action == "open":
        return Open(str(_need(args, "text", action)))
    if action == "wait":
        return Wait(_number(args, "time", action, 1.0))
    if action == "terminate":
        status = str(_need(args, "status", action)).lower()
        if status not in ("success", "failure"):
            raise InputError(f"action 'terminate' status must be success or failure, got {status!r}")
        return Terminate(status)
    if action == "answer":
        return Answer(str(_need(args, "text", action)))
    raise InputError(f"unknown action {action!r} in tool call {call.name!r}")


def to_arguments(action: Action, tool: str = "mobile_use") -> dict:
    """The inverse of `to_action`: the arguments object the model would emit for this action with
    this tool (for history lines and training targets). Coordinates are rounded to ints."""
    def pt(x, y):
        return [round(x), round(y)]

    mobile = tool == "mobile_use"
    if isinstance(action, Click):
        names = [k for k, v in _CLICKS.items() if k != "click" and v == (action.button, action.clicks)]
        if not names or (mobile and names != ["left_click"]):
            raise InputError(f"{tool} has no action for a {action.button} click x{action.clicks}")
        name = "click" if mobile else names[0]
        out = {"action": name}
        if action.x is not None:
            out["coordinate"] = pt(action.x, action.y)
        return out
    if isinstance(action, LongPress):
        return {"action": "long_press", "coordinate": pt(action.x, action.y), "time": action.seconds}
    if isinstance(action, Swipe):
        return {"action": "swipe", "coordinate": pt(action.x, action.y), "coordinate2": pt(action.x2, action.y2)}
    if isinstance(action, Drag):
        return {"action": "left_click_drag", "coordinate": pt(action.x, action.y)}
    if isinstance(action, MouseMove):
        return {"action": "mouse_move", "coordinate": pt(action.x, action.y)}
    if isinstance(action, Type):
        return {"action": "type", "text": action.text}
    if isinstance(action, Key):
        return {"action": "key", "text": action.keys[0]} if mobile else {"action": "key", "keys": list(action.keys)}
    if isinstance(action, Scroll):
        out = {"action": "scroll", "pixels": action.pixels}
        if action.x is not None:
            out["coordinate"] = pt(action.x, action.y)
        return out
    if isinstance(action, SystemButton):
        return {"action": "system_button", "button": action.button}
    if isinstance(action, Open):
        return {"action": "open", "text": action.app}
    if isinstance(action, Wait):
        return {"action": "wait", "time": action.seconds}
    if isinstance(action, Terminate):
        return {"action": "terminate", "status": action.status}
    if isinstance(action, Answer):
        return {"action": "answer", "text": action.text}
    raise InputError(f"not an action: {action!r}")


_COORD_PAIRS = (("x", "y"), ("x2", "y2"))


def scale_action(action: Action, resized_hw: Sequence[int], screen_hw: Sequence[int]) -> Action:
    """Map an action's coordinates from the resized screenshot the model saw to the real screen
    (both (height, width)); rounded to whole pixels and clamped to [0, size - 1]."""
    (rh, rw), (sh, sw) = resized_hw, screen_hw
    if min(rh, rw, sh, sw) <= 0:
        raise InputError(f"sizes must be > 0, got resized {tuple(resized_hw)} screen {tuple(screen_hw)}")
    names = {f.name for f in fields(action)}
    changes = {}
    for kx, ky in _COORD_PAIRS:
        if kx in names and getattr(action, kx) is not None:
            changes[kx] = min(max(round(getattr(action, kx) * sw / rw), 0), sw - 1)
            changes[ky] = min(max(round(getattr(action, ky) * sh / rh), 0), sh - 1)
    return replace(action, **changes)


def action_dict(action: Action) -> dict:
    """{"type": "Click", **fields}: a plain form for logs and comparisons."""
    return {"type": type(action).__name__, **asdict(action)}


# ----------------------------------------------------------------------------- loop

@dataclass
class AgentStep:
    text: str  # the model's raw answer
    call: ToolCall | None
    action: Action | None  # in screen pixels, as executed
    error: str | None = None


@dataclass
class AgentResult:
    status: str  # success | failure (the model's terminate), max_steps, or error (unusable answer)
    steps: list[AgentStep]

    @property
    def error(self) -> str | None:
        return self.steps[-1].error if self.steps else None


def run_agent(model_fn: Callable[[list[dict]], str], screenshot_fn: Callable[[], Any],
              execute_fn: Callable[[Action], Any], task: str, max_steps: int = 20,
              tool: str = "mobile_use", resize_fn: Callable[[int, int], Sequence[int]] | None = None,
              min_pixels: int = 3136, max_pixels: int = 12845056, system: str = DEFAULT_SYSTEM,
              history: Sequence[Any] = ()) -> AgentResult:
    """Drive one task: screenshot -> messages -> model_fn(messages) -> first tool call -> action mapped
    to the screen -> execute_fn(action), until terminate or max_steps.

    screenshot_fn returns a PIL image of the whole screen. The tool description and the model's
    coordinates use the screenshot's smart-resized size: resize_fn(height, width) -> (h, w), by
    default preprocess.smart_resize with min/max_pixels (model_fn must process the image with the same
    values). History lines are the model's own tool calls, as the mobile_agent cookbook writes them.
    An answer with no usable tool call ends the run with status "error" (greedy decoding would repeat it).
    `history`: earlier steps' tool calls (ToolCall, {"name", "arguments"} dict or a preformatted line), to resume
    a task; the run's own calls are appended after them.
    """
    if resize_fn is None:
        from ..preprocess import smart_resize  # lazy: only needed when no resize_fn is given

        def resize_fn(h: int, w: int) -> Sequence[int]:
            return smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)

    steps: list[AgentStep] = []
    history = list(history)
    for _ in range(max_steps):
        screenshot = screenshot_fn()
        screen_hw = (screenshot.size[1], screenshot.size[0])
        rh, rw = resize_fn(*screen_hw)
        messages = build_messages(task, screenshot, make_tool(tool, rw, rh), history, system)
        text = model_fn(messages)
        calls = parse_tool_calls(text)
        call = calls[0] if calls else None
        try:
            if call is None:
                raise InputError("the answer has no <tool_call>")
            action = scale_action(to_action(call), (rh, rw), screen_hw)
        except InputError as e:
            steps.append(AgentStep(text, call, None, str(e)))
            return AgentResult("error", steps)
        steps.append(AgentStep(text, call, action))
        if isinstance(action, Terminate):
            return AgentResult(action.status, steps)
        execute_fn(action)
        history.append(call)
    return AgentResult("max_steps", steps)
