"""OpenTelemetry spans from oncely events (`pip install 'oncely[otel]'`).

    tracing = OpenTelemetrySubscriber()
    app.add_middleware(IdempotencyMiddleware, store=store, event_subscribers=[tracing])
    app.add_middleware(OpenTelemetryMiddleware)  # outside oncely: its span is the parent

Each claim and each completion becomes a span, `oncely.claim` / `oncely.complete`,
child of the span current when the event is emitted (the request span of an outer OTel
ASGI/WSGI middleware), timed from the store operation's start to the event. Rejections,
a lease lost while the handler runs, and client retries are span events on the current
span. Attributes: `oncely.outcome`, `oncely.store`, `oncely.attempt`,
`oncely.key_hash`, `http.request.method`, `http.route`, `http.response.status_code`.
A store failure sets the span status to ERROR.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from oncely._version import __version__
from oncely.core.events import EventKind, IdempotencyEvent
from oncely.instrumentation._phase import Phase, phase_of

__all__ = ["CLAIM_SPAN", "COMPLETE_SPAN", "OpenTelemetrySubscriber"]

CLAIM_SPAN = "oncely.claim"
COMPLETE_SPAN = "oncely.complete"
_SPAN_EVENTS = {
    EventKind.REJECTED: "oncely.rejected",
    EventKind.LEASE_LOST: "oncely.lease_lost",
    EventKind.CLIENT_RETRY: "oncely.client_retry",
}


class OpenTelemetrySubscriber:
    """An event subscriber that records spans with `tracer_provider` (default: the
    global one, so it follows whatever the app's OTel setup configured)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("oncely", __version__, tracer_provider=tracer_provider)

    def __call__(self, event: IdempotencyEvent) -> None:
        phase = phase_of(event)
        if event.kind is EventKind.REJECTED or phase is Phase.RENEWAL or phase is Phase.CLIENT:
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(_SPAN_EVENTS[event.kind], attributes_of(event))
            return
        end = time.time_ns()
        start = end if event.duration is None else end - int(event.duration * 1e9)
        span = self.tracer.start_span(
            CLAIM_SPAN if phase is Phase.DECISION else COMPLETE_SPAN,
            kind=SpanKind.INTERNAL,
            attributes=attributes_of(event),
            start_time=start,
        )
        if event.kind is EventKind.STORE_ERROR:
            span.set_status(Status(StatusCode.ERROR, f"idempotency store failed at {event.detail}"))
        span.end(end_time=end)


def attributes_of(event: IdempotencyEvent) -> dict[str, AttributeValue]:
    """The event as span attributes; absent values are left out (OTel refuses None)."""
    attributes: dict[str, AttributeValue] = {"oncely.outcome": event.kind.value}
    if event.store is not None:
        attributes["oncely.store"] = event.store
    if event.attempt is not None:
        attributes["oncely.attempt"] = event.attempt
    if event.key_hash is not None:
        attributes["oncely.key_hash"] = event.key_hash
    if event.method:
        attributes["http.request.method"] = event.method
    if event.route is not None:
        attributes["http.route"] = event.route
    if event.status is not None:
        attributes["http.response.status_code"] = event.status
    if event.detail is not None:
        attributes["oncely.detail"] = event.detail
    return attributes
