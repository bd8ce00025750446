"""A small event emitter with the seed's event names; every event is also logged."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["EVENTS", "EventEmitter", "logger"]

logger = logging.getLogger("singleton_integrations")

#: The seed's events, then ``renewed`` and ``lost`` which renewal adds.
EVENTS = ("locking", "locked", "conflict", "expired", "releasing", "released", "error", "renewed", "lost")

_LEVELS = {"error": logging.ERROR, "lost": logging.WARNING, "expired": logging.WARNING, "renewed": logging.DEBUG,
           "locking": logging.DEBUG, "releasing": logging.DEBUG}

Handler = Callable[[Any], object]


class EventEmitter:
    """``on(event, handler)``: handlers get a message string (``error`` gets the exception)."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {event: [] for event in EVENTS}
        self._handlers_guard = threading.Lock()

    def on(self, event: str, handler: Handler) -> Handler:
        """Call ``handler`` on each ``event``; returns it, so this works as a decorator factory's target."""
        self._check(event, handler)
        with self._handlers_guard:
            self._handlers[event].append(handler)
        return handler

    def once(self, event: str, handler: Handler) -> Handler:
        """Call ``handler`` on the next ``event`` only."""
        self._check(event, handler)

        def wrapper(payload: Any) -> None:
            self.off(event, wrapper)
            handler(payload)

        return self.on(event, wrapper)

    def off(self, event: str, handler: Handler) -> None:
        """Stop calling ``handler``; unknown handlers are ignored."""
        self._check(event, handler)
        with self._handlers_guard:
            if handler in self._handlers[event]:
                self._handlers[event].remove(handler)

    def emit(self, event: str, payload: Any, name: str) -> None:
        """Log ``payload`` and hand it to the handlers.

        A callable payload is a message built only if someone listens: the
        acquire and release paths are hot and usually unobserved.
        """
        level = _LEVELS.get(event, logging.INFO)
        handlers = self._handlers[event]
        logged = logger.isEnabledFor(level)
        if not handlers and not logged:
            return
        if callable(payload):
            payload = payload()
        if logged:
            if event == "error":
                logger.log(level, "%s: %s", name, payload)
            else:
                logger.log(level, "%s", payload, extra={"singleton_event": event, "singleton_name": name})
        with self._handlers_guard:
            handlers = list(handlers)
        for handler in handlers:
            try:
                handler(payload)
            except Exception:  # a broken handler must not break locking
                logger.exception("handler %r for %r event on lock %r failed", handler, event, name)

    @staticmethod
    def _check(event: str, handler: object) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; events are: {', '.join(EVENTS)}")
        if not callable(handler):
            raise TypeError(f"an event handler must be callable, not {type(handler).__name__}")
