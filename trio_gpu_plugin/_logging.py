"""Log output: text for people, or one JSON object per line for log pipelines; and
:class:`Reminder`, which keeps a condition that lasts (no driver, a socket another
process holds) to one line and a reminder now and then instead of a line per retry."""

from __future__ import annotations

import json
import logging
import time
from typing import Final, Literal

import trio

__all__ = ["REMINDER_INTERVAL", "JsonFormatter", "Reminder", "configure_logging"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: How often a condition that lasts is logged again, in seconds.  Retries back off to
#: every 30 s at most, so a line per retry is ~2,900 lines a day for a node without a
#: driver; every 10 minutes is 144, and still shows within one scroll of ``kubectl logs``
#: that the condition goes on.
REMINDER_INTERVAL: Final = 600.0


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (RFC 3339, UTC), ``level``, ``logger``,
    ``message``, and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Route the root logger to stderr at ``level`` in ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Reminder:
    """When to log a condition that lasts: once when it begins, then at most every
    ``interval`` seconds (trio time) while it lasts.

    A condition is known by a ``key`` (its text, say): :meth:`due` with another key is
    a new condition, logged at once.  :meth:`clear` when the condition is over, so that
    the next one is logged at once too.  Retries in between are for debug level.
    """

    def __init__(self, interval: float = REMINDER_INTERVAL) -> None:
        self.interval = interval
        self._key: str | None = None
        self._began = 0.0
        self._logged = 0.0

    def due(self, key: str) -> Literal["first", "reminder"] | None:
        """``"first"`` for a condition not logged yet, ``"reminder"`` when the last line
        about it is ``interval`` seconds old (and counts as logged now), else ``None``."""
        now = trio.current_time()
        if key != self._key:
            self._key, self._began, self._logged = key, now, now
            return "first"
        if now - self._logged >= self.interval:
            self._logged = now
            return "reminder"
        return None

    @property
    def active(self) -> bool:
        """Whether a condition is current (:meth:`due` was called since :meth:`clear`)."""
        return self._key is not None

    @property
    def lasted(self) -> float:
        """Seconds since the current condition began (0 when there is none)."""
        return 0.0 if self._key is None else trio.current_time() - self._began

    def clear(self) -> None:
        """The condition is over: the next :meth:`due` is a ``"first"``."""
        self._key = None
