"""Log hygiene: API keys never reach a log line.

Browsers pass the key as `?token=KEY` (they cannot set headers on a websocket), and uvicorn logs each
websocket handshake and HTTP request with its query string. `redact_tokens()` installs a filter on
uvicorn's loggers that rewrites `token=...` to `token=***` before any handler formats the record.
"""

from __future__ import annotations

import logging
import re

_TOKEN = re.compile(r"((?:[?&]|\b)(?:token|api_key|key)=)[^&\s\"']+", re.IGNORECASE)
LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn", "casa.server", "casa.session")


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _TOKEN.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_tokens() -> None:
    """Idempotent: add the filter to uvicorn's and our loggers once."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
