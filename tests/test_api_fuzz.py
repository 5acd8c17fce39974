"""Schemathesis fuzzing of the API's own OpenAPI spec: no input may produce a 5xx.

A bounded number of examples per operation (FUZZ_EXAMPLES) keeps this under a minute;
the engine's max_len bounds every generation whatever max_tokens the fuzzer picks.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from tasktune.serve.api import create_app
from tasktune.serve.engine import Engine

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
CROSS_CHECKED = ("logit_bias", "stop_token_ids", "min_tokens", "top_logprobs", "echo", "n")


@pytest.fixture(scope="module")
def schema(tiny_llama, adapter_root):  # noqa: F811
    engine = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=2, max_rank=8,
                                    max_running=4, max_waiting=64, max_len=128)
    engine.pool.register_root()
    app = create_app(engine)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.runner.stop()


def test_no_server_errors_for_any_input(schema):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    failures, statuses = [], {}
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for op, mode in [(op, mode) for op in operations for mode in modes]:
        # (hypothesis leans to a strategy's simplest values, the first of sampled_from and False:
        # those are the ones that reach the engine)
        @given(case=op.as_strategy(mode), model=st.sampled_from(["tiny-llama", "task-1", "task-6", None]),
               plain=st.booleans().map(lambda b: not b))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case, model, plain):
            if model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model  # reach the engine, not only the 404 for unknown models
            if plain and isinstance(case.body, dict):  # without the fields whose valid values depend on
                for key in CROSS_CHECKED:  # the vocabulary or on each other (a 400 each, mostly)
                    case.body.pop(key, None)
            response = case.call()
            key = f"{op.method.upper()} {op.path} {response.status_code}"  # noqa: B023
            statuses[key] = statuses.get(key, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{op.method.upper()} {op.path}: {response.status_code} {response.text[:300]}")
            assert response.status_code < 500

        try:
            fuzz()
        except Unsatisfiable:  # no negative inputs exist for an operation without parameters
            assert mode == schemathesis.GenerationMode.NEGATIVE
    assert not failures
    assert sum(statuses.values()) >= 3 * len(operations), statuses
    for seen in ("POST /v1/completions 200", "POST /v1/chat/completions 200", "POST /v1/completions 422"):
        assert seen in statuses, (seen, sorted(statuses.items()))
