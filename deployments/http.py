"""The HTTP plumbing of the Serve app: the FastAPI app, OpenAI-style errors, body parsing."""
# No `from __future__ import annotations` here: FastAPI must see real types on the handler signatures.

import logging
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from cluster.replica import ReplicaUnavailable
from cluster.request import RequestError
from deployments.openai_schema import error_body

log = logging.getLogger("gridserve.http")
T = TypeVar("T", bound=BaseModel)
MAX_BODY_BYTES = 4 * 2**20
api = FastAPI(title="gridserve", description="OpenAI-compatible API over a TP x PP grid of Ray actors")


def current_ingress() -> Any:
    """The ingress replica serving this request (`deployments.serve_app.OpenAIIngress`), for routes registered
    outside its class."""
    from ray import serve

    return serve.get_replica_context().servable_object


Ingress = Annotated[Any, Depends(current_ingress)]


class APIError(Exception):
    """An error answered as OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    """Render APIError."""
    return JSONResponse(error_body(exc.message, exc.type, exc.param), exc.status, headers=exc.headers)


@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    """A request that can never be served as sent: 4xx naming the field."""
    return JSONResponse(error_body(str(exc), param=exc.param, code=exc.code), exc.status)


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is our bug: a 500 (not a retryable 503), its traceback in the log."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(f"internal error ({type(exc).__name__}); this is a bug in the server",
                                   "server_error"), 500)


@api.exception_handler(ReplicaUnavailable)
async def _unavailable(_: Request, exc: ReplicaUnavailable) -> JSONResponse:
    """Grid rebuilding or queue full: 503 + Retry-After."""
    return JSONResponse(error_body(str(exc), "server_error"), 503, headers={"Retry-After": str(exc.retry_after_s)})


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad JSON or bad fields: 400 naming the field, like OpenAI."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                        for e in exc.errors()[:5])
    return JSONResponse(error_body(message, param=param), 400)


async def parse_body(request: Request, schema: type[T], served_model: str | None = None) -> T:
    """Read and validate a JSON body (against the served model's name, if given); malformed JSON and bad fields
    become HTTP 4xx naming the field."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return schema.model_validate_json(raw, context={"served_model": served_model})
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {errors[0]['msg']}") from None
        if (found := request_error_in(errors)) is not None:
            raise found from None
        first = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        raise APIError(400, message, param=first) from None


def request_error_in(errors: list[Any]) -> RequestError | None:
    """The first RequestError a validator raised, its `param` prefixed with where in the body it was raised."""
    for e in errors:
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, RequestError):
            where = [str(p) for p in e["loc"]] + ([cause.param] if cause.param else [])
            return RequestError(str(cause), ".".join(where) or None, cause.status, cause.code)
    return None
