"""Probe an engine server: what it can do for progserve (run this first against a new server).

Prints a table (feature, yes/no, a one-line reason); `--json OUT` also writes
`{feature: bool, ..., "reasons": {feature: reason}, ...}` ("-" for stdout). Exit status 0
when the server answered requests of the protocol, 1 when it did not (unreachable, or not
an OpenAI / SGLang server), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("openai", "sglang"), required=True,
                        help="the protocol progserve would use: openai or sglang")
    parser.add_argument("--engine-url", required=True, metavar="URL",
                        help="the server's root URL (openai: with or without /v1)")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON here "
                        "('-': stdout, instead of the table)")
    parser.add_argument("--model", help="model name to probe (default: the server's first)")
    parser.add_argument("--api-key", help="bearer key for the server "
                        "(default: $PROGSERVE_HTTP_ENGINE__API_KEY)")
    parser.add_argument("--chat-template", type=Path, metavar="FILE",
                        help="a Jinja chat template to check instead of the model directory's")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds per request (default 120)")
    parser.add_argument("--no-order-check", action="store_true",
                        help="skip the priority-order check (the only one that queues calls); "
                        "priority then reads no: accepted is not honoured")


def main(args: argparse.Namespace) -> int:
    import os

    from progserve.probe import probe_engine

    template = None
    if args.chat_template is not None:
        try:
            template = args.chat_template.read_text()
        except OSError as exc:
            print(f"progserve probe: {exc}", file=sys.stderr)
            return 2
    report = asyncio.run(probe_engine(
        args.engine, args.engine_url, model=args.model,
        api_key=args.api_key or os.environ.get("PROGSERVE_HTTP_ENGINE__API_KEY"),
        timeout_s=args.timeout, check_order=not args.no_order_check,
        chat_template=template))
    data = json.dumps(report.to_json(), indent=2)
    if args.json == "-":
        print(data)
    else:
        print(report.table())
        if args.json:
            Path(args.json).write_text(data + "\n")
    return 0 if report.speaks_protocol else 1
