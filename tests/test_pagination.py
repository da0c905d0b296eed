"""Cursor pagination (``gate.service.pagination``) on the lists that grow: base models and the reviewers'
queues. Pages follow one fixed order, a row added while a client walks the list is neither shown twice nor
skipped, and a bad ``limit`` or ``cursor`` is a 400 naming it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_api import Env, good_zip
from test_api_results import make_job

from gate.storage.models import BaseModel, utcnow


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def walk(env: Env, path: str, key: str, who: str = "op", limit: int = 2) -> tuple[list[str], int]:
    """Every id of a list, a page at a time, and how many pages it took."""
    ids, cursor, pages = [], None, 0
    while True:
        query = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        r = env.client.get(path, headers=env.headers(who), query_string=query)
        assert r.status_code == 200, r.json
        pages += 1
        ids += [row["id"] for row in r.json[key]]
        assert len(r.json[key]) <= limit
        if (cursor := r.json["next_cursor"]) is None:
            return ids, pages


def test_base_models_come_a_page_at_a_time_oldest_first(env):
    start = utcnow() - timedelta(hours=1)
    with env.sessions() as s:
        made = [BaseModel(name=f"m{i}", path="/m", weights_sha256="0" * 64, created_at=start + timedelta(minutes=i))
                for i in range(4)]
        s.add_all(made)
        s.commit()
        expected = [m.id for m in made]
    ids, pages = walk(env, "/v1/base-models", "base_models", who="a")
    assert ids == expected + [env.base_model_id] and pages == 3  # Env's own model was made last


def test_a_row_added_while_walking_is_neither_repeated_nor_skipped(env):
    jobs = [make_job(env, "review") for _ in range(3)]
    first = env.client.get("/v1/reviews", headers=env.headers("rev"), query_string={"limit": 2}).json
    assert [j["id"] for j in first["jobs"]] == jobs[:2] and first["next_cursor"]
    late = make_job(env, "review")
    rest = env.client.get("/v1/reviews", headers=env.headers("rev"),
                          query_string={"limit": 2, "cursor": first["next_cursor"]}).json
    assert [j["id"] for j in rest["jobs"]] == [jobs[2], late] and rest["next_cursor"] is None
    flagged = [env.upload(good_zip(n=20, red=1)).json["id"] for _ in range(3)]
    assert walk(env, "/v1/dataset-reviews", "datasets", who="rev")[0] == flagged


@pytest.mark.parametrize(("query", "field"), [({"limit": 0}, "limit"), ({"limit": 501}, "limit"),
                                              ({"limit": "ten"}, "limit"), ({"cursor": "not-ours"}, "cursor"),
                                              ({"cursor": "WyJ4Il0"}, "cursor")])
def test_a_bad_limit_or_cursor_is_a_400_naming_it(env, query, field):
    r = env.client.get("/v1/base-models", headers=env.headers("a"), query_string=query)
    assert r.status_code == 400 and r.json["error"]["field"] == field
