"""Test setup (offline hub, the Triton interpreter without a GPU) and shared fixtures.
Plain helpers live in helpers.py."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # before any test imports triton: it reads this once
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import FAMILIES, make_tiny_model, make_tiny_tokenizer  # noqa: E402


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def saved_tiny_model(tmp_path):
    """A tiny LLaMA GQA model + tokenizer saved as a HF folder; returns the path."""
    path = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path
