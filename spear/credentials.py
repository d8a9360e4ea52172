"""Credentials: how spear recognises them, and the one way it keeps them out of what it prints,
logs, sends with a job or writes into outputs.

Recognition is by pattern, never by a fixed list of variables, so every object store's keys are
covered (AWS, Azure, GCS, MinIO, a token for the hub):

* a **name** (environment variable, config key, URL query parameter, ``NAME=VALUE`` text) is a
  credential's when one of its words ends in KEY, SECRET, TOKEN, PASSWORD, PASSWD, CREDENTIAL,
  AUTH, SAS, SIGNATURE or PRIVATE (plural too), case-insensitive: ``AZURE_STORAGE_ACCOUNT_KEY``,
  ``AWS_SESSION_TOKEN``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``apiKey``, ``X-Amz-Signature``;
  not ``tokenize`` or ``token_mixing=true`` (a word must end in the marker, and a flag or a
  number is no credential);
* a **value** holds one when it has URL user info (``https://user:pass@host``), a signature or
  token query parameter (``?sig=``, ``X-Amz-Signature=``, ``X-Goog-Credential=``, ``token=``), a
  connection string's ``AccountKey=`` / ``SharedAccessSignature=``, or a PEM private key.

:func:`redact` masks structured data (reports, metadata, a config), :func:`redact_text` free
text (console lines, log records; it also masks the values of this process's credential
variables), :func:`install_log_redaction` every log record of the process.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
MARKERS = (
    "KEY",
    "SECRET",
    "TOKEN",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "AUTH",
    "SAS",
    "SIGNATURE",
    "PRIVATE",
)
# Query parameters that carry a signature without a marker word in their name (Azure SAS).
_QUERY_NAMES = frozenset({"sig"})
# Values of the process's credential variables shorter than this are not masked in text: "1",
# "true" or a region would turn every line into asterisks, and are no secret.
_MIN_SECRET_LEN = 8

_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_MARKER_END = re.compile(rf"(?:{'|'.join(MARKERS)})S?$")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/\s@?#]+)@")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&#\s;\"']*)")
# NAME=VALUE in free text (an --env option, a connection string's AccountKey=...). Not
# "NAME: VALUE": prose names variables that way ("AWS_SECRET_ACCESS_KEY: not sent").
_ASSIGN = re.compile(
    r"(?P<name>\b[A-Za-z_][A-Za-z0-9_.-]*)(?P<op>=)(?P<value>\"[^\"]*\"|'[^']*'|[^\s;,&\"']+)"
)
_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
)
# Values that are settings, not secrets: RAY_AUTH_MODE=disabled, token_mixing=true, a count.
_PLAIN = re.compile(
    r"^(?:true|false|yes|no|on|off|none|null|disabled|enabled|token|\*\*\*|[-+]?[0-9][0-9.e+-]*)$",
    re.I,
)


@functools.lru_cache(maxsize=4096)  # every log record asks it of every variable's name
def is_credential_name(name: str) -> bool:
    """Whether ``name`` (a variable, key, option or query parameter) names a credential."""
    if name.lower() in _QUERY_NAMES:
        return True
    return any(_MARKER_END.search(w.upper()) for w in _WORD.findall(name))


def _mask_query(m: re.Match[str]) -> str:
    if m["value"] and is_credential_name(m["name"]):
        return f"{m['sep']}{m['name']}={MASK}"
    return m.group(0)


def _mask_assign(m: re.Match[str]) -> str:
    value = m["value"].strip("\"'")
    if not is_credential_name(m["name"]) or not value or _PLAIN.match(value):
        return m.group(0)
    return f"{m['name']}{m['op']}{MASK}"


def _mask_patterns(text: str) -> str:
    text = _PEM.sub(MASK, text)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY.sub(_mask_query, text)
    return _ASSIGN.sub(_mask_assign, text)


def has_credential(value: str) -> bool:
    """Whether the text ``value`` holds something credential-like (URL user info, a signature
    parameter, ``KEY=...``, a private key)."""
    return _mask_patterns(value) != value


def secret_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The credential variables of ``env`` (default: this process's environment) that are set."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if v and is_credential_name(k)}


def redact_text(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with credentials masked: the patterns of :func:`has_credential`, and the value
    of every credential variable set in ``env`` (default: this process's environment)."""
    values = sorted(
        (v for v in secret_env(env).values() if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True
    )
    for v in values:
        text = text.replace(v, MASK)
    return _mask_patterns(text)


def redact(obj: Any, *, by_name: bool = True) -> Any:
    """A copy of ``obj`` (plain data: dicts, lists, strings, numbers) fit to print or write:
    a string under a credential key becomes ``***``, credential parts of other strings are
    masked (:func:`has_credential`). Deterministic (no environment lookup), so two runs that
    differ only in a credential redact the same. ``by_name=False`` masks by value only: for
    data whose keys are spear's own names of ids and settings (a run record's ``token_run``
    is an id, not a token), where a credential can only arrive inside a value (a signed URL)."""
    if isinstance(obj, Mapping):
        return {
            k: MASK
            if by_name and isinstance(v, str) and v and is_credential_name(str(k))
            else redact(v, by_name=by_name)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v, by_name=by_name) for v in obj]
    if isinstance(obj, str):
        return _mask_patterns(obj)
    return obj


def _redacting_factory(base: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it itself when it formats
            return record
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    factory.spear_redacts = True  # type: ignore[attr-defined]
    return factory


def install_log_redaction() -> None:
    """Mask credentials in every log record this process creates, whichever logger or handler
    (spear's, Ray's, a test's) it goes to; idempotent. Also Ray workers' setup hook."""
    base = logging.getLogRecordFactory()
    if not getattr(base, "spear_redacts", False):
        logging.setLogRecordFactory(_redacting_factory(base))
