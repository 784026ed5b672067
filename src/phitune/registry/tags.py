"""Names shared by every stage that reads or writes the registry: aliases and tag keys.

The MLflow registry is the one source of truth for what is deployed: aliases say which version is
champion, challenger or the previous champion; model-version tags carry lineage (data and config
digests, run, base model), the evaluation metrics the promotion gate compares, and the endpoints
that serve a version (written by the serving stage, read by retire and the monitor).
"""

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

DATA_DIGEST_TAG = "phitune.data_digest"
CONFIG_DIGEST_TAG = "phitune.config_digest"
CHAT_TEMPLATE_TAG = "phitune.chat_template_sha256"
RUN_ID_TAG = "phitune.run_id"
BASE_MODEL_TAG = "phitune.base_model"  # the config value (e.g. 'default' or a hub id), stable across machines
BASE_MODEL_PATH_TAG = "phitune.base_model_path"  # where it was loaded from when logged
METRIC_TAG_PREFIX = "phitune.metric."  # + metric name: the candidate's evaluation, for later gates
PROMOTION_TAG = "phitune.promotion"  # the gate's reason
ROLLBACK_TAG = "phitune.rollback"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own key, shown in its UI
NOTE_TAG = "mlflow.note.content"  # the run description in the MLflow UI

ENDPOINT_TAG_PREFIX = "endpoint."
"""Model-version tags `endpoint.<endpoint name>.<field>` record where a version is served; `.url` marks it live."""
ENDPOINT_URL_FIELD = "url"


def endpoint_tag(endpoint: str, field: str = ENDPOINT_URL_FIELD) -> str:
    """The model-version tag key of one field of an endpoint's record, e.g. `endpoint.phitune-support.url`."""
    return f"{ENDPOINT_TAG_PREFIX}{endpoint}.{field}"
