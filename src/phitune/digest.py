"""The one file checksum of phitune: SHA-256 of a file's bytes, read in 1 MiB blocks.

Lineage (dataset ids, MLflow dataset digests), the default model's manifest and Azure data-asset
versions all name content by this digest, so the same bytes get the same name everywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, in constant memory (model weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
