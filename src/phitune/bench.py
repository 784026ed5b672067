"""`phitune bench`: each benchmark runs phitune and a baseline side by side in one run and reports ratios.

Timings are reported, never asserted: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHES = {
    "validate": "phitune.data.bench",  # contract vs pandas + per-example tokenization
    "train": "phitune.training.bench",  # phitune's LoRA loop vs a stock SFTTrainer recipe
    "serve": "phitune.serving.bench",  # batched server vs one request at a time
}


def cli_bench(args: argparse.Namespace) -> int:
    results = {}
    for name in args.which:
        print(f"\n=== bench: {name} ===", flush=True)
        results[name] = importlib.import_module(BENCHES[name]).run(quick=args.quick)
    print("\n=== bench results (JSON) ===")
    print(json.dumps(results, indent=2, default=str))
    return 0
