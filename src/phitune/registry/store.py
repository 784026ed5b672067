"""Where the registry lives: tracking URI, experiment and client, with local paths made absolute.

MLflow's defaults depend on the working directory (`sqlite:///mlflow.db`, `./mlruns`), and a relative
sqlite URI in the config would too; a flow whose tasks run elsewhere, or a later `phitune retire`
from another folder, would then silently open a different, empty store. So relative paths are
resolved once, here, and for a database store both the tracking URI and the experiment's artifact location are set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from phitune.config import RegistryConfig

_SQLITE = "sqlite:///"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: "C:" is a drive, not a scheme


def resolve_tracking_uri(uri: str) -> str:
    """A sqlite URI with an absolute path (its folder created); other URIs unchanged."""
    if not uri.startswith(_SQLITE):
        return uri
    path = Path(uri[len(_SQLITE) :]).expanduser()
    if str(path) == ":memory:":
        return uri
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _SQLITE + str(path)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI, else None."""
    resolved = resolve_tracking_uri(uri)
    return Path(resolved[len(_SQLITE) :]) if resolved.startswith(_SQLITE) else None


def resolve_artifact_location(location: str, tracking_uri: str) -> str | None:
    """A local folder as an absolute file:// URI (created); URIs (s3://, mlflow-artifacts:/, ...) unchanged.

    With a tracking server (http[s]://) a folder on this machine would be invisible to the server and
    to every other host, so it yields None: the server's own artifact root applies (with
    `mlflow server --artifacts-destination`, artifacts are proxied through it).
    """
    if _SCHEME.match(location):
        return location
    if tracking_uri.startswith(("http://", "https://")):
        return None
    path = Path(location).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def client_for(tracking_uri: str) -> MlflowClient:
    """A client bound to this store for tracking and registry alike (no global state)."""
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass(frozen=True)
class Store:
    client: MlflowClient
    tracking_uri: str
    experiment_id: str


def configure(reg: RegistryConfig) -> Store:
    """Point MLflow at the configured store and make sure the experiment exists with an absolute artifact root.

    Also sets the process-wide tracking/registry URI: `mlflow.transformers.log_model` and model
    loading go through MLflow's fluent API, which reads it.
    """
    uri = resolve_tracking_uri(reg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = client_for(uri)
    return Store(client, uri, _experiment_id(client, reg.experiment, resolve_artifact_location(reg.artifact_location, uri)))


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another pipeline created it a moment ago
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id
