"""The Azure backend: fine-tune on Azure AI Foundry / Azure ML, serve on serverless endpoints (and delete them).

Prefect-free and importable where only azure-ai-ml is installed. One small module per concern:

- `client`: MLClient + ARM client construction (DefaultAzureCredential unless one is injected).
- `errors`: Azure errors turned into one-line PhituneErrors.
- `preflight`: everything checked before anything is uploaded or paid for, plus the cost drivers.
- `data_assets`: training files as data assets named by content digest (uploaded once).
- `finetune`: submit the serverless (or managed-compute) fine-tuning job, poll it, read its result.
- `endpoints`: serverless endpoints (deploy, keys, delete).

Importing this package does not import azure-ai-ml (2-3 s); the submodules do.
"""
