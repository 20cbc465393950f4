"""Tool-layer knobs (`settings.tools`). Per-tool registration arguments override the
defaults given here."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class CodeRunnerConfig(BaseModel):
    """Limits of the example code-runner tool's subprocess (see `code_runner.py`)."""

    timeout_s: float = Field(10.0, gt=0, description="wall-clock limit of one run")
    cpu_s: int = Field(10, ge=1, description="RLIMIT_CPU of the child (CPU seconds)")
    memory_mb: int = Field(512, ge=32, description="RLIMIT_AS of the child (address space)")
    file_size_mb: int = Field(16, ge=0, description="RLIMIT_FSIZE: largest file it may write")
    open_files: int = Field(64, ge=16, description="RLIMIT_NOFILE of the child")
    max_output_bytes: int = Field(65536, ge=1024, description="stdout kept per run")
    drop_privileges: bool = Field(True, description="run as `nobody` when the server is root")
    python: str | None = Field(None, description="interpreter; default: the server's own")
    prewarm: bool = Field(True, description="keep one started child ready for the next run")


class ToolsConfig(BaseModel):
    default_timeout_s: float = Field(30.0, gt=0, description="per attempt, unless registered")
    default_max_concurrency: int = Field(16, ge=1, description="running calls per tool")
    default_max_retries: int = Field(2, ge=0, description="extra attempts (idempotent tools)")
    backoff_base_s: float = Field(0.1, ge=0, description="first retry delay; doubles each try")
    backoff_max_s: float = Field(2.0, ge=0, description="cap on one retry delay")
    backoff_jitter: float = Field(0.1, ge=0, le=1, description="+- fraction of random jitter")
    max_threads: int = Field(8, ge=1, description="worker threads for synchronous tools")
    latency_window: int = Field(1024, ge=16, description="recent latencies kept for p50/p95")
    # LLMCompiler plans
    max_plan_tasks: int = Field(64, ge=1, description="tasks one plan may hold")
    max_parallel_tool_calls: int = Field(32, ge=1, description="OpenAI tool_calls run at once")
    code_runner: CodeRunnerConfig = Field(default_factory=CodeRunnerConfig)
    # Server-side builtin tools beyond `calculator` (always on).
    docs_root: Path | None = Field(None, description="enables `search_docs` over this directory")
    enable_code_runner: bool = Field(False, description="registers the sandboxed `python` tool")
