"""The README's span processor for Python services (NativeThreadIds): what the stock OpenTelemetry SDK
sends with it reaches the viewer as each span's kernel thread and process, the keys of the thread method.

The stock SDK puts neither on a span or its resource (no thread attribute; `process.pid` only from a
resource detector the SDK does not run by default); the processor is the one thing a user adds. The
processor tested is the README's snippet itself, run as written; the end-to-end test's fixture
(tests/fixtures/python/otel_spans.py) has the same class, checked here word for word.
"""

from __future__ import annotations

import os
import re
import textwrap
import threading
from pathlib import Path

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.viewer.conftest import get_json

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "python" / "otel_spans.py"


def _readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", readme, flags=re.S | re.M)
    return textwrap.dedent(next(b for _, b in blocks if "class NativeThreadIds" in b))


def _readme_processor() -> type:
    """NativeThreadIds as the README defines it (its last line adds it to the user's provider)."""
    code = "\n".join(line for line in _readme_snippet().splitlines() if not line.startswith("provider."))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (our own README's snippet)
    return namespace["NativeThreadIds"]


def _send(server, processor: object | None) -> dict[str, dict]:
    provider = TracerProvider(resource=Resource.create({"service.name": "py-threads"}))
    if processor is not None:
        provider.add_span_processor(processor)
    endpoint = f"http://127.0.0.1:{server.receiver.http_port}/v1/traces"
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    tracer = provider.get_tracer("t")
    tids = {}

    def work(name: str) -> None:
        tids[name] = threading.get_native_id()
        with tracer.start_as_current_span(name):
            pass

    work("main")
    t = threading.Thread(target=work, args=("worker",), name="worker-thread")
    t.start()
    t.join()
    provider.shutdown()
    spans = get_json(f"{server.ui_url}api/spans?service=py-threads")["spans"]
    return {s["name"]: {**s, "native_id": tids[s["name"]]} for s in spans}


def test_stock_sdk_spans_name_no_kernel_thread(server):
    spans = _send(server, None)
    assert set(spans) == {"main", "worker"}
    assert all(s["tid"] is None and s["pid"] is None for s in spans.values()), spans


def test_processor_gives_each_span_its_kernel_thread_and_process(server):
    spans = _send(server, _readme_processor()())
    assert set(spans) == {"main", "worker"}
    for s in spans.values():
        assert s["tid"] == s["native_id"] and s["pid"] == os.getpid(), s
    assert spans["main"]["tid"] != spans["worker"]["tid"]
    assert spans["worker"]["thread_name"] == "worker-thread"


def test_readme_snippet_is_the_end_to_end_fixtures_processor():
    snippet = _readme_snippet()
    cls = snippet[snippet.index("class NativeThreadIds"):].split("\n\n\n")[0].strip()
    assert cls in FIXTURE.read_text(), "README's NativeThreadIds differs from tests/fixtures/python/otel_spans.py's"
