"""Shared fixtures: tiny random-weight models of every supported family, built once per session."""
from __future__ import annotations

import pytest
import torch

from vlmprune.models.tiny import FAMILIES, build_tiny


@pytest.fixture(scope="session")
def tiny():
    """``tiny(family) -> (model, make_inputs)``, seeded, cached for the session (do not mutate)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny(family, seed=0)
        return cache[family]

    torch.manual_seed(0)
    return get


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Parametrises a test over the five families."""
    return request.param
