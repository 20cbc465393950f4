"""Self-checks of the runnable examples: each example says whether its answer is right.

A check must be able to fail. Where there is an exact value (a computed number, a verified
expression) it is compared; where the model's text is free-form (a summary, a debate
argument) it is held to rules that junk fails: plain sentences (ending in a full stop),
no markdown lines, nothing repeated, and at least a few of the key terms of what it was
written from.

A check is a dict: `passed` (bool), `expected` (what was checked), and `why` when it
failed.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

Check = dict[str, Any]

_WORD = re.compile(r"[A-Za-z][A-Za-z-]{3,}")
_MARKDOWN_LINE = re.compile(r"^\s*(#|[-*+] |\d+\. |>|\||```)")
_STOPWORDS = frozenset(
    "about above after again against also among because been before being below between "
    "both could does doing down during each from further have having here into itself "
    "just more most much must only other over same should some such than that their them "
    "then there these they this those through under until very were what when where which "
    "while will with within without would your yours every another each many".split()
)


def complete_sentences(text: str) -> str:
    """The text up to its last full stop: a reply cut by its token cap ends mid-sentence,
    and the examples show (and check) what the model completed."""
    text = text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"))
    return text if text.endswith((".", "!", "?")) or end < 0 else text[: end + 1]


def exact_check(answer: Any, target: Any, *, passed: bool = True, expected: str | None = None
                ) -> Check:
    """Passed when `answer` equals `target` (and `passed`, a further condition, holds)."""
    ok = bool(passed) and str(answer).strip() == str(target)
    check: Check = {"passed": ok, "expected": expected or str(target)}
    if not ok:
        check["why"] = f"got {str(answer)[:80]!r}"
    return check


def key_terms(source: str, n: int = 12) -> list[str]:
    """The `n` most frequent content words (4+ letters, not stopwords) of `source`."""
    words = [w.lower() for w in _WORD.findall(source)]
    counts = Counter(w for w in words if w not in _STOPWORDS)
    return [word for word, _ in counts.most_common(n)]


def prose_problems(text: str, terms: list[str], min_terms: int) -> list[str]:
    """Why `text` is not plain prose about its source (empty list: it is)."""
    problems = []
    lines = [line for line in text.splitlines() if line.strip()]
    words = _WORD.findall(text)
    if len(words) < 4:
        problems.append("fewer than four words")
    if any(_MARKDOWN_LINE.match(line) for line in lines):
        problems.append("markdown lines")
    if lines and Counter(line.strip() for line in lines).most_common(1)[0][1] > 1:
        problems.append("a repeated line")
    if not text.strip().endswith((".", "!", "?")):
        problems.append("no closing full stop")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    if sentences and Counter(sentences).most_common(1)[0][1] > 1:
        problems.append("a repeated sentence")
    grams = Counter(zip(words, words[1:], words[2:], words[3:], strict=False))
    if grams and grams.most_common(1)[0][1] >= 3:
        problems.append(f"a phrase repeated {grams.most_common(1)[0][1]} times")
    lowered = text.lower()
    found = [t for t in terms if re.search(rf"\b{re.escape(t)}", lowered)]
    if len(found) < min_terms:
        problems.append(f"mentions {len(found)} of the key terms {terms} (needs {min_terms})")
    return problems


def prose_check(text: str, source: str, *, min_terms: int = 2, n_terms: int = 12) -> Check:
    """Plain sentences, no markdown lines, nothing repeated, and at least `min_terms` of the
    source's key terms."""
    terms = key_terms(source, n_terms)
    problems = prose_problems(text, terms, min_terms)
    check: Check = {
        "passed": not problems,
        "expected": f"plain sentences, no markdown lines, nothing repeated, at least "
        f"{min_terms} of the key terms {terms}",
    }
    if problems:
        check["why"] = "; ".join(problems)
    return check
