"""/metrics reports what the engine counts: adapters read from disk and decode steps launched
ahead, as the load test (bench/serve_load.py) reads them from a server in another process."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tasktune.serve.api import create_app


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_metrics_count_disk_loads_and_steps_ahead(engine):
    loads = engine.pool.loads
    with TestClient(create_app(engine)) as c:
        for adapter in ("task-1", "task-2", "task-1"):
            body = {"model": adapter, "prompt": "play some jazz", "max_tokens": 6, "temperature": 0}
            assert c.post("/v1/completions", json=body).status_code == 200
        text = c.get("/metrics").text
    # task-1 and task-2 read once each (4 resident: the second task-1 finds it resident)
    assert gauge(text, "tasktune_adapter_disk_loads") == engine.pool.loads == loads + 2
    step = engine.decode_step
    assert gauge(text, 'tasktune_decode_steps_ahead{outcome="used"}') == step.ahead_used
    assert gauge(text, 'tasktune_decode_steps_ahead{outcome="wasted"}') == step.ahead_wasted
    assert step.ahead_used + step.ahead_wasted > 0  # greedy requests of 6 tokens launch steps ahead
