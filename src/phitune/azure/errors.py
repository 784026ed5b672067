"""Azure failures as one clear PhituneError each, and a classifier for error responses of endpoints.

Why a translation layer: azure-core raises HttpResponseError with a multi-line message (and sometimes
the whole response); the CLI and the Prefect logs should show one line that says what phitune was
doing, Azure's error code and Azure's message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from phitune.errors import PhituneError


class AzureError(PhituneError):
    """Azure refused or failed an operation; the message carries Azure's code and message."""


class AzureAuthError(AzureError):
    """The credential could not get a token, or Azure rejected it (expired, wrong tenant)."""


class AzureJobError(AzureError):
    """The fine-tuning job failed, was cancelled, or did not finish in time."""

    def __init__(self, message: str, *, job_name: str, azure_status: str) -> None:
        super().__init__(message)
        self.job_name = job_name
        self.azure_status = azure_status


class ModelInUseError(AzureError):
    """A model that a deployment still serves cannot be deleted."""


def _error_object(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return {}
    if not isinstance(body, dict):
        return {}
    err = body.get("error", body)
    return err if isinstance(err, dict) else {}


def classify_azure_error(status_code: int, body: Any) -> str:
    """Name the kind of an Azure (or OpenAI-style) error response, for probes and smoke tests.

    Returns one of: "ok", "content_filter", "auth", "throttled", "not_found", "conflict",
    "bad_request", "server_error", "other". A prompt blocked by Azure AI Content Safety comes back as
    HTTP 400 with error.code "content_filter" (inner code "ResponsibleAIPolicyViolation").
    """
    if 200 <= status_code < 300:
        return "ok"
    err = _error_object(body)
    inner = err.get("innererror") or err.get("inner_error") or {}
    codes = {str(err.get("code", "")).lower(), str(inner.get("code", "")).lower() if isinstance(inner, dict) else ""}
    if codes & {"content_filter", "responsibleaipolicyviolation", "contentfilter"}:
        return "content_filter"
    if status_code in (401, 403):
        return "auth"
    if status_code == 429:
        return "throttled"
    if status_code == 404:
        return "not_found"
    if status_code == 409:
        return "conflict"
    if 400 <= status_code < 500:
        return "bad_request"
    if status_code >= 500:
        return "server_error"
    return "other"


def describe(exc: BaseException) -> str:
    """One line for an azure-core / azure-ai-ml exception: HTTP status, Azure's code and message."""
    from azure.core.exceptions import HttpResponseError

    if isinstance(exc, HttpResponseError):
        err = getattr(exc, "error", None)
        code = getattr(err, "code", None) or getattr(exc, "error_code", None)
        message = getattr(err, "message", None)
        if not message:
            message = str(exc.message or exc).strip().splitlines()[0] if str(exc.message or exc).strip() else type(exc).__name__
        status = f"HTTP {exc.status_code} " if exc.status_code and exc.status_code >= 400 else ""  # a failed LRO polls with 200
        return f"{status}{code + ': ' if code else ''}{message}"
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(message).split())


@contextmanager
def azure_errors(action: str) -> Iterator[None]:
    """Re-raise Azure exceptions raised while doing `action` as AzureError with one clear line."""
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError as CoreAzureError
    from azure.core.exceptions import ClientAuthenticationError

    try:
        yield
    except ClientAuthenticationError as exc:
        raise AzureAuthError(
            f"{action}: Azure did not accept the credential ({describe(exc)}). Sign in again (`az login`) "
            "or check the AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET environment variables."
        ) from exc
    except (CoreAzureError, MlException) as exc:
        raise AzureError(f"{action}: {describe(exc)}") from exc
