"""The command line of the flows: `python flows/<flow>.py --config ... key=value`, and what `make run` prints at the end."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from phitune.config import PipelineConfig, load_config
from phitune.errors import PhituneError
from phitune.chat_client import chat_url


def run_cli(flow: Callable[[PipelineConfig], dict[str, Any]], report: Callable[[PipelineConfig, dict[str, Any]], None],
            description: str, argv: list[str] | None = None) -> int:
    """Load the config (file + overrides), run the flow in-process, print its report; one clear line on a user error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", help="pipeline config YAML (default: built-in defaults, which run on the embedded default model)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.epochs=1")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        result = flow(config)
    except PhituneError as err:
        print(f"phitune: error: {err}", file=sys.stderr)
        return err.exit_code
    report(config, result)
    return 0

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
        _print_endpoint(result.get("endpoint"), reg)
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
    _print_endpoint(result.get("endpoint"), reg)


def _print_endpoint(endpoint: dict[str, Any] | None, reg: Any) -> None:
    if endpoint:
        url = endpoint["base_url"]
        state = "already serving" if endpoint.get("already_serving") else "serving"
        print(f"\nendpoint          {endpoint['endpoint']} {state} v{endpoint['version']} at {url}")
        print(f"  try it:  curl -s {chat_url(url)} -H 'Content-Type: application/json' \\")
        print("             -d '{\"messages\": [{\"role\": \"user\", \"content\": \"My router keeps dropping Wi-Fi\"}]}'")
        print(f"  stop it: .venv/bin/phitune endpoint stop {endpoint['endpoint']} --config <same config>")
    print("\nbrowse:  .venv/bin/mlflow ui --backend-store-uri " + reg.tracking_uri + "   (http://127.0.0.1:5000)")
