"""The `progserve` command. Each subcommand lives in its own module, imported lazily so
that `progserve --help` stays fast and the core install never imports torch."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> module exposing `configure(parser)` and `main(args) -> int`
COMMANDS = {
    "serve": "progserve.commands.serve",
    "demo": "progserve.commands.demo",
    "bench": "progserve.bench.cli",
    "config": "progserve.commands.config",
    "probe": "progserve.commands.probe",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="progserve", description="Serving middleware for agentic LLM programs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue  # not part of this build
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.configure(sub_parser)
        sub_parser.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
