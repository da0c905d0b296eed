"""Whether a dataset may train on a base model: accepted, and scanned with that model's detector.

The intake scans every upload with NudeNet and with the detector of every base model registered at the time
(``gate.pipeline.intake``). A base model registered later may audit for a concept no scan of the dataset looked
for (the shapes world's red triangle; a real model hardened against another concept), so the first job on it
has its dataset screened for that concept before anything trains: the dataset goes ``screening``, a worker
scans it, and the client creates the job again once the dataset is ``accepted`` (or it waits for a reviewer,
flagged, like any flagged dataset).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from gate.auth import Principal
from gate.pipeline.intake import INTAKE_STATES, detector_key, profile_detector, screened
from gate.storage.audit_log import StaleState, transition
from gate.storage.clock import db_time
from gate.storage.models import TRAINABLE_DATASET, BaseModel, Dataset

from .errors import ApiError

log = logging.getLogger(__name__)


def require_trainable(session: Session, principal: Principal, dataset: Dataset, base_model: BaseModel,
                      dispatcher) -> None:
    """Return if ``dataset`` may train on ``base_model``; else a 409 naming ``dataset``: ``dataset_not_ready``
    while its intake runs, ``dataset_not_trainable`` when it is not accepted, ``dataset_screening`` after
    committing it to ``screening`` and calling ``dispatcher.dataset(dataset_id)`` when it was never scanned with
    the base model's detector (the client waits for ``GET /v1/datasets/<id>`` and creates the job again)."""
    wait = f"create the job once GET /v1/datasets/{dataset.id} shows it {TRAINABLE_DATASET}"
    if dataset.status in INTAKE_STATES:
        raise ApiError(409, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}: its intake has not "
                                                 f"finished; {wait}", field="dataset", dataset_status=dataset.status)
    if dataset.status != TRAINABLE_DATASET:
        why = ("it waits for a reviewer, and can train once a reviewer accepts it" if dataset.status == "flagged"
               else f"only {TRAINABLE_DATASET} datasets can train")
        raise ApiError(409, "dataset_not_trainable", f"dataset {dataset.id} is {dataset.status}: {why}",
                       field="dataset")
    name, options = profile_detector(base_model)
    key = detector_key(name, options)
    if key in screened(dataset):
        return
    try:
        transition(session, dataset, "screening", principal,
                   reason=f"base model {base_model.id} audits with {name}, which has not scanned it",
                   detail={"detector": key, "base_model": base_model.id},
                   changes={"attempts": 0, "error": None, "dispatched_at": db_time()})
        session.commit()
    except StaleState:  # another request started the screening first
        session.rollback()
    else:
        try:
            dispatcher.dataset(dataset.id)
        except Exception:  # the broker is away: the reaper dispatches a screening whose dispatch is overdue
            log.exception("dataset %s: its screening could not be dispatched; the reaper will send it", dataset.id)
    # The customer is not told which detector: it would say what to train against (docs/threat-model.md).
    raise ApiError(409, "dataset_screening", f"dataset {dataset.id} was never screened for what base model "
                                             f"{base_model.id} is audited for; it is being screened now: {wait}",
                   field="dataset", dataset_status="screening")
