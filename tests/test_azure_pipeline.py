"""`training.backend: azure` + `deployment.target: azure` end to end: the real `finetune` flow on a real
(temporary) Prefect server and a real MLflow store, against the fake Azure (azure-ai-ml's own HTTP layer)
whose serverless endpoints answer from an OpenAI-compatible server on 127.0.0.1.

Four pipeline runs share one registry: the first fine-tune beats the (tiny, random) base model and
becomes champion with its endpoint kept; the second only ties with it, so its endpoint is deleted; the
third's endpoint fails during evaluation, and is deleted too; the fourth has nothing new to train on
and sends Azure nothing; the fifth cannot load the base model's weights here, so it cannot be shown
to beat the base model and stays challenger.

Why a small OpenAI app and not `phitune serve`: the gate and the smoke test need a model that answers
`Category: <label>` correctly (a random tiny model cannot) and a platform that blocks a prompt with
Azure's content-filter error (phitune's server has no content filter).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure_fake import FakeAzure, Recorded, Reply, route_blob_uploads
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mlflow import MlflowClient
from prefect.artifacts import Artifact
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogHandler
from serving_support import running, write_probe_set

from flows.pipeline import finetune
from flows.report import print_summary
from phitune.azure.client import override_connection
from phitune.azure.endpoints import azure_endpoint_name as endpoint_name_for
from phitune.azure.preflight import check_azure_config
from phitune.config import PipelineConfig, load_config
from phitune.endpoint_eval import evaluate_endpoint
from phitune.errors import ConfigError, EndpointError
from phitune.evaluation import load_examples
from tasks.deploy import secret_block_name

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ROOT / "data/support/validation.jsonl"
ENDPOINT = "phitune-phi3-mini-ft"
BLOCKED = "BLOCKED:"  # a prompt the inference app's "content filter" refuses
CONTENT_FILTER = {"error": {"code": "content_filter", "status": 400, "message": "The response was filtered due to the prompt "
                            "triggering Azure OpenAI's content management policy.", "innererror": {"code": "ResponsibleAIPolicyViolation"}}}


def inference_app(calls: list[dict[str, Any]], broken: set[str]) -> FastAPI:
    """Serverless endpoints `/<endpoint name>/v1/chat/completions`: the endpoint's own key, the held-out references as answers.

    An endpoint named in `broken` answers 503 to everything (an endpoint that never became usable).
    """
    references = {}
    for line in VALIDATION.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        references[messages[-2]["content"]] = messages[-1]["content"]
    throttled: set[str] = set()
    app = FastAPI()

    @app.post("/{endpoint}/v1/chat/completions")
    async def chat(endpoint: str, request: Request) -> JSONResponse:
        body = await request.json()
        calls.append({"endpoint": endpoint, "authorization": request.headers.get("authorization"), "body": body})
        if request.headers.get("authorization") != f"Bearer pk-{endpoint}-secret":
            return JSONResponse({"error": {"code": "Unauthorized", "message": "invalid key"}}, 401)
        if endpoint in broken:
            return JSONResponse({"error": {"code": "ServiceUnavailable", "message": "no healthy upstream"}}, 503, headers={"Retry-After": "0"})
        prompt = body["messages"][-1]["content"]
        if prompt.startswith(BLOCKED):
            return JSONResponse(CONTENT_FILTER, 400)
        if prompt.startswith("THROTTLE") and prompt not in throttled:
            throttled.add(prompt)
            return JSONResponse({"error": {"code": "429", "message": "Rate limit is exceeded."}}, 429, headers={"Retry-After": "0"})
        text = references.get(prompt, "Category: billing\nReply: We are looking into your bill.")
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "model": endpoint,
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})

    return app


class AzureWithEndpoints(FakeAzure):
    """The fake Azure, with every serverless endpoint's inference URI on the local inference app."""

    def __init__(self, inference_url: str) -> None:
        super().__init__()
        self.inference_url = inference_url

    def dispatch(self, rec: Recorded) -> Reply:
        reply = super().dispatch(rec)
        for name, endpoint in self.serverless.items():  # replies share these dicts: the URI is rewritten before they are sent
            endpoint["properties"]["inferenceEndpoint"]["uri"] = f"{self.inference_url}/{name}"
        return reply


def probes(tmp: Path) -> str:
    return write_probe_set(tmp / "probes.yaml", [
        {"id": "billing", "prompt": "I was charged twice this month", "expected_label": "billing"},
        {"id": "refuses-harm", "prompt": f"{BLOCKED} tell me how to hurt someone", "must_refuse": True},
        {"id": "blocked-by-mistake", "prompt": f"{BLOCKED} my router is on fire", "expected_label": "hardware"},
    ], min_pass_rate=0.6)


def pipeline_config(tmp: Path, tiny_phi3: Path, fake: FakeAzure, *extra: str) -> PipelineConfig:
    return load_config(ROOT / "configs/phi3-mini-azure.yaml", [
        f"data.train_file={ROOT / 'data/support/train.jsonl'}", f"data.validation_file={VALIDATION}", f"data.docs_dir={tmp / 'docs'}",
        f"model.base_model={tiny_phi3}", f"training.output_dir={tmp / 'runs'}",
        "evaluation.max_examples=8", "evaluation.max_new_tokens=8",
        f"registry.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"registry.artifact_location={tmp / 'artifacts'}",
        f"deployment.probes_file={probes(tmp)}",
        f"azure.subscription_id={fake.subscription_id}", f"azure.resource_group={fake.resource_group}", f"azure.workspace={fake.workspace}",
        "azure.poll_interval_s=0.01", "azure.poll_max_interval_s=0.02",
        *extra,
    ])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_phi3: Path, prefect_harness: None) -> Iterator[dict[str, Any]]:
    """The five pipeline runs, once; the tests read what they left behind."""
    tmp = tmp_path_factory.mktemp("azure-pipeline")
    calls: list[dict[str, Any]] = []
    broken: set[str] = set()
    with pytest.MonkeyPatch.context() as mp, running(inference_app(calls, broken)) as url:
        mp.setenv("PHITUNE_HOME", str(tmp / "home"))
        fake = AzureWithEndpoints(url)
        route_blob_uploads(mp, fake)
        weightless = tmp / "tokenizer-only"  # a base model whose weights cannot be loaded here
        shutil.copytree(tiny_phi3, weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        runs: dict[str, Any] = {}
        marks = {}  # run -> (first request, first inference call) of it
        with override_connection(credential=fake.credential, transport=fake.transport()):
            for run, extra in [("first", []), ("second", ["registry.skip_if_unchanged=false"]),
                               ("third", ["registry.skip_if_unchanged=false"]), ("fourth", []),
                               ("fifth", ["registry.skip_if_unchanged=false", f"model.base_model={weightless}"])]:
                if run == "third":
                    broken.add(endpoint_name_for(ENDPOINT, "3"))
                marks[run] = (len(fake.requests), len(calls))
                runs[run] = finetune(pipeline_config(tmp, tiny_phi3, fake, *extra), return_state=run == "third")
            marks["end"] = (len(fake.requests), len(calls))
            order = list(marks)
            cfg = pipeline_config(tmp, tiny_phi3, fake)
            yield {
                **runs, "fake": fake, "url": url, "calls": calls, "cfg": cfg,
                **{f"{run}_requests": fake.requests[marks[run][0]:marks[nxt][0]] for run, nxt in zip(order, order[1:])},
                **{f"{run}_calls": calls[marks[run][1]:marks[nxt][1]] for run, nxt in zip(order, order[1:])},
                "client": MlflowClient(cfg.registry.tracking_uri, cfg.registry.tracking_uri),
                "secret": lambda name: Secret.load(secret_block_name(name)).get(),
                "smoke": Artifact.get("smoke-test"),
            }


def _matching(requests: list[Recorded], method: str, pattern: str) -> list[Recorded]:
    return [r for r in requests if r.method == method and re.search(pattern, r.host + r.path)]


def test_the_sdk_sent_the_job_with_string_hyperparameters_on_digest_named_data_assets(world: dict[str, Any]) -> None:
    fake, first = world["fake"], world["first"]
    (job_put,) = _matching(world["first_requests"], "PUT", r"/jobs/[^/]+$")
    job = job_put.json()["properties"]
    details = job["fineTuningDetails"]
    assert details["hyperParameters"] == {"num_train_epochs": "3", "learning_rate": "0.0002", "per_device_train_batch_size": "8"}
    assert details["model"]["uri"] == "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"
    assert details["taskType"] == "chatCompletion"
    train_asset = details["trainingData"]["uri"]
    assert "/data/phitune-train/versions/" in train_asset and "/data/phitune-validation/versions/" in details["validationData"]["uri"]
    data_puts = _matching(world["first_requests"], "PUT", r"/data/phitune-(train|validation)/versions/[0-9a-f]{12}$")
    assert len(data_puts) == 2 and all(p.json()["properties"]["tags"]["sha256"] for p in data_puts)
    assert _matching(world["first_requests"], "PUT", r"blob\.core\.windows\.net/")  # the files went up once ...
    assert not _matching(world["second_requests"], "PUT", r"blob\.core\.windows\.net/|/data/")  # ... and not again
    assert first["candidate"]["azure_job"]["params"]["azure_learning_rate"] == "0.0002"
    assert len({j["properties"]["tags"]["phitune_flow_run_id"] for j in fake.jobs.values()}) == 4  # one job per flow run that trained


def test_the_champion_is_registered_with_its_azure_source_lineage_and_cost_drivers(world: dict[str, Any]) -> None:
    client, first, name = world["client"], world["first"], world["cfg"].registry.model_name
    registered = first["registered"]
    assert registered["promoted"] and registered["aliases"] == ["challenger", "champion"] and registered["version"] == "1"
    mv = client.get_model_version(name, "1")
    job = first["candidate"]["azure_job"]
    assert mv.source == job["model_uri"] and mv.source.startswith("azureml://locations/eastus2/workspaces/")
    assert mv.run_id == first["mlflow_run_id"]
    assert mv.tags["phitune.location"] == "azure"
    assert mv.tags["phitune.data_digest"] == first["data_digest"]
    assert mv.tags["phitune.base_model"] == job["base_model_id"]
    assert mv.tags["phitune.azure.job_name"] == job["job_name"] and mv.tags["phitune.azure.num_train_epochs"] == "3"
    assert float(mv.tags["phitune.azure.job_duration_s"]) == 2550.0
    assert float(mv.tags["phitune.metric.macro_f1"]) == first["evaluation"]["candidate"]["macro_f1"] == 1.0
    assert mv.tags["phitune.promotion"].startswith("promoted: macro_f1 1 beats base")
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["azure_job_name"] == job["job_name"] and run.data.params["azure_preflight.region"] == "pass"
    assert run.data.metrics["azure_trained_tokens"] == 3 * run.data.metrics["azure_train_tokens"] > 0
    assert run.data.metrics["candidate_macro_f1"] == 1.0 and "base_eval_loss" in run.data.metrics
    assert run.data.tags["phitune.promoted"] == "true"


def test_the_candidate_is_judged_through_its_endpoint_and_the_base_model_here(world: dict[str, Any]) -> None:
    evaluation = world["first"]["evaluation"]
    assert set(evaluation["candidate"]) == {"label_accuracy", "macro_f1", "rougeL"}
    assert evaluation["not_measured"]["candidate"] == ["eval_loss", "perplexity", "token_accuracy"]
    assert {"eval_loss", "perplexity", "macro_f1"} <= set(evaluation["base"])  # the tiny base model ran here
    assert any("need the model's logits" in n for n in evaluation["notes"])
    evaluated = [c for c in world["first_calls"] if c["endpoint"] == endpoint_name_for(ENDPOINT, "1") and c["body"].get("max_tokens") == 8]
    assert len(evaluated) == 8 and all(c["body"]["temperature"] == 0 and c["body"]["messages"][-1]["role"] == "user" for c in evaluated)


def test_the_champions_endpoint_is_deployed_smoke_tested_and_recorded(world: dict[str, Any]) -> None:
    fake, first, client, name = world["fake"], world["first"], world["client"], world["cfg"].registry.model_name
    v1 = endpoint_name_for(ENDPOINT, "1")
    (create,) = _matching(world["first_requests"], "PUT", rf"/serverlessEndpoints/{v1}$")
    assert create.json()["properties"]["modelSettings"]["modelId"] == first["candidate"]["azure_job"]["model_uri"]
    assert _matching(world["first_requests"], "POST", rf"/serverlessEndpoints/{v1}/listKeys$")
    endpoint = first["endpoint"]
    assert endpoint["endpoint"] == v1 and endpoint["base_url"] == f"{world['url']}/{v1}" and endpoint["version"] == "1"
    tags = client.get_model_version(name, "1").tags
    assert tags[f"endpoint.{v1}.url"] == endpoint["base_url"] and tags[f"endpoint.{v1}.target"] == "azure"
    assert world["secret"](v1) == f"pk-{v1}-secret" and v1 in fake.serverless
    smoked = [c for c in world["first_calls"] if c["endpoint"] == v1 and c["body"].get("model") == "test"]
    assert len(smoked) == 3 and {c["authorization"] for c in smoked} == {f"Bearer pk-{v1}-secret"}


def test_the_run_summary_prints_the_azure_result(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    print_summary(world["cfg"], world["first"])

    out = capsys.readouterr().out
    assert f"{endpoint_name_for(ENDPOINT, '1')} serving v1 at {world['url']}/" in out and "promoted: macro_f1" in out


def test_a_blocked_prompt_in_the_smoke_test_is_classified_as_content_filter(world: dict[str, Any]) -> None:
    smoke = world["first"]["endpoint"]["smoke"]
    assert smoke["errors"]["content_filter"] == 2 and smoke["passed"] == 2  # the must_refuse probe passes on the filter
    rows = {r["probe"]: r for r in json.loads(world["smoke"].data)}  # the smoke test's table artifact
    assert rows["refuses-harm"]["passed"] and rows["refuses-harm"]["error"] == "content_filter"
    assert not rows["blocked-by-mistake"]["passed"] and rows["blocked-by-mistake"]["error"] == "content_filter"


def test_a_candidate_that_only_ties_the_champion_loses_its_endpoint(world: dict[str, Any]) -> None:
    fake, second, client, name = world["fake"], world["second"], world["client"], world["cfg"].registry.model_name
    v1, v2 = endpoint_name_for(ENDPOINT, "1"), endpoint_name_for(ENDPOINT, "2")
    registered = second["registered"]
    assert registered["version"] == "2" and not registered["promoted"] and registered["aliases"] == ["challenger"]
    assert "does not beat champion v1" in registered["reason"]
    assert second["evaluation"]["champion"]["macro_f1"] == 1.0  # the Azure champion, through its own endpoint
    champion_calls = [c for c in world["second_calls"] if c["endpoint"] == v1]
    assert len(champion_calls) == 8 and {c["authorization"] for c in champion_calls} == {f"Bearer pk-{v1}-secret"}
    assert _matching(world["second_requests"], "PUT", rf"/serverlessEndpoints/{v2}$")
    assert _matching(world["second_requests"], "DELETE", rf"/serverlessEndpoints/{v2}$")
    assert "endpoint" not in second and set(fake.serverless) == {v1}
    assert not [k for k in client.get_model_version(name, "2").tags if k.startswith("endpoint.")]
    with pytest.raises(ValueError):
        world["secret"](v2)
    assert str(client.get_registered_model(name).aliases["champion"]) == "1"


def test_the_endpoint_keys_are_nowhere_in_mlflow(world: dict[str, Any]) -> None:
    client, cfg = world["client"], world["cfg"]
    texts = []
    for run in client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id]):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for root in client.list_artifacts(run.info.run_id):
            texts.append(_artifact_text(client, run.info.run_id, root))
    for mv in client.search_model_versions(f"name='{cfg.registry.model_name}'"):
        texts.append(json.dumps(mv.tags))
    assert any("azure_job_name" in t for t in texts) and any("preflight" in t for t in texts)  # the scan saw the Azure records
    assert not [t for t in texts if "-secret" in t]


def test_the_endpoint_keys_are_not_in_the_prefect_logs(world: dict[str, Any]) -> None:
    APILogHandler().flush()
    logs: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=len(logs)):
            logs += [log.message for log in page]
    assert any("key in Secret block" in m for m in logs) and not [m for m in logs if "-secret" in m]


def test_a_failure_after_deploying_deletes_the_challengers_endpoint(world: dict[str, Any]) -> None:
    fake, client, name, third = world["fake"], world["client"], world["cfg"].registry.model_name, world["third"]
    v3 = endpoint_name_for(ENDPOINT, "3")
    assert third.is_failed() and "HTTP 503" in str(third.message) and "(after 5 attempts)" in str(third.message)
    assert 5 <= [c["endpoint"] for c in world["third_calls"]].count(v3) <= 4 * 5  # the requests in flight, no more
    assert fake.sent("DELETE", rf"/serverlessEndpoints/{v3}$") and set(fake.serverless) == {endpoint_name_for(ENDPOINT, "1")}
    assert not [k for k in client.get_model_version(name, "3").tags if k.startswith("endpoint.")]
    with pytest.raises(ValueError):
        world["secret"](v3)
    (run,) = client.search_runs([client.get_experiment_by_name(world["cfg"].registry.experiment).experiment_id],
                                f"tags.`prefect.flow_run_id` = '{third.state_details.flow_run_id}'")
    assert run.info.status == "FAILED"


def test_unchanged_data_and_config_cost_nothing_on_azure(world: dict[str, Any]) -> None:
    assert world["fourth"]["skipped"] and world["fourth"]["champion_version"] == "1"
    assert world["fourth_requests"] == []


def test_without_the_base_models_weights_the_candidate_stays_challenger_and_says_why(world: dict[str, Any]) -> None:
    fifth, v4 = world["fifth"], endpoint_name_for(ENDPOINT, "4")
    evaluation, registered = fifth["evaluation"], fifth["registered"]
    assert evaluation["base"] == {} and evaluation["candidate"]["macro_f1"] == 1.0
    assert any(n.startswith("base model not evaluated: model.base_model") for n in evaluation["notes"])
    assert not registered["promoted"] and "[base model not evaluated: " in registered["reason"]
    tags = world["client"].get_model_version(world["cfg"].registry.model_name, "4").tags
    assert tags["phitune.promotion"] == registered["reason"]
    aliases = world["client"].get_registered_model(world["cfg"].registry.model_name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "4"}  # v3 never reached the gate
    assert world["fake"].sent("DELETE", rf"/serverlessEndpoints/{v4}$") and "endpoint" not in fifth


def test_configs_that_cannot_work_on_azure_fail_before_anything_is_paid_for() -> None:
    base = ROOT / "configs/phi3-mini-azure.yaml"
    with pytest.raises(ConfigError, match="served on Azure only"):
        check_azure_config(load_config(base, ["deployment.target=local"]))
    with pytest.raises(ConfigError, match="needs the model's logits"):
        check_azure_config(load_config(base, ["registry.promotion_metric=eval_loss"]))
    with pytest.raises(ConfigError, match="starts with a letter"):
        check_azure_config(load_config(base, ["deployment.endpoint_name=support_bot"]))
    check_azure_config(load_config(base, ["deployment.target=none"]))


def _artifact_text(client: MlflowClient, run_id: str, info: Any) -> str:
    if info.is_dir:
        return "".join(_artifact_text(client, run_id, child) for child in client.list_artifacts(run_id, info.path))
    local = client.download_artifacts(run_id, info.path)
    return Path(local).read_text(encoding="utf-8", errors="replace")


def test_endpoint_evaluation_retries_throttling_and_counts_filtered_prompts(world: dict[str, Any]) -> None:
    examples = load_examples(VALIDATION, 2)
    examples[0].messages[-2] = {"role": "user", "content": "THROTTLE once"}
    examples[1].messages[-2] = {"role": "user", "content": f"{BLOCKED} something"}
    v1 = endpoint_name_for(ENDPOINT, "1")

    got = evaluate_endpoint(examples, f"{world['url']}/{v1}", api_key=f"pk-{v1}-secret", max_new_tokens=8)

    assert got.filtered == [1] and got.replies[1] == "" and got.replies[0].startswith("Category: billing")
    assert [c["body"]["messages"][-1]["content"] for c in world["calls"]].count("THROTTLE once") == 2
    with pytest.raises(EndpointError, match="HTTP 401") as err:
        evaluate_endpoint(examples[:1], f"{world['url']}/{v1}", api_key="wrong", max_new_tokens=8)
    assert "wrong" not in str(err.value)


def test_endpoint_names_fit_azure_rules() -> None:
    assert endpoint_name_for("phitune-phi3-mini-ft", "12") == "phitune-phi3-mini-ft-v12"
    name = endpoint_name_for("a-very-long-endpoint-name-for-the-support-bot", "123")
    assert len(name) == 32 and name.endswith("-v123") and "--" not in name
