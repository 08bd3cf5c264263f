"""A throwaway PostgreSQL for the store's tests: one per session, on a private unix socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmpool.pgstore import throwaway


@pytest.fixture(scope="session")
def pg() -> Iterator[throwaway.Throwaway]:
    """A running cluster (``pg.dsn``), stopped and removed at the end of the session."""
    server = throwaway.start()
    try:
        yield server
    finally:
        server.remove()
