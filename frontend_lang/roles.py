"""Chat roles: `system(...)`, `user(...)`, `assistant(...)`, as in SGLang's frontend.

An instruct model answers well only inside its chat template. A program written with roles
is sent as messages (their contents are templates over semantic variables) and the server
renders them with the model's own chat template, so the same messages give the same text
in every call of the program and every branch of a fork, and the engine's prefix cache
serves what earlier calls prefilled.

    s = conversation(system("You are a careful assistant."), user(f"Question: {q}"))
    s += assistant(select(choices=["calculator", "finish"], name="action"))
    s += user("Write the expression.")
    s += assistant(gen(regex=r"[0-9 +*/()-]+", max_tokens=16, name="expression"))

`gen(...)` / `select(...)` without a prompt stand for "the model writes this": they are
only valid inside `assistant(...)`, after its fixed text (if any), when the message is
added to a conversation or a fork's branch. A top-level call takes messages directly:
`gen([system(...), user(...)])` generates the assistant's reply (and a list that ends with
an assistant message continues that message).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from scheduler.spec import MessageSpec

from .errors import ProgramDefinitionError
from .templates import to_template

Role = Literal["system", "user", "assistant", "tool"]

__all__ = [
    "CallPrompt",
    "Generation",
    "Message",
    "assistant",
    "message_specs",
    "system",
    "tool_result",
    "user",
]


@dataclass(frozen=True, slots=True)
class Generation:
    """A `gen` / `select` without a prompt: the model writes the assistant turn it sits in."""

    kind: Literal["gen", "select"]
    name: str | None
    sampling: dict[str, Any]
    choices: list[str] | None
    priority_hint: float | None
    site: str

    def _misuse(self) -> ProgramDefinitionError:
        return ProgramDefinitionError(
            f"{self.kind}() without a prompt at {self.site} is only valid inside "
            f"assistant(...) added to a conversation (`s += assistant({self.kind}(...))`); "
            f"elsewhere give it a prompt"
        )

    def __await__(self) -> Any:
        raise self._misuse()

    def __format__(self, spec: str) -> str:
        raise self._misuse()

    def __str__(self) -> str:
        raise self._misuse()


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message; `content` is a template. An assistant message may end with a
    `Generation`: the model writes the rest of it."""

    role: Role
    content: str
    generation: Generation | None = None

    def spec(self) -> MessageSpec:
        if self.generation is not None:
            raise ProgramDefinitionError(
                f"assistant({self.generation.kind}(...)) at {self.generation.site} generates "
                f"inside a conversation: add it to one (`s += ...`) instead of passing it "
                f"as a prompt"
            )
        return MessageSpec(role=self.role, content=self.content)


def _message(role: Role, parts: tuple[Any, ...]) -> Message:
    generation = None
    if parts and isinstance(parts[-1], Generation):
        generation, parts = parts[-1], parts[:-1]
        if role != "assistant":
            raise ProgramDefinitionError(
                f"{generation.kind}() at {generation.site}: the model writes assistant "
                f"turns only; put it inside assistant(...), not {role}(...)"
            )
    for part in parts:
        if isinstance(part, Generation | Message):
            raise ProgramDefinitionError(
                f"{role}(...): a {type(part).__name__.lower()} can only be the last part of "
                f"an assistant message"
            )
    content = "".join(to_template(part, what=f"{role}() content") for part in parts)
    return Message(role, content, generation)


def system(*parts: Any) -> Message:
    """A system message (text, variables, or a list of them)."""
    return _message("system", parts)


def user(*parts: Any) -> Message:
    """A user message (text, variables, or a list of them)."""
    return _message("user", parts)


def assistant(*parts: Any) -> Message:
    """An assistant message: fixed text, or text followed by `gen(...)` / `select(...)`
    (the model writes the rest of the turn)."""
    return _message("assistant", parts)


def tool_result(*parts: Any) -> Message:
    """A tool's result given back to the model (OpenAI's `tool` role)."""
    return _message("tool", parts)


@dataclass(frozen=True, slots=True)
class CallPrompt:
    """What an LLM call generates from: a text template, or messages and how their
    rendering ends (the `CallSpec` fields of the same names)."""

    text: str | None = None
    messages: tuple[MessageSpec, ...] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def spec_fields(self) -> dict[str, Any]:
        if self.messages is None:
            return {"prompt": self.text}
        return {
            "messages": list(self.messages),
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
        }

    @classmethod
    def of(cls, prompt: Any) -> CallPrompt:
        """A call's prompt: messages (a `Message` or a list of them; a list that ends with
        an assistant message continues it), or text (a template, variables, or a list)."""
        messages = _as_messages(prompt)
        if messages is None:
            return cls(text=to_template(prompt))
        if not messages:
            raise ProgramDefinitionError("a prompt of messages needs at least one message")
        specs = tuple(m.spec() for m in messages)
        return cls(messages=specs, continue_final_message=specs[-1].role == "assistant")

    @classmethod
    def prefix(cls, prompt: Any) -> CallPrompt:
        """A fork's shared prefix: messages render without opening the assistant's turn
        (the branches add their own turns after them)."""
        messages = _as_messages(prompt)
        if messages is None:
            return cls(text=to_template(prompt))
        return cls(messages=tuple(m.spec() for m in messages), add_generation_prompt=False)


def _as_messages(prompt: Any) -> list[Message] | None:
    if isinstance(prompt, Message):
        return [prompt]
    if isinstance(prompt, Generation):
        raise prompt._misuse()
    if isinstance(prompt, list | tuple) and any(isinstance(p, Message) for p in prompt):
        if not all(isinstance(p, Message) for p in prompt):
            raise ProgramDefinitionError(
                "a prompt is either text or a list of messages (system / user / assistant), "
                "not both"
            )
        return list(prompt)
    return None


def message_specs(turns: Iterable[tuple[Role, list[str]]]) -> tuple[MessageSpec, ...]:
    return tuple(MessageSpec(role=role, content="".join(parts)) for role, parts in turns)
