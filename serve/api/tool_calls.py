"""What a chat request's `tools`, `tool_choice` and `parallel_tool_calls` mean for its prompt, its decoding and its
answer (OpenAI's semantics):

    none       the tools are not rendered and the answer is not read for calls (the default without tools)
    auto       the tools are rendered; the answer is free, and calls in it are read by --tool-call-parser
    required   as auto, and a grammar forces one call or more of the offered functions
    a function as auto, and a grammar forces exactly one call of that function

With parallel_tool_calls false an answer carries at most one call: the grammar forces one, and under auto only the
first call read counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import bad_request
from .schemas import ChatCompletionRequest, FunctionDefinition, NamedToolChoice
from .tool_parsers import ToolCallFormat


@dataclass(frozen=True)
class ToolUse:
    format: ToolCallFormat  # how the model writes calls: read from answers, written into the history
    offered: tuple[dict, ...] = ()  # the tools rendered into the prompt, as OpenAI's dicts
    names: frozenset[str] = frozenset()  # the functions an answer may call; empty: answers are not read for calls
    max_calls: int | None = None  # 1 without parallel tool calls
    forced: tuple[FunctionDefinition, ...] = ()  # a grammar forces calls of these (required, or a named function)


def tool_use(body: ChatCompletionRequest, format: ToolCallFormat) -> ToolUse:
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if not tools and choice not in ("none", "auto"):
        raise bad_request("tool_choice asks for a call, but the request offers no tools", param="tool_choice")
    if not tools or choice == "none":
        return ToolUse(format)
    functions = [tool.function for tool in tools]
    forced: list[FunctionDefinition] = []
    if isinstance(choice, NamedToolChoice):
        forced = [f for f in functions if f.name == choice.function.name]
        if not forced:
            raise bad_request(f"tool_choice names the function {choice.function.name!r}, which tools does not offer "
                              f"(offered: {', '.join(f.name for f in functions)})", param="tool_choice")
    elif choice == "required":
        forced = functions
    single = isinstance(choice, NamedToolChoice) or not body.parallel_tool_calls
    return ToolUse(format, tuple(tool.model_dump(exclude_none=True) for tool in tools),
                   frozenset(f.name for f in functions), 1 if single else None, tuple(forced))
