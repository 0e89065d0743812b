"""Suite-wide guards.

Offline is a promise, so every test runs with outbound connections refused: any code path that
tries the network (a hub download, telemetry) fails the test that reached it. Loopback stays open
for tests that run a local server.
"""

from __future__ import annotations

import socket

import pytest

import edgevlm  # noqa: F401  first: sets onnxruntime's telemetry opt-out before any test module imports it


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address, *args, **kwargs):  # type: ignore[no-untyped-def]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or "/" in host):
            return real_connect(self, address, *args, **kwargs)
        raise NetworkAccessError(f"test tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
