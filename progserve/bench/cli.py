"""Benchmarks: `progserve bench` compares scheduling policies; `progserve bench KIND` runs one micro-benchmark.

Every comparison runs both sides in the same run, on the same trace.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# kind -> module exposing `configure(parser)` and `main(args) -> int`.
# `policies` is the default when no kind is given.
BENCHES = {
    "radix": "progserve.bench.radix",
    "sim": "progserve.bench.sim",
    "engine": "progserve.bench.engine",
    "tools": "progserve.bench.tools",
    "load": "progserve.bench.load",
    "overhead": "progserve.bench.overhead",
    "live": "progserve.bench.live",
    "calibrate": "progserve.bench.calibrate",
}
DEFAULT = "progserve.bench.policies"


def _available(module_name: str) -> bool:
    return importlib.util.find_spec(module_name) is not None


def configure(parser: argparse.ArgumentParser) -> None:
    if _available(DEFAULT):
        importlib.import_module(DEFAULT).configure(parser)
    sub = parser.add_subparsers(dest="bench_kind", required=False)
    for kind, module_name in BENCHES.items():
        if not _available(module_name):
            continue
        module = importlib.import_module(module_name)
        kind_parser = sub.add_parser(kind, help=(module.__doc__ or kind).strip().splitlines()[0])
        module.configure(kind_parser)
        kind_parser.set_defaults(_bench_main=module.main)


def main(args: argparse.Namespace) -> int:
    bench_main = getattr(args, "_bench_main", None)
    if bench_main is None:
        if not _available(DEFAULT):
            raise SystemExit("the policy benchmark is not installed in this build")
        bench_main = importlib.import_module(DEFAULT).main
    return int(bench_main(args) or 0)
