"""A Ray Serve span exporter for `recsae bench profile`: every span Ray Serve records (the proxy's request, its routing,
the replica's handling) as one JSON line [trace id, name, start ns, end ns] in a per-process file under
$RECSAE_PROFILE_SPANS. Ray imports it in each of its processes when started with

    RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=service.tracing:span_lines  RECSAE_PROFILE_SPANS=/some/folder

Kept apart from the profile itself so that Ray's processes import only this and OpenTelemetry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

SPANS_ENV = "RECSAE_PROFILE_SPANS"
EXPORTER = "service.tracing:span_lines"


class SpanLines(SpanProcessor):
    """Writes each ended span as one line, unbuffered past the line (a replica may be killed without a flush)."""

    def __init__(self, path: Path) -> None:
        self.out = path.open("a", buffering=1)

    def on_end(self, span: ReadableSpan) -> None:
        context: Any = span.get_span_context()
        self.out.write(json.dumps([f"{context.trace_id:032x}", span.name, span.start_time, span.end_time]) + "\n")

    def shutdown(self) -> None:
        self.out.close()


def span_lines() -> list[SpanProcessor]:
    """The exporter Ray calls (it takes no arguments): one file per process."""
    folder = Path(os.environ[SPANS_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    return [SpanLines(folder / f"spans-{os.getpid()}.jsonl")]
