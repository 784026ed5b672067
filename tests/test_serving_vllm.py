"""The vLLM command for a GPU host; starting it runs only where vLLM is installed."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from phitune.errors import EndpointError
from phitune.serving.endpoints import free_port, start_process, stop_process, wait_healthy
from phitune.serving.vllm import max_lora_rank, vllm_available, vllm_command


def adapter(tmp_path: Path, r: int) -> Path:
    folder = tmp_path / f"adapter-r{r}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}), encoding="utf-8")
    return folder


def test_command_serves_the_adapter_as_a_named_lora_module(tmp_path: Path) -> None:
    cmd = vllm_command("/models/phi-3-mini", adapter(tmp_path, 16), "phitune-support", host="0.0.0.0", port=8001,
                       max_new_tokens=256, max_batch_size=8)
    assert cmd[:3] == ["vllm", "serve", "/models/phi-3-mini"]
    assert cmd[cmd.index("--lora-modules") + 1] == f"phitune-support={tmp_path / 'adapter-r16'}"
    assert "--enable-lora" in cmd
    pairs = {cmd[i]: cmd[i + 1] for i in range(3, len(cmd) - 1) if cmd[i].startswith("--") and not cmd[i + 1].startswith("--")}
    assert pairs["--max-lora-rank"] == "16" and pairs["--host"] == "0.0.0.0" and pairs["--port"] == "8001"
    assert pairs["--max-num-seqs"] == "8"
    assert json.loads(pairs["--override-generation-config"]) == {"max_new_tokens": 256}
    assert not any("key" in part.lower() for part in cmd)  # the API key travels in VLLM_API_KEY, never in argv


@pytest.mark.parametrize(("rank", "flag"), [(4, 8), (8, 8), (16, 16), (24, 32), (64, 64), (300, 320)])
def test_lora_rank_is_rounded_up_to_what_vllm_accepts(rank: int, flag: int) -> None:
    assert max_lora_rank(rank) == flag


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="cannot read the LoRA rank"):
        vllm_command("base", tmp_path, "x")
    with pytest.raises(EndpointError, match="no '='"):
        vllm_command("base", adapter(tmp_path, 8), "a=b")
    with pytest.raises(EndpointError, match="above what vLLM serves"):
        max_lora_rank(1024)


@pytest.mark.skipif(vllm_available() is None, reason="vLLM is not installed here (it needs a CUDA GPU host: pip install vllm)")
def test_vllm_serves_the_adapter(tmp_path: Path, tiny_chatml: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chatml), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert torch.cuda.is_available(), "vLLM is installed but no CUDA device is visible"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "vllm.log"
    proc = start_process(vllm_command(tiny_chatml, tmp_path / "adapter", "tiny-lora", port=port, max_new_tokens=16), log,
                         env={"VLLM_API_KEY": "k"})
    try:
        wait_healthy(url, proc, 600, log)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert "tiny-lora" in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens >= 1
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key is enforced
    finally:
        stop_process(proc.pid)
