"""Azure failures as one clear PhituneError each.

Why a translation layer: azure-core raises HttpResponseError with a multi-line message (and sometimes
the whole response); the CLI and the Prefect logs should show one line that says what phitune was
doing, Azure's error code and Azure's message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
