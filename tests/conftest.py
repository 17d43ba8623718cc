"""Test session set-up: offline, quiet, with tiny architecture-true models built once per session."""

import os
import socket

# Before anything imports huggingface_hub/gradio: no network, no telemetry, and a local "Hub".
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if not os.environ.get("HF_ENDPOINT", "").startswith("http://127.0.0.1"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = ["tests.hub_server"]


@pytest.fixture(autouse=True)
def _no_amx(monkeypatch):
    """The CPU default's dtype depends on the CPU (bf16 around int8 where it has AMX, float32 elsewhere):
    tests run the float32 one on every machine, so that figures and answers do not depend on where they
    run. `tests/test_quantize.py` sets both on purpose."""
    from mmft import quantize

    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny CLIP + Phi-3 + tokenizer, written with save_pretrained (shared, read-only by convention)."""
    from mmft.testing import build_tiny_models

    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_models(folder)
    return folder


@pytest.fixture
def tiny_config(tiny_dir):
    """A fresh MMFTConfig (patch mode) naming the session's tiny models."""
    from mmft.config import MMFTConfig

    return MMFTConfig(lm_model_id=str(tiny_dir / "lm"), vit_model_id=str(tiny_dir / "clip"),
                      vit_feature_mode="patch", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      gen_max_new_tokens=12, prompt_max_question_tokens=64, prompt_max_answer_tokens=64)


@pytest.fixture
def tiny_model(tiny_config):
    """A trainable tiny model (LoRA freshly initialised, projector random), fp32 on CPU."""
    from mmft.loading import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config, device="cpu", dtype=torch.float32, trainable=True)
    _randomise_lora(model)
    return model


def _randomise_lora(model):
    """LoRA B starts at zero (adapter = identity); make it non-zero so on/off is observable."""
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
