"""Fuzz the gateway from its own OpenAPI schema (schemathesis): no input may produce a 5xx,
and the API server must still be up afterwards. Bounded in examples and time."""

from __future__ import annotations

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = 25  # per operation


def test_no_input_makes_the_gateway_fail(demo_stack):
    base = demo_stack.api_base.removesuffix("/v1")
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    server_errors, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            nonlocal calls
            # Ask for little: a fuzzed body naming the real model must not start a long generation.
            if isinstance(case.body, dict) and "max_tokens" in case.body:
                case.body["max_tokens"] = 2
            response = case.call(base_url=base, timeout=60)
            calls += 1
            if response.status_code >= 500:
                server_errors.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} {response.text[:300]}")

        fuzz()
    assert calls >= EXAMPLES * 4, calls
    assert not server_errors, "\n".join(server_errors[:10])
    assert requests.get(base + "/health", timeout=10).status_code == 200
