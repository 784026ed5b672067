"""The `retire` flow: delete a fine-tuned model version (registry entry and artifacts).

Refused, with a clear message, while an endpoint still serves the version (as Azure AI Foundry refuses
to delete a model with a deployment) or while it is the champion. Same as `phitune retire NAME VERSION`.
"""

from __future__ import annotations

from prefect import flow

from phitune.config import PipelineConfig
from tasks.register import retire_version


@flow(name="retire", log_prints=True)
def retire(name: str, version: str, config: PipelineConfig = PipelineConfig()) -> str:
    """Delete registered model `name` version `version`; refused while served or champion."""
    return retire_version(config, name, str(version))
