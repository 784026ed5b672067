"""The MLflow side of phitune: runs (lineage), model versions, the promotion gate, retirement.

Modules: store (tracking URI, experiment), runs (one run per pipeline run), versions (log, fetch,
endpoints, retire), promotion (gate under a lock, rollback, unchanged champion), tags (names),
external (versions whose weights live elsewhere, e.g. Azure fine-tunes).
"""

from phitune.registry.external import LOCATION_TAG, log_to_run, record_version_metrics, register_external_version

from phitune.registry.promotion import (
    Decision,
    comparison_markdown,
    decide,
    promote,
    recorded_metrics,
    rollback_champion,
    unchanged_champion,
)
from phitune.registry.runs import close_run, config_digest, log_evaluation, open_run
from phitune.registry.store import Store, client_for, configure
from phitune.registry.tags import CHALLENGER, CHAMPION, ENDPOINT_TAG_PREFIX, PREVIOUS, endpoint_tag
from phitune.registry.versions import (
    ChampionAdapter,
    champion_adapter,
    cli_retire,
    current_champion,
    fetch_adapter,
    get_version,
    live_endpoints,
    log_model_version,
    retire,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "ENDPOINT_TAG_PREFIX", "LOCATION_TAG", "PREVIOUS", "ChampionAdapter", "Decision", "Store",
    "champion_adapter", "cli_retire", "client_for", "close_run", "comparison_markdown", "config_digest",
    "configure", "current_champion", "decide", "endpoint_tag", "fetch_adapter", "get_version", "live_endpoints",
    "log_evaluation", "log_model_version", "log_to_run", "open_run", "promote", "record_version_metrics", "recorded_metrics", "register_external_version", "retire",
    "rollback_champion", "unchanged_champion",
]
