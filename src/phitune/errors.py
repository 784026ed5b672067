"""Errors a user can cause. The CLI prints their message alone (no traceback) and exits non-zero."""


class PhituneError(Exception):
    """A problem the user can fix; the message says what and where."""

    exit_code = 1


class ConfigError(PhituneError):
    """A bad config file, field or override (usage error: exit status 2)."""

    exit_code = 2


class DataError(PhituneError):
    """Training data that breaks the chat-data contract."""


class ModelNotFoundError(PhituneError):
    """A base model, adapter or registered version that cannot be found."""


class TrainingError(PhituneError):
    """A training run stopped by a sanity gate (NaN loss, nothing to learn, no improvement)."""


class EndpointError(PhituneError):
    """An endpoint that cannot be started, reached or stopped."""
