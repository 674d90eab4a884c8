"""Fixtures for the journal tests: one real redis-server per module (AOF on, temp dir, free port) and a journal
fixture parametrized over both stores."""

from __future__ import annotations

import pytest
import redis
from redis_server import RedisServer

from splitserve.router.journal import Journal, open_journal

TTL_S = 1.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def journal(request) -> Journal:
    if request.param == "memory":
        j = open_journal(None, ttl_s=TTL_S)
    else:
        server = request.getfixturevalue("redis_server")
        redis.Redis.from_url(server.url).flushall()
        j = open_journal(server.url, ttl_s=TTL_S)
    yield j
    j.close()
