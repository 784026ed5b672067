"""End to end on the embedded default: what `make run` does, in a clean working folder.

SmolLM2-135M-Instruct really learns the sample task on the CPU; the run must end with a registered
champion that beats the base model, a comparison artifact, and a live endpoint answering chat.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from phitune.chat_client import chat_url
from phitune.registry import client_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    shutil.copytree(ROOT / "data", work / "data")
    shutil.copytree(ROOT / "configs", work / "configs")
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "pipeline.py"), "--config", "configs/demo-cpu.yaml"],
        cwd=work, env=env, capture_output=True, text=True, timeout=1500,
    )
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tracking_uri = f"sqlite:///{work}/.phitune/mlflow.db"
    yield {"work": work, "stdout": proc.stdout, "tracking_uri": tracking_uri}
    stop = subprocess.run(
        [sys.executable, "-m", "phitune.cli", "endpoint", "stop", "--all", "--config", "configs/demo-cpu.yaml"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    print("endpoint stop:", stop.returncode, stop.stdout, stop.stderr[-2000:])
    # Never leave a model server behind, whatever the CLI found.
    for version in client_for(tracking_uri).search_model_versions("name = 'phitune-support'"):
        for key, pid in version.tags.items():
            if key.startswith("endpoint.") and key.endswith(".pid"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGTERM)


def test_pipeline_registers_a_champion_that_beats_the_base_model(pipeline_run: dict) -> None:
    client = client_for(pipeline_run["tracking_uri"])
    champion = client.get_model_version_by_alias("phitune-support", "champion")
    metrics = client.get_run(champion.run_id).data.metrics
    # The fine-tuned adapter learned the task: clearly lower perplexity, clearly better labels.
    assert metrics["candidate_perplexity"] < 0.8 * metrics["base_perplexity"]
    assert metrics["candidate_macro_f1"] >= metrics["base_macro_f1"] + 0.2
    assert "champion" in pipeline_run["stdout"] and "endpoint" in pipeline_run["stdout"]


def test_the_champion_is_served_and_answers_in_the_learned_shape(pipeline_run: dict) -> None:
    version = client_for(pipeline_run["tracking_uri"]).get_model_version_by_alias("phitune-support", "champion")
    urls = [v for k, v in version.tags.items() if k.startswith("endpoint.") and k.endswith(".url")]
    assert urls, version.tags
    reply = httpx.post(
        chat_url(urls[0]),
        json={
            # No system prompt, like the curl line `make run` prints: a fifth of the sample data has none.
            "messages": [{"role": "user", "content": "I was charged twice for my Skylark subscription this month"}],
            "max_tokens": 24,
        },
        timeout=120,
    ).json()
    text = reply["choices"][0]["message"]["content"]
    assert text.startswith("Category: billing\nReply: "), json.dumps(reply)
