"""Read a schemathesis JUnit report and say which failures are by design.

`scripts/schemathesis.sh` runs `schemathesis run --checks all`. What it may report and
still pass is one kind of finding only: a schema-valid request answered 400 (ST202)
because it breaks a rule that relates two fields of the body, which no JSON Schema can
state (`progserve.errors.BODY_RULES`), or asks for what the configured engine cannot do
(`progserve.errors.ENGINE_LIMIT_CODES`: the schema is the same for every engine). Each
answers with its own error `code`, listed in docs/reliability.md (section "Bad input").
Every other failure, and every error (a timeout, a dropped connection), fails the
verdict.

Usage: python scripts/schemathesis_verdict.py REPORT.xml   (exit 0: nothing but by design)
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's progserve
from progserve.errors import BODY_RULES, ENGINE_LIMIT_CODES  # noqa: E402

BY_DESIGN = BODY_RULES | ENGINE_LIMIT_CODES

BY_DESIGN_CHECK = "ST202"  # schema-valid request rejected


@dataclass(frozen=True)
class Finding:
    operation: str
    check: str  # ST... code, or "error"
    error_code: str | None  # the `code` of the server's error body, if any
    by_design: bool
    text: str


def findings(report_path: str) -> list[Finding]:
    out: list[Finding] = []
    for case in ET.parse(report_path).getroot().iter("testcase"):
        operation = case.get("name") or "?"
        for outcome in case:
            if outcome.tag == "error":
                out.append(Finding(operation, "error", None, False, outcome.text or ""))
                continue
            if outcome.tag != "failure":
                continue
            for block in re.split(r"\n(?=\d+\. Test Case ID)", outcome.text or ""):
                for check in re.findall(r"^- (ST\d+) ", block, re.M) or ["?"]:
                    found = re.search(r'"code":"([a-z_]+)"', block)
                    code = found.group(1) if found else None
                    by_design = check == BY_DESIGN_CHECK and code in BY_DESIGN
                    out.append(Finding(operation, check, code, by_design, block.strip()))
    return out


def main(report_path: str) -> int:
    results = findings(report_path)
    by_design = Counter(f.error_code for f in results if f.by_design)
    others = [f for f in results if not f.by_design]
    for code, count in sorted(by_design.items()):
        print(f"[verdict] by design ({count}x): {code}: {BY_DESIGN[code]}")
    for finding in others:
        print(f"[verdict] NOT by design: {finding.operation} {finding.check}\n{finding.text}\n")
    print(f"[verdict] {len(others)} failures outside the by-design list")
    return 1 if others else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
