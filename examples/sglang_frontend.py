"""An SGLang frontend program (`sgl.function` with gen, select, fork and streaming) pointed
at progserve with `sgl.RuntimeEndpoint`, unchanged: progserve speaks SGLang's native
`/generate` (cumulative streaming, logprobs for `select`, `meta_info.cached_tokens`).

The SGLang frontend sends each call on its own (it has no notion of a program), so each
`/generate` is a single-call program to progserve; the fork's branches share the
program's prefix, which the engine's prefix cache serves. Without `--url` the example
starts its own progserve server in this process on a free loopback port.

Needs SGLang's frontend: `bash scripts/install_sglang_frontend.sh` (CPU route, no GPU
stack). Without it the example says so and exits 0.

    python examples/sglang_frontend.py                      # in-process server
    python examples/sglang_frontend.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Any

from frontend_lang.cli_support import example_parser, print_report, serve_in_background

CITY = "Lisbon"
IDEAS = 2

# Scripted replies for the sim engine (the prompts are what the SGLang frontend builds).
SCRIPT = [
    {"pattern": r"Is it a big city\? \Z", "reply": "yes"},
    {"pattern": r"Idea (\d):\Z", "reply": r" Walk the old town (idea \1)."},
    {
        "pattern": r"Day plan:\Z",
        "reply": " Morning in Alfama, lunch by the river, sunset at a miradouro.",
    },
]


def define_program() -> Any:
    import sglang as sgl

    @sgl.function
    def day_planner(s: Any, city: str) -> None:
        s += "You are a travel assistant. Be brief.\n"
        s += f"City: {city}. Is it a big city? " + sgl.select("big", choices=["yes", "no"])
        s += "\n"
        branches = s.fork(IDEAS)
        for i, branch in enumerate(branches):
            branch += f"Idea {i + 1}:" + sgl.gen("idea", max_tokens=24, stop="\n", temperature=0)
        branches.join()
        s += "Ideas:\n" + "".join(f"- {b['idea'].strip()}\n" for b in branches)
        s += "Day plan:" + sgl.gen("plan", max_tokens=48, stop="\n", temperature=0)

    return day_planner


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import sglang as sgl

    sgl.set_default_backend(sgl.RuntimeEndpoint(url, api_key=args.api_key))
    day_planner = define_program()
    started = time.perf_counter()
    state = day_planner.run(city=args.city, stream=True)
    streamed = "".join(state.text_iter(var_name="plan"))  # streamed from /generate
    latency = time.perf_counter() - started
    metas = [state.get_meta_info(name) or {} for name in ("big", "plan")]
    return {
        "value": {"big_city": state["big"], "plan": state["plan"].strip(), "streamed": streamed},
        "latency_s": latency,
        "prompt_tokens": sum(int(m.get("prompt_tokens", 0)) for m in metas),
        "cached_tokens": sum(int(m.get("cached_tokens", 0)) for m in metas),
        "completion_tokens": sum(int(m.get("completion_tokens", 0)) for m in metas),
    }


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--city", default=CITY)

    args = example_parser(__doc__, add_arguments).parse_args(argv)
    if importlib.util.find_spec("sglang") is None:
        print(
            "skipped: SGLang's frontend is not installed "
            "(run `bash scripts/install_sglang_frontend.sh`)"
        )
        return 0
    with serve_in_background(args, SCRIPT) as url:
        outcome = run(url, args)
    print_report(program_id="sglang-frontend", calls=None, as_json=args.json, **outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
