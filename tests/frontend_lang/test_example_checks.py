"""The examples' self-checks can fail: junk answers (the ones the issue saw on SmolLM2
before chat roles: a summary of `#` marks, a debate of "The answer is:" lines, a wrong sum)
fail them, and right answers pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from frontend_lang.example_checks import complete_sentences, exact_check, prose_check

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SOURCE = (EXAMPLES / "data" / "agent_programs.txt").read_text()


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_summary_of_markdown_or_repetition_fails() -> None:
    good = ("An AI agent runs a program of many model calls and tool calls. progserve "
            "schedules each agent program as a whole, so programs finish sooner.")
    assert prose_check(good, SOURCE)["passed"]
    for junk in ("#" * 32, "# Agent programs\n- calls\n- engines.",
                 "The answer is: " * 8, "Agents. Agents. Agents.",
                 "The weather is nice today and the birds are singing.",
                 "An agent runs programs of calls that are cut off mid"):
        check = prose_check(junk, SOURCE)
        assert not check["passed"] and check["why"], junk


def test_exact_checks_compare_values() -> None:
    assert exact_check("395", "395")["passed"]
    assert not exact_check("320", "395")["passed"]
    assert not exact_check("395", "395", passed=False)["passed"]  # not from the tool


def test_the_tree_search_check_recomputes_the_expression() -> None:
    check = load("tree_search").check
    assert check("(4 * 6) * (3 - 2) = 24", (2, 3, 4, 6))["passed"]
    assert not check("2 * 3 * 4 = 24", (2, 3, 4, 6))["passed"]  # 6 unused
    assert not check("(4 + 6) * (3 - 2) = 24", (2, 3, 4, 6))["passed"]  # is 10
    assert not check("no verified expression", (2, 3, 4, 6))["passed"]


def test_the_debate_check_wants_a_position_and_prose() -> None:
    module = load("multi_agent_debate")
    argument = ("An LLM serving system should schedule whole agent programs, because the "
                "calls of a program depend on each other.")
    good = {"answer": "whole agent programs", "arguments": [argument]}
    assert module.check(good, module.QUESTION)["passed"]
    assert not module.check({**good, "answer": "maybe"}, module.QUESTION)["passed"]
    junk = {**good, "arguments": ["The answer is:\n" * 8]}
    assert not module.check(junk, module.QUESTION)["passed"]


def test_complete_sentences_drops_a_cut_off_tail() -> None:
    assert complete_sentences("One. Two is cut") == "One."
    assert complete_sentences("One. Two.") == "One. Two."
    assert complete_sentences("no stop at all") == "no stop at all"
