"""Rate limits (``gate.api.ratelimit``): per API key, per address without one, shared through Redis when a
broker is configured, health and metrics never counted, and a 429 in the API's error shape."""

from __future__ import annotations

import dataclasses

import pytest
import redis
from test_api import Env
from test_web import token

from gate.api import create_app
from gate.api.ratelimit import storage_uri
from gate.settings import SettingsError, load_settings
from gate.worker.broker import EmbeddedRedis

SYSTEM_REDIS = "redis://127.0.0.1:6379/13"


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def limited(env: Env, rate: str = "3/minute", **changes):
    return create_app(dataclasses.replace(env.settings, rate_limit=rate, **changes), dispatcher=env.dispatcher)


def test_each_key_has_its_own_budget_and_a_refusal_says_which_limit(env):
    client = limited(env).test_client()
    assert [client.get("/v1/jobs", headers=env.headers("a")).status_code for _ in range(3)] == [200] * 3
    r = client.get("/v1/jobs", headers=env.headers("a"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.json["error"] == {"status": 429, "reason": "rate_limited", "message": r.json["error"]["message"],
                               "limit": "rate_limit", "maximum": "3 per 1 minute"}
    assert "rate_limit=3/minute" in r.json["error"]["message"]
    assert client.get("/v1/base-models", headers=env.headers("a")).status_code == 429  # one budget for all routes
    assert client.get("/v1/jobs", headers=env.headers("b")).status_code == 200  # another key, another budget


def test_health_and_metrics_are_never_counted(env):
    client = limited(env, "1/minute").test_client()
    for _ in range(5):
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics", headers=env.headers("op")).status_code == 200
    assert client.get("/v1/jobs", headers=env.headers("op")).status_code == 200


def test_callers_without_a_valid_key_are_counted_by_address(env):
    """Guessing keys is limited: on /v1 (401s) and on the reviewer pages' sign-in form alike."""
    client = limited(env).test_client()
    assert [client.get("/v1/jobs").status_code for _ in range(4)] == [401, 401, 401, 429]
    wrong = {"Authorization": "Bearer ftg_000000000000_" + "x" * 43}
    assert client.get("/v1/jobs", headers=wrong).status_code == 429  # the same address
    assert client.get("/v1/jobs", headers=env.headers("a")).status_code == 200

    pages = limited(env).test_client()
    form = pages.get("/review/login")
    codes = [pages.post("/review/login", data={"key": "ftg_nonsense", "csrf_token": token(form)}).status_code
             for _ in range(3)]
    assert codes == [401, 401, 429]
    refused = pages.get("/review/login")  # a browser is told in a page, not in the API's JSON
    assert refused.status_code == 429 and refused.mimetype == "text/html" and int(refused.headers["Retry-After"]) > 0
    assert b"Too many requests" in refused.data and b"at most 3 per 1 minute" in refused.data


@pytest.fixture
def shared_redis(tmp_path):
    """The machine's Redis (db 13) when it answers, else an embedded one (kombu's redis+socket URL)."""
    try:
        client = redis.Redis.from_url(SYSTEM_REDIS, socket_timeout=1)
        client.flushdb()
    except redis.RedisError:
        embedded = EmbeddedRedis(tmp_path / "redis")
        embedded.ensure_running()
        yield embedded.url, redis.Redis(unix_socket_path=str(embedded.socket))
        embedded.stop()
        return
    yield SYSTEM_REDIS, client
    client.flushdb()


def test_api_processes_share_the_count_through_the_brokers_redis(env, shared_redis):
    """Two apps (two gunicorn workers, two replicas) on one broker draw on one budget per key; the counters are
    in that Redis."""
    url, client = shared_redis
    one, two = (limited(env, broker_url=url).test_client() for _ in range(2))
    assert one.get("/v1/jobs", headers=env.headers("a")).status_code == 200
    assert two.get("/v1/jobs", headers=env.headers("a")).status_code == 200
    assert one.get("/v1/jobs", headers=env.headers("a")).status_code == 200
    assert two.get("/v1/jobs", headers=env.headers("a")).status_code == 429
    assert any(b"LIMITER/ftgate-rate/key:" in key for key in client.keys("*"))


def test_storage_is_memory_without_a_broker_and_redis_with_one(env, tmp_path):
    assert storage_uri(env.settings) == "memory://"
    assert storage_uri(dataclasses.replace(env.settings, broker_url="redis://redis:6379/0")) == "redis://redis:6379/0"
    socket = dataclasses.replace(env.settings, broker_url="redis+socket:///run/redis.sock?virtual_host=3")
    assert storage_uri(socket) == "redis+unix:///run/redis.sock?db=3"


@pytest.mark.parametrize("rate", ["lots", "0/minute", "5 per fortnight"])
def test_a_bad_rate_is_refused_at_start_up(tmp_path, rate):
    with pytest.raises(SettingsError, match="rate_limit must be requests per period") as caught:
        load_settings(env={"HOME": str(tmp_path), "FTGATE_RATE_LIMIT": rate})
    assert caught.value.field == "rate_limit"
    assert load_settings(env={"HOME": str(tmp_path), "FTGATE_RATE_LIMIT": "10/second;600/minute"}).rate_limit == \
        "10/second;600/minute"
