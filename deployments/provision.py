"""Provision a running Prefect server for phitune: work pools, the GPU concurrency limit, the
deployments of prefect.yaml and the automations. Idempotent: run it again after editing prefect.yaml.

`phitune stack up` runs this as `python -m deployments.provision` against the server it started, with
the stack's environment (Prefect reads PREFECT_API_URL from it); against any other server set
PREFECT_API_URL and run the same.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.workers.process import ProcessWorker

from deployments.automations import create_automations
from deployments.stack import GPU_LIMIT

POOLS = {
    "cpu": "Validation, evaluation, registration, deployment and monitoring (process worker).",
    "gpu": "Training: run the `train/gpu` deployment here; start one worker per GPU host.",
}


async def ensure_pools_and_limits(gpus: int) -> None:
    """Create (or update) the process work pools and the `gpu-training` global concurrency limit."""
    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for name, description in POOLS.items():
            await client.create_work_pool(
                WorkPoolCreate(name=name, type="process", description=description, base_job_template=template),
                overwrite=True,
            )
        await client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, gpus)


def deploy_all(prefect_file: Path, log: Path) -> None:
    """`prefect deploy --all` from prefect.yaml, in its folder (entrypoints are relative to it).

    prefect.yaml's placeholders are filled from the environment: PHITUNE_ROOT (where flow runs
    execute; default: prefect.yaml's folder) and PHITUNE_TRACKING_URI (the MLflow server the runs
    record to; no default: a deployment pointing at the wrong store is worse than none)."""
    if not os.environ.get("PHITUNE_TRACKING_URI"):
        raise SystemExit("set PHITUNE_TRACKING_URI to the MLflow tracking URI the deployments' runs record to "
                         "(e.g. http://127.0.0.1:5000); `phitune stack up` sets it")
    env = {"PHITUNE_ROOT": str(prefect_file.parent), **os.environ, "PREFECT_CLI_WRAP_LINES": "false", "COLUMNS": "200"}
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
            cwd=prefect_file.parent, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"prefect deploy --all failed (status {proc.returncode}); see {log}")


async def list_deployments() -> list[str]:
    async with get_client() as client:
        deployments = await client.read_deployments()
        flows = {f.id: f.name for f in await client.read_flows()}
    return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" + (" (scheduled)" if d.schedules else "") for d in deployments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefect-file", default="prefect.yaml")
    parser.add_argument("--gpus", type=int, default=1, help="slots of the gpu-training concurrency limit")
    parser.add_argument("--no-automations", action="store_true", help="skip the automations (a project without phitune's flows)")
    parser.add_argument("--log", default="provision.log", help="where the output of `prefect deploy` goes")
    args = parser.parse_args(argv)
    asyncio.run(ensure_pools_and_limits(args.gpus))
    print(f"work pools: {', '.join(POOLS)}; concurrency limit {GPU_LIMIT}={args.gpus}")
    deploy_all(Path(args.prefect_file).resolve(), Path(args.log))
    print("deployments: " + ", ".join(asyncio.run(list_deployments())))
    if not args.no_automations:
        print("automations: " + (", ".join(create_automations()) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
