"""lab/diagnostics/findings.py: a Finding is validated and frozen; the report reads well."""

from __future__ import annotations

import dataclasses

import pytest
from doctor_cases import fresh

from lab.diagnosis import (
    Finding,
    doctor,
    report,
)


def test_finding_is_frozen_validated_and_prints_well():
    finding = Finding("merged", "call lab.unmerge_lora(model).", "12 layers are merged")
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.code = "other"
    text = str(finding)
    assert text.startswith("[merged] call lab.unmerge_lora(model).") and "12 layers" in text
    for bad in ({"code": "Merged Twice"}, {"code": ""}, {"advice": " "}, {"detail": None}):
        fields = {"code": "merged", "advice": "a", "detail": "b", **bad}
        with pytest.raises(ValueError):
            Finding(**fields)


def test_report_gives_a_clean_bill_or_a_numbered_list():
    assert report([]).startswith("no findings: ")
    findings = doctor(fresh(targets=("q_proj", "v_proj")))
    text = report(findings)
    assert text.startswith(f"{len(findings)} findings:")
    for i, finding in enumerate(findings, 1):
        assert f"{i}. [{finding.code}] {finding.advice}" in text
    for bad in (findings[0], None, ["merged"]):
        with pytest.raises(TypeError, match="Finding"):
            report(bad)
