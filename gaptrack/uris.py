"""Tracking URIs: checked before use, shown without credentials, and whether a
server answers.

A malformed URI is one :class:`TrackingURIError` naming it and what is accepted;
every URI and failure message that gaptrack shows or writes to disk has its
``user:password@`` part removed (MLflow reads credentials from its own
environment variables, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``).
"""

import os
import re
import urllib.error
import urllib.parse
import urllib.request


class TrackingURIError(ValueError):
    """The tracking URI is malformed or names nothing; the message says what is accepted."""


_URI_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                "databricks")
_CREDENTIALS = re.compile(r"(//)[^/@\s]+@")


def check_tracking_uri(uri):
    """Raise :class:`TrackingURIError` unless ``uri`` has a form MLflow can use.

    Accepted: ``http(s)://host[:port]``, ``sqlite:///path``,
    ``postgresql://...``/``mysql://...``/``mssql://...`` (with an optional
    ``+driver``), ``file:...`` and ``databricks``. Whether the server answers is
    not checked here: an unreachable server is spooled for, not refused.
    """
    parts = urllib.parse.urlsplit(uri or "")
    scheme = "databricks" if uri == "databricks" else parts.scheme.split("+")[0]
    accepted = ("accepted: http(s)://host:port, sqlite:///path/to/mlflow.db, "
                "postgresql://user@host/db (or mysql, mssql), file:/path, databricks")
    if scheme not in _URI_SCHEMES:
        raise TrackingURIError(f"tracking URI {redact_uri(uri)!r} has no usable scheme; {accepted}")
    if scheme in ("http", "https") and not parts.hostname:
        raise TrackingURIError(f"tracking URI {redact_uri(uri)!r} names no host; {accepted}")
    if scheme == "sqlite" and not parts.path.strip("/"):
        raise TrackingURIError(f"tracking URI {redact_uri(uri)!r} names no database file; "
                               f"{accepted}")


def redact_uri(uri):
    """``uri`` without a ``user:password@`` part."""
    parts = urllib.parse.urlsplit(uri or "")
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _http_status(exc):
    response = getattr(exc, "response", None)  # requests' HTTPError (file uploads)
    if getattr(response, "status_code", None):
        return int(response.status_code)
    getter = getattr(exc, "get_http_status_code", None)
    try:
        return int(getter()) if getter else None
    except (TypeError, ValueError):
        return None


_REQUEST = re.compile(r"API request to \S+ failed")
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^\"')]+)")


def _network_reason(exc):
    """Why a request got no HTTP answer, in a few words (``None``: it got one).
    MLflow wraps ``requests``' exception, whose text is urllib3's retry report
    (a read timeout included, once MLflow's retries are off)."""
    import requests

    cause = exc.__cause__ or exc.__context__
    if not isinstance(cause, requests.exceptions.RequestException):
        return None
    if isinstance(cause, requests.exceptions.Timeout) or "timed out" in str(cause):
        return "no answer in time"
    errno = _ERRNO.search(str(cause))
    return errno.group(1) if errno else "no answer"


def describe_failure(exc):
    """One line on a failed request, without credentials; ``(text, permanent)``.

    A refusal (HTTP 4xx but 429) will not go away by retrying: bad or missing
    credentials, a deleted run. Anything else (connection refused, timeouts,
    5xx) may.
    """
    status = _http_status(exc)
    # MLflow's messages quote the request URL, credentials included.
    first_line = _CREDENTIALS.sub(r"\1", str(exc).splitlines()[0] if str(exc) else "")
    request, reason = _REQUEST.match(first_line), _network_reason(exc)
    if request and reason:
        return f"{request.group(0)}: {reason}", False
    text = f"{type(exc).__name__}: {first_line}"
    if status in (401, 403):
        return (f"the tracking server refused the request (HTTP {status}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to credentials "
                "it accepts", True)
    if status is not None and 400 <= status < 500 and status != 429:
        return f"the tracking server refused the request (HTTP {status}): {text}", True
    return text, False


def reachable(uri, timeout):
    """Whether an HTTP tracking server answers ``/health`` within ``timeout``
    seconds (non-HTTP stores are local: always)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


def open_client(tracking_uri=None, timeout=10.0):
    """An ``MlflowClient`` for ``tracking_uri`` (default: MLflow's current one),
    after checking that the URI is well formed, that an HTTP server answers and
    that a SQLite file exists: a wrong URI is one clear :class:`TrackingURIError`
    instead of minutes of retries or a new, empty store.

    Returns:
        ``(client, uri)``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    check_tracking_uri(uri)
    where = ("pass a running server or an existing store with --tracking-uri or "
             "MLFLOW_TRACKING_URI")
    if not reachable(uri, timeout=timeout):
        raise TrackingURIError(f"tracking server {redact_uri(uri)} is unreachable; {where}")
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        path = make_url(uri).database
        if path and path != ":memory:" and not os.path.exists(path):
            raise TrackingURIError(f"tracking store {uri} does not exist (no file {path}); "
                                   f"{where}")
    return MlflowClient(uri), uri
