"""Shared pytest fixtures. Each section is owned by one module; keep them delimited."""

from __future__ import annotations

from pathlib import Path

import pytest


# --- edgetune.model: tiny models, built once per session (hermetic: no cache across sessions) ---

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """`edgetune model tiny` (qwen2 arch, seed 0, pre-trained): ChatML, eos <|im_end|>, pad <|endoftext|>."""
    from edgetune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """`edgetune model tiny --arch llama` (seed 0, pre-trained): Llama 3 template, BOS, eos <|eot_id|>, untied head."""
    from edgetune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0)

# --- end edgetune.model ---
