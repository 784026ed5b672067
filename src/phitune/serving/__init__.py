"""Serving: the OpenAI-compatible local server, endpoint processes (blue/green), the vLLM command, the bench."""
