"""The gate's HTTP API as Python calls, for customers and for the project's own drivers (demo, fault harness,
load benchmark): one key per client, JSON in and out, files streamed both ways.

Every refused request raises ``GateError`` carrying the API's error body (``reason``, ``message``, ``field``,
``limit``, ``maximum``, the HTTP status), so a caller branches on the same codes docs/api.md lists. Uploads are
streamed from the file (never read into memory) with a progress callback; downloads are streamed to a temporary
sibling of the target, checked against the size and sha256 the API gives for a LoRA, and only then renamed over
it, so a failed or tampered download leaves no file behind. The URL and key come from the arguments, else from
``FTGATE_URL`` and ``FTGATE_API_KEY``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import requests

from gate.settings import KEY_ENV, URL_ENV

# States a job leaves only by a person's act (a reviewer's decision, an operator's requeue), or never.
SETTLED = ("released", "review", "withheld", "failed", "cancelled")
# A dataset's intake (or its screening for a base model) has decided; ``received`` and ``screening`` have not.
DATASET_SETTLED = ("accepted", "flagged", "rejected", "failed")
TIMEOUT_S = 60.0  # one HTTP request
WAIT_S = 3600.0  # a whole job: training and audit
INTAKE_WAIT_S = 1800.0  # a dataset's intake on a worker: archive checks, re-encoding, scans
POLL_S, MAX_POLL_S, BACKOFF = 1.0, 15.0, 1.5  # waits poll from POLL_S, stretching by BACKOFF while nothing moves
CHUNK_BYTES = 1 << 20
ZIP_TYPE = "application/zip"
USER_AGENT = f"ftgate-client/{importlib.metadata.version('ftgate')}"

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None when the server did not say)


class GateError(Exception):
    """A request the API refused: its HTTP status and error body (``reason`` is the code to branch on)."""

    def __init__(self, status: int, body: Mapping[str, Any], method: str, path: str):
        self.status, self.body, self.method, self.path = status, dict(body), method, path
        self.reason: str = self.body.get("reason", "http_error")
        self.message: str = self.body.get("message", "")
        self.field: str | None = self.body.get("field")
        self.limit: str | None = self.body.get("limit")
        self.maximum = self.body.get("maximum")
        where = "".join(f", {name} {value}" for name, value in (("field", self.field), ("limit", self.limit),
                                                                 ("maximum", self.maximum)) if value is not None)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}{where}")

    @classmethod
    def from_response(cls, response: requests.Response) -> GateError:
        path = urlsplit(response.request.url).path
        try:
            body = response.json()["error"]
            if not isinstance(body, dict):
                raise TypeError(body)
        except (ValueError, KeyError, TypeError):  # not the API's JSON (a proxy's page, say)
            body = {"reason": "http_error", "message": response.text[:500]}
        return cls(response.status_code, body, response.request.method, path)


class DownloadError(Exception):
    """A download whose bytes are not the checkpoint the API described (size or sha256); nothing was kept."""


class WaitTimeout(TimeoutError):
    """Jobs (or datasets) not settled within the wait's timeout; ``jobs`` holds each one as last seen."""

    def __init__(self, jobs: dict[str, dict], timeout_s: float, settled: tuple[str, ...] = SETTLED,
                 what: str = "jobs"):
        self.jobs, self.timeout_s = jobs, timeout_s
        pending = sorted(i for i, row in jobs.items() if row["status"] not in settled)
        super().__init__(f"{what} not settled after {timeout_s:g} s: {pending}")


class _MultipartBody:
    """A ``multipart/form-data`` body read in pieces: the form fields, then the file straight from its stream,
    so an upload of any size takes no memory; ``len`` gives requests its Content-Length. (Not an ``io`` stream:
    requests would take its ``tell`` for the read position and send the body chunked, which the API refuses.)"""

    def __init__(self, fields: Mapping[str, str], filename: str, stream: IO[bytes], size: int,
                 progress: Progress | None):
        self.boundary = uuid.uuid4().hex
        head = b"".join(self._part(f'name="{_quoted(name)}"') + value.encode() + b"\r\n"
                        for name, value in fields.items())
        head += self._part(f'name="file"; filename="{_quoted(filename)}"', ZIP_TYPE)
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._pieces = [io.BytesIO(head), stream, io.BytesIO(tail)]
        self._head, self._file_size, self._size = len(head), size, len(head) + size + len(tail)
        self._sent, self._progress = 0, progress

    def _part(self, disposition: str, content_type: str | None = None) -> bytes:
        typed = f"Content-Type: {content_type}\r\n" if content_type else ""
        return f"--{self.boundary}\r\nContent-Disposition: form-data; {disposition}\r\n{typed}\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        size = CHUNK_BYTES if size is None or size < 0 else size
        while self._pieces:
            data = self._pieces[0].read(size)
            if data:
                self._sent += len(data)
                if self._progress is not None:
                    self._progress(min(max(self._sent - self._head, 0), self._file_size), self._file_size)
                return data
            self._pieces.pop(0)
        return b""


def _quoted(text: str) -> str:
    """A multipart header value as browsers write it (HTML's form encoding): quotes and line breaks escaped."""
    return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _segment(value: str) -> str:
    """An id as one path segment; refused if it could name another route (servers decode ``%2F`` back to ``/``)."""
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"not an id: {value!r}")
    return quote(value, safe="")


def _settled(job: dict) -> bool:
    return job["status"] in SETTLED


class Client:
    """One caller of the gate's API: its URL and API key (``Authorization: Bearer``), one HTTP session."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout_s: float = TIMEOUT_S,
                 env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        url, key = url or env.get(URL_ENV), key or env.get(KEY_ENV)
        if not url:
            raise ValueError(f"no gate URL: pass url (--url) or set {URL_ENV}")
        if not key:
            raise ValueError(f"no API key: pass key or set {KEY_ENV}")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT})

    # --- HTTP -------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, check: bool = True, **kwargs) -> requests.Response:
        """One API call; a non-2xx answer raises ``GateError`` unless ``check`` is false (then it is returned)."""
        response = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        if check and not response.ok:
            raise GateError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs) -> dict:
        return self.request(method, path, **kwargs).json()

    def _save(self, path: str, out: str | Path, progress: Progress | None = None,
              expect: dict | None = None) -> Path:
        """Stream ``GET path`` into a temporary sibling of ``out``, check it against ``expect`` (``size_bytes``,
        ``sha256``) if given, then rename it over ``out``; on any failure the temporary file is removed."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f, self.request("GET", path, stream=True) as response:
                total = int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
                digest, done = hashlib.sha256(), 0
                for chunk in response.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                f.flush()
                os.fsync(f.fileno())
            if expect is not None:
                if done != expect["size_bytes"] or digest.hexdigest() != expect["sha256"]:
                    raise DownloadError(f"GET {path}: got {done} bytes with sha256 {digest.hexdigest()}, the API "
                                        f"described {expect['size_bytes']} bytes with sha256 {expect['sha256']}; "
                                        f"nothing was written to {out}")
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    # --- datasets ---------------------------------------------------------------------------------------------

    def upload_dataset(self, source: str | Path | bytes | IO[bytes], *, name: str | None = None,
                       filename: str | None = None, progress: Progress | None = None, wait: bool = True,
                       timeout_s: float = INTAKE_WAIT_S, on_poll: Callable[[dict], None] | None = None) -> dict:
        """``POST /v1/datasets``: a dataset zip from a path, bytes or a seekable binary file, streamed. The gate
        answers ``received`` and takes it in on a worker; with ``wait`` (the default) this returns the dataset
        once its intake has decided (``DATASET_SETTLED``; ``on_poll`` sees each read), else the answer as is."""
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                return self.upload_dataset(f, name=name, filename=filename or Path(source).name, progress=progress,
                                           wait=wait, timeout_s=timeout_s, on_poll=on_poll)
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        size = stream.seek(0, os.SEEK_END) - stream.seek(0)
        body = _MultipartBody({"name": name} if name is not None else {}, filename or "dataset.zip", stream, size,
                              progress)
        dataset = self._json("POST", "/v1/datasets", data=body, headers={"Content-Type": body.content_type})
        return self.wait_dataset(dataset["id"], timeout_s=timeout_s, on_poll=on_poll) if wait else dataset

    def dataset(self, dataset_id: str) -> dict:
        return self._json("GET", f"/v1/datasets/{_segment(dataset_id)}")

    def wait_dataset(self, dataset_id: str, *, timeout_s: float = INTAKE_WAIT_S, poll_s: float = POLL_S,
                     max_poll_s: float = MAX_POLL_S, on_poll: Callable[[dict], None] | None = None) -> dict:
        """The dataset once its intake or screening has decided (``DATASET_SETTLED``), polling as ``wait_all``
        does; raises ``WaitTimeout`` after ``timeout_s``."""
        return self._poll(self.dataset, [dataset_id], lambda d: d["status"] in DATASET_SETTLED, ("status",),
                          timeout_s, poll_s, max_poll_s, on_poll, DATASET_SETTLED, "datasets")[dataset_id]

    # --- jobs -------------------------------------------------------------------------------------------------

    def create_job(self, base_model: str, dataset: str, method: str, hyperparameters: dict | None = None,
                   idempotency_key: str | None = None, on_poll: Callable[[dict], None] | None = None) -> dict:
        """``POST /v1/jobs``; with ``idempotency_key``, a retry returns the job the first call created. A dataset
        the gate first screens with the base model's detector (409 ``dataset_screening``) is waited for
        (``on_poll`` sees it) and the job created once it is accepted; otherwise that 409 is raised."""
        body = {"base_model": base_model, "dataset": dataset, "method": method,
                "hyperparameters": hyperparameters or {}}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        try:
            return self._json("POST", "/v1/jobs", json=body)
        except GateError as exc:
            if exc.reason != "dataset_screening" or self.wait_dataset(dataset, on_poll=on_poll)["status"] != "accepted":
                raise
        return self._json("POST", "/v1/jobs", json=body)

    def job(self, job_id: str) -> dict:
        """The job with its verdict, review and checkpoint (``artifact``: kind, size, sha256, downloadable)."""
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}")

    def jobs(self) -> list[dict]:
        """The caller's jobs (staff: every tenant's), newest first, every page."""
        return self._pages("/v1/jobs", "jobs")

    def _pages(self, path: str, key: str) -> list[dict]:
        """Every row of a paginated list, following ``next_cursor`` (docs/api.md, "Pages")."""
        rows, cursor = [], None
        while True:
            page = self._json("GET", path, params={"cursor": cursor} if cursor else None)
            rows += page[key]
            if (cursor := page.get("next_cursor")) is None:
                return rows

    def requeue(self, job_id: str, reason: str) -> dict:
        """Operators: ``POST /v1/jobs/<id>/requeue``, a failed job queued again from a clean state."""
        return self._json("POST", f"/v1/jobs/{_segment(job_id)}/requeue", json={"reason": reason})

    def cancel(self, job_id: str) -> dict:
        """``POST /v1/jobs/<id>/cancel``: the job as the cancel left it (a running job stops at its next step);
        ``GateError`` ``job_final`` (409) if it had already finished."""
        return self._json("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def wait(self, job_id: str, *, until: Callable[[dict], bool] = _settled, timeout_s: float = WAIT_S,
             poll_s: float = POLL_S, max_poll_s: float = MAX_POLL_S,
             on_poll: Callable[[dict], None] | None = None) -> dict:
        """The job once ``until(job)`` holds (default: a settled state, ``SETTLED``); see ``wait_all``."""
        return self.wait_all([job_id], until=until, timeout_s=timeout_s, poll_s=poll_s, max_poll_s=max_poll_s,
                             on_poll=on_poll)[job_id]

    def wait_all(self, job_ids: Iterable[str], *, until: Callable[[dict], bool] = _settled,
                 timeout_s: float = WAIT_S, poll_s: float = POLL_S, max_poll_s: float = MAX_POLL_S,
                 on_poll: Callable[[dict], None] | None = None) -> dict[str, dict]:
        """Poll each job until ``until`` holds for all of them. The interval starts at ``poll_s`` and stretches by
        ``BACKOFF`` up to ``max_poll_s`` while no job's status, stage or progress changes. ``on_poll`` sees every
        job read (progress bars). Raises ``WaitTimeout`` after ``timeout_s``."""
        return self._poll(self.job, job_ids, until, ("status", "stage", "progress"), timeout_s, poll_s, max_poll_s,
                          on_poll, SETTLED, "jobs")

    @staticmethod
    def _poll(read: Callable[[str], dict], ids: Iterable[str], until: Callable[[dict], bool], keys: tuple[str, ...],
              timeout_s: float, poll_s: float, max_poll_s: float, on_poll: Callable[[dict], None] | None,
              settled: tuple[str, ...], what: str) -> dict[str, dict]:
        """``read`` each id until ``until`` holds for all, backing off while none of ``keys`` changes."""
        pending, seen, done = list(dict.fromkeys(ids)), {}, {}
        deadline, interval = time.monotonic() + timeout_s, poll_s
        while True:
            moved = False
            for row_id in pending:
                row = read(row_id)
                before = seen.get(row_id)
                moved |= before is None or any(row[k] != before[k] for k in keys)
                seen[row_id] = row
                if on_poll is not None:
                    on_poll(row)
                if until(row):
                    done[row_id] = row
            pending = [i for i in pending if i not in done]
            if not pending:
                return {row_id: done[row_id] for row_id in seen}
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(seen, timeout_s, settled, what)
            interval = poll_s if moved else min(interval * BACKOFF, max_poll_s)
            time.sleep(min(interval, left))

    def events(self, job_id: str, after: int | None = None) -> dict:
        """``GET /v1/jobs/<id>/events``: ``{"events": [{seq, at, kind, data}], "next": seq}``, the events after
        ``after`` (all when None); pass ``next`` as ``after`` to read on."""
        params = {} if after is None else {"after": after}
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}/events", params=params)

    def follow_events(self, job_id: str, after: int | None = None, *, timeout_s: float = WAIT_S,
                      poll_s: float = POLL_S, max_poll_s: float = MAX_POLL_S) -> Iterator[dict]:
        """Each event of the job as it comes, until the job settles and its last events are read."""
        deadline, interval = time.monotonic() + timeout_s, poll_s
        while True:
            page = self.events(job_id, after)
            yield from page["events"]
            after = page["next"]
            if page["events"]:
                interval = poll_s
                continue
            job = self.job(job_id)
            if _settled(job):
                page = self.events(job_id, after)  # what was written between the two reads
                yield from page["events"]
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout({job_id: job}, timeout_s)
            time.sleep(min(interval, left))
            interval = min(interval * BACKOFF, max_poll_s)

    def download(self, job_id: str, out: str | Path, *, progress: Progress | None = None) -> Path:
        """The released job's checkpoint into ``out`` (``pytorch_lora_weights.safetensors`` for a LoRA, the
        ``unet.zip`` folder for DreamBooth). A LoRA is checked against the size and sha256 of the job's
        ``artifact`` (a DreamBooth zip is assembled on the fly, so only its transfer is checked)."""
        artifact = self.job(job_id)["artifact"]
        expect = artifact if artifact is not None and artifact["kind"] == "lora" else None
        return self._save(f"/v1/jobs/{_segment(job_id)}/artifact", out, progress, expect)

    def report(self, job_id: str) -> dict:
        """The audit report as the caller may read it (a customer's view: verdict and figures)."""
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}/report")

    def save_report(self, job_id: str, out: str | Path, *, html: bool = False) -> Path:
        """The report's bytes as served (JSON, or the page with ``html``) into ``out``."""
        return self._save(f"/v1/jobs/{_segment(job_id)}/report{'.html' if html else ''}", out)

    def log(self, job_id: str) -> list[dict]:
        """The job's audit-log entries, oldest first."""
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}/log")["entries"]

    # --- operators and reviewers ------------------------------------------------------------------------------

    def create_base_model(self, name: str, path: str, audit_profile: dict, **fields) -> dict:
        """``POST /v1/base-models`` (operators): ``fields`` are the optional ``config``, ``variant``, ``vae``."""
        return self._json("POST", "/v1/base-models", json={"name": name, "path": path,
                                                           "audit_profile": audit_profile, **fields})

    def base_model(self, base_model_id: str) -> dict:
        return self._json("GET", f"/v1/base-models/{_segment(base_model_id)}")

    def reviews(self) -> list[dict]:
        """Jobs waiting for a reviewer, oldest first (reviewers, operators)."""
        return self._pages("/v1/reviews", "jobs")

    def decide_review(self, job_id: str, decision: str, reason: str) -> dict:
        """A reviewer's ``approve`` or ``reject`` of a job in review."""
        return self._json("POST", f"/v1/reviews/{_segment(job_id)}", json={"decision": decision, "reason": reason})

    def dataset_reviews(self) -> list[dict]:
        """Flagged datasets waiting for a reviewer, oldest first (reviewers, operators)."""
        return self._pages("/v1/dataset-reviews", "datasets")

    def decide_dataset(self, dataset_id: str, decision: str, reason: str) -> dict:
        """A reviewer's ``accept`` or ``reject`` of a flagged dataset: an accepted one can train."""
        return self._json("POST", f"/v1/datasets/{_segment(dataset_id)}/review",
                          json={"decision": decision, "reason": reason})
