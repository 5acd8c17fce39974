"""The scaffolding every engine's routes hang on (api.py's causal routes, encoder_api.py's):
JSON error bodies `{"error": {"message", "type", "code"}}` for every failure (our own
APIError, a TasktuneError by its kind, a validation error, an unknown route), the
optional API key, and per-endpoint request counts for /metrics.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tasktune.errors import TasktuneError
from tasktune.serve import schemas as s
from tasktune.serve.adapter_pool import AdapterError, AdapterNotFound
from tasktune.serve.metrics import Metrics
from tasktune.serve.scheduler import QueueFull


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def status_of(e: TasktuneError) -> tuple[int, str]:
    if isinstance(e, AdapterError):
        return e.status, "not_found_error" if isinstance(e, AdapterNotFound) else "adapter_error"
    if isinstance(e, QueueFull):
        return 429, "rate_limit_error"
    return 400, "invalid_request_error"


def api_app(metrics: Metrics, *, api_key: str | None = None, lifespan=None) -> tuple[FastAPI, list]:
    """The app every engine's routes hang on: JSON error bodies, the API key check (the
    returned dependencies) and per-endpoint request counts."""
    app = FastAPI(title="tasktune serve", version="0.1.0", lifespan=lifespan,
                  responses={k: {"model": s.ErrorResponse} for k in (400, 401, 404, 422, 429)})
    app.state.metrics = metrics

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    @app.middleware("http")
    async def count_requests(request: HTTPRequest, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.count(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.kind)

    @app.exception_handler(TasktuneError)
    async def _tasktune_error(_, e: TasktuneError):
        status, kind = status_of(e)
        return error_response(status, str(e), kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors()[:5]]
        return error_response(422, "invalid request: " + "; ".join(parts), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    return app, [Depends(check_key)]
