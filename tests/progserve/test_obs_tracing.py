"""OpenTelemetry tracing: one trace per program, a span per LLM and tool call with the
scheduling attributes, W3C traceparent propagation, and the console and OTLP/HTTP
exporters. Programs run through the real scheduler and sim engine."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from obs_support import live_server, mapreduce_spec, run_program, sim_settings
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from progserve.observability import Observability
from progserve.tracing import program_root_span_id, program_trace_id
from scheduler.spec import ProgramSpec

CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
CALLER_TRACEPARENT = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"
LLM_ATTRS = (
    "progserve.program.id", "progserve.thread.id", "progserve.tenant",
    "progserve.policy.priority", "progserve.policy.queue_level", "progserve.replica",
    "progserve.queue_wait_s", "progserve.ttft_s", "progserve.prefill_tokens",
    "progserve.decode_tokens", "progserve.cached_tokens", "progserve.instance",
)  # fmt: skip


@pytest.fixture
async def server() -> AsyncIterator:
    async with live_server(sim_settings()) as srv:
        yield srv


def _obs(srv) -> Observability:  # type: ignore[no-untyped-def]
    return srv.app.state.observability


async def test_one_trace_per_program_with_a_span_per_call(server) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        program_id = await run_program(client, mapreduce_spec(4))
    spans = await _obs(server).store.program_spans(program_id)
    by_call = {s["call_id"]: s for s in spans if s["call_id"]}
    assert set(by_call) == {"map-0", "map-1", "map-2", "map-3", "search", "reduce"}
    trace_id = f"{program_trace_id(program_id):032x}"
    root_id = f"{program_root_span_id(program_id):016x}"
    assert {s["trace_id"] for s in spans} == {trace_id}  # one trace per program
    root = [s for s in spans if s["kind"] == "program"]
    assert len(root) == 1 and root[0]["span_id"] == root_id and root[0]["parent_id"] is None
    for call_id, span in by_call.items():
        assert span["parent_id"] == root_id, call_id
        assert span["end_ns"] >= span["start_ns"]
    for call_id in ("map-0", "map-3", "reduce"):
        attrs = by_call[call_id]["attributes"]
        for name in LLM_ATTRS:
            assert name in attrs, (call_id, name)
        assert attrs["progserve.decode_tokens"] > 0
        assert (
            attrs["progserve.prefill_tokens"] + attrs["progserve.cached_tokens"]
            == (attrs["progserve.prompt_tokens"])
        )
        assert attrs["progserve.replica"] in (0, 1)
        events = [e["name"] for e in by_call[call_id]["events"]]
        assert events[:2] == ["dispatched", "first_token"]
    # The reduce reads every summary: its span starts (queued) after all of them end.
    last_map_end = max(by_call[f"map-{i}"]["end_ns"] for i in range(4))
    assert by_call["reduce"]["start_ns"] >= min(last_map_end, by_call["search"]["end_ns"])
    # the DAG edges travel with the spans (a replica without the program can draw it)
    assert set(by_call["reduce"]["attributes"]["progserve.call.parents"]) == {
        "map-0", "map-1", "map-2", "map-3", "search",
    }  # fmt: skip
    assert by_call["search"]["attributes"]["progserve.call.parents"] == ["map-0"]
    tool = by_call["search"]
    assert tool["kind"] == "tool" and tool["name"] == "tool search_docs"
    assert tool["attributes"]["progserve.tool.name"] == "search_docs"
    # The shared system prefix: later calls hit the prefix cache somewhere.
    assert sum(s["attributes"].get("progserve.cached_tokens", 0) for s in spans) > 0


async def test_traceparent_from_the_request_joins_the_callers_trace(server) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        program_id = await run_program(
            client, mapreduce_spec(2, with_tool=False), headers={"traceparent": CALLER_TRACEPARENT}
        )
        other_id = await run_program(client, mapreduce_spec(2, with_tool=False))
    spans = await _obs(server).store.program_spans(program_id)
    assert spans and {s["trace_id"] for s in spans} == {f"{CALLER_TRACE:032x}"}
    root = next(s for s in spans if s["kind"] == "program")
    assert root["parent_id"] == f"{CALLER_SPAN:016x}"  # our root hangs under the caller
    others = await _obs(server).store.program_spans(other_id)
    assert {s["trace_id"] for s in others} == {f"{program_trace_id(other_id):032x}"}


async def test_traceparent_on_openai_proxy_calls(server) -> None:  # type: ignore[no-untyped-def]
    headers = {"traceparent": CALLER_TRACEPARENT, "X-Program-Id": "agent-7"}
    body = {"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
        r = await client.post("/v1/chat/completions", json=body,
                              headers={"X-Program-Id": "agent-7", "X-Program-End": "true"})  # fmt: skip
        assert r.status_code == 200, r.text
    spans = await _obs(server).store.program_spans("agent-7")
    assert len([s for s in spans if s["kind"] == "llm"]) == 3
    assert {s["trace_id"] for s in spans} == {f"{CALLER_TRACE:032x}"}
    root = next(s for s in spans if s["kind"] == "program")
    assert root["parent_id"] == f"{CALLER_SPAN:016x}"


async def test_traceparent_in_the_current_context_is_adopted() -> None:
    """Programs submitted in-process (no HTTP) join the trace active around the call."""
    async with live_server(sim_settings()) as srv:
        scheduler = srv.runtime.scheduler
        caller = SpanContext(CALLER_TRACE, CALLER_SPAN, is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))  # fmt: skip
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
        try:
            spec = ProgramSpec.model_validate(mapreduce_spec(2, with_tool=False))
            program_id = await scheduler.submit_program(spec)
        finally:
            otel_context.detach(token)
        await scheduler.wait_variable(program_id, "final", timeout=30)
        await scheduler.end_program(program_id)
        spans = await _obs(srv).store.program_spans(program_id)
        assert {s["trace_id"] for s in spans} == {f"{CALLER_TRACE:032x}"}


class _Collector(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: keeps every POSTed ExportTraceServiceRequest."""

    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_collector() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    httpd.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


async def test_otlp_http_exporter_sends_the_program_spans(otlp_collector) -> None:  # type: ignore[no-untyped-def]
    endpoint = f"http://127.0.0.1:{otlp_collector.server_address[1]}"
    async with live_server(sim_settings(otlp_endpoint=endpoint)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            program_id = await run_program(client, mapreduce_spec(2, with_tool=False))
        assert _obs(srv).tracing.force_flush(10_000)
    names: set[str] = set()
    for path, body in otlp_collector.received:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attrs = {a.key: a.value.string_value for a in span.attributes}
                    if attrs.get("progserve.program.id") == program_id:
                        names.add(span.name)
                        assert span.trace_id == program_trace_id(program_id).to_bytes(16, "big")
    assert names == {"llm map-0", "llm map-1", "llm reduce", f"program {program_id}"}


async def test_console_exporter_prints_spans(capsys) -> None:  # type: ignore[no-untyped-def]
    settings = sim_settings(observability={"console_spans": True})
    async with live_server(settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            program_id = await run_program(client, mapreduce_spec(1, with_tool=False))
        assert _obs(srv).tracing.force_flush(10_000)
    out = capsys.readouterr().out
    assert '"name": "llm map-0"' in out and program_id in out


async def test_a_kept_call_span_holds_its_figures_not_its_event(server) -> None:  # type: ignore[no-untyped-def]
    """Spans are kept unbuilt (built when read); a kept call span is packed (numbers in
    one bytes, no scheduler event, no timeline), a kept program span holds its figures,
    not the program's last event (10,000 kept spans were 12 MB; issue 18's RSS rounds)."""
    from progserve.call_timeline import PackedCallSpan
    from scheduler.events import SchedulerEvent

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        program_id = await run_program(client, mapreduce_spec(2))
    store = _obs(server).store
    builders = [item for item in store._spans[program_id] if not isinstance(item, bytes)]
    calls = [b for b in builders if isinstance(b, PackedCallSpan)]
    assert calls, "call spans are kept unbuilt, packed"
    for build in builders:
        if not isinstance(build, PackedCallSpan):
            assert not any(isinstance(arg, SchedulerEvent) for arg in build.args)
    spans = await store.program_spans(program_id)  # built now: the same attributes
    for span in (s for s in spans if s["kind"] == "llm"):
        assert span["attributes"]["progserve.decode_tokens"] > 0
        assert all(isinstance(e["attributes"], dict) for e in span["events"])
