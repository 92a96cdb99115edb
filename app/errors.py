"""Errors and their HTTP answers.

Routes raise ``ApiError``; the service answers ``{"error": {"code", "message"}}`` with
its status, except under ``/v2`` where the KServe protocol's ``{"error": "..."}`` is used.
Nothing a client sends ever becomes a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def __reduce__(self) -> tuple[type[ApiError], tuple[int, str, str, dict[str, str]]]:
        # raised in a decode process (DECODE_PROCESSES) and pickled back to the server whole
        return type(self), (self.status, self.code, self.message, self.headers)


def bad_input(message: str) -> ApiError:
    return ApiError(400, "bad_input", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def unsupported(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def wrong_shape(message: str) -> ApiError:
    return ApiError(422, "wrong_shape", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def overloaded(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})


def not_ready(message: str) -> ApiError:
    return ApiError(503, "not_ready", message, {"Retry-After": "1"})


def timed_out(message: str) -> ApiError:
    return ApiError(504, "timeout", message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


_CODES = {
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


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5]]
        return error_response(request, 422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            request,
            exc.status_code,
            _CODES.get(exc.status_code, "http_error"),
            str(exc.detail),
            dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal", "internal error; see the server log")
