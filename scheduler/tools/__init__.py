"""Tools inside the schedule: a safe, throttled executor of registered tools; parallel
function calls (OpenAI tool_calls, LLMCompiler plans); partial tool execution (Conveyor).

- `registry.ToolRegistry`: register tools by name, with their limits.
- `executor.ToolExecutor`: `run(name, args, program_id=, call_id=)`, `cancel_program`,
  `stats`, `run_incremental`; tool time is reported as `ToolCallRecord`s.
- `parallel.run_tool_calls`: run an LLM response's OpenAI `tool_calls` concurrently.
- `llmcompiler`: the plan format and parser; a streamed plan's tasks go onto the
  scheduler's data-flow graph (`submit_plan`); the joiner's answer format.
- `partial`: incremental parsers of the token stream; `run_partial_tool`.
- `code_runner.CodeRunnerTool`, `builtin`: example tools.
"""

from .config import CodeRunnerConfig, ToolsConfig
from .errors import (
    JoinerOutputError,
    PlanCycleError,
    PlanError,
    PlanReferenceError,
    PlanSyntaxError,
    PlanUnknownToolError,
    ToolArgumentError,
    ToolCancelledError,
    ToolError,
    ToolFailedError,
    ToolTimeoutError,
    UnknownToolError,
)
from .executor import ToolCallRecord, ToolExecutor, ToolRunner, ToolStats
from .incremental import IncrementalTool
from .parallel import ToolCallResult, run_tool_calls
from .registry import RegisteredTool, ToolPolicy, ToolRegistry

__all__ = [
    "CodeRunnerConfig",
    "IncrementalTool",
    "JoinerOutputError",
    "PlanCycleError",
    "PlanError",
    "PlanReferenceError",
    "PlanSyntaxError",
    "PlanUnknownToolError",
    "RegisteredTool",
    "ToolArgumentError",
    "ToolCallRecord",
    "ToolCallResult",
    "ToolCancelledError",
    "ToolError",
    "ToolExecutor",
    "ToolFailedError",
    "ToolPolicy",
    "ToolRegistry",
    "ToolRunner",
    "ToolStats",
    "ToolTimeoutError",
    "ToolsConfig",
    "UnknownToolError",
    "run_tool_calls",
]
