"""The promotion gate: decisions on numbers, aliases in a real registry, concurrent pipelines, rollback, skip-if-unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from phitune.config import PipelineConfig
from phitune.errors import PhituneError
from phitune.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    Decision,
    comparison_markdown,
    config_digest,
    configure,
    decide,
    promote,
    rollback_champion,
    unchanged_champion,
)
from phitune.registry import tags as T

_names = count()


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineConfig]:
    root = tmp_path_factory.mktemp("promotion")
    patch = pytest.MonkeyPatch()
    patch.setenv("PHITUNE_HOME", str(root / "home"))
    yield PipelineConfig.model_validate({
        "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts"),
                     "promotion_metric": "macro_f1", "promotion_margin": 0.02},
    })
    patch.undo()


@pytest.fixture
def cfg(store_cfg: PipelineConfig) -> PipelineConfig:
    """The module's store with a fresh registered-model name per test."""
    cfg = store_cfg.model_copy(deep=True)
    cfg.registry.model_name = f"m{next(_names)}"
    return cfg


def new_version(cfg: PipelineConfig, metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
    """A registry entry with recorded metrics, as log_model_version leaves it (the gate needs no weights)."""
    client = configure(cfg.registry).client
    name = cfg.registry.model_name
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    version_tags = {**{T.METRIC_TAG_PREFIX + k: repr(v) for k, v in metrics.items()}, **(tags or {})}
    return str(client.create_model_version(name, source="file:///nonexistent", tags=version_tags).version)


def aliases(cfg: PipelineConfig) -> dict[str, str]:
    client = configure(cfg.registry).client
    return {k: str(v) for k, v in client.get_registered_model(cfg.registry.model_name).aliases.items()}


def evaluation(candidate: float, base: float, champion: float | None = None, champion_version: str | None = None) -> dict:
    result = {"base": {"macro_f1": base}, "candidate": {"macro_f1": candidate}, "champion_version": champion_version}
    if champion is not None:
        result["champion"] = {"macro_f1": champion}
    return result


@pytest.mark.parametrize(
    ("metric", "margin", "candidate", "base", "champion", "promoted", "reason"),
    [
        ("macro_f1", 0.02, 0.80, 0.50, None, True, "promoted: macro_f1 0.8 beats base 0.5 by +0.3 (margin 0.02); there was no champion"),
        ("macro_f1", 0.02, 0.80, 0.79, None, False, "does not beat the base model's 0.79 by the margin 0.02"),
        ("macro_f1", 0.02, 0.80, 0.50, 0.79, False, "beats base 0.5 by +0.3, but does not beat champion v7's 0.79 by the margin 0.02 (gain +0.01)"),
        ("macro_f1", 0.02, 0.85, 0.50, 0.80, True, "and champion v7's 0.8 by +0.05"),
        ("macro_f1", 0.0, 0.80, 0.50, 0.80, False, "does not beat champion v7's 0.8"),  # a tie never promotes
        ("perplexity", 0.2, 5.0, 9.0, 5.5, True, "perplexity 5 beats base 9 by +4 and champion v7's 5.5 by +0.5"),
        ("perplexity", 0.2, 5.4, 9.0, 5.5, False, "does not beat champion v7's 5.5 by the margin 0.2 (gain +0.1)"),
        ("eval_loss", 0.0, 2.5, 2.0, None, False, "does not beat the base model's 2 by the margin 0 (lower is better"),
        ("macro_f1", 0.02, None, None, None, False, "macro_f1 is not available for the candidate and base model"),
        ("macro_f1", 0.02, 0.90, 0.50, float("nan"), False, "champion v7 has no recorded macro_f1"),
    ],
)
def test_gate_decisions(metric: str, margin: float, candidate, base, champion, promoted: bool, reason: str) -> None:
    decision = decide(metric, margin, candidate, base, champion, "7" if champion is not None else None)
    assert decision.promoted is promoted
    assert reason in decision.reason


def test_promotion_moves_aliases_and_records_reasons(cfg: PipelineConfig) -> None:
    name, client = cfg.registry.model_name, configure(cfg.registry).client
    v1 = new_version(cfg, {"macro_f1": 0.60})
    assert promote(cfg.registry, v1, evaluation(0.60, 0.30)).promoted
    assert aliases(cfg) == {CHAMPION: v1, CHALLENGER: v1}

    v2 = new_version(cfg, {"macro_f1": 0.61})
    decision = promote(cfg.registry, v2, evaluation(0.61, 0.30, champion=0.60, champion_version=v1))
    assert not decision.promoted and decision.champion_version == v1
    assert aliases(cfg) == {CHAMPION: v1, CHALLENGER: v2}
    assert client.get_model_version(name, v2).tags[T.PROMOTION_TAG] == decision.reason
    assert f"does not beat champion v{v1}" in decision.reason

    v3 = new_version(cfg, {"macro_f1": 0.90})
    assert promote(cfg.registry, v3, evaluation(0.90, 0.30, champion=0.60, champion_version=v1)).promoted
    assert aliases(cfg) == {CHAMPION: v3, CHALLENGER: v3, PREVIOUS: v1}


def test_gate_judges_against_whoever_is_champion_now(cfg: PipelineConfig) -> None:
    """Evaluation saw v1 as champion, but v2 took over meanwhile: v2's recorded metrics decide."""
    v1 = new_version(cfg, {"macro_f1": 0.60})
    promote(cfg.registry, v1, evaluation(0.60, 0.30))
    v2 = new_version(cfg, {"macro_f1": 0.95})
    promote(cfg.registry, v2, evaluation(0.95, 0.30, champion=0.60, champion_version=v1))
    v3 = new_version(cfg, {"macro_f1": 0.80})
    decision = promote(cfg.registry, v3, evaluation(0.80, 0.30, champion=0.60, champion_version=v1))
    assert not decision.promoted
    assert decision.champion_version == v2 and decision.champion == pytest.approx(0.95)
    assert f"champion v{v2} judged by the evaluation recorded when it was registered" in decision.reason
    assert aliases(cfg)[CHAMPION] == v2


def test_two_pipelines_promoting_at_once_yield_exactly_one_champion(cfg: PipelineConfig) -> None:
    versions = [new_version(cfg, {"macro_f1": 0.80}) for _ in range(2)]
    start = threading.Barrier(len(versions))
    decisions: dict[str, Decision] = {}
    errors: list[BaseException] = []

    def pipeline(version: str) -> None:
        try:
            start.wait()
            # Both evaluated while there was no champion: only the lock's re-read can stop the second one.
            decisions[version] = promote(cfg.registry, version, evaluation(0.80, 0.50))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=pipeline, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    winners = [v for v, d in decisions.items() if d.promoted]
    assert len(winners) == 1
    (loser,) = set(versions) - set(winners)
    assert aliases(cfg)[CHAMPION] == winners[0]
    assert f"does not beat champion v{winners[0]}'s 0.8 by the margin 0.02" in decisions[loser].reason


def test_rollback_returns_champion_to_the_previous_version_once(cfg: PipelineConfig) -> None:
    name = cfg.registry.model_name
    client = configure(cfg.registry).client
    v1 = new_version(cfg, {"macro_f1": 0.60})
    promote(cfg.registry, v1, evaluation(0.60, 0.30))
    with pytest.raises(PhituneError, match="no previous champion"):
        rollback_champion(name, client)
    v2 = new_version(cfg, {"macro_f1": 0.90})
    promote(cfg.registry, v2, evaluation(0.90, 0.30, champion=0.60, champion_version=v1))
    assert rollback_champion(name, client) == v1
    assert aliases(cfg) == {CHAMPION: v1, CHALLENGER: v2}
    assert client.get_model_version(name, v2).tags[T.ROLLBACK_TAG].startswith(f"rolled back to v{v1}")
    with pytest.raises(PhituneError, match="no previous champion"):
        rollback_champion(name, client)


def test_unchanged_champion_matches_data_and_training_config(cfg: PipelineConfig) -> None:
    digest = "a" * 64
    assert unchanged_champion(cfg, digest) is None  # no champion yet
    v1 = new_version(cfg, {"macro_f1": 0.6}, {T.DATA_DIGEST_TAG: digest, T.CONFIG_DIGEST_TAG: config_digest(cfg, digest)})
    promote(cfg.registry, v1, evaluation(0.6, 0.3))
    assert unchanged_champion(cfg, digest) == v1
    assert unchanged_champion(cfg, "b" * 64) is None
    moved = cfg.model_copy(deep=True)
    moved.training.output_dir = str(Path("/tmp/elsewhere"))  # where, not what: still unchanged
    assert unchanged_champion(moved, digest) == v1
    retuned = cfg.model_copy(deep=True)
    retuned.training.epochs = 1
    assert unchanged_champion(retuned, digest) is None


def test_comparison_markdown_lists_every_model_and_the_reason() -> None:
    ev = {
        "base": {"macro_f1": 0.3, "perplexity": 20.0},
        "champion": {"macro_f1": 0.6, "perplexity": 8.0},
        "candidate": {"macro_f1": 0.9, "perplexity": 6.0},
        "champion_version": "2",
    }
    decision = decide("macro_f1", 0.02, 0.9, 0.3, 0.6, "2")
    text = comparison_markdown("support", "3", ev, decision)
    assert "| metric | base model | champion v2 | candidate v3 |" in text
    assert "| **macro_f1** (gate) | 0.3 | 0.6 | 0.9 |" in text
    assert "| perplexity | 20 | 8 | 6 |" in text
    assert decision.reason in text and "promoted to champion" in text
    no_champion = comparison_markdown("support", "1", {**ev, "champion": None}, decide("macro_f1", 0.02, 0.9, 0.3))
    assert "| metric | base model | candidate v1 |" in no_champion
