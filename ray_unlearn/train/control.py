"""The detached executor's control endpoint: ``forget --address`` without Ray in the client.

Attaching through Ray costs a client ``import ray`` (0.6-1.0 s of CPU on 2 cores) plus Ray's
connect and disconnect, for one call. So the run's detached executor
(:mod:`ray_unlearn.train.executor`) also answers two HTTP calls, served by a thread of its
own process with the standard library's ``http.server``:

* ``GET /v1/ping``: who it is (run id, storage root, instance) and the fields its forget
  takes (``forget_fields``: a client asks for no more than that); never waits on the engine.
* ``POST /v1/forget``: ``Executor.forget_request``'s arguments as a JSON object (``wait:
  false``: log the request durably and answer without executing it); answers its
  document (200), or an input error (422: the platform's ``ValueError`` / ``OSError``, with
  what a client needs to raise the same), a malformed call (400, 411, 413), a wrong or missing
  token (401), an executor failure (500).

It publishes where it listens in the run's storage (:data:`CONTROL_FILE` under the run's
folder): URL, a random bearer token (32 bytes) and an instance id, written atomically (the
storage's temp file + rename; on a local disk the file is 0600, as every file the storage
writes): whoever may read the run's storage may call it, the same trust as writing the
deletion log directly. The executor removes the file when it closes; a file left by a killed
executor names a closed port (connection refused at once) or, if the port was reused, a
server that does not answer the ping with this instance: :func:`find_executor` then answers
None and the client takes the Ray path.

The client half (:func:`find_executor`, :class:`ControlClient`) imports only the standard
library (and pyarrow's filesystems for an object-store root); this module imports neither
Ray nor the platform.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Under the run's folder (runs/<run id>/): RunLayout.executor_control names the same path
# (tests/train/test_control.py holds them equal; this module does not import the storage
# module, which imports pyarrow: 0.15 s a client does not need for a local root).
CONTROL_FILE = "executor/control.json"
# How long a client waits for the ping (connect + answer, seconds) before it takes the Ray
# path. A killed executor's port refuses at once; this bounds a host that drops packets (a
# client outside the cluster's network) and a reused port whose server never answers.
PING_TIMEOUT_S = 2.0
# Largest request body accepted (bytes): a million sample ids as JSON is ~8 MB.
MAX_BODY = 64 * 1024 * 1024
# The fields of POST /v1/forget: Executor.forget_request's parameters and their JSON types.
FORGET_FIELDS: dict[str, tuple[type, ...]] = {
    "storage": (str,),
    "owner_id": (str, type(None)),
    "sample_ids": (list, type(None)),
    "request_id": (str, type(None)),
    "deadline": (int, float, type(None)),
    "strategy": (str, type(None)),
    "wait": (bool,),
}


def control_path(run_id: str) -> str:
    """The control file's path relative to the storage root."""
    return f"runs/{run_id}/{CONTROL_FILE}"


class ExecutorInputError(ValueError):
    """Bad input found by the executor (an unknown owner, a strategy that does not fit the
    run, another storage root): the platform's ``ValueError`` raised there, with its message,
    the class it had (``remote_type``) and its ``problems`` list if it had one."""

    def __init__(self, message: str, remote_type: str = "ValueError", problems=None):
        super().__init__(message)
        self.remote_type = remote_type
        self.problems = problems


class ExecutorFailed(RuntimeError):
    """The executor failed on a request (not the input's fault), or stopped answering."""


class BadRequest(ValueError):
    """A malformed control call: its HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the server (in the executor's process) ------------------------------------------------


def check_forget_fields(body: Any) -> dict[str, Any]:
    """POST /v1/forget's JSON body as ``forget_request``'s arguments (``storage``: its
    first, ``storage_uri``; the others by name); raises
    :class:`BadRequest` (400) naming the field and what is allowed."""
    if not isinstance(body, dict):
        raise BadRequest(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FORGET_FIELDS))
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FORGET_FIELDS)}"
        )
    if "storage" not in body:
        raise BadRequest(400, "field storage (the client's storage root) is required")
    for name, value in body.items():  # an absent field is the executor's default
        types = FORGET_FIELDS[name]
        # bool is an int in Python: a valid value only where a bool is asked for (wait)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise BadRequest(400, f"field {name} must be {allowed}, got {json.dumps(value)}")
    ids = body.get("sample_ids")
    if ids is not None and not all(type(i) is int for i in ids):
        raise BadRequest(400, "field sample_ids must be a list of integer sample ids")
    return dict(body)


def error_document(e: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for an exception raised by ``forget_request``: the platform's
    input errors (``ValueError``, ``OSError``: what the Ray path re-raised in the client)
    are 422, with what the client needs to raise the same; anything else is the executor's
    failure, 500."""
    kind = f"{type(e).__module__}.{type(e).__qualname__}"
    if isinstance(e, ValueError):
        problems = getattr(e, "problems", None)
        return 422, {"error": str(e), "kind": "value", "type": kind, "problems": problems}
    if isinstance(e, OSError):
        return 422, {
            "error": str(e),
            "kind": "os",
            "type": kind,
            "errno": e.errno,
            "strerror": e.strerror,
            "filename": None if e.filename is None else str(e.filename),
        }
    return 500, {"error": f"{type(e).__name__}: {e}", "kind": "failure", "type": kind}


def _jsonable(o: Any) -> Any:
    """numpy scalars and arrays (without importing numpy) and sets, as JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, set | frozenset):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class _Handler(BaseHTTPRequestHandler):
    server: ControlServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("control %s: " + format, self.address_string(), *args)

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, default=_jsonable).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        want = f"Bearer {self.server.token}"
        if hmac.compare_digest(given.encode(), want.encode()):
            return True
        self.close_connection = True  # the body (if any) is left unread
        self._send(401, {"error": "missing or wrong bearer token (Authorization: Bearer ...)"})
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._authorized():
            return
        if self.path != "/v1/ping":
            self._send(404, {"error": f"no endpoint GET {self.path}; try GET /v1/ping"})
            return
        fields = list(FORGET_FIELDS)  # what this executor's forget takes (a newer client asks)
        self._send(
            200, {**self.server.identity, "instance": self.server.instance, "forget_fields": fields}
        )

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if not self._authorized():
            return
        if self.path != "/v1/forget":
            self.close_connection = True
            self._send(404, {"error": f"no endpoint POST {self.path}; try POST /v1/forget"})
            return
        try:
            fields = check_forget_fields(self._read_json())
        except BadRequest as e:
            self.close_connection = True
            self._send(e.status, {"error": str(e), "kind": "request"})
            return
        try:
            doc = self.server.forget(fields.pop("storage"), **fields)
        except Exception as e:  # answered as an HTTP error; the executor keeps serving
            if not isinstance(e, ValueError | OSError):
                log.exception("control: forget_request failed")
            self._send(*error_document(e))
            return
        self._send(200, doc)

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(400, f"Content-Length must be an integer, got {length!r}") from None
        if not 0 <= n <= MAX_BODY:
            raise BadRequest(413, f"the body must be 0-{MAX_BODY} bytes, got {n}")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(400, f"the body is not valid JSON: {e}") from None


class ControlServer(ThreadingHTTPServer):
    """The endpoint, answering in daemon threads. ``forget``: the executor's
    ``forget_request`` (it takes the executor's lock: one engine operation at a time, as
    through Ray); ``identity``: what the ping answers (run id, storage root, executor name)."""

    daemon_threads = True  # a call in progress never keeps the process alive

    def __init__(
        self, host: str, forget: Callable[..., dict[str, Any]], identity: dict[str, Any], port=0
    ):
        super().__init__((host, port), _Handler)
        self.forget = forget
        self.identity = dict(identity)
        self.token = secrets.token_hex(32)
        self.instance = uuid.uuid4().hex
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host  # an IPv6 literal
        return f"http://{host}:{port}"

    def record(self) -> dict[str, Any]:
        """What the control file holds."""
        return {**self.identity, "url": self.url, "token": self.token, "instance": self.instance}

    def start(self) -> ControlServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="control", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the socket (later connections are refused)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()


# -- the client (no Ray) -------------------------------------------------------------------


def read_control(storage_root: str, run_id: str) -> dict[str, Any] | None:
    """The run's control file under ``storage_root`` (absolute local path or URI), or None
    when there is none or it cannot be read as one."""
    rel = control_path(run_id)
    try:
        if "://" in storage_root and not storage_root.startswith("file://"):
            from ray_unlearn.platform.core.storage import Storage, StorageError

            try:
                raw = Storage(storage_root).read_bytes(rel)
            except StorageError:
                return None
        else:
            local = storage_root.removeprefix("file://")
            raw = (Path(local) / rel).read_bytes()
        doc = json.loads(raw)
    except (OSError, ValueError):  # absent, unreadable, or half a file from another writer
        return None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), str) for k in ("url", "token", "instance")
    ):
        return None
    return doc


class ControlClient:
    """Calls one executor's endpoint (``record``: its control file)."""

    def __init__(self, record: dict[str, Any]):
        parts = urlsplit(record["url"])
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"control URL {record['url']!r}: want http://host:port")
        self.record = record
        self.host, self.port = parts.hostname, parts.port
        self._headers = {"Authorization": f"Bearer {record['token']}"}
        self.ping: dict[str, Any] = {}  # the executor's answer to the ping, once alive()

    def accepts(self, field: str) -> bool:
        """Whether the executor (as its ping answered) takes ``field`` in a forget: one
        started from an older release takes no ``wait``, and would refuse it (400)."""
        return field in (self.ping.get("forget_fields") or ())

    def _call(self, method: str, path: str, body: Any, connect_timeout: float, timeout):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(timeout)  # None: a retraining may take minutes
            headers = dict(self._headers)
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
        finally:
            conn.close()

    def alive(self, run_id: str, storage_root: str, timeout: float = PING_TIMEOUT_S) -> bool:
        """Whether the executor named by the record answers the ping, as itself (same
        instance, run and storage root), within ``timeout`` seconds."""
        try:
            status, doc = self._call("GET", "/v1/ping", None, timeout, timeout)
        except (OSError, ValueError, http.client.HTTPException):
            return False
        if isinstance(doc, dict):
            self.ping = doc
        return (
            status == 200
            and isinstance(doc, dict)
            and doc.get("instance") == self.record["instance"]
            and doc.get("run_id") == run_id
            and str(doc.get("storage", "")).rstrip("/") == storage_root.rstrip("/")
        )

    def forget_request(self, storage_root: str, **fields: Any) -> dict[str, Any]:
        """``Executor.forget_request`` over HTTP: its document, or the error it raised."""
        body = {"storage": storage_root, **fields}
        try:
            status, doc = self._call("POST", "/v1/forget", body, PING_TIMEOUT_S, None)
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise ExecutorFailed(
                f"the run's executor at {self.record['url']} stopped answering during the "
                f"request ({type(e).__name__}: {e}); the request may be logged: see "
                "`ray-unlearn status`, or repeat it with the same --request-id"
            ) from None
        if status == 200:
            return doc
        raise remote_error(status, doc)


def remote_error(status: int, doc: Any) -> Exception:
    """The exception a client raises for an endpoint's error answer (see error_document)."""
    doc = doc if isinstance(doc, dict) else {}
    message = str(doc.get("error") or f"HTTP {status}")
    if status == 422 and doc.get("kind") == "value":
        return ExecutorInputError(message, doc.get("type", "ValueError"), doc.get("problems"))
    if status == 422 and doc.get("kind") == "os":
        if doc.get("errno") is not None:  # OSError(errno, ...) builds the same subclass
            return OSError(doc["errno"], doc.get("strerror") or message, doc.get("filename"))
        return OSError(message)
    return ExecutorFailed(f"the run's executor answered HTTP {status}: {message}")


def find_executor(storage_root: str, run_id: str) -> ControlClient | None:
    """A client of the run's executor if its control file is under ``storage_root`` and the
    executor answers as itself; None otherwise (the caller then attaches through Ray)."""
    record = read_control(storage_root, run_id)
    if record is None:
        return None
    try:
        client = ControlClient(record)
    except ValueError:
        return None
    return client if client.alive(run_id, storage_root) else None
