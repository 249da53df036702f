"""Meilisearch node target: a real Meilisearch server reached over HTTP.

Writes are NDJSON bodies (gzip'd) kept under the node's payload limit; a batch counts as
committed only once every task it enqueued has ``succeeded``. 429, 5xx, connection errors and
timeouts are retried with exponential backoff and jitter until a retry budget runs out.

The API key comes from the environment variable the topology names; it is only ever put in
the ``Authorization`` header, never in a message, log line or ``repr``.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx
import msgspec

from miroir_pipeline.fleet.document_rules import depth_exceeds
from miroir_pipeline.fleet.routing import SHARD_FIELD
from miroir_pipeline.fleet.targets._settings import with_shard_filterable
from miroir_pipeline.fleet.targets.base import (
    DocumentsRefused,
    IndexNotFound,
    NodeTarget,
    PendingWrite,
    RefusedDocument,
    RequestRefused,
    TargetError,
    isolate_refused,
    send_guard,
)
from miroir_pipeline.fleet.topology import DEFAULT_PAYLOAD_LIMIT, Node

log = logging.getLogger(__name__)

__all__ = ["MeilisearchNode", "TaskFailed", "split_ndjson", "wait_healthy"]

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=60.0, pool=30.0)
_FIRST_POLL_S = 0.005
_MAX_POLL_S = 0.2
_FACET_VALUES_FLOOR = 1000
#: Task uids asked for per ``GET /tasks`` (keeps the query string short).
_TASKS_PER_POLL = 200


class TaskFailed(TargetError):
    """A Meilisearch task ended ``failed`` or ``canceled``; ``code`` is Meilisearch's error code."""

    def __init__(
        self,
        message: str,
        *,
        node_id: str,
        task_uid: int,
        code: str | None,
        node_message: str = "",
        batch_uid: int | None = None,
    ) -> None:
        super().__init__(message, node_id=node_id, retryable=False)
        self.task_uid = task_uid
        self.code = code
        #: The node's own error message, as it gave it.
        self.node_message = node_message
        #: The node batch the task ran in: a batch fails as a whole, so its error may be about
        #: another client's documents batched with ours (see ``MeilisearchNode._shared_batch``).
        self.batch_uid = batch_uid


class EnqueuedTask(NamedTuple):
    """A task as the node acknowledged enqueuing it. A uid alone does not name it for good: a
    node restarted on a fresh database hands the same uids out again, so the time it was
    enqueued goes with it."""

    uid: int
    enqueued_at: str | None


class _EnqueuedTasks(PendingWrite):
    """The tasks one enqueued batch became on one node; settled by :meth:`MeilisearchNode.refresh`."""

    def __init__(self, node: MeilisearchNode, index_uid: str, tasks: list[EnqueuedTask]) -> None:
        self.node = node
        self.index_uid = index_uid
        self.remaining = {task.uid for task in tasks}
        self.enqueued_at = {task.uid: task.enqueued_at for task in tasks}
        self.failure: TargetError | None = None
        self.deadline = time.monotonic() + node.task_timeout

    def unfinished(self) -> bool:
        return bool(self.remaining) and self.failure is None

    def settle(self, uid: int, failure: TargetError | None) -> None:
        self.remaining.discard(uid)
        if failure is not None and self.failure is None:
            self.failure = failure

    def check(self) -> bool:
        if self.failure is not None:
            raise self.failure
        if not self.remaining:
            return True
        if time.monotonic() >= self.deadline:
            raise TargetError(
                f"{self.node._where(self.index_uid)}: task(s) {sorted(self.remaining)} still not "
                f"finished after {self.node.task_timeout:.0f}s",
                node_id=self.node.node_id,
                retryable=True,
            )
        return False


class _Page(msgspec.Struct):
    """A ``documents/fetch`` answer; documents stay raw JSON so they are never re-encoded."""

    results: list[msgspec.Raw]
    total: int


#: Error codes by which a failed task blames the documents it was given, not the node.
DOCUMENT_ERROR_CODES = frozenset(
    {
        "missing_document_id",
        "invalid_document_id",
        "invalid_document_fields",
        "invalid_document_geo_field",
        "invalid_document_geojson_field",
        "invalid_vector_dimensions",
        "invalid_vectors_type",
        "document_fields_limit_reached",
        "invalid_document_vectors",
        "missing_document_filter",
    }
)
#: How serde_json words a document it cannot deserialize (reported with code ``internal``), a
#: number beyond the 64-bit float range anywhere in it included ("number out of range"): the
#: router does not read fields other than the primary key, so only the node finds that one.
_DOCUMENT_PARSE_ERROR = re.compile(
    r"(invalid type|recursion limit exceeded|invalid value|number out of range).* at line \d+ column \d+"
)
#: How a node's message names the document it is about (its primary key, JSON-encoded).
_NAMED_DOCUMENT = re.compile(r"(?:document with (?:the )?id:? |Document identifier )`([^`]*)`")


def names_document(message: str, key: str | int) -> bool | None:
    """Whether a node's message is about the document with primary key ``key``: None when the
    message names no document (a parse error, say), so it cannot tell."""
    named = _NAMED_DOCUMENT.search(message)
    if named is None:
        return None
    # Quoted as a JSON string, or bare; an integer id is the same id as its decimal string.
    return named.group(1) in (msgspec.json.encode(str(key)).decode(), str(key))


def blames(message: str, line: bytes, key: str | int) -> bool | None:
    """Whether a node's error is about this document: by the key its message names, or, for
    the parse errors that name no document, by checking the document as the node did (its
    nesting depth; a number beyond the float range, decoding it whole). None when none can
    tell."""
    named = names_document(message, key)
    if named is not None:
        return named
    if "recursion limit exceeded" in message:
        return depth_exceeds(line)
    if "number out of range" not in message:
        return None
    try:
        doc = msgspec.json.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return "out of range" in str(exc)
    return _has_huge_integer(doc)


def _has_huge_integer(value: Any) -> bool:
    """An integer beyond the 64-bit float range somewhere in ``value`` (the node reads every
    number as a float, so such an integer is out of range for it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > 1.7976931348623157e308:
            return True
    return False


def document_refusal(exc: TargetError) -> RefusedDocument | None:
    """The refusal an error makes of the documents sent, or None when it is about the node."""
    if not isinstance(exc, TaskFailed):
        return None
    code = exc.code or ""
    message = exc.node_message or str(exc)
    if code in DOCUMENT_ERROR_CODES or code.startswith("invalid_document_") or (
        code == "internal" and _DOCUMENT_PARSE_ERROR.search(message)
    ):
        return RefusedDocument(-1, message, code)
    return None


def split_ndjson(ndjson: bytes, limit: int) -> list[bytes]:
    """Cut NDJSON on line boundaries into pieces of at most ``limit`` bytes each.

    A single line longer than ``limit`` becomes a piece of its own (the node will refuse it
    with a clear ``payload_too_large`` error rather than this function hiding it).
    """
    if len(ndjson) <= limit:
        return [ndjson] if ndjson else []
    pieces: list[bytes] = []
    start, size = 0, len(ndjson)
    view = memoryview(ndjson)
    while start < size:
        end = start + limit
        if end >= size:
            pieces.append(bytes(view[start:]))
            break
        cut = ndjson.rfind(b"\n", start, end) + 1
        if cut <= start:  # one line longer than the limit
            nl = ndjson.find(b"\n", start)
            cut = size if nl < 0 else nl + 1
        pieces.append(bytes(view[start:cut]))
        start = cut
    return pieces


def _error_detail(resp: httpx.Response) -> tuple[str, str | None]:
    """Meilisearch's ``message`` and ``code`` from an error response (or the raw text)."""
    try:
        body = msgspec.json.decode(resp.content)
    except msgspec.DecodeError:
        return (resp.text[:300] or resp.reason_phrase), None
    if isinstance(body, dict):
        return str(body.get("message", body))[:1000], body.get("code")
    return str(body)[:300], None


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    """Wait until the Meilisearch server at ``url`` answers ``GET /health`` as available."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(base_url=url.rstrip("/"), timeout=2.0) as client:
        while True:
            try:
                resp = client.get("/health")
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TargetError(
                    f"Meilisearch at {url} not healthy after {timeout:.0f}s (last: {last})",
                    node_id=url,
                    retryable=True,
                )
            time.sleep(0.05)


class MeilisearchNode(NodeTarget):
    """One Meilisearch server of the fleet."""

    payload_limit_bytes: int

    def __init__(
        self,
        node_id: str,
        url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        payload_limit_bytes: int = DEFAULT_PAYLOAD_LIMIT,
        max_retries: int = 8,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        task_timeout: float = 1800.0,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        gzip_level: int = 1,
    ) -> None:
        self.node_id = node_id
        self.url = url.rstrip("/")
        self.payload_limit_bytes = payload_limit_bytes
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.task_timeout = task_timeout
        self.gzip_level = gzip_level
        #: Name of the env var holding the key (for error messages; never the key itself).
        self._api_key_env = api_key_env
        self._timeout = timeout
        self._client = self._new_client({"Authorization": f"Bearer {api_key}"} if api_key else {})
        self._pid = os.getpid()

    @classmethod
    def from_node(cls, node: Node, **options: Any) -> MeilisearchNode:
        """Build from a topology node, reading its API key from the environment now."""
        key = node.api_key()
        if node.api_key_env and key is None:
            raise TargetError(
                f"node {node.id}: environment variable {node.api_key_env} (api_key_env) is not set; "
                f"export it with the node's Meilisearch API key",
                node_id=node.id,
            )
        if key is not None:
            # A key mounted from a file often ends in a newline; anything else that cannot go
            # in a header is refused here, by name, before a request could echo it.
            key = key.strip()
            if not key or not (key.isascii() and key.isprintable()) or " " in key:
                raise TargetError(
                    f"node {node.id}: environment variable {node.api_key_env} (api_key_env) "
                    + ("is empty" if not key else "holds spaces, control or non-ASCII characters")
                    + "; set it to the node's Meilisearch API key alone",
                    node_id=node.id,
                )
        return cls(
            node.id,
            node.url,
            api_key=key,
            api_key_env=node.api_key_env,
            payload_limit_bytes=node.payload_limit_bytes,
            **options,
        )

    def __repr__(self) -> str:
        return f"MeilisearchNode(node_id={self.node_id!r}, url={self.url!r})"

    def _new_client(self, headers: Mapping[str, str]) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers=dict(headers),
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )

    def _http(self) -> httpx.Client:
        """The keep-alive client; a forked child gets its own instead of sharing sockets."""
        if self._pid != os.getpid():
            self._client = self._new_client(self._client.headers)
            self._pid = os.getpid()
        return self._client

    def close(self) -> None:
        if self._pid == os.getpid():
            self._client.close()

    # -- HTTP plumbing --------------------------------------------------------------------------

    def _where(self, index_uid: str | None) -> str:
        return f"node {self.node_id} ({self.url})" + (f", index {index_uid}" if index_uid else "")

    def _key_source(self) -> str:
        return f"environment variable {self._api_key_env}" if self._api_key_env else "no key"

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2.0**attempt)
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(self.backoff_cap, float(retry_after)))
        return delay * random.uniform(0.5, 1.0)  # jitter: spread retries of many workers

    def _request(
        self, method: str, path: str, *, what: str, index_uid: str | None = None, **kw: Any
    ) -> httpx.Response:
        """Send a request, retrying 429/5xx/transport errors; 4xx become :class:`TargetError`."""
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after: str | None = None
            if method != "GET":
                send_guard()  # a write on a lost lease stops, even between retries
            try:
                resp = self._http().request(method, path, **kw)
            except httpx.LocalProtocolError:
                # The request itself is malformed (a header value, most likely the key); its
                # text may quote the Authorization header, so it is not repeated, and a retry
                # would fail the same way.
                raise TargetError(
                    f"{self._where(index_uid)}: {what} could not be sent: the request is malformed "
                    f"(details withheld, they may quote the API key); check the node's API key "
                    f"({self._key_source()}) and URL",
                    node_id=self.node_id,
                ) from None
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return resp
                message, code = _error_detail(resp)
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}: {message}" + (f" ({code})" if code else "")
                    retry_after = resp.headers.get("Retry-After")
                else:
                    raise self._http_error(resp.status_code, message, code, what, index_uid)
            if attempt < self.max_retries:
                time.sleep(self._backoff(attempt, retry_after))
        raise TargetError(
            f"{self._where(index_uid)}: {what} failed after {self.max_retries + 1} attempts; "
            f"last error: {last}",
            node_id=self.node_id,
            retryable=True,
        )

    def _http_error(
        self, status: int, message: str, code: str | None, what: str, index_uid: str | None
    ) -> TargetError:
        text = f"{self._where(index_uid)}: {what} refused (HTTP {status}"
        text += f", {code}): {message}" if code else f"): {message}"
        if code == "index_not_found" or (status == 404 and index_uid and code is None):
            return IndexNotFound(text, node_id=self.node_id)
        if status in (401, 403):
            text += (
                f"; check the node's API key ({self._key_source()}), then retry the chunk (a "
                "worker reads the key when it first uses the node: restart running workers "
                "after changing it)"
            )
            return RequestRefused(text, node_id=self.node_id, status=status)
        if status == 413 or code == "payload_too_large":
            text += (
                "; set payload_limit_bytes of this node in the topology to what the node takes "
                "(its --http-payload-size-limit), then plan the import or reshard again: a "
                "retried chunk keeps the topology it was planned with"
            )
            return RequestRefused(text, node_id=self.node_id, status=status)
        return TargetError(text, node_id=self.node_id)

    def _json(
        self, method: str, path: str, *, what: str, index_uid: str | None = None, **kw: Any
    ) -> Any:
        return msgspec.json.decode(
            self._request(method, path, what=what, index_uid=index_uid, **kw).content
        )

    def _enqueue(
        self, method: str, path: str, *, what: str, index_uid: str | None, **kw: Any
    ) -> int:
        return self._enqueue_task(method, path, what=what, index_uid=index_uid, **kw).uid

    def _enqueue_task(
        self, method: str, path: str, *, what: str, index_uid: str | None, **kw: Any
    ) -> EnqueuedTask:
        body = self._json(method, path, what=what, index_uid=index_uid, **kw)
        enqueued_at = body.get("enqueuedAt")
        return EnqueuedTask(int(body["taskUid"]), None if enqueued_at is None else str(enqueued_at))

    def await_task(
        self, task_uid: int, *, what: str, index_uid: str | None = None, enqueued_at: str | None = None
    ) -> dict[str, Any]:
        """Poll ``GET /tasks/{uid}`` (5 ms doubling to 200 ms) until it ends; only ``succeeded``
        returns, ``failed``/``canceled`` raise :class:`TaskFailed`. Given ``enqueued_at``, a task
        under that uid enqueued at another time is not ours (the node's task store was
        replaced): a retryable error, as no answer about ours will come."""
        delay = _FIRST_POLL_S
        deadline = time.monotonic() + self.task_timeout
        while True:
            task: dict[str, Any] = self._json(
                "GET",
                f"/tasks/{task_uid}",
                what=f"{what}: polling task {task_uid}",
                index_uid=index_uid,
            )
            if enqueued_at is not None and task.get("enqueuedAt") != enqueued_at:
                raise self._task_lost(task_uid, index_uid, self._replaced(task, enqueued_at), what)
            status = task.get("status")
            if status == "succeeded":
                return task
            if status in ("failed", "canceled"):
                raise self._task_failed(task, what, index_uid)
            if time.monotonic() >= deadline:
                raise TargetError(
                    f"{self._where(index_uid)}: task {task_uid} ({what}) still {status} after "
                    f"{self.task_timeout:.0f}s",
                    node_id=self.node_id,
                    retryable=True,
                )
            send_guard()  # a write whose chunk is lost or handed back stops waiting too
            time.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)

    def _task_failed(self, task: Mapping[str, Any], what: str, index_uid: str | None) -> TaskFailed:
        error = task.get("error") or {}
        code = error.get("code")
        return TaskFailed(
            f"{self._where(index_uid)}: task {task.get('uid')} ({task.get('type')}, {what}) "
            f"{task.get('status')}: {error.get('message', 'no error message')}" + (f" ({code})" if code else ""),
            node_id=self.node_id,
            task_uid=int(task.get("uid", -1)),
            code=code,
            node_message=str(error.get("message", "")),
            batch_uid=None if task.get("batchUid") is None else int(task["batchUid"]),
        )

    def _shared_batch(self, exc: TaskFailed, ours: Sequence[int]) -> bool:
        """Whether the batch ``exc``'s task failed in also held tasks not in ``ours``: the node
        auto-batches the additions of every client of an index and fails the batch as a whole,
        so then its error may be about another client's documents."""
        if exc.batch_uid is None:
            return False
        body = self._json(
            "GET",
            "/tasks",
            what=f"listing the tasks of batch {exc.batch_uid}",
            params={"batchUids": exc.batch_uid, "limit": len(ours) + 1},
        )
        return any(int(task["uid"]) not in ours for task in body.get("results", []))

    def _task_lost(self, uid: int, index_uid: str | None, why: str, what: str = "adding documents") -> TargetError:
        """A batch whose task cannot be followed any more: the chunk retries from its cursor."""
        return TargetError(
            f"{self._where(index_uid)}: task {uid} ({what}) {why}; the batch is written "
            "again from the chunk's last acknowledged cursor",
            node_id=self.node_id,
            retryable=True,
        )

    @staticmethod
    def _replaced(task: Mapping[str, Any], enqueued_at: str) -> str:
        return (
            f"is now another task, enqueued at {task.get('enqueuedAt')} where ours was enqueued at "
            f"{enqueued_at} (the node lost its task store, e.g. restarted on a fresh database)"
        )

    def _await_index_idle(self, index_uid: str) -> None:
        """Wait for every enqueued or processing task of the index (counts must see all writes)."""
        while True:
            page = self._json(
                "GET",
                "/tasks",
                what="listing pending tasks",
                index_uid=index_uid,
                params={"indexUids": index_uid, "statuses": "enqueued,processing", "limit": 100},
            )
            pending = page.get("results") or []
            if not pending:
                return
            for task in pending:
                # A failed task (maybe someone else's) changes nothing stored: only wait for it.
                with contextlib.suppress(TaskFailed):
                    self.await_task(int(task["uid"]), what="pending task", index_uid=index_uid)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until this node answers ``GET /health``."""
        wait_healthy(self.url, timeout)

    @staticmethod
    def _index_path(index_uid: str) -> str:
        return f"/indexes/{quote(index_uid, safe='')}"

    # -- NodeTarget -----------------------------------------------------------------------------

    def _index_info(self, index_uid: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self._json(
                "GET", self._index_path(index_uid), what="reading index", index_uid=index_uid
            )
        except IndexNotFound:
            return None
        return info

    def ensure_index(
        self,
        index_uid: str,
        primary_key: str,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        info = self._index_info(index_uid)
        if info is None:
            task = self._enqueue(
                "POST",
                "/indexes",
                what="creating index",
                index_uid=index_uid,
                json={"uid": index_uid, "primaryKey": primary_key},
            )
            try:
                self.await_task(task, what="creating index", index_uid=index_uid)
            except TaskFailed as exc:
                if exc.code != "index_already_exists":  # another worker won the race: fine
                    raise
            info = self._index_info(index_uid) or {}
        existing = info.get("primaryKey")
        if existing is None:
            task = self._enqueue(
                "PATCH",
                self._index_path(index_uid),
                what="setting primary key",
                index_uid=index_uid,
                json={"primaryKey": primary_key},
            )
            self.await_task(task, what="setting primary key", index_uid=index_uid)
        elif existing != primary_key:
            raise TargetError(
                f"{self._where(index_uid)}: index already has primary key {existing!r}, not "
                f"{primary_key!r}; import with --primary-key {existing} or into a new index uid",
                node_id=self.node_id,
            )
        current = self.get_settings(index_uid)
        wanted = dict(settings or {})
        wanted["filterableAttributes"] = with_shard_filterable(
            wanted.get("filterableAttributes", current.get("filterableAttributes"))
        )
        # A settings.json from a .dump lists every setting, including experimental ones (e.g.
        # `chat`) that this node has not enabled and does not report; setting them would be
        # refused. Keep only settings the node knows, and say which were left out.
        unknown = sorted(k for k in wanted if k not in current)
        if unknown:
            log.warning(
                "%s: not applying setting(s) %s: this node does not report them (experimental "
                "feature not enabled?)", self._where(index_uid), ", ".join(unknown)
            )
        patch = {k: v for k, v in wanted.items() if k in current and current.get(k) != v}
        if patch:
            task = self._enqueue(
                "PATCH",
                f"{self._index_path(index_uid)}/settings",
                what="updating settings",
                index_uid=index_uid,
                json=patch,
            )
            self.await_task(task, what="updating settings", index_uid=index_uid)

    def write_documents(self, index_uid: str, primary_key: str, ndjson: bytes, count: int) -> None:
        """Send the batch in pieces under the payload limit, then await every task."""
        # Tasks run in order on the node: awaiting them in order polls the least.
        for task in self._enqueue_documents(index_uid, primary_key, ndjson, count):
            self.await_task(task.uid, what="adding documents", index_uid=index_uid, enqueued_at=task.enqueued_at)

    def enqueue_routed(
        self,
        index_uid: str,
        primary_key: str,
        lines: Sequence[bytes],
        keys: Sequence[str | int],
        shards: Sequence[int],
        *,
        checked: bool = False,
    ) -> PendingWrite:
        """Enqueue the batch (gzip'd NDJSON pieces under the payload limit) without waiting for
        the node to index it: the caller keeps a window of such writes and polls them together.
        The node applies its own rules, ``checked`` or not."""
        tasks = self._enqueue_documents(index_uid, primary_key, b"\n".join(lines) + b"\n", len(lines))
        return _EnqueuedTasks(self, index_uid, tasks)

    def refresh(self, pending: Sequence[PendingWrite]) -> None:
        """One ``GET /tasks?uids=…`` for every task of this node's pending writes still unfinished."""
        mine = [p for p in pending if isinstance(p, _EnqueuedTasks) and p.node is self and p.unfinished()]
        uids = sorted({uid for p in mine for uid in p.remaining})
        for start in range(0, len(uids), _TASKS_PER_POLL):
            part = uids[start : start + _TASKS_PER_POLL]
            body = self._json(
                "GET",
                "/tasks",
                what=f"polling {len(part)} enqueued task(s)",
                params={"uids": ",".join(map(str, part)), "limit": len(part)},
            )
            seen: set[int] = set()
            for task in body.get("results", []):
                uid, status = int(task["uid"]), task.get("status")
                seen.add(uid)
                for p in mine:
                    if uid not in p.remaining:
                        continue
                    ours_at = p.enqueued_at.get(uid)
                    if task.get("indexUid") not in (None, p.index_uid):
                        # Not the task we enqueued (the node's task store was replaced): its
                        # outcome says nothing about our batch.
                        p.settle(uid, self._task_lost(uid, p.index_uid, f"is now a task of index {task.get('indexUid')!r}"))
                    elif ours_at is not None and task.get("enqueuedAt") != ours_at:
                        p.settle(uid, self._task_lost(uid, p.index_uid, self._replaced(task, ours_at)))
                    elif status in ("succeeded", "failed", "canceled"):
                        p.settle(uid, None if status == "succeeded" else self._task_failed(task, "adding documents", p.index_uid))
            for uid in set(part) - seen:
                for p in mine:
                    if uid in p.remaining:
                        # Deleted, or the node came back from an older copy of its data: waiting
                        # would last until the task timeout for an answer that never comes.
                        p.settle(uid, self._task_lost(uid, p.index_uid, "is no longer known to the node"))

    def refusal_of(self, exc: TargetError) -> RefusedDocument | None:
        return document_refusal(exc)

    def _enqueue_documents(self, index_uid: str, primary_key: str, ndjson: bytes, count: int) -> list[EnqueuedTask]:
        """Enqueue the documents in pieces under the payload limit; their tasks, in order."""
        lines = ndjson.count(b"\n")
        if lines != count:
            raise TargetError(
                f"{self._where(index_uid)}: batch holds {lines} NDJSON lines but {count} documents "
                f"were announced; refusing a batch that does not add up",
                node_id=self.node_id,
            )
        path = f"{self._index_path(index_uid)}/documents"
        headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
        tasks = []
        for piece in split_ndjson(ndjson, self.payload_limit_bytes):
            body = gzip.compress(piece, compresslevel=self.gzip_level, mtime=0)
            tasks.append(
                self._enqueue_task(
                    "POST",
                    path,
                    what="adding documents",
                    index_uid=index_uid,
                    params={"primaryKey": primary_key},
                    content=body,
                    headers=headers,
                )
            )
        return tasks

    def write_routed(
        self,
        index_uid: str,
        primary_key: str,
        lines: Sequence[bytes],
        keys: Sequence[str | int],
        shards: Sequence[int],
        *,
        checked: bool = False,
    ) -> None:
        """Write the batch; when the node refuses documents for what they are, write it again by
        halves until each refused document is alone, so the good ones of the batch still land
        (:class:`DocumentsRefused` then names the refused ones with the node's own message).

        A document is only taken as refused when the node's error is its own: the task failed
        in a batch of ours alone, or the message names that document. Written while another
        client's failing tasks share its batch, it is written again (up to ``max_retries``
        times, with backoff), then the write fails as retryable rather than blame it."""

        def write(part: Sequence[bytes], first: int) -> None:
            for attempt in range(self.max_retries + 1):
                tasks = self._enqueue_documents(index_uid, primary_key, b"\n".join(part) + b"\n", len(part))
                try:
                    for task in tasks:  # tasks run in order on the node: awaiting in order polls least
                        self.await_task(task.uid, what="adding documents", index_uid=index_uid, enqueued_at=task.enqueued_at)
                    return
                except TaskFailed as exc:
                    ours = [task.uid for task in tasks]
                    if document_refusal(exc) is None or len(part) > 1 or not self._shared_batch(exc, ours):
                        raise  # halving goes on below a batch; a document alone is judged here
                    if blames(exc.node_message, part[0], keys[first]) is True:
                        raise
                    last = exc
                if attempt < self.max_retries:
                    time.sleep(self._backoff(attempt, None))
            raise TargetError(
                f"{self._where(index_uid)}: the document at position {first} of the batch was "
                f"written {self.max_retries + 1} times, and each time the node batched it with "
                f"other clients' tasks and failed the batch ({last.node_message}), so which "
                "document it refuses cannot be told; the chunk is retried from its cursor. If this "
                "repeats, run the nodes with --experimental-max-number-of-batched-tasks 1 while "
                "importing",
                node_id=self.node_id,
                retryable=True,
            )

        if not lines:
            return
        # Its first write is the whole batch; only a refusal makes it split.
        refused = isolate_refused(lines, write, document_refusal)
        if refused:
            raise DocumentsRefused(self.node_id, index_uid, refused)

    def index_exists(self, index_uid: str) -> bool:
        return self._index_info(index_uid) is not None

    def get_primary_key(self, index_uid: str) -> str | None:
        info = self._json(
            "GET", self._index_path(index_uid), what="reading index", index_uid=index_uid
        )
        pk = info.get("primaryKey")
        return None if pk is None else str(pk)

    def get_settings(self, index_uid: str) -> dict[str, Any]:
        settings: dict[str, Any] = self._json(
            "GET",
            f"{self._index_path(index_uid)}/settings",
            what="reading settings",
            index_uid=index_uid,
        )
        return settings

    def _fetch(self, index_uid: str, body: dict[str, Any], what: str) -> _Page:
        """A page of whole documents: ``_vectors`` included when the index has embedders (left
        out by default), so a reshard carries user-provided embeddings over and verification
        compares them. Asked per page, as embedders may be added at any time; without any,
        Meilisearch would add an empty ``_vectors`` to every document."""
        if self._has_embedders(index_uid):
            body = {**body, "retrieveVectors": True}
        resp = self._request(
            "POST",
            f"{self._index_path(index_uid)}/documents/fetch",
            what=what,
            index_uid=index_uid,
            json=body,
        )
        return msgspec.json.decode(resp.content, type=_Page)

    def _has_embedders(self, index_uid: str) -> bool:
        embedders = self._json(
            "GET",
            f"{self._index_path(index_uid)}/settings/embedders",
            what="reading embedders",
            index_uid=index_uid,
        )
        return bool(embedders)

    def fetch_shard(self, index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        page = self._fetch(
            index_uid,
            {"filter": f"{SHARD_FIELD} = {int(shard)}", "offset": offset, "limit": limit},
            f"fetching shard {shard}",
        )
        return [bytes(doc) for doc in page.results]

    def iter_documents(self, index_uid: str, page_size: int = 1000) -> Iterator[bytes]:
        offset = 0
        while True:
            page = self._fetch(
                index_uid, {"offset": offset, "limit": page_size}, "reading documents"
            )
            for doc in page.results:
                yield bytes(doc)
            offset += len(page.results)
            if not page.results or offset >= page.total:
                return

    def count_documents(self, index_uid: str) -> int:
        self._await_index_idle(index_uid)
        stats = self._json(
            "GET", f"{self._index_path(index_uid)}/stats", what="reading stats", index_uid=index_uid
        )
        return int(stats["numberOfDocuments"])

    def count_by_shard(self, index_uid: str) -> dict[int, int]:
        """Exact documents per shard from the ``_miroir_shard`` facet distribution.

        Meilisearch returns at most ``faceting.maxValuesPerFacet`` values; when the answer may be
        cut short (as many values as the cap and fewer documents than the index holds), the cap
        is raised and the question asked again.
        """
        total = self.count_documents(index_uid)
        faceting = self._json(
            "GET",
            f"{self._index_path(index_uid)}/settings/faceting",
            what="reading faceting",
            index_uid=index_uid,
        )
        cap = int(faceting.get("maxValuesPerFacet") or 100)
        while True:
            result = self._json(
                "POST",
                f"{self._index_path(index_uid)}/search",
                what="counting documents per shard",
                index_uid=index_uid,
                json={"q": "", "limit": 0, "facets": [SHARD_FIELD]},
            )
            dist: dict[str, int] = (result.get("facetDistribution") or {}).get(SHARD_FIELD, {})
            counts = {int(k): int(v) for k, v in dist.items()}
            if len(counts) < cap or sum(counts.values()) >= total:
                return counts
            cap = max(cap * 4, _FACET_VALUES_FLOOR)
            task = self._enqueue(
                "PATCH",
                f"{self._index_path(index_uid)}/settings/faceting",
                what="raising maxValuesPerFacet",
                index_uid=index_uid,
                json={"maxValuesPerFacet": cap},
            )
            self.await_task(task, what="raising maxValuesPerFacet", index_uid=index_uid)

    def delete_documents(self, index_uid: str, primary_keys: list[str]) -> None:
        task = self._enqueue(
            "POST",
            f"{self._index_path(index_uid)}/documents/delete-batch",
            what="deleting documents",
            index_uid=index_uid,
            json=list(primary_keys),
        )
        self.await_task(task, what="deleting documents", index_uid=index_uid)

    def delete_index(self, index_uid: str) -> None:
        """Delete an index; a missing index is not an error."""
        try:
            task = self._enqueue(
                "DELETE", self._index_path(index_uid), what="deleting index", index_uid=index_uid
            )
            self.await_task(task, what="deleting index", index_uid=index_uid)
        except TaskFailed as exc:
            if exc.code != "index_not_found":
                raise
        except IndexNotFound:
            pass
