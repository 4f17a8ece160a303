"""Log hygiene: API keys and cookies never reach a log line, at any level.

Keys travel as `Authorization: Bearer KEY` or, from browsers (they cannot set websocket headers), as
`?token=KEY`. Uvicorn logs each request line with its query string, and at debug level the websocket
library logs every handshake header through uvicorn's logger. `install_redaction()` wraps the logging
record factory, so every record of every logger is redacted when it is created, before any filter,
handler or formatter sees it, whichever logger (or child logger) it comes from:
- `token=`, `api_key=`, `key=` query values;
- the values of `Authorization`, `Proxy-Authorization`, `Cookie` and `Set-Cookie` headers, in the
  forms they are logged in (`name: value`, `('name', 'value')`, `(b'name', b'value')`);
- any `Bearer ...` / `Basic ...` credential.
It is idempotent, and also adds a filter to uvicorn's and our loggers for records made elsewhere.
"""

from __future__ import annotations

import logging
import re

_TOKEN = re.compile(r"((?:[?&]|\b)(?:token|api_key|key)=)[^&\s\"']+", re.IGNORECASE)
_HEADER = re.compile(
    r"""((?:proxy-)?authorization|(?:set-)?cookie)(['"]?\s*(?::|,|=)\s*(?:b?['"])?)([^'"\r\n]*)""",
    re.IGNORECASE,
)
_SCHEME = re.compile(r"\b(Bearer|Basic|Digest)\s+[^\s'\",;]+", re.IGNORECASE)
LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn", "websockets", "casa.server", "casa.session")


def redact(text: str) -> str:
    text = _HEADER.sub(r"\1\2***", text)
    text = _SCHEME.sub(r"\1 ***", text)
    return _TOKEN.sub(r"\1***", text)


def _redact_record(record: logging.LogRecord) -> None:
    if getattr(record, "casa_redacted", False):
        return
    record.casa_redacted = True
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it for logging's own error handling
        return
    redacted = redact(message)
    if redacted != message:
        record.msg, record.args = redacted, ()


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_installed = False


def install_redaction() -> None:
    """Redact every log record from now on (process-wide, idempotent)."""
    global _installed
    if not _installed:
        _installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:  # type: ignore[no-untyped-def]
            record = previous(*args, **kwargs)
            _redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


redact_tokens = install_redaction  # the earlier name
