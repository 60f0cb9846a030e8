"""Reading the model's answers: grounding boxes/points, QwenVL HTML documents, OCR/KIE, video
timestamps, agent tool calls, and the metrics that score them. Pure Python + PIL; no model needed."""
from .agent import (Answer, AgentResult, AgentStep, Click, Drag, Key, LongPress, MouseMove, Open, Scroll,
                    Swipe, SystemButton, Terminate, ToolCall, Type, Wait, build_messages, computer_use_tool,
                    make_tool, mobile_use_tool, parse_tool_calls, run_agent, scale_action, to_action, to_arguments,
                    tools_system_prompt, user_query)
from .document import (DOC_PARSE_PROMPT, DOC_PARSE_SYSTEM, OCR_PROMPT, SPOTTING_PROMPT, Element, KIEResult,
                       is_json_schema, kie_prompt, parse_html, parse_kie, parse_text_spotting, schema_template,
                       table_to_markdown, to_markdown)
from .grounding import (Box, Point, count, count_prompt, describe_prompt, detect_prompt, draw, locate_prompt,
                        parse_boxes, parse_points, point_json_prompt, point_prompt, resized_hw, to_original,
                        to_original_image, to_resized)
from .metrics import (acc_at_iou, action_accuracy, action_match, anls, char_accuracy, iou, levenshtein, mean_anls,
                      mean_iou, point_accuracy, point_in_box, recall_at_k, relaxed_accuracy, relaxed_correctness,
                      temporal_grounding_scores, temporal_iou)
from .video import (Event, charades_prompt, dense_caption_prompt, format_time, grounding_prompt, parse_events,
                    parse_time, parse_time_range, parse_time_ranges)

__all__ = [
    # grounding
    "Box", "Point", "parse_boxes", "parse_points", "count", "to_original", "to_resized", "resized_hw",
    "to_original_image", "draw", "detect_prompt", "describe_prompt", "locate_prompt", "point_prompt",
    "point_json_prompt", "count_prompt",
    # documents
    "Element", "parse_html", "to_markdown", "table_to_markdown", "parse_text_spotting", "KIEResult", "kie_prompt",
    "parse_kie", "is_json_schema", "schema_template", "DOC_PARSE_PROMPT", "DOC_PARSE_SYSTEM", "OCR_PROMPT", "SPOTTING_PROMPT",
    # video
    "Event", "parse_time", "parse_time_range", "parse_time_ranges", "parse_events", "format_time",
    "grounding_prompt", "charades_prompt", "dense_caption_prompt",
    # agents
    "ToolCall", "parse_tool_calls", "to_action", "to_arguments", "scale_action", "computer_use_tool",
    "mobile_use_tool", "make_tool", "tools_system_prompt", "user_query", "build_messages", "run_agent",
    "AgentResult", "AgentStep", "Click", "LongPress", "Swipe", "Drag", "MouseMove", "Type", "Key", "Scroll",
    "SystemButton", "Open", "Wait", "Terminate", "Answer",
    # metrics
    "iou", "acc_at_iou", "point_in_box", "point_accuracy", "levenshtein", "anls", "mean_anls",
    "relaxed_correctness", "relaxed_accuracy", "char_accuracy", "temporal_iou", "mean_iou", "recall_at_k",
    "temporal_grounding_scores", "action_match", "action_accuracy",
]
