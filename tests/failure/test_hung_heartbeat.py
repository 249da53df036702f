"""A heartbeat whose renewal hangs (the jobs store's connection is half-open: the request goes
out, no answer and no error come back) must still stop the chunk once the lease has run out,
because by then another worker may hold it. The jobs store is a real Postgres reached through
a loopback proxy that stops forwarding: the one fault stood in for is the dead network path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobKind, JobState, JobStore, LeaseLost, NewChunk
from miroir_pipeline.queue.lease import LeaseKeeper
from tests.support.stall_proxy import StallProxy

pytestmark = [pytest.mark.postgres]

TTL = 2.0


def _through(proxy: StallProxy, dsn: str) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit((parts.scheme, f"{userinfo}127.0.0.1:{proxy.port}", parts.path, parts.query, ""))


@pytest.fixture
def direct_store(pg_dsn: str) -> Iterator[JobStore]:
    store = open_store(pg_dsn)
    yield store
    store.close()


@pytest.mark.timeout(120)
def test_a_hung_renewal_marks_the_lease_lost_once_it_has_run_out(pg_dsn: str, direct_store: JobStore) -> None:
    parent = direct_store.enqueue("dump_import", {"uri": "x"}, kind=JobKind.PARENT)
    [chunk] = direct_store.split(parent.id, [NewChunk(chunk_index=0, params={"start": 0})])
    port = urlsplit(pg_dsn).port
    assert port is not None
    with StallProxy("127.0.0.1", port) as proxy:
        store = open_store(_through(proxy, pg_dsn), min_size=1, max_size=1)
        try:
            lease = store.claim_by_id(chunk.id, "w-stuck", TTL)
            keeper = LeaseKeeper(store, lease, ttl=TTL, interval=0.2).start()
            store_renewed = direct_store.get(chunk.id).claim_expires_at
            # A renewal through the proxy lands before the stall: the heartbeat works.
            deadline = time.monotonic() + 30
            while direct_store.get(chunk.id).claim_expires_at == store_renewed:
                assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
                time.sleep(0.05)
            proxy.stall()
            stalled_at = time.monotonic()
            # Nothing renews it now: once it has expired in the database another worker takes it.
            rescuer: object = None
            while rescuer is None:
                assert time.monotonic() - stalled_at < 30, "the lease never expired in the database"
                direct_store.reclaim_expired()
                rescuer = direct_store.claim(["dump_import"], "w-rescuer", 60)
                time.sleep(0.05)
            # By then the stuck worker must refuse to write on: its lease ran out unrenewed.
            with pytest.raises(LeaseLost, match=r"not renewed within its 2 s TTL"):
                keeper.check()
            assert keeper.lost
            row = direct_store.get(chunk.id)
            assert row.state == JobState.IN_PROGRESS and row.claimed_by == "w-rescuer"
        finally:
            proxy.close()  # the hung renewal now fails and its thread ends
            keeper.stop()
            store.close()
