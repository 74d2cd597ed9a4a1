"""Errors raised by the gateway's logic, mapped to OpenAI's error JSON in one place (app.py)."""

from __future__ import annotations

from gateway.backends.base import (
    AdapterLoadError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidGenerationError,
    UnknownAdapterError,
)


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type_="invalid_request_error", code="invalid_api_key")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, type_="permission_error", code="insufficient_scope")


def from_backend(exc: BackendError) -> GatewayError:
    if isinstance(exc, UnknownAdapterError):
        return GatewayError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, InvalidGenerationError | AdapterLoadError):
        return GatewayError(400, str(exc))
    if isinstance(exc, BackendTimeoutError):
        return GatewayError(
            504, f"the model timed out: {exc}", type_="timeout_error", code="backend_timeout"
        )
    if isinstance(exc, BackendUnavailableError):
        return GatewayError(
            503,
            f"the model is unavailable: {exc}",
            type_="server_error",
            code="backend_unavailable",
        )
    return GatewayError(502, f"the model failed: {exc}", type_="server_error", code="backend_error")
