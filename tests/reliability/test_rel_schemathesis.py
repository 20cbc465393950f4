"""Schemathesis against progserve's OpenAPI schema, every operation: generated and
deliberately invalid requests never get a 5xx, and every answer (errors included) has a
documented status, content type and body shape. Bounded to a few examples per operation
so that it stays fast in CI; `scripts/schemathesis.sh` runs the fuller version."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import Runtime

EXAMPLES = 6  # per operation and mode; scripts/schemathesis.sh runs 100
pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


@pytest.fixture(scope="module")
def api_server(serve_in_thread):
    # A fast sim: fuzzed generations of thousands of tokens end in milliseconds.
    settings_ = Settings(sim={"time_scale": 0.0001}, limits={"max_tokens": 4096})
    return serve_in_thread(create_app(Runtime(settings_)))


def operations(app) -> list:
    schema = schemathesis.openapi.from_dict(app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


# Schemathesis's pytest plugin needs a pytest internal that this pytest lacks, so each
# operation runs as a plain Hypothesis test over the operation's strategy.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_every_operation_answers_in_a_documented_shape_and_never_5xx(api_server, mode):
    tested = []
    for operation in operations(api_server.app):
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(base_url=api_server.url, checks=CHECKS, timeout=30)

        try:
            run()
        except Unsatisfiable:  # nothing to break: e.g. no parameter can be made invalid
            continue
        tested.append(operation.label)
    assert len(tested) >= (20 if mode is GenerationMode.POSITIVE else 8), tested
