"""Fixtures: a tiny random LLaMA with a small BPE tokenizer, saved as a local model folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep converted models and task files of the tests out of the user's cache."""
    os.environ["LLMTAILOR_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a random 4-block LLaMA (hidden 64, 4 heads, 2 KV heads) and its tokenizer."""
    from tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """The tiny model, loaded through llmtailor.models.load."""
    from llmtailor import models

    return models.load(str(tiny_model_dir))
