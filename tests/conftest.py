"""Fixtures shared by the test files; plain helper functions live in `tests/helpers/` (`helpers.models`:
tiny transformers references and their checkpoints, `helpers.train`: training stand-ins and runs). Test
files import helpers, never each other (the server tests' own helpers: `serve_helpers.py`)."""

from __future__ import annotations

import pytest
import torch

from helpers.models import TINY, write_layout


@pytest.fixture(params=list(TINY))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: palikit model} of each tiny reference, loaded from its Hub-layout folder on disk."""
    from palikit.weights.hf import load_hf_checkpoint

    out = {}
    for name in TINY:
        d = tmp_path_factory.mktemp(name)
        write_layout(name, "hub", d)
        out[name] = load_hf_checkpoint(d)
    return out


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: 1 intra-op thread is ~10x faster under contention
    (spinning OpenMP threads) and makes runs reproducible across processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random PaliGemma 2 checkpoint in the Hub layout (a file's own `ckpt` fixture overrides it)."""
    from palikit.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), family="pg2")


@pytest.fixture(scope="module")
def pg(ckpt):
    """`PaliGemma` on `ckpt`, on the CPU (a file's own `pg` fixture overrides it)."""
    from palikit.api import PaliGemma

    return PaliGemma.from_pretrained(ckpt, device="cpu")
