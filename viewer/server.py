"""`bpfprof serve` as a library: store + OTLP receivers + web UI + retention, started and stopped together;
and `bpfprof view`'s: the same web UI over an in-memory store of profiles read from files."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from exporters.http_server import BoundedHttpServer, HttpLimits
from exporters.profile import Profile
from viewer import file_profiles
from viewer.assets import render_page
from viewer.config import ServeConfig
from viewer.receiver import OtlpReceiver, start_http
from viewer.store import Store
from viewer.web import Api, make_handler

log = logging.getLogger(__name__)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class Server:
    """`start()` binds everything (OSError if a port is taken), `stop()` closes it all, store last."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        render_page()  # fail before binding anything if the page's assets are missing
        self.store = Store(config.db_path, max_bytes=config.retention_bytes)  # the size cap holds at every write
        self.receiver = OtlpReceiver(self.store, config.grpc_addr, config.http_addr, config.max_request_bytes,
                                     config.http_limits)
        self.ui: BoundedHttpServer | None = None
        self._stop = threading.Event()
        self._retention = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        self.ui_port = 0

    @property
    def ui_url(self) -> str:
        return f"http://{_url_host(self.config.ui_addr[0])}:{self.ui_port}/"

    def start(self) -> None:
        self.receiver.start()
        try:
            self.ui = start_http(make_handler(Api(self.store, render_page)), *self.config.ui_addr, name="ui",
                                 limits=self.config.http_limits)
        except OSError:
            self.receiver.stop(0)
            raise
        self.ui_port = self.ui.port
        self._retention.start()

    def enforce_retention(self) -> dict[str, int]:
        return self.store.enforce_retention(self.config.retention_age_s, self.config.retention_bytes)

    def _retention_loop(self) -> None:
        while True:
            try:
                deleted = self.enforce_retention()
                if any(deleted.values()):
                    log.info("retention dropped %s", deleted)
            except Exception as e:  # noqa: BLE001  (retention must not stop serving)
                log.warning("retention failed: %s", e)
            if self._stop.wait(self.config.retention_interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self.ui is not None:
            self.ui.close()
        self.receiver.stop()
        if self._retention.is_alive():
            self._retention.join(timeout=5)
        self.store.close()


class FileViewer:
    """`bpfprof view`: profiles stored in memory under their names, served by serve's own UI (no receivers)."""

    def __init__(self, named: Sequence[tuple[str, Profile]]) -> None:
        render_page()  # ConfigError before loading anything if the page's assets are missing
        self.store = Store(":memory:")
        file_profiles.load(self.store, named)
        self.ui: BoundedHttpServer | None = None

    def start(self, host: str, port: int, limits: HttpLimits | None = None) -> str:
        """Binds (OSError if it cannot) and serves; returns the URL of the UI."""
        self.ui = start_http(make_handler(Api(self.store, render_page)), host, port, name="view",
                             limits=limits or ServeConfig.http_limits)
        return f"http://{_url_host(host)}:{self.ui.port}/"

    def stop(self) -> None:
        if self.ui is not None:
            self.ui.close()
        self.store.close()
