"""Training files as Azure ML data assets, named by their content digest so the same data is uploaded once.

The asset name is fixed per role (`<prefix>-train`, `<prefix>-validation`) and the version is the
first 12 hex digits of the file's SHA-256: a GET on that version tells whether the upload already
happened, and an asset's version says exactly which data a job was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phitune.azure.client import AzureClients
from phitune.azure.errors import AzureError, azure_errors
from phitune.digest import file_sha256

DIGEST_CHARS = 12


@dataclass(frozen=True)
class DataAssetRef:
    name: str
    version: str
    asset_id: str
    """ARM id of the data asset version: what the fine-tuning job's input points at."""
    sha256: str
    uploaded: bool
    """False when the asset already existed and nothing was uploaded."""

    @property
    def short_uri(self) -> str:
        return f"azureml:{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_data_asset(az: AzureClients, path: Path, name: str) -> DataAssetRef:
    """Return the data asset holding exactly this file's content, uploading it only if it does not exist yet."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Data
    from azure.core.exceptions import ResourceNotFoundError

    sha = file_sha256(path)
    version = sha[:DIGEST_CHARS]
    with azure_errors(f"look up data asset {name}:{version}"):
        try:
            existing = az.ml.data.get(name, version=version)
        except ResourceNotFoundError:
            existing = None
    if existing is not None:
        recorded = (existing.tags or {}).get("sha256")
        if recorded and recorded != sha:
            raise AzureError(f"data asset {name}:{version} holds different data (sha256 {recorded}); delete or rename it")
        return DataAssetRef(name, version, existing.id, sha, uploaded=False)
    asset = Data(
        name=name,
        version=version,
        path=str(path),
        type=AssetTypes.URI_FILE,
        description=f"phitune chat data {path.name} (sha256 {sha})",
        tags={"sha256": sha, "source_file": path.name, "created_by": "phitune"},
    )
    with azure_errors(f"upload {path} as data asset {name}:{version}"):
        created = az.ml.data.create_or_update(asset)
    return DataAssetRef(name, version, created.id, sha, uploaded=True)


def upload_training_data(az: AzureClients, train_file: Path, validation_file: Path | None) -> tuple[DataAssetRef, DataAssetRef | None]:
    """The training (and validation) data assets of a run; see `ensure_data_asset`."""
    prefix = az.config.output_model_prefix
    train = ensure_data_asset(az, Path(train_file), f"{prefix}-train")
    validation = ensure_data_asset(az, Path(validation_file), f"{prefix}-validation") if validation_file else None
    return train, validation
