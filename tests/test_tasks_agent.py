"""Agent tool schemas, system prompt, tool-call parsing, typed actions, coordinate mapping, step loop."""
import json

import pytest
from PIL import Image

from qwenvl.errors import InputError
from qwenvl.tasks import agent as a
from qwenvl.tasks.agent import (Click, Drag, Key, LongPress, MouseMove, Open, Scroll, Swipe, SystemButton,
                                Terminate, ToolCall, Type, Wait)


def test_computer_use_schema_matches_cookbook():
    tool = a.computer_use_tool(1932, 1092)
    assert tool["name"] == tool["name_for_human"] == "computer_use"
    assert tool["args_format"] == "Format the arguments as a JSON object."
    params = tool["parameters"]
    assert params["properties"]["action"]["enum"] == [
        "key", "type", "mouse_move", "left_click", "left_click_drag", "right_click", "middle_click",
        "double_click", "scroll", "wait", "terminate"]
    assert list(params["properties"]) == ["action", "keys", "text", "coordinate", "pixels", "time", "status"]
    assert params["required"] == ["action"] and params["type"] == "object"
    assert params["properties"]["status"]["enum"] == ["success", "failure"]
    assert "* The screen's resolution is 1932x1092.\n" in tool["description"]
    assert tool["description"].startswith("Use a mouse and keyboard to interact with a computer, and take screenshots.")


def test_mobile_use_schema_matches_cookbook():
    tool = a.mobile_use_tool(1092, 2408)
    params = tool["parameters"]
    assert params["properties"]["action"]["enum"] == [
        "key", "click", "long_press", "swipe", "type", "system_button", "open", "wait", "terminate"]
    assert list(params["properties"]) == ["action", "coordinate", "coordinate2", "text", "time", "button", "status"]
    assert params["properties"]["button"]["enum"] == ["Back", "Home", "Menu", "Enter"]
    assert "* The screen's resolution is 1092x2408.\n" in tool["description"]
    with pytest.raises(InputError):
        a.make_tool("browser_use", 10, 10)


def test_tools_system_prompt_layout():
    tool = a.mobile_use_tool(1092, 2408)
    prompt = a.tools_system_prompt([tool])
    expected = (
        "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps({"type": "function", "function": tool}, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call>")
    assert prompt == expected
    # the recorded notebook shows this exact key order
    assert '<tools>\n{"type": "function", "function": {"name_for_human": "mobile_use", "name": "mobile_use", ' \
           '"description": "Use a touchscreen' in prompt


def test_user_query_with_history():
    assert a.user_query("Open settings") == "The user query: Open settings"
    call = ToolCall("mobile_use", {"action": "open", "text": "File Manager"})
    q = a.user_query("Play the mp3", [call, {"name": "mobile_use", "arguments": {"action": "wait", "time": 2}}])
    assert q == ('The user query: Play the mp3\nTask progress (You have done the following operation on the current '
                 'device): Step 1: {"name": "mobile_use", "arguments": {"action": "open", "text": "File Manager"}}; '
                 'Step 2: {"name": "mobile_use", "arguments": {"action": "wait", "time": 2}}; ')


# ------------------------------------------------------------------ parsing tool calls

def test_parse_cookbook_tool_call():
    text = '<tool_call>\n{"name": "mobile_use", "arguments": {"action": "click", "coordinate": [935, 406]}}\n</tool_call>'
    (call,) = a.parse_tool_calls(text)
    assert call.ok and call.name == "mobile_use"
    assert call.arguments == {"action": "click", "coordinate": [935, 406]}


def test_parse_several_calls_with_thoughts_and_missing_close():
    text = ('I need to open the app first.\n<tool_call>\n{"name": "mobile_use", "arguments": {"action": "open", '
            '"text": "Settings"}}\n</tool_call>\n<tool_call>\n{"name": "mobile_use", "arguments": '
            '{"action": "wait", "time": 1,}}')  # second one: trailing comma, no closing tag
    calls = a.parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("mobile_use", {"action": "open", "text": "Settings"}, None),
        ("mobile_use", {"action": "wait", "time": 1}, None)]


def test_parse_broken_calls_give_error_entries():
    truncated = '<tool_call>\n{"name": "computer_use", "arguments": {"action": "type", "text": "hello wor'
    (call,) = a.parse_tool_calls(truncated)
    assert not call.ok and call.name is None and "unreadable" in call.error
    (call,) = a.parse_tool_calls("<tool_call>\nnot json at all\n</tool_call>")
    assert not call.ok
    (call,) = a.parse_tool_calls('<tool_call>{"arguments": {"action": "wait"}}</tool_call>')
    assert call.error == 'tool call has no "name"'
    (call,) = a.parse_tool_calls('<tool_call>[1, 2]</tool_call>')
    assert call.error == "tool call is not a JSON object"
    assert a.parse_tool_calls("I think the task is done.") == []


def test_parse_untagged_and_string_arguments():
    (call,) = a.parse_tool_calls('{"name": "computer_use", "arguments": "{\\"action\\": \\"left_click\\", '
                                 '\\"coordinate\\": [10, 20]}"}')
    assert call.ok and call.arguments == {"action": "left_click", "coordinate": [10, 20]}


# ------------------------------------------------------------------ typed actions

@pytest.mark.parametrize("args, action", [
    ({"action": "click", "coordinate": [935, 406]}, Click(935, 406)),
    ({"action": "left_click", "coordinate": [10, 20]}, Click(10, 20)),
    ({"action": "left_click"}, Click(None, None)),  # computer_use: click where the cursor is
    ({"action": "right_click", "coordinate": [1, 2]}, Click(1, 2, "right")),
    ({"action": "middle_click", "coordinate": [1, 2]}, Click(1, 2, "middle")),
    ({"action": "double_click", "coordinate": [1, 2]}, Click(1, 2, "left", 2)),
    ({"action": "long_press", "coordinate": [5, 6], "time": 2}, LongPress(5, 6, 2.0)),
    ({"action": "swipe", "coordinate": [5, 600], "coordinate2": [5, 100]}, Swipe(5, 600, 5, 100)),
    ({"action": "left_click_drag", "coordinate": [7, 8]}, Drag(7, 8)),
    ({"action": "mouse_move", "coordinate": ["7", "8"]}, MouseMove(7, 8)),
    ({"action": "type", "text": "hello"}, Type("hello")),
    ({"action": "key", "keys": ["ctrl", "c"]}, Key(("ctrl", "c"))),
    ({"action": "key", "text": "volume_up"}, Key(("volume_up",))),
    ({"action": "scroll", "pixels": -300}, Scroll(-300.0)),
    ({"action": "system_button", "button": "Back"}, SystemButton("Back")),
    ({"action": "open", "text": "File Manager"}, Open("File Manager")),
    ({"action": "wait", "time": 2}, Wait(2.0)),
    ({"action": "terminate", "status": "success"}, Terminate("success")),
])
def test_to_action(args, action):
    assert a.to_action(ToolCall("x_use", args)) == action


@pytest.mark.parametrize("args, message", [
    ({"action": "click"}, "'coordinate'"),
    ({"action": "swipe", "coordinate": [1, 2]}, "'coordinate2'"),
    ({"action": "click", "coordinate": [1, 2, 3]}, "'coordinate'"),
    ({"action": "type"}, "'text'"),
    ({"action": "key"}, "'keys'"),
    ({"action": "scroll", "pixels": "lots"}, "'pixels'"),
    ({"action": "terminate", "status": "done"}, "success or failure"),
    ({"action": "fly"}, "unknown action 'fly'"),
    ({}, "unknown action None"),
])
def test_to_action_errors(args, message):
    with pytest.raises(InputError, match=message):
        a.to_action(ToolCall("mobile_use", args))


def test_to_arguments_round_trip():
    for tool, action in [("mobile_use", Click(935, 406)), ("computer_use", Click(1, 2, "right")),
                         ("computer_use", Click(1, 2, "left", 2)), ("mobile_use", Swipe(1, 2, 3, 4)),
                         ("computer_use", Key(("ctrl", "s"))), ("mobile_use", Key(("power",))),
                         ("mobile_use", Terminate("failure")), ("mobile_use", LongPress(3, 4, 2.0))]:
        args = a.to_arguments(action, tool)
        assert a.to_action(ToolCall(tool, args)) == action
    assert a.to_arguments(Click(935.4, 406.6), "mobile_use") == {"action": "click", "coordinate": [935, 407]}
    assert a.to_arguments(Click(1, 2), "computer_use") == {"action": "left_click", "coordinate": [1, 2]}


def test_scale_action_to_screen():
    # 1080x2400 phone, the model saw 1092x2408 (smart_resize). Worked by hand:
    # x = round(935 * 1080 / 1092) = round(924.725) = 925, y = round(406 * 2400 / 2408) = round(404.651) = 405
    out = a.scale_action(Click(935, 406), (2408, 1092), (2400, 1080))
    assert out == Click(925, 405)
    swipe = a.scale_action(Swipe(1092, 2408, 0, 1204), (2408, 1092), (2400, 1080))
    assert swipe == Swipe(1079, 2399, 0, 1200)  # clamped to the last pixel; 1204 * 2400 / 2408 = 1200
    assert a.scale_action(Click(None, None), (10, 10), (20, 20)) == Click(None, None)
    assert a.scale_action(Type("hi"), (10, 10), (20, 20)) == Type("hi")


def test_resized_screen_from_smart_resize():
    pytest.importorskip("qwenvl.preprocess")
    from qwenvl.tasks.grounding import resized_hw
    # CAPABILITIES §2.5: a 1080x2400 screenshot is described as 1092x2408, 720x1280 as 728x1288
    assert tuple(resized_hw((2400, 1080))) == (2408, 1092)
    assert tuple(resized_hw((1280, 720))) == (1288, 728)


# ------------------------------------------------------------------ loop

def _call(arguments):
    return ("Thought.\n<tool_call>\n" + json.dumps({"name": "mobile_use", "arguments": arguments})
            + "\n</tool_call>")


def test_run_agent_to_success():
    # 540x1200 screenshot -> smart_resize: h = round(1200/28)*28 = 43*28 = 1204, w = round(540/28)*28 = 19*28 = 532
    pytest.importorskip("qwenvl.preprocess")
    answers = iter([_call({"action": "open", "text": "Settings"}),
                    _call({"action": "click", "coordinate": [266, 602]}),
                    _call({"action": "terminate", "status": "success"})])
    seen, executed = [], []

    def model_fn(messages):
        seen.append(messages)
        return next(answers)

    result = a.run_agent(model_fn, lambda: Image.new("RGB", (540, 1200)), executed.append, "Turn on wifi",
                         max_steps=5)
    assert result.status == "success" and len(result.steps) == 3
    # 266 * 540 / 532 = 270, 602 * 1200 / 1204 = 600
    assert executed == [Open("Settings"), Click(270, 600)]
    system = seen[0][0]["content"]
    assert "The screen's resolution is 532x1204." in system
    user = seen[2][1]["content"]
    assert user[1]["type"] == "image" and user[1]["image"].size == (540, 1200)
    assert user[0]["text"] == (
        'The user query: Turn on wifi\nTask progress (You have done the following operation on the current device): '
        'Step 1: {"name": "mobile_use", "arguments": {"action": "open", "text": "Settings"}}; '
        'Step 2: {"name": "mobile_use", "arguments": {"action": "click", "coordinate": [266, 602]}}; ')


def test_run_agent_error_and_max_steps():
    shot = lambda: Image.new("RGB", (100, 200))  # noqa: E731
    executed = []
    result = a.run_agent(lambda m: "I am not sure what to do.", shot, executed.append, "t",
                         resize_fn=lambda h, w: (h, w))
    assert result.status == "error" and executed == [] and "no <tool_call>" in result.error
    result = a.run_agent(lambda m: _call({"action": "click"}), shot, executed.append, "t",
                         resize_fn=lambda h, w: (h, w))
    assert result.status == "error" and "'coordinate'" in result.error
    result = a.run_agent(lambda m: _call({"action": "wait", "time": 1}), shot, executed.append, "t", max_steps=3,
                         resize_fn=lambda h, w: (h, w))
    assert result.status == "max_steps" and executed == [Wait(1.0)] * 3


def test_to_arguments_rejects_what_the_tool_cannot_express():
    with pytest.raises(InputError):
        a.to_arguments(Click(1, 2, "right"), "mobile_use")
    with pytest.raises(InputError):
        a.to_arguments(Click(1, 2, "right", 2), "computer_use")


def test_run_agent_resumes_from_history():
    """Given earlier steps, the first prompt already lists them, and the run's own calls follow them."""
    seen, executed = [], []
    answers = iter([_call({"action": "wait", "time": 2}), _call({"action": "terminate", "status": "failure"})])

    def model_fn(messages):
        seen.append(messages[1]["content"][0]["text"])
        return next(answers)

    earlier = [{"name": "mobile_use", "arguments": {"action": "open", "text": "Clock"}}]
    result = a.run_agent(model_fn, lambda: Image.new("RGB", (56, 56)), executed.append, "Set an alarm",
                         history=earlier, resize_fn=lambda h, w: (h, w))
    assert result.status == "failure" and executed == [Wait(2.0)]
    step1 = 'Step 1: {"name": "mobile_use", "arguments": {"action": "open", "text": "Clock"}}; '
    step2 = 'Step 2: {"name": "mobile_use", "arguments": {"action": "wait", "time": 2}}; '
    prefix = "The user query: Set an alarm\nTask progress (You have done the following operation on the current device): "
    assert seen == [prefix + step1, prefix + step1 + step2]
    assert earlier == [{"name": "mobile_use", "arguments": {"action": "open", "text": "Clock"}}]  # not modified
