"""Shared fixtures: tiny seeded model directories and an offline guard.

Tests never touch the network: the hub is switched off and any socket connect to a non-loopback
address fails the test.
"""

from __future__ import annotations

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import mixq  # noqa: E402  (loads the fast BLAS before mlx)
import pytest  # noqa: E402

from mixq.core.synth import build_fixture  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost") \
            and not str(host).startswith("127."):
        raise RuntimeError(f"test tried to reach the network: {address}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory):
    """kind -> path of a freshly built fixture model (built once per session)."""
    root = tmp_path_factory.mktemp("fixtures")
    return {k: build_fixture(k, root / k, seed=0) for k in ("nemotron-dense", "nemotron-moe", "qwen3")}


@pytest.fixture(scope="session")
def nemotron_dense(fixture_models):
    return fixture_models["nemotron-dense"]


@pytest.fixture(scope="session")
def nemotron_moe(fixture_models):
    return fixture_models["nemotron-moe"]


@pytest.fixture(scope="session")
def qwen3(fixture_models):
    return fixture_models["qwen3"]
