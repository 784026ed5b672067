"""phitune: fine-tune small instruct LMs with LoRA, evaluate, register in MLflow, deploy and monitor.

This package is the Prefect-free core: it must run where Prefect is not installed (inside an Azure ML
job, on a bare GPU host under `accelerate launch`). The Prefect flows and tasks live in flows/ and tasks/.
"""

__version__ = "0.1.0"
