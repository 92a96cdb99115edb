"""The HTTP edge of every error: the one place where the service's domain errors (``app.errors``)
become statuses, headers and bodies.

Under ``/v2`` the body is the KServe protocol's ``{"error": "..."}``; elsewhere it is
``{"error": {"code", "message"}}``. Nothing a client sends becomes a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import errors as e

log = logging.getLogger(__name__)

RETRY = {"Retry-After": "1"}

# domain error -> (status, code, headers); the first class in this order that an error is an instance of
STATUSES: list[tuple[type[Exception], int, str, dict[str, str]]] = [
    (e.BadInput, 400, "bad_input", {}),
    (e.Unauthorized, 401, "unauthorized", {"WWW-Authenticate": "Bearer"}),
    (e.NotFound, 404, "not_found", {}),
    (e.TooLarge, 413, "too_large", {}),
    (e.UnsupportedMedia, 415, "unsupported_media_type", {}),
    (e.WrongShape, 422, "wrong_shape", {}),
    (e.InferenceFailed, 422, "inference_failed", {}),
    (e.Overloaded, 503, "overloaded", RETRY),
    (e.DecoderFailed, 503, "decoder_failed", RETRY),
    (e.NotReady, 503, "not_ready", RETRY),
    (e.TimedOut, 504, "timeout", {}),
]

# statuses Starlette raises itself (routing, methods)
_HTTP_CODES = {
    400: "bad_input",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "wrong_shape",
}


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: object = (
        {"error": message} if request.url.path.startswith("/v2") else {"error": {"code": code, "message": message}}
    )
    return JSONResponse(body, status_code=status, headers=headers)


def status_of(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """A domain error's (status, code, message, headers); (500, "internal", ...) for anything else."""
    for cls, status, code, headers in STATUSES:
        if isinstance(exc, cls):
            message = str(exc)
            if cls is e.InferenceFailed:
                message = f"the model could not process this clip: {message}"
            return status, code, message, headers
    log.error("no status for %s: %s", type(exc).__name__, exc)
    return 500, "internal", "internal error; see the server log", {}


def domain_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, e.ClientGone):
        return Response(status_code=499)  # nobody reads it; the access log and metrics do
    status, code, message, headers = status_of(exc)
    return error_response(request, status, code, message, headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnect)
    async def _left_mid_body(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client left while its body was read: nobody to answer

    @app.exception_handler(e.InputError)
    async def _input(request: Request, exc: e.InputError) -> Response:
        return domain_response(request, exc)

    @app.exception_handler(e.ServiceError)
    async def _service(request: Request, exc: e.ServiceError) -> Response:
        return domain_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()[:5]]
        return error_response(request, 422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal", "internal error; see the server log")
