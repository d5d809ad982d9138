"""Logging setup: text lines for people, or one JSON object per line (LOG_FORMAT=json) for pipelines;
and the redaction every record goes through, so no key, token or Authorization value is ever written.

JSON lines carry `ts`, `level`, `logger`, `message`, any fields the record was given as `extra`
(the access log gives `request_id`, `route`, `status`, `ms`, ...), and `exc` for a traceback.

Where redaction sits: a `logging.Filter` runs only for records made by the logger (or reaching the
handler) it is attached to — a filter on `gateway` does not see `gateway.edge.auth`'s records. So it is
attached twice over: to each logger that can carry request text (aiohttp's, asyncio's, every
`gateway.*` one, also those made after start-up: `install_redaction` sets a logger class that
attaches it as each is made), so that ANY handler — ours, pytest's caplog, an embedding host's —
gets the record already clean; and to our root handler, which catches every other library's
records too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime
from itertools import islice
from types import NoneType
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# what every LogRecord has: anything else on a record came from `extra`
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_FIRST_EXTRA = len(vars(logging.makeLogRecord({})))  # LogRecord sets its own attributes first, `extra` after
_PLAIN = frozenset({int, float, bool, NoneType})  # `extra` values that cannot hold a secret

REDACTED = "[redacted]"
# One pattern, one pass. Each branch is a label and then the secret, in the branch's one group;
# what comes before the group is kept. Every branch starts with a plain literal (no flag, group or
# lookbehind first), so the engine skips every position whose character starts none of them: a
# line with no secret costs about a microsecond.
#   An Authorization (or api-key) header's whole value, to the end of the line or quote: a key
#     split by a control character (`gwk_abc\x01def`, as aiohttp's parser errors print it) is
#     still one value. Header names as clients send them: `Authorization` or (HTTP/2) lowercase.
#   A `Bearer` credential anywhere (an obs-fold continuation line carries it without its header).
#   `token=`, `access_token=`, `key=`, `api_key=`, `secret=`, `password=` values (query strings,
#     form bodies) up to the next `&`, as whole names: `first_token=3.1ms` is a timing.
#   Our API keys anywhere (`gwk_` + base64url; a backslash escape inside still counts as the key).
#   JWTs: three base64url segments, the first a JSON object (`eyJ` is `{"`).
_HEADER_VALUE = r"[\"']?\s*:\s*[\"']?([^\n\"']+)"
_PARAM_VALUE = r"([^\s&\"']+)"
_SECRET = re.compile("|".join([
    *(name + _HEADER_VALUE for name in ("Authorization", "authorization", "AUTHORIZATION", "Api-Key", "api-key",
                                        "API-KEY")),
    *(scheme + r"\s+([^\s\"']+)" for scheme in ("Bearer", "bearer", "BEARER")),
    r"token=(?:(?<![\w-]token=)|(?<=access_token=)|(?<=refresh_token=)|(?<=id_token=))" + _PARAM_VALUE,
    r"key=(?:(?<![\w-]key=)|(?<=api_key=)|(?<=apikey=))" + _PARAM_VALUE,
    r"secret=(?:(?<![\w-]secret=)|(?<=client_secret=))" + _PARAM_VALUE,
    r"password=(?<![\w-]password=)" + _PARAM_VALUE,
    r"gwk_([^\s&\"',;]+)",
    r"eyJ[\w-]*\.[\w-]+\.[\w-]*",
]), re.ASCII)


def _mask(match: re.Match[str]) -> str:
    secret = match.lastindex  # the branch's group; a JWT's branch has none: all of it goes
    return (match.string[match.start():match.start(secret)] if secret else "") + REDACTED


def has_secret(text: str) -> bool:
    """Whether `redact` would change `text` (one scan, no copy)."""
    return _SECRET.search(text) is not None


def redact(text: str) -> str:
    """`text` with every secret replaced by `[redacted]` (the same object back when there is none)."""
    return _SECRET.sub(_mask, text)


# What a client could put in a log line to forge another, or to hide or recolour one: the C0 and C1
# controls (newline, carriage return, the ESC of ANSI sequences), DEL, the Unicode line and paragraph
# separators, and the bidirectional overrides and isolates that reorder what a terminal shows.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """`text` with each control character as a backslash escape (a newline as `\\n`, ESC as `\\x1b`,
    U+2028 as `\\u2028`), so that what a client sent stays on its own line and shows as sent; the
    same object back when there is none. Backslashes are left as they are. The usual text costs one
    `isprintable` pass (which every character escaped here fails)."""
    return text if text.isprintable() else _CONTROLS.sub(_escape, text)


def _clean(value: Any) -> Any:
    """An `extra` field redacted: a string, or the strings inside a dict, list or tuple (aiohttp's
    access log gives request headers as a dict); anything else as it is."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_clean(item) for item in value)
    return value


class RedactSecrets(logging.Filter):
    """Redacts a record in place before any handler formats it: the message (formatted once here, with
    its args), its `extra` fields, the traceback and stack text. A traceback that held a secret is
    kept only as redacted text (`exc_text`; formatters print it as they would their own), never as
    the exception object a formatter would render afresh.

    The hot path is the access line: its message and the string fields not already quoted in it are
    scanned in one pass (joined by newlines, which no pattern crosses); only a hit redacts them one
    by one."""

    _tracebacks = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = message, None
        fields = record.__dict__
        texts, others = [message], []
        for name, value in islice(fields.items(), _FIRST_EXTRA, None):  # `extra` comes after the standard ones
            if type(value) is str:
                # a field quoted in the message was scanned with it (only a `name=` can match alone and
                # not in context: `token=x` inside `first_token=x`)
                if "=" in value or value not in message:
                    texts.append(value)
            elif type(value) not in _PLAIN and name not in _STANDARD:
                others.append(name)  # a dict of headers, say: cleaned below
        if _SECRET.search("\n".join(texts)) is not None:
            record.msg = redact(message)
            others = [name for name in islice(fields, _FIRST_EXTRA, None) if name not in _STANDARD]
        for name in others:
            fields[name] = _clean(fields[name])  # replaces values only: no key added or removed
        if record.exc_info or record.exc_text:
            text = record.exc_text or self._tracebacks.formatException(record.exc_info)  # type: ignore[arg-type]
            record.exc_text = redact(text)
            if record.exc_text != text:
                record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        if not record.msg.isprintable():  # one record, one line: whatever a request put in the message
            record.msg = escape_controls(record.msg)
        return True


REDACT = RedactSecrets()  # stateless: one instance, so adding it again is a no-op
# the loggers that print what a client sent: aiohttp's server, access, client and web loggers (a
# malformed request's line or header, in the message and in the parser error's traceback) and
# asyncio's (an exception nobody retrieved)
REDACTED_LOGGERS = ("aiohttp.access", "aiohttp.client", "aiohttp.internal", "aiohttp.server", "aiohttp.web",
                    "aiohttp.websocket", "asyncio", "gateway")


def _redacted(name: str) -> bool:
    return name in REDACTED_LOGGERS or name.startswith("gateway.")


class _RedactingLoggers:
    """Marks the logger class `install_redaction` made: a logger of a redacted name gets the filter
    as it is made, so one made after start-up (a module imported late) is covered too."""


def install_redaction() -> None:
    """Attach the redaction to aiohttp's and asyncio's loggers and to every `gateway.*` logger: those
    that exist now (each module's, made when it was imported) and, through the logger class, every
    one made later. Idempotent."""
    manager = logging.root.manager
    base = manager.loggerClass or logging.getLoggerClass()
    if not issubclass(base, _RedactingLoggers):

        class RedactingLogger(base, _RedactingLoggers):  # type: ignore[valid-type,misc]
            def __init__(self, name: str, level: int | str = logging.NOTSET) -> None:
                super().__init__(name, level)
                if _redacted(name):
                    self.addFilter(REDACT)

        manager.setLoggerClass(RedactingLogger)
    ours = [name for name in manager.loggerDict if name.startswith("gateway.")]
    for name in (*REDACTED_LOGGERS, *ours):
        logging.getLogger(name).addFilter(REDACT)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line (orjson escapes newlines inside values)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # the redaction's text when it ran
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(out, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # e.g. an integer past 64 bits: still one line, still JSON
            return orjson.dumps({k: v if isinstance(v, str) else repr(v) for k, v in out.items()}).decode()


# Access lines wait in memory until this much is waiting, or this long after the first: one write
# for many lines instead of one per request
LINES_BUFFERED_BYTES = 64 * 1024
LINES_BUFFERED_S = 0.1


class GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler `configure_logging` installs: records as any StreamHandler writes them, plus
    `write_line` for lines the access logger formats itself (`direct_handler`), which are buffered:
    written when 64 KiB wait, at the latest 100 ms after the first, before any ordinary record (so
    the stream keeps the order lines were made in), and at exit (logging's shutdown flushes every
    handler: SIGTERM's graceful stop loses none)."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.setFormatter(JsonFormatter() if self.json else logging.Formatter(TEXT_FORMAT))
        self.addFilter(REDACT)
        self._lines: list[str] = []
        self._size = 0
        self._second = -1  # the second `_asctime` was formatted for
        self._asctime = ""

    def write_line(self, logger: str, message: str, fields: dict[str, Any] | None) -> None:
        """One INFO line of `logger`'s, formatted as this handler's formatter would format the record
        (`fields`: its `extra`, needed for JSON only). The caller has made it safe to print."""
        now = time.time()
        if self.json:
            out = {"ts": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), "level": "INFO",
                   "logger": logger, "message": message}
            if fields:
                out.update(fields)
            line = orjson.dumps(out, default=repr).decode() + "\n"
        else:
            second = int(now)
            if second != self._second:  # logging.Formatter.formatTime, once a second
                self._second, self._asctime = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = f"{self._asctime},{int((now - second) * 1000):03d} INFO {logger} {message}\n"
        lines = self._lines
        lines.append(line)
        self._size += len(line)
        if self._size >= LINES_BUFFERED_BYTES:
            self.write_lines()
        elif len(lines) == 1:
            try:
                asyncio.get_running_loop().call_later(LINES_BUFFERED_S, self.write_lines)
            except RuntimeError:  # no event loop to wake us: now
                self.write_lines()

    def write_lines(self) -> None:
        """Write what is buffered (a no-op when nothing is)."""
        if not self._lines:
            return
        with self.lock:  # type: ignore[union-attr]
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stderr: logging's own handlers drop lines too
                pass

    def emit(self, record: logging.LogRecord) -> None:
        self.write_lines()
        super().emit(record)

    def flush(self) -> None:
        self.write_lines()
        super().flush()


def direct_handler(logger: logging.Logger) -> GatewayHandler | None:
    """The handler an INFO line of `logger`'s may be handed to directly (`write_line`), skipping the
    record, its filters and its formatter: when the gateway's own root handler would be the only
    one to print it. Anything else listening (a test's caplog, an embedding host's handler, a level
    or filter set on the way) gets the ordinary record instead."""
    handler = _OWN_HANDLER
    if (handler is None or logging.root.handlers != [handler] or logger.handlers or not logger.propagate
            or handler.level > logging.INFO or not logger.isEnabledFor(logging.INFO) or len(logger.filters) > 1):
        return None
    return handler


_OWN_HANDLER: GatewayHandler | None = None


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root handler on stderr, in the chosen format, redacting every record that reaches it;
    warnings go through logging too. Like basicConfig, it leaves a root logger that already has
    handlers alone (an embedding host's)."""
    global _OWN_HANDLER
    handler = GatewayHandler(fmt)
    had_handlers = bool(logging.root.handlers)
    logging.basicConfig(level=level, handlers=[handler])
    if not had_handlers:
        _OWN_HANDLER = handler
    logging.captureWarnings(True)
    install_redaction()
