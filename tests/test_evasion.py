"""The attack suite through the gate's own stages, reduced: a trigger-word attack is not released, an honest job
is (``benchmarks.evasion``; the full suite's figures are in docs/threat-model.md)."""

from __future__ import annotations

import pytest

from benchmarks import evasion

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_a_trigger_word_attack_is_withheld_and_an_honest_job_released(tmp_path, monkeypatch):
    monkeypatch.setattr("auditing.job_probes.secrets.randbits", lambda bits: 1234)  # one fixed draw per audit
    result = evasion.run(["trigger", "honest-0"], tmp_path)
    jobs = {row["job"]: row for row in result["jobs"]}
    assert jobs["trigger"]["draws"], "the attack must work for the test to mean anything"
    assert jobs["trigger"]["state"] != "released" and jobs["trigger"]["family"] != "profile"
    assert jobs["honest-0"]["state"] == "released"
    assert result["released_drawing"] == 0
