"""The stack as users run it, for real: `phitune stack up` starts Prefect and MLflow servers, deploys
prefect.yaml, creates the automations and starts workers; runs are created the way the Prefect UI creates
them. On SQLite: deployments and schedules, parameter validation, a UI-triggered run that registers a
model, a scheduled deployment a worker picks up, a worker killed mid-training, and `down`. On
PostgreSQL (fresh databases, dropped after): the UI-triggered run.

The tests of one stack share it (module scope) and run in file order; the last one stops it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from deployments.stack import check_port_free, down, read_state, stack_env, start_workers
from phitune.registry import client_for
from stack_support import PG, create_run, pg_database, prefect, running_stack, stack_config, wait_final, write_support_jsonl

pytestmark = pytest.mark.integration


def pipeline_parameters(tmp: Path, tiny_model: Path, tracking_uri: str, model_name: str,
                        train_examples: int = 24, **training: Any) -> dict[str, Any]:
    """finetune/on-demand parameters for a seconds-long run on a tiny model (what the UI form sends)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {"config": {
        "data": {"train_file": str(write_support_jsonl(tmp / "train.jsonl", train_examples)),
                 "validation_file": str(write_support_jsonl(tmp / "validation.jsonl", 8, offset=1000)),
                 "min_examples": 4, "docs_dir": str(tmp / "docs")},
        "model": {"base_model": str(tiny_model)},
        "training": {"epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8, "max_seq_length": 128,
                     "output_dir": str(tmp / "runs"), **training},
        "evaluation": {"max_new_tokens": 8, "batch_size": 8},
        "registry": {"tracking_uri": tracking_uri, "model_name": model_name, "experiment": model_name},
        "deployment": {"target": "none"},
    }}


def _stack(tmp: Path, backend: str, sections: dict[str, Any], stack_: ExitStack) -> dict[str, Any]:
    cfg = stack_config(tmp, workers={"cpu": 1, "gpu": 1, "poll_seconds": 1}, **sections)
    state = stack_.enter_context(running_stack(cfg))
    print(f"[{backend}] start-up timings: {state['timings']}")
    return {"cfg": cfg, "api": state["urls"]["prefect_api"], "tmp": tmp, "backend": backend}


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with ExitStack() as stack_:
        yield _stack(tmp_path_factory.mktemp("stack-sqlite"), "sqlite", {}, stack_)


@pytest.fixture(scope="module")
def postgres_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with ExitStack() as stack_:
        prefect_db = stack_.enter_context(pg_database("phitune_it_prefect"))
        mlflow_db = stack_.enter_context(pg_database("phitune_it_mlflow"))
        sections = {"prefect": {"database_url": f"postgresql+asyncpg://{PG}/{prefect_db}"},
                    "mlflow": {"backend_store_uri": f"postgresql+psycopg2://{PG}/{mlflow_db}"}}
        yield _stack(tmp_path_factory.mktemp("stack-postgres"), "postgresql", sections, stack_)


# ------------------------------------------------------------------------------------------ SQLite


async def _runs_in_state(client, deployment, state: str, timeout: float) -> list[Any]:
    """The deployment's runs in `state` (SCHEDULED, COMPLETED...), as soon as there are any; [] at the deadline."""
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter

    deadline = time.monotonic() + timeout
    while True:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
            flow_run_filter=FlowRunFilter(state={"type": {"any_": [state]}}),
        )
        if runs or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.5)


async def _deployments(client, _):
    found = {}
    for name in ("finetune/on-demand", "finetune/nightly", "monitor/every-5-minutes", "retire/on-demand", "train/gpu", "rollback/on-breach"):
        dep = await client.read_deployment_by_name(name)
        found[name] = (dep, len(await _runs_in_state(client, dep, "SCHEDULED", 60)) if dep.schedules else 0)
    pools = {p.name: p.type for p in await client.read_work_pools()}
    gpu_limit = await client.read_global_concurrency_limit_by_name("gpu-training")
    automations = await client.read_automations_by_name("phitune-slo-breach")
    return found, pools, gpu_limit.limit, automations


def test_up_brings_the_uis_deployments_schedules_pools_and_automation(sqlite_stack: dict[str, Any]) -> None:
    cfg = sqlite_stack["cfg"]
    assert "<html" in httpx.get(cfg.prefect_url, timeout=30).text.lower()
    assert "<html" in httpx.get(cfg.mlflow_url, timeout=30).text.lower()
    found, pools, gpu_slots, automations = prefect(sqlite_stack["api"], _deployments, None)
    assert pools == {"cpu": "process", "gpu": "process"} and gpu_slots == cfg.gpus
    assert found["finetune/nightly"][0].schedules[0].schedule.cron == "0 2 * * *"
    assert found["monitor/every-5-minutes"][0].schedules[0].schedule.interval.total_seconds() == 300
    # The scheduler puts upcoming runs of both scheduled deployments on the calendar.
    assert found["finetune/nightly"][1] >= 1 and found["monitor/every-5-minutes"][1] >= 1
    assert not found["finetune/on-demand"][0].schedules
    assert found["train/gpu"][0].work_pool_name == "gpu"
    assert {d.work_pool_name for name, (d, _) in found.items() if name != "train/gpu"} == {"cpu"}
    assert all(d.enforce_parameter_schema for d, _ in found.values())
    # Runs from the stack record to the stack's MLflow server (a deploy-time parameter).
    assert found["finetune/on-demand"][0].parameters["config"]["registry"]["tracking_uri"] == cfg.mlflow_url
    assert len(automations) == 1


async def _bad_parameter(client, parameters):
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        await create_run(client, "finetune/on-demand", parameters)
    except PrefectHTTPStatusError as exc:
        return exc.response.status_code, exc.response.json()["detail"]
    return None, "accepted"


def test_a_bad_parameter_is_refused_at_creation_naming_the_field(sqlite_stack: dict[str, Any]) -> None:
    code, detail = prefect(sqlite_stack["api"], _bad_parameter, {"config": {"training": {"precision": "fp64"}}})
    assert code == 409, detail
    assert "field 'config.training.precision'" in detail and "'fp64' is not one of ['auto', 'fp32', 'bf16', 'fp16']" in detail, detail


async def _run_and_time(client, parameters):
    from prefect.client.schemas.filters import FlowRunFilter

    t0 = time.monotonic()
    run = await create_run(client, "finetune/on-demand", parameters)
    run = await wait_final(client, run.id, timeout=600)
    elapsed = time.monotonic() - t0
    tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    result = await run.state.result(raise_on_failure=False)
    at = {s.type.value: s.timestamp for s in await client.read_flow_run_states(run.id)}
    print(f"  created -> picked up by a worker {(at['PENDING'] - run.created).total_seconds():.1f} s, "
          f"-> flow running in its process {(at['RUNNING'] - at['PENDING']).total_seconds():.1f} s, "
          f"-> completed {(at['COMPLETED'] - at['RUNNING']).total_seconds():.1f} s")
    return run, result, elapsed, sum(t.total_run_time.total_seconds() for t in tasks)


def _ui_triggered_run_registers_in_mlflow(stack: dict[str, Any], tiny_model: Path) -> None:
    cfg = stack["cfg"]
    name = f"it-{stack['backend']}"
    params = pipeline_parameters(stack["tmp"] / "ui-run", tiny_model, cfg.mlflow_url, name)
    run, result, elapsed, in_tasks = prefect(stack["api"], _run_and_time, params)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    print(f"[{stack['backend']}] finetune/on-demand: {elapsed:.1f} s end to end (creation to Completed), "
          f"{in_tasks:.1f} s inside tasks, orchestration overhead {elapsed - in_tasks:.1f} s")
    client = client_for(cfg.mlflow_url)  # bound to this store for registry too (earlier tests set the global one)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.run_id for v in versions] == [result["mlflow_run_id"]]
    assert result["registered"]["version"] == versions[0].version
    assert "challenger" in client.get_registered_model(name).aliases
    mlflow_run = client.get_run(result["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert {"candidate_eval_loss", "base_eval_loss"} <= set(mlflow_run.data.metrics)


def test_a_ui_triggered_run_completes_and_registers_in_mlflow(sqlite_stack: dict[str, Any], tiny_chatml: Path) -> None:
    _ui_triggered_run_registers_in_mlflow(sqlite_stack, tiny_chatml)


TICK_FLOW = '''
from prefect import flow


@flow(name="tick")
def tick() -> str:
    return "tock"
'''

TICK_YAML = '''
name: tick
prefect-version: 3.8.8
build: null
push: null
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: {directory}
deployments:
  - name: every-5-seconds
    entrypoint: tick_flow.py:tick
    work_pool: {{name: cpu}}
    schedules:
      - interval: 5
'''


async def _completed_scheduled_runs(client, _):
    dep = await client.read_deployment_by_name("tick/every-5-seconds")
    runs = await _runs_in_state(client, dep, "COMPLETED", 180)
    await client.pause_deployment(dep.id)  # leave the worker to the other tests
    return runs


def test_a_scheduled_deployment_produces_runs_a_worker_picks_up(sqlite_stack: dict[str, Any]) -> None:
    project = sqlite_stack["tmp"] / "tick"
    project.mkdir()
    (project / "tick_flow.py").write_text(TICK_FLOW)
    (project / "prefect.yaml").write_text(TICK_YAML.format(directory=project))
    subprocess.run([str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all"], cwd=project,
                   env={**os.environ, **stack_env(sqlite_stack["cfg"])}, check=True, capture_output=True)
    runs = prefect(sqlite_stack["api"], _completed_scheduled_runs, None)
    assert runs and all(r.auto_scheduled for r in runs)


async def _train_runs(client, mlflow_run_id):
    from prefect.client.schemas.filters import DeploymentFilter

    dep = await client.read_deployment_by_name("train/gpu")
    runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}))
    return [r for r in runs if r.parameters.get("run_id") == mlflow_run_id]


def test_training_runs_on_the_gpu_pool_when_configured(sqlite_stack: dict[str, Any], tiny_chatml: Path) -> None:
    cfg = sqlite_stack["cfg"]
    name = "it-gpu-pool"
    params = pipeline_parameters(sqlite_stack["tmp"] / "gpu-pool", tiny_chatml, cfg.mlflow_url, name, deployment="train/gpu")
    run, result, _, _ = prefect(sqlite_stack["api"], _run_and_time, params)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    [train_run] = prefect(sqlite_stack["api"], _train_runs, result["mlflow_run_id"])
    assert train_run.state.is_completed() and train_run.work_pool_name == "gpu"
    assert train_run.parent_task_run_id is not None, "not linked to the pipeline run as a subflow"
    client = client_for(cfg.mlflow_url)  # bound to this store for registry too (earlier tests set the global one)
    assert "adapter" in {a.path for a in client.list_artifacts(result["mlflow_run_id"])}
    assert [v.run_id for v in client.search_model_versions(f"name = '{name}'")] == [result["mlflow_run_id"]]


async def _start_run(client, parameters):
    return await create_run(client, "finetune/on-demand", parameters)


async def _retry_and_wait(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.states import Scheduled

    before = await client.read_flow_run(flow_run_id)
    await client.set_flow_run_state(flow_run_id, Scheduled(), force=True)  # what "Retry" does for a run nobody will finish
    run = await wait_final(client, flow_run_id, timeout=600)
    tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return before, run, await run.state.result(raise_on_failure=False), tasks


def test_a_worker_killed_mid_training_then_a_retry_finishes_reusing_stages_and_checkpoint(
    sqlite_stack: dict[str, Any], tiny_chatml: Path,
) -> None:
    cfg = sqlite_stack["cfg"]
    tmp = sqlite_stack["tmp"] / "crash"
    name = "it-crash"
    # 40 steps, a checkpoint every 4: long enough to be killed mid-way however fast the machine is.
    params = pipeline_parameters(tmp, tiny_chatml, cfg.mlflow_url, name, train_examples=40, epochs=1, batch_size=1,
                                 checkpoint_every_steps=4)
    run = prefect(sqlite_stack["api"], _start_run, params)
    checkpoints = tmp / "runs" / str(run.id) / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step-*")):
        assert time.monotonic() < deadline, "no training checkpoint within 300 s"
        time.sleep(0.05)

    worker = next(p for p in read_state(cfg)["processes"] if p["name"] == "worker-cpu-1")
    family = [psutil.Process(worker["pid"]), *psutil.Process(worker["pid"]).children(recursive=True)]
    for proc in family:  # the machine running the worker dies: worker and flow-run process, no goodbye
        proc.kill()
    psutil.wait_procs(family, timeout=10)
    start_workers(cfg, read_state(cfg), ["cpu-2"])

    before, run, result, tasks = prefect(sqlite_stack["api"], _retry_and_wait, run.id)
    assert before.state.name == "Running", "nobody reported the crash: the run looked alive"
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    assert run.run_count == 2
    # Validation runs again by design (it must follow the bytes on disk); the MLflow run is the same one.
    cached = {t.name.rsplit("-", 1)[0] for t in tasks if t.state.name == "Cached"}
    assert "open-run" in cached, sorted((t.name, t.state.name) for t in tasks)
    client = client_for(cfg.mlflow_url)  # bound to this store for registry too (earlier tests set the global one)
    mlflow_run = client.get_run(result["mlflow_run_id"])
    assert 4 <= mlflow_run.data.metrics["train_resumed_from_step"] < 40
    assert len(client.search_runs([mlflow_run.info.experiment_id])) == 1, "the retry opened a second MLflow run"
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"], "registered twice"


def test_down_stops_everything_it_started(sqlite_stack: dict[str, Any]) -> None:
    cfg = sqlite_stack["cfg"]
    recorded = read_state(cfg)["processes"]
    family = [p for e in recorded if psutil.pid_exists(e["pid"]) for p in [psutil.Process(e["pid"]), *psutil.Process(e["pid"]).children(recursive=True)]]
    stopped = down(cfg, out=print)
    assert {"mlflow-server", "prefect-server", "worker-cpu-1", "worker-gpu-1", "worker-cpu-2"} >= set(stopped) >= {"mlflow-server", "prefect-server"}
    assert read_state(cfg) is None
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    check_port_free(cfg.host, cfg.prefect.port, "prefect.port")
    check_port_free(cfg.host, cfg.mlflow.port, "mlflow.port")


# -------------------------------------------------------------------------------------- PostgreSQL


def test_on_postgresql_a_ui_triggered_run_completes_and_registers(postgres_stack: dict[str, Any], tiny_chatml: Path) -> None:
    _ui_triggered_run_registers_in_mlflow(postgres_stack, tiny_chatml)
