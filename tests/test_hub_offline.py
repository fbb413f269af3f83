"""Without a network, a Hub id that is not cached is one quick ``forgetless: error:`` line
(huggingface_hub would otherwise retry each request for ~25 s with a warning per retry), and
huggingface_hub is put in offline mode so cached files load without retries."""

from __future__ import annotations

import socket
import time

import pytest
from huggingface_hub import constants

from forgetless.errors import ForgetlessError
from forgetless.models import resolve_model


def _no_network(*args, **kwargs):
    raise OSError("Name or service not known")


def test_uncached_hub_id_without_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # undone after the test, whatever the code sets
    started = time.perf_counter()
    with pytest.raises(ForgetlessError, match="cannot be reached"):
        resolve_model("nobody/no-such-model")
    assert time.perf_counter() - started < 2
    assert constants.HF_HUB_OFFLINE  # later requests in this process do not retry either


def test_cached_hub_id_without_network_passes_through(monkeypatch, tmp_path):
    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # undone after the test, whatever the code sets
    assert resolve_model("someone/tiny") == "someone/tiny"
