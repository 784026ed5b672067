"""What `make run` prints at the end: what happened, where it is, and what to try next."""

from __future__ import annotations

from typing import Any

from phitune.config import PipelineConfig
from phitune.probes import chat_url

METRICS = ("eval_loss", "perplexity", "token_accuracy", "label_accuracy", "macro_f1", "rougeL")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def print_summary(config: PipelineConfig, result: dict[str, Any]) -> None:
    reg = config.registry
    print("\n=== phitune: pipeline finished ===")
    print(f"MLflow run        {result['mlflow_run_id']}  (tracking: {reg.tracking_uri})")
    print(f"data digest       {result['data_digest'][:16]}")
    if result.get("skipped"):
        print(f"skipped training  champion v{result['champion_version']} already has this data and config")
        return
    evaluation = result["evaluation"]
    models = [m for m in ("base", "champion", "candidate") if evaluation.get(m)]
    print("\nevaluation on the held-out set:")
    print(f"  {'metric':<16}" + "".join(f"{m:>12}" for m in models))
    for metric in METRICS:
        print(f"  {metric:<16}" + "".join(f"{_fmt(evaluation[m].get(metric)):>12}" for m in models))
    registered = result["registered"]
    print(f"\nregistered        {registered['model_uri']}  aliases: {', '.join(registered['aliases'])}")
    print(f"promotion         {registered['reason']}")
    endpoint = result.get("endpoint")
    if endpoint:
        url = endpoint["base_url"]
        print(f"\nendpoint          {endpoint['endpoint']} serving v{endpoint['version']} at {url}")
        print(f"  try it:  curl -s {chat_url(url)} -H 'Content-Type: application/json' \\")
        print("             -d '{\"messages\": [{\"role\": \"user\", \"content\": \"My router keeps dropping Wi-Fi\"}]}'")
        print(f"  stop it: .venv/bin/phitune endpoint stop {endpoint['endpoint']} --config <same config>")
    print("\nbrowse:  .venv/bin/mlflow ui --backend-store-uri " + reg.tracking_uri + "   (http://127.0.0.1:5000)")
