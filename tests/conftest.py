"""Shared test set-up: every cache (synthetic data, text embeddings) goes to a per-session folder."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hlss-cache")
    old = os.environ.get("HLSS_CACHE")
    os.environ["HLSS_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield str(cache)
    if old is None:
        os.environ.pop("HLSS_CACHE", None)
    else:
        os.environ["HLSS_CACHE"] = old
