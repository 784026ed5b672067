"""Model versions: log an adapter as an MLflow model, fetch one back, find endpoints serving one, retire one.

A version is the PEFT adapter plus a reference to its base model, logged with
`mlflow.transformers.log_model` under task `llm/v1/chat` (pyfunc predict answers OpenAI-style chat).
Two arguments are not optional (checked with MLflow 3.17): `base_model_path=`, without which
MLflow saves the weights under PEFT's wrapped names and the reloaded model silently has random
attention weights; and `pip_requirements=`, without which logging fails inferring torchvision.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any

import httpx
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phitune.config import PipelineConfig, load_config
from phitune.errors import ModelNotFoundError, PhituneError
from phitune.home import phitune_home
from phitune.registry import tags as T
from phitune.registry.runs import base_model_ref, config_digest
from phitune.registry.store import client_for, configure, resolve_tracking_uri

_RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
ADAPTER_SUBDIR = "peft"  # where mlflow.transformers keeps a PEFT model's adapter inside the model artifact


def pip_requirements() -> list[str]:
    """Exact pins of what loading the model needs (local version labels such as +cpu dropped)."""
    pins = []
    for name in _RUNTIME_PACKAGES:
        try:
            pins.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_model_version(cfg: PipelineConfig, run_id: str, adapter_dir: str | Path, data_digest: str) -> ModelVersion:
    """Log the adapter on its base model under the run and register it as `registry.model_name`.

    The version's tags carry its lineage; the promotion gate adds its evaluation metrics.
    """
    import mlflow
    from peft import PeftModel

    from phitune.modeling import chat_template_hash, load_base_model, load_tokenizer, resolve_base_model

    store = configure(cfg.registry)
    source = resolve_base_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_base_model(cfg.model), str(adapter_dir))
    version_tags = {
        T.RUN_ID_TAG: run_id,
        T.DATA_DIGEST_TAG: data_digest,
        T.CONFIG_DIGEST_TAG: config_digest(cfg, data_digest),
        T.BASE_MODEL_TAG: base_model_ref(cfg),
        T.BASE_MODEL_PATH_TAG: source,
        T.CHAT_TEMPLATE_TAG: chat_template_hash(tokenizer),
    }
    # Created explicitly so the model lands in the run's experiment (and its artifact location), not MLflow's default one.
    logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id, experiment_id=store.experiment_id)
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        task="llm/v1/chat",
        base_model_path=source if Path(source).is_dir() else None,  # a hub id is referenced by MLflow itself
        pip_requirements=pip_requirements(),
        registered_model_name=cfg.registry.model_name,
        tags=version_tags,
        model_id=logged.model_id,
        run_id=run_id,
    )
    return store.client.get_model_version(cfg.registry.model_name, str(info.registered_model_version))


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@alias or models:/NAME/VERSION -> (name, alias, version)."""
    match = _MODEL_URI.match(model_uri.strip())
    if match is None:
        raise ModelNotFoundError(f"not a registered-model URI: {model_uri!r} (expected models:/NAME@alias or models:/NAME/VERSION)")
    return match["name"], match["alias"], match["version"]


def get_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    """The model version a models:/ URI names, or ModelNotFoundError saying which part is missing."""
    name, alias, number = parse_model_uri(model_uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {number}"
        raise ModelNotFoundError(f"{model_uri}: registered model {name!r} has no {what} in {client.tracking_uri}") from None


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the champion alias, if any."""
    try:
        return client.get_model_version_by_alias(name, T.CHAMPION)
    except MlflowException:
        return None


def fetch_adapter(model_uri: str, tracking_uri: str) -> Path:
    """A local folder with adapter_config.json for a registered version (cached by its immutable logged model)."""
    client = client_for(tracking_uri)
    mv = get_version(client, model_uri)
    key = mv.source.removeprefix("models:/") if mv.source.startswith("models:/") else f"{mv.name}-{mv.version}"
    cache = phitune_home() / "adapters" / key
    if (cache / "adapter_config.json").is_file():
        return cache
    import mlflow.artifacts

    cache.parent.mkdir(parents=True, exist_ok=True)
    download_uri = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache.parent))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{download_uri}/{ADAPTER_SUBDIR}", dst_path=str(work), tracking_uri=resolve_tracking_uri(tracking_uri)
        )
        if not (Path(local) / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{model_uri} (version {mv.version}) has no PEFT adapter in its artifacts")
        try:
            os.replace(local, cache)
        except OSError:  # a concurrent fetch installed it first
            if not (cache / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache


@dataclass(frozen=True)
class ChampionAdapter:
    version: str
    adapter_dir: Path | None  # None: not comparable on this base model (see note)
    note: str


def champion_adapter(cfg: PipelineConfig) -> ChampionAdapter | None:
    """The current champion's adapter, to evaluate beside the candidate; None when there is no champion.

    A champion fine-tuned from another base model cannot ride on this run's base model: it is
    reported (adapter_dir None) and the gate falls back to its recorded metrics.
    """
    store = configure(cfg.registry)
    mv = current_champion(store.client, cfg.registry.model_name)
    if mv is None:
        return None
    version, its_base = str(mv.version), mv.tags.get(T.BASE_MODEL_TAG)
    if its_base != base_model_ref(cfg):
        return ChampionAdapter(version, None, f"champion v{version} was tuned from {its_base!r}, not {base_model_ref(cfg)!r}; not re-evaluated")
    path = fetch_adapter(f"models:/{mv.name}/{version}", store.tracking_uri)
    return ChampionAdapter(version, path, f"champion v{version} evaluated on the same held-out set")


@dataclass(frozen=True)
class Endpoint:
    """One live endpoint, as recorded on the model version it serves (written by phitune.serving.endpoints)."""

    name: str
    model_name: str
    version: str
    url: str
    target: str = "local"
    pid: int | None = None
    started: float | None = None
    model: str | None = None
    log: str | None = None

    @property
    def port(self) -> int | None:
        return httpx.URL(self.url).port

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recorded_endpoints(mv: ModelVersion) -> list[Endpoint]:
    """The endpoints that serve this version: one per `endpoint.<name>.url` tag (the tag that marks it live).

    The one reader of the endpoint tags: retire, `phitune endpoints`, the monitor and deploy all see the same record.
    """
    suffix = "." + T.ENDPOINT_URL_FIELD
    found = []
    for key, url in mv.tags.items():
        if not (key.startswith(T.ENDPOINT_TAG_PREFIX) and key.endswith(suffix)):
            continue
        name = key[len(T.ENDPOINT_TAG_PREFIX) : -len(suffix)]
        get = lambda field: mv.tags.get(T.endpoint_tag(name, field))  # noqa: E731
        found.append(Endpoint(
            name=name, model_name=mv.name, version=str(mv.version), url=url, target=get("target") or "local",
            pid=int(get("pid")) if (get("pid") or "").isdigit() else None,
            started=float(get("started")) if get("started") else None, model=get("model"), log=get("log"),
        ))
    return sorted(found, key=lambda e: e.name)


def live_endpoints(name: str, version: str, client: MlflowClient | None = None) -> list[str]:
    """Names of the endpoints that serve this version."""
    mv = (client or MlflowClient()).get_model_version(name, str(version))
    return [endpoint.name for endpoint in recorded_endpoints(mv)]


def retire(name: str, version: str, client: MlflowClient | None = None) -> str:
    """Delete a model version: its registry entry, then its artifacts. Refused while it is served or champion."""
    client = client or MlflowClient()
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise ModelNotFoundError(f"registered model {name!r} has no version {version} in {client.tracking_uri}") from None
    if endpoints := live_endpoints(name, version, client):
        where = ", ".join(f"{ep} ({mv.tags[T.endpoint_tag(ep)]})" for ep in endpoints)
        raise PhituneError(
            f"refused: {name} version {version} is still served by {where}; "
            f"stop it first (`phitune endpoint stop {endpoints[0]}`), then retire again"
        )
    if T.CHAMPION in mv.aliases:
        raise PhituneError(
            f"refused: {name} version {version} is the champion; roll back or promote another version first"
        )
    client.delete_model_version(name, version)
    removed = _delete_artifacts(client, name, mv)
    return f"retired {name} version {version}" + (f" and deleted its artifacts at {removed}" if removed else "")


def _delete_artifacts(client: MlflowClient, name: str, mv: ModelVersion) -> str | None:
    """Delete the logged model behind a version unless another version still points at it."""
    if not mv.source.startswith("models:/m-"):
        return None
    if any(other.source == mv.source for other in client.search_model_versions(f"name='{name}'")):
        return None
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    model_id = mv.source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    get_artifact_repository(location).delete_artifacts()
    client.delete_logged_model(model_id)
    return location


def cli_retire(args: argparse.Namespace) -> int:
    """`phitune retire NAME VERSION [-c CONFIG] [overrides]`: the registry comes from the config."""
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    store = configure(cfg.registry)
    print(retire(args.name, args.version, store.client))
    return 0
