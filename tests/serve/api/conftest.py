"""Fixtures of the API tests that use the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from loradock.serve.models.default_model import default_model_path


@pytest.fixture(scope="session")
def smollm_path(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, built once per session in the cache tests/conftest.py points at (set here as well:
    a module-scoped server starts before the function-scoped fixture that sets it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORADOCK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loradock-cache"))
        return default_model_path()
