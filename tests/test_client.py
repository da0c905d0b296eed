"""The shipped client (``gate.client``) and its ``ftgate datasets|jobs`` commands over real HTTP: the API app of
the embedded configuration (tests/test_api.py's ``Env``) served by werkzeug on 127.0.0.1 in a thread. No worker
runs: jobs are moved along their life cycle and given a checkpoint as the workers would (tests/test_api_results.py).
Cancel and events, which another part of the API serves, are held to their contract against a small fake."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from test_api import Env, good_zip, served
from test_api_results import add_artifact, move
from werkzeug.wrappers import Request, Response

from gate.cli import main
from gate.client import Client, DownloadError, GateError, WaitTimeout

LORA = b"lora weights " * 1000


@pytest.fixture
def gate(tmp_path, migrated):
    env = Env(tmp_path, migrated)
    with served(env.app) as url:
        env.url = url
        yield env


def customer(gate, who: str = "a") -> Client:
    return Client(gate.url, gate.keys[who].key)


def new_job(gate, client: Client) -> dict:
    dataset = client.upload_dataset(good_zip(), name="set")
    return client.create_job(gate.base_model_id, dataset["id"], "lora", {"steps": 10, "rank": 4})


def test_upload_streams_the_zip_and_reports_progress(gate, tmp_path):
    data = good_zip(4)
    path = tmp_path / "set.zip"
    path.write_bytes(data)
    seen = []
    dataset = customer(gate).upload_dataset(path, progress=lambda done, total: seen.append((done, total)))
    assert dataset["status"] == "accepted" and dataset["image_count"] == 4 and dataset["name"] == "set.zip"
    assert seen[-1] == (len(data), len(data)) and all(total == len(data) for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert customer(gate).dataset(dataset["id"])["content_sha256"] == dataset["content_sha256"]


def test_upload_waits_for_the_intake_on_the_worker(gate, capsys, monkeypatch, tmp_path):
    """The gate answers ``received``; the client polls until the worker's intake decides (it runs a second after
    the upload here), and ``datasets upload`` shows it and exits 0 only for an accepted dataset."""
    gate.dispatcher.intake = lambda dataset_id: threading.Timer(1.0, gate.run_intake, (dataset_id,)).start()
    client = customer(gate)
    assert client.upload_dataset(good_zip(), wait=False)["status"] == "received"
    seen = []
    dataset = client.upload_dataset(good_zip(n=20, red=1), on_poll=lambda d: seen.append(d["status"]))
    assert dataset["status"] == "flagged" and seen[0] == "received" and seen[-1] == "flagged"
    with pytest.raises(WaitTimeout, match="datasets not settled"):
        client.upload_dataset(good_zip(n=5), timeout_s=0.2)
    monkeypatch.setenv("FTGATE_API_KEY", gate.keys["a"].key)
    monkeypatch.setenv("FTGATE_URL", gate.url)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    code, out, err = ftgate(capsys, "datasets", "upload", str(tmp_path / "bad.zip"))
    assert code == 1 and "rejected" in out and "not_a_zip" in out


def test_create_job_waits_for_a_screening_and_creates_the_job(gate, tmp_path):
    """A base model registered after the upload: the first job asks for a screening (409 dataset_screening),
    which the client waits out, creating the job once the dataset is accepted."""
    from test_api import registrable_model

    client = customer(gate)
    dataset = client.upload_dataset(good_zip())
    model, probes = registrable_model(tmp_path)
    profile = {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": "red circle"}}
    later = Client(gate.url, gate.keys["op"].key).create_base_model("later", str(model), profile)
    gate.dispatcher.intake = lambda dataset_id: threading.Timer(0.5, gate.run_intake, (dataset_id,)).start()
    seen = []
    job = client.create_job(later["id"], dataset["id"], "lora", {"steps": 10}, on_poll=lambda d: seen.append(d))
    assert job["status"] == "queued" and seen[-1]["status"] == "accepted"
    operator = Client(gate.url, gate.keys["op"].key)  # staff read the figures per detector; a customer, none
    assert set(operator.dataset(dataset["id"])["intake"]["scans"]) == {"nudenet", 'shapes:{"concept":"red circle"}'}
    assert "scans" not in client.dataset(dataset["id"])["intake"]


def test_create_show_list_and_idempotent_retry(gate):
    client = customer(gate)
    dataset = client.upload_dataset(good_zip(), name="set \"quoted\"")
    assert dataset["name"] == "set \"quoted\""
    job = client.create_job(gate.base_model_id, dataset["id"], "lora", {"steps": 10}, idempotency_key="k1")
    assert job["status"] == "queued" and gate.enqueued == [job["id"]]
    again = client.create_job(gate.base_model_id, dataset["id"], "lora", {"steps": 10}, idempotency_key="k1")
    assert again["id"] == job["id"] and gate.enqueued == [job["id"]]
    shown = client.job(job["id"])
    assert shown["status"] == "queued" and shown["verdict"] is None and shown["artifact"] is None
    assert [j["id"] for j in client.jobs()] == [job["id"]]
    assert customer(gate, "b").jobs() == []  # another tenant sees none of it


def test_refusals_raise_gate_error_with_the_api_body(gate):
    client = customer(gate)
    dataset = client.upload_dataset(good_zip())
    with pytest.raises(GateError) as refused:
        client.create_job(gate.base_model_id, dataset["id"], "lora", {"rank": 129})
    err = refused.value
    assert (err.status, err.reason, err.field, err.limit, err.maximum) == \
        (400, "invalid_request", "hyperparameters.rank", "max_rank", 128)
    assert "max_rank" in err.message and "hyperparameters.rank" in str(err)
    with pytest.raises(GateError) as missing:
        customer(gate, "b").job(new_job(gate, client)["id"])
    assert (missing.value.status, missing.value.reason) == (404, "not_found")
    with pytest.raises(ValueError, match="not an id"):
        client.job("../datasets/x")  # never another route
    with pytest.raises(GateError) as unauthorized:
        Client(gate.url, "ftg_bad_key").jobs()
    assert (unauthorized.value.status, unauthorized.value.reason) == (401, "unauthorized")


def test_the_key_and_url_come_from_the_environment(gate):
    client = Client(env={"FTGATE_URL": gate.url + "/", "FTGATE_API_KEY": gate.keys["a"].key})
    assert client.url == gate.url and client.jobs() == []
    with pytest.raises(ValueError, match="FTGATE_API_KEY"):
        Client(gate.url, env={})
    with pytest.raises(ValueError, match="FTGATE_URL"):
        Client(key="k", env={})


def test_wait_polls_until_the_job_settles(gate):
    client = customer(gate)
    job = new_job(gate, client)
    seen = []
    timer = threading.Timer(0.3, move, (gate, job["id"], "released"))
    timer.start()
    try:
        done = client.wait(job["id"], timeout_s=20, poll_s=0.05, on_poll=lambda j: seen.append(j["status"]))
    finally:
        timer.join()
    assert done["status"] == "released" and done["finished_at"] is not None
    assert seen[0] == "queued" and seen[-1] == "released"
    other = new_job(gate, client)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as late:
        client.wait(other["id"], timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - t0 < 5 and late.value.jobs[other["id"]]["status"] == "queued"
    assert other["id"] in str(late.value)


def test_download_is_checked_and_atomic(gate, tmp_path):
    client = customer(gate)
    job = new_job(gate, client)
    key = add_artifact(gate, job["id"], LORA)
    out = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    with pytest.raises(GateError) as withheld:  # still queued: the API refuses, nothing is written
        client.download(job["id"], out)
    assert withheld.value.reason == "artifact_withheld" and list(out.parent.iterdir()) == []
    move(gate, job["id"], "released")
    sizes = []
    assert client.download(job["id"], out, progress=lambda done, total: sizes.append((done, total))) == out
    assert out.read_bytes() == LORA and sizes[-1] == (len(LORA), len(LORA))

    def interrupted(done, total):
        raise ConnectionError("the line dropped")

    again = tmp_path / "out" / "again.safetensors"
    with pytest.raises(ConnectionError):
        client.download(job["id"], again, progress=interrupted)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no partial file left behind
    # Bytes swapped in place behind the server's hash cache (same size, same mtime): the client's own check.
    stored = gate.settings.artifacts_dir / key
    stat = stored.stat()
    with open(stored, "r+b") as f:
        f.write(b"LORA")
    os.utime(stored, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DownloadError, match="sha256"):
        client.download(job["id"], out)
    assert out.read_bytes() == LORA and sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_reports_are_saved_as_served(gate, tmp_path):
    client = customer(gate)
    job = new_job(gate, client)
    with pytest.raises(GateError) as none_yet:
        client.save_report(job["id"], tmp_path / "report.json")
    assert none_yet.value.reason == "no_report" and not (tmp_path / "report.json").exists()
    assert [e["to_state"] for e in client.log(job["id"])] == ["queued"]


# --- the command line -----------------------------------------------------------------------------------------

def ftgate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_output_for_scripts(gate, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTGATE_API_KEY", gate.keys["a"].key)
    monkeypatch.setenv("FTGATE_URL", gate.url)
    (tmp_path / "set.zip").write_bytes(good_zip())
    code, out, _ = ftgate(capsys, "datasets", "upload", str(tmp_path / "set.zip"), "--json")
    dataset = json.loads(out)
    assert code == 0 and dataset["status"] == "accepted"
    (tmp_path / "hp.json").write_text('{"steps": 10, "rank": 4}')
    code, out, _ = ftgate(capsys, "jobs", "create", "--base-model", gate.base_model_id, "--dataset", dataset["id"],
                          "--method", "lora", "--hyperparameters", f"@{tmp_path / 'hp.json'}", "--json")
    job = json.loads(out)
    assert code == 0 and job["hyperparameters"] == {"steps": 10, "rank": 4}
    code, out, err = ftgate(capsys, "jobs", "create", "--base-model", gate.base_model_id, "--dataset", dataset["id"],
                            "--method", "lora", "--hyperparameters", '{"rank": 129}', "--json")
    assert code == 1 and json.loads(out)["error"]["field"] == "hyperparameters.rank"
    assert "max_rank" in err
    code, out, _ = ftgate(capsys, "jobs", "show", job["id"], "--json")
    assert code == 0 and json.loads(out)["status"] == "queued"
    code, out, _ = ftgate(capsys, "jobs", "list", "--json", "--url", gate.url)
    assert [j["id"] for j in json.loads(out)["jobs"]] == [job["id"]]
    code, out, _ = ftgate(capsys, "jobs", "wait", job["id"], "--timeout", "0.2", "--json")
    assert code == 3 and json.loads(out)["status"] == "queued"
    move(gate, job["id"], "released")
    add_artifact(gate, job["id"], LORA)
    code, out, _ = ftgate(capsys, "jobs", "wait", job["id"], "--json")
    assert code == 0 and json.loads(out)["artifact"]["downloadable"] is True
    target = tmp_path / "w.safetensors"
    code, out, _ = ftgate(capsys, "jobs", "download", job["id"], "--out", str(target), "--json")
    assert code == 0 and json.loads(out) == {"job": job["id"], "path": str(target), "size_bytes": len(LORA)}
    code, out, _ = ftgate(capsys, "jobs", "show", job["id"])
    assert code == 0 and out.startswith(f"job {job['id']}: released") and "downloadable" in out


def test_cli_without_a_key_or_a_gate_says_so(capsys, monkeypatch):
    monkeypatch.delenv("FTGATE_API_KEY", raising=False)
    code, _, err = ftgate(capsys, "jobs", "show", "x", "--url", "http://127.0.0.1:9")
    assert code == 2 and "FTGATE_API_KEY" in err
    monkeypatch.setenv("FTGATE_API_KEY", "ftg_k_s")
    code, out, err = ftgate(capsys, "jobs", "show", "x", "--url", "http://127.0.0.1:9", "--json")
    assert code == 1 and out == "" and "cannot reach the gate at http://127.0.0.1:9" in err


# --- cancel and events, against their contract ----------------------------------------------------------------

EVENTS = [{"seq": i, "at": f"2026-01-01T00:00:0{i}+00:00", "kind": kind, "data": {"n": i}}
          for i, kind in enumerate(("stage", "loss", "loss", "checkpoint", "verdict"), start=1)]


class FakeEvents:
    """``/v1/jobs/<id>/events`` and ``/cancel`` as docs/api.md specifies them: two events per read, the job
    settled once all are out."""

    def __init__(self):
        self.afters = []

    @Request.application
    def __call__(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")  # v1 jobs <id> [events|cancel]
        job = {"id": parts[2], "status": "training", "stage": "training", "progress": 0.5}
        if parts[-1] == "events":
            after = int(request.args.get("after", 0))
            self.afters.append(after)
            page = [e for e in EVENTS if e["seq"] > after][:2]
            return Response(json.dumps({"events": page, "next": page[-1]["seq"] if page else after}),
                            content_type="application/json")
        if parts[-1] == "cancel" and request.method == "POST":
            if parts[2] == "done":
                error = {"status": 409, "reason": "job_final", "message": "job done is released", "state": "released"}
                return Response(json.dumps({"error": error}), 409, content_type="application/json")
            return Response(json.dumps(job | {"status": "cancelled"}), 202, content_type="application/json")
        settled = self.afters and self.afters[-1] >= EVENTS[-1]["seq"]
        return Response(json.dumps(job | {"status": "released" if settled else "training"}),
                        content_type="application/json")


def test_cancel_and_events_follow_their_contract():
    fake = FakeEvents()
    with served(fake) as url:
        client = Client(url, "ftg_k_s")
        assert client.cancel("j1")["status"] == "cancelled"
        with pytest.raises(GateError) as final:
            client.cancel("done")
        assert (final.value.status, final.value.reason, final.value.body["state"]) == (409, "job_final", "released")
        assert client.events("j1", after=3) == {"events": EVENTS[3:5], "next": 5}
        assert list(client.follow_events("j1", poll_s=0.01)) == EVENTS
    assert fake.afters[:4] == [3, 0, 2, 4]


def test_cli_cancel_and_followed_events(capsys, monkeypatch):
    monkeypatch.setenv("FTGATE_API_KEY", "ftg_k_s")
    with served(FakeEvents()) as url:
        code, out, _ = ftgate(capsys, "jobs", "events", "j1", "--follow", "--json", "--url", url)
        assert code == 0 and [json.loads(line) for line in out.splitlines()] == EVENTS
        code, out, _ = ftgate(capsys, "jobs", "events", "j1", "--after", "4", "--url", url)
        assert code == 0 and out.split()[:3] == ["5", EVENTS[4]["at"], "verdict"]
        code, out, err = ftgate(capsys, "jobs", "cancel", "done", "--json", "--url", url)
        assert code == 1 and json.loads(out)["error"]["reason"] == "job_final" and "409 job_final" in err


def test_lists_follow_every_page_and_an_operator_requeues_over_http(gate, capsys, monkeypatch):
    """``jobs()`` walks ``next_cursor`` to the end; ``ftgate jobs requeue`` queues a failed job again (operators)."""
    from test_api_results import make_job

    from gate.pipeline.fairness import HELD_STAGE

    client = customer(gate)
    made = [new_job(gate, client)["id"] for _ in range(3)]
    monkeypatch.setattr("gate.service.pagination.DEFAULT_LIMIT", 2)  # three jobs: two pages
    assert [j["id"] for j in client.jobs()] == made[::-1]  # newest first
    failed = make_job(gate, "failed")
    with pytest.raises(GateError) as refused:
        client.requeue(failed, "mine")
    assert refused.value.status == 403
    monkeypatch.setenv("FTGATE_URL", gate.url)
    monkeypatch.setenv("FTGATE_API_KEY", gate.keys["op"].key)
    assert main(["jobs", "requeue", failed, "--reason", "the GPU host was repaired", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["id"], job["status"], job["attempts"]) == (failed, "queued", 0)
    assert job["stage"] == HELD_STAGE and failed not in gate.enqueued  # the tenant's dispatch slots hold two of made


def test_a_reviewer_accepts_a_flagged_dataset_and_then_it_trains(gate):
    client, reviewer = customer(gate), Client(gate.url, gate.keys["rev"].key)
    flagged = client.upload_dataset(good_zip(n=20, red=1), name="flagged")
    with pytest.raises(GateError) as refused:
        client.create_job(gate.base_model_id, flagged["id"], "lora", {"steps": 10})
    assert refused.value.status == 409 and refused.value.body["reason"] == "dataset_not_trainable"
    assert [d["id"] for d in reviewer.dataset_reviews()] == [flagged["id"]]
    with pytest.raises(GateError) as not_a_reviewer:
        client.decide_dataset(flagged["id"], "accept", "mine")
    assert not_a_reviewer.value.status == 403
    decided = reviewer.decide_dataset(flagged["id"], "accept", "the flagged image is a red tile, not the concept")
    assert decided["status"] == "accepted" and reviewer.dataset_reviews() == []
    assert client.create_job(gate.base_model_id, flagged["id"], "lora", {"steps": 10})["status"] == "queued"
