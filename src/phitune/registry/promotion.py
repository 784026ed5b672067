"""The promotion gate: a new version is always `challenger`; it becomes `champion` only on merit.

It must beat the base model and the current champion on `registry.promotion_metric` by
`registry.promotion_margin`. Two pipelines finishing at once must not both win against a stale
view: the decision and the alias moves happen under a lock, and the champion is re-read under it,
so the second pipeline is judged against the first one's result. The lock is a file lock keyed by
store and model name (next to a sqlite database, so every process using that database shares it);
the Prefect task also holds a global concurrency slot, which serialises pipelines on other hosts.

The champion that was replaced stays reachable as alias `previous`, for `rollback_champion`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from phitune.config import PipelineConfig, RegistryConfig
from phitune.errors import PhituneError
from phitune.home import phitune_home
from phitune.registry import tags as T
from phitune.registry.runs import config_digest
from phitune.registry.store import configure, resolve_tracking_uri, sqlite_path
from phitune.registry.versions import current_champion

LOCK_TIMEOUT_S = 600.0
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    candidate: float | None
    base: float | None
    champion: float | None
    champion_version: str | None  # the champion the candidate was judged against (at decision time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _gain(metric: str, candidate: float, reference: float) -> float:
    """How much better the candidate is (positive: better), whichever direction the metric improves in."""
    return reference - candidate if metric in LOWER_IS_BETTER else candidate - reference


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(
    metric: str, margin: float, candidate: float | None, base: float | None,
    champion: float | None = None, champion_version: str | None = None,
) -> Decision:
    """The gate itself, on numbers only: beat base, then the champion (if any), each by at least `margin`."""
    def result(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, reason, metric, candidate, base, champion, champion_version)

    if not _usable(candidate) or not _usable(base):
        return result(False, f"not promoted: {metric} is not available for the candidate and base model "
                             "(label metrics need a 'Category: <label>' first line in the reference replies); "
                             "set registry.promotion_metric to another metric")
    assert candidate is not None and base is not None
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    vs_base = _gain(metric, candidate, base)
    if vs_base <= 0 or vs_base < margin:
        return result(False, f"not promoted: {metric} {_fmt(candidate)} does not beat the base model's {_fmt(base)} "
                             f"by the margin {margin:g} ({direction} is better; gain {vs_base:+.4g})")
    beats_base = f"{metric} {_fmt(candidate)} beats base {_fmt(base)} by {vs_base:+.4g}"
    if champion_version is None:
        return result(True, f"promoted: {beats_base} (margin {margin:g}); there was no champion")
    if not _usable(champion):
        return result(False, f"not promoted: champion v{champion_version} has no recorded {metric} to compare with; "
                             "promote by hand if intended")
    assert champion is not None
    vs_champion = _gain(metric, candidate, champion)
    if vs_champion <= 0 or vs_champion < margin:
        return result(False, f"not promoted: {beats_base}, but does not beat champion v{champion_version}'s "
                             f"{_fmt(champion)} by the margin {margin:g} (gain {vs_champion:+.4g})")
    return result(True, f"promoted: {beats_base} and champion v{champion_version}'s {_fmt(champion)} by "
                        f"{vs_champion:+.4g} (margin {margin:g})")


def lock_path(tracking_uri: str, name: str) -> Path:
    """Beside a sqlite database (shared by every process that opens it), else under PHITUNE_HOME (this host)."""
    uri = resolve_tracking_uri(tracking_uri)  # one lock however the same store is spelled
    key = hashlib.sha256(f"{uri}\0{name}".encode()).hexdigest()[:16]
    db = sqlite_path(uri)
    folder = db.parent if db is not None else phitune_home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".phitune-promotion-{key}.lock"


@contextmanager
def promotion_lock(tracking_uri: str, name: str) -> Iterator[None]:
    """Serialise alias changes of one registered model."""
    lock = FileLock(str(lock_path(tracking_uri, name)))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise PhituneError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for the promotion lock {lock.lock_file}") from None
    try:
        yield
    finally:
        lock.release()


def recorded_metrics(mv: ModelVersion) -> dict[str, float]:
    """The evaluation metrics stored on a version when it was registered."""
    return {k[len(T.METRIC_TAG_PREFIX):]: float(v) for k, v in mv.tags.items() if k.startswith(T.METRIC_TAG_PREFIX)}


def promote(reg: RegistryConfig, version: str, evaluation: Mapping[str, Any]) -> Decision:
    """Make `version` the challenger, then champion if the gate passes; record the reason on the version.

    `evaluation` is the evaluation stage's result ({"base", "candidate", "champion"?, "champion_version"}).
    Its champion metrics are used when that champion is still champion under the lock (same held-out
    set); otherwise the current champion's recorded metrics are.
    """
    store = configure(reg)
    client, name, metric = store.client, reg.model_name, reg.promotion_metric
    version = str(version)
    with promotion_lock(store.tracking_uri, name):  # every alias write too: MLflow's upsert of an alias races
        client.set_registered_model_alias(name, T.CHALLENGER, version)
        champion = current_champion(client, name)
        champion_value, same_one = None, False
        if champion is not None:
            same_one = str(evaluation.get("champion_version")) == str(champion.version) and bool(evaluation.get("champion"))
            champion_value = (evaluation["champion"] if same_one else recorded_metrics(champion)).get(metric)
        decision = decide(
            metric, reg.promotion_margin, evaluation["candidate"].get(metric), evaluation["base"].get(metric),
            champion_value, str(champion.version) if champion else None,
        )
        if champion is not None and not same_one:
            note = f" [champion v{champion.version} judged by the evaluation recorded when it was registered]"
            decision = replace(decision, reason=decision.reason + note)
        unevaluated = [n for n in evaluation.get("notes", []) if "not evaluated" in n]
        if not decision.promoted and unevaluated and not (evaluation["base"] and evaluation["candidate"]):
            decision = replace(decision, reason=f"{decision.reason} [{'; '.join(unevaluated)}]")
        if decision.promoted:
            if champion is not None:
                client.set_registered_model_alias(name, T.PREVIOUS, str(champion.version))
            client.set_registered_model_alias(name, T.CHAMPION, version)
        client.set_model_version_tag(name, version, T.PROMOTION_TAG, decision.reason)
    return decision


def rollback_champion(name: str, client: MlflowClient | None = None) -> str:
    """Move `champion` back to the `previous` version and return it; the replaced one is tagged as rolled back.

    `previous` is removed afterwards, so a second rollback fails clearly instead of flipping back to
    the version that was just rolled back.
    """
    client = client or MlflowClient()
    with promotion_lock(client.tracking_uri, name):
        aliases = client.get_registered_model(name).aliases
        if T.PREVIOUS not in aliases:
            raise PhituneError(f"cannot roll back {name}: no previous champion (alias {T.PREVIOUS!r}) is recorded")
        previous, replaced = str(aliases[T.PREVIOUS]), aliases.get(T.CHAMPION)
        client.set_registered_model_alias(name, T.CHAMPION, previous)
        client.delete_registered_model_alias(name, T.PREVIOUS)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(name, previous, T.PROMOTION_TAG, f"champion again by rollback at {stamp}" + (f" (replacing v{replaced})" if replaced else ""))
        if replaced is not None:
            client.set_model_version_tag(name, str(replaced), T.ROLLBACK_TAG, f"rolled back to v{previous} at {stamp}")
    return previous


def unchanged_champion(cfg: PipelineConfig, data_digest: str) -> str | None:
    """The champion's version when it was trained on this data digest with this training config, else None."""
    store = configure(cfg.registry)
    champion = current_champion(store.client, cfg.registry.model_name)
    if champion is None:
        return None
    same_data = champion.tags.get(T.DATA_DIGEST_TAG) == data_digest
    same_config = champion.tags.get(T.CONFIG_DIGEST_TAG) == config_digest(cfg, data_digest)
    return str(champion.version) if same_data and same_config else None


def comparison_markdown(name: str, version: str, evaluation: Mapping[str, Any], decision: Decision) -> str:
    """A markdown table of base / champion / candidate on every metric, the gate's metric marked, and the reason."""
    columns = [("base", "base model")]
    if evaluation.get("champion"):
        columns.append(("champion", f"champion v{evaluation.get('champion_version')}"))
    columns.append(("candidate", f"candidate v{version}"))
    metrics = list(dict.fromkeys(k for key, _ in columns for k in evaluation[key]))
    lines = [f"## {name} v{version}: {'promoted to champion' if decision.promoted else 'challenger (not promoted)'}", ""]
    lines.append("| metric | " + " | ".join(title for _, title in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for m in metrics:
        label = f"**{m}** (gate{', lower is better' if m in LOWER_IS_BETTER else ''})" if m == decision.metric else m
        cells = [_fmt(evaluation[key][m]) if m in evaluation[key] else "–" for key, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"**Gate:** {decision.reason}"]
    return "\n".join(lines) + "\n"
