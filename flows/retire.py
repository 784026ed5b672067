"""The `retire` flow: delete a fine-tuned model version (registry entry and artifacts).

Refused, with a clear message, while an endpoint still serves the version (as Azure AI Foundry refuses
to delete a model with a deployment) or while it is the champion. Same as `phitune retire NAME VERSION`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from phitune import registry
from phitune.config import PipelineConfig


@task(name="retire-version")
def retire_version(config: PipelineConfig, name: str, version: str) -> str:
    return registry.retire(name, version, registry.configure(config.registry).client)


@flow(name="retire")
def retire(name: str, version: str, config: PipelineConfig = PipelineConfig()) -> str:
    """Delete registered model `name` version `version`; refused while served or champion."""
    message = retire_version(config, name, str(version))
    get_run_logger().info(message)
    return message
