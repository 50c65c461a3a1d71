"""The serve tests' shared fixture: the scripted model (see scripted.py), trained once per session."""

from __future__ import annotations

import pytest

from scripted import train_scripted


@pytest.fixture(scope="session")
def scripted_model(qwen3, tmp_path_factory):
    return train_scripted(qwen3, tmp_path_factory.mktemp("scripted") / "m")
