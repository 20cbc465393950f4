"""The priority file's wire format: how progserve (`sglang_priority_writer.py`, beside
`SGLangHTTPEngine`) tells its SGLang plugin (`sglang_plugin/priorities.py`, inside SGLang's
scheduler process) which programs to keep and which ended. Both import this module and
nothing else of each other; it imports neither SGLang nor asyncio.

One JSON object: `{"pinned": ["<program id>", ...], "priorities": {"<program id>": int},
"ended": ["<program id>", ...]}`. Priorities are in SGLang's units (larger is more urgent,
as `SGLangHTTPEngine` sends them); `ended` is the most recently ended programs, oldest
first, at most `ENDED_WINDOW`. `$PROGSERVE_PRIORITY_FILE` (the servers' environment)
names the file, or a directory in which each progserve process writes its own
`progserve-<host>-<pid>.json` and the reader merges every `*.json`.

Requests name their program by id: `rid = "<program id>/<call id>/<nonce>"` (the program
id may itself contain `/`); `program_rid` renames a request that does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ENV_FILE = "PROGSERVE_PRIORITY_FILE"
ENV_REFRESH = "PROGSERVE_PRIORITY_REFRESH_S"
# Ended programs a file lists (the newest). The reader looks at most every refresh
# interval, so this many programs may end between two reads before one is missed.
ENDED_WINDOW = 4096


def program_of_rid(rid: str) -> str | None:
    """`"<program>/<call>/<nonce>"` -> `"<program>"`; None for ids of another shape."""
    parts = rid.rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


def program_rid(program: str, rid: str) -> str:
    """The rid to send `rid` under so that it names `program`."""
    if program_of_rid(rid) == program:
        return rid
    return f"{program}/{rid.replace('/', '_')}/p"


def process_file(directory: Path, host: str, pid: int) -> Path:
    """One progserve process's file in a shared directory."""
    return directory / f"progserve-{host}-{pid}.json"


def source_files(path: Path) -> list[Path]:
    """The files to read: `path` itself, or every visible `*.json` in a directory."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
    return [path]


@dataclass(slots=True)
class PriorityFile:
    pinned: set[str] = field(default_factory=set)
    priorities: dict[str, int] = field(default_factory=dict)
    ended: list[str] = field(default_factory=list)

    def dumps(self) -> str:
        return json.dumps({"pinned": sorted(self.pinned), "priorities": self.priorities,
                           "ended": self.ended})

    @classmethod
    def loads(cls, text: str) -> PriorityFile:
        data = json.loads(text)
        return cls(pinned={str(p) for p in data.get("pinned", ())},
                   priorities={str(k): int(v) for k, v in dict(data.get("priorities", {})).items()},
                   ended=[str(p) for p in data.get("ended", ())])

    @classmethod
    def merge(cls, files: list[PriorityFile]) -> PriorityFile:
        """Several writers' files as one: pins and ended programs are unions (in order), a
        program's priority the highest any file gives."""
        out = cls()
        ended: dict[str, None] = {}
        for f in files:
            out.pinned |= f.pinned
            for program, value in f.priorities.items():
                out.priorities[program] = max(value, out.priorities.get(program, value))
            ended.update(dict.fromkeys(f.ended))
        out.ended = list(ended)
        return out
