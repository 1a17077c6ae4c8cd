"""A Python app instrumented with the OpenTelemetry SDK, for `bpfprof serve`'s end-to-end test.

    traced_app.py LIBSPIN ENDPOINT

Spans carry thread.id = the kernel thread id (threading.get_native_id()) and the
resource carries process.pid, so the viewer can cut a native CPU profile of this
process to a span. The slow span runs spin_inside_span; spin_outside_span runs
outside every span, on the same thread, before and after.
"""

import ctypes
import os
import sys
import threading
import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def main() -> None:
    lib = ctypes.CDLL(sys.argv[1])
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-app", "process.pid": os.getpid()}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[2])))
    tracer = provider.get_tracer("traced_app")
    thread = {"thread.id": threading.get_native_id(), "thread.name": threading.current_thread().name}
    print("ready", flush=True)
    sys.stdin.readline()  # the test says go once the profiler watches this process
    lib.spin_outside_span(800)
    with tracer.start_as_current_span("checkout", attributes=thread):
        with tracer.start_as_current_span("slow-query", attributes=thread):
            lib.spin_inside_span(1200)
        for _ in range(3):
            with tracer.start_as_current_span("fast-render", attributes=thread):
                time.sleep(0.01)
    lib.spin_outside_span(800)
    provider.shutdown()  # flushes the spans
    print("done", flush=True)


if __name__ == "__main__":
    main()
