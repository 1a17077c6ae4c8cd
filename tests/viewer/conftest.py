"""A `bpfprof serve` Server on port 0 with its store in tmp_path, and HTTP helpers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from viewer.config import ServeConfig
from viewer.server import Server


@pytest.fixture
def server(tmp_path):
    config = ServeConfig(grpc_addr=("127.0.0.1", 0), http_addr=("127.0.0.1", 0), ui_addr=("127.0.0.1", 0),
                         db_path=tmp_path / "serve.sqlite", max_request_bytes=1 << 20, retention_interval_s=3600)
    s = Server(config)
    s.start()
    yield s
    s.stop()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/x-protobuf", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get_json(url: str) -> dict:
    status, body, _ = get(url)
    assert status == 200, body
    return json.loads(body)
