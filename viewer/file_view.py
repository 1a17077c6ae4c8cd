"""`bpfprof view FILE...`: profiles recorded elsewhere, served on loopback as the pages `record --format html` writes.

    GET /              the only profile's page, or a list of them
    GET /profile/<n>   the page of the n-th profile (0-based, in the order given)

Pages are rendered once, at start: the server only hands out bytes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from exporters.http_server import BoundedHttpServer, HttpLimits, serve_in_thread
from exporters.profile import Profile
from viewer.report import encode_html
from viewer.web import Reply, make_handler

_PAGE = re.compile(r"^/profile/(\d+)/?$")


class FileApi:
    """Routes of `view`: one page per profile, and an index."""

    def __init__(self, profiles: Sequence[tuple[str, Profile]]) -> None:
        self.names = [name for name, _ in profiles]
        self.pages = [encode_html(p, [("file", name)]) for name, p in profiles]

    def _index(self) -> bytes:
        items = "".join(f'<li><a href="/profile/{i}">{html.escape(n)}</a></li>' for i, n in enumerate(self.names))
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>bpfprof view</title></head>'
                f"<body><h1>bpfprof view</h1><ul id=\"profiles\">{items}</ul></body></html>").encode()

    def handle(self, target: str) -> Reply:
        path = urlsplit(target).path
        if path == "/":
            return Reply(200, self.pages[0] if len(self.pages) == 1 else self._index(), "text/html; charset=utf-8")
        m = _PAGE.match(path)
        if m and int(m.group(1)) < len(self.pages):
            return Reply(200, self.pages[int(m.group(1))], "text/html; charset=utf-8")
        return Reply(404, f"no such page: {path}\n".encode(), "text/plain; charset=utf-8")


def start_view(profiles: Sequence[tuple[str, Profile]], host: str, port: int) -> BoundedHttpServer:
    """A started server of the profiles' pages (OSError if the address cannot be bound)."""
    return serve_in_thread(make_handler(FileApi(profiles)), host, port, HttpLimits(request_timeout_s=60.0), "view")
