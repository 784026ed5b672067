"""Chat data: the contract every training file must pass, and the automatic validation split."""

from phitune.data.contract import DataFileError, cli_validate, validate_files
from phitune.data.reader import data_digest
from phitune.data.report import ERROR_CODES, Issue, ValidationReport
from phitune.data.split import split_train_validation

__all__ = [
    "ERROR_CODES",
    "DataFileError",
    "Issue",
    "ValidationReport",
    "cli_validate",
    "data_digest",
    "split_train_validation",
    "validate_files",
]
