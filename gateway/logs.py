"""Logging setup: text lines for people, or one JSON object per line (LOG_FORMAT=json) for pipelines.

JSON lines carry `ts`, `level`, `logger`, `message`, any fields the record was given as `extra`
(the access log gives `request_id`, `route`, `status`, `ms`, ...), and `exc` for a traceback.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# what every LogRecord has: anything else on a record came from `extra`
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line (orjson escapes newlines inside values)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(out, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # e.g. an integer past 64 bits: still one line, still JSON
            return orjson.dumps({k: v if isinstance(v, str) else repr(v) for k, v in out.items()}).decode()


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root handler on stderr, in the chosen format; warnings go through logging too.
    Like basicConfig, it leaves a root logger that already has handlers alone (an embedding host's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)
