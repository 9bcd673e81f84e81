"""The checked-in generated code matches protos/*.proto (regenerate: python scripts/gen_protos.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "protos").iterdir())
    assert generated, "protoc generated nothing"
    for rel in generated:
        checked_in = ROOT / rel
        assert checked_in.exists(), f"{rel} is not checked in: run python scripts/gen_protos.py"
        assert checked_in.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run python scripts/gen_protos.py"


def test_public_contract_field_numbers():
    from protos import classifier_pb2 as pb

    fields = {f.name: f.number for f in pb.ClassifyResponse.DESCRIPTOR.fields}
    # The fixed four; more fields may be added after them.
    assert {k: v for k, v in fields.items() if v <= 4} == {"label": 1, "score": 2, "tier": 3, "model": 4}
    assert fields["error"] == 5 and pb.ItemError.DESCRIPTOR.fields_by_name["code"].number == 1
    assert pb.ClassifyRequest.DESCRIPTOR.fields_by_name["text"].number == 1
    assert pb.ClassifyBatchRequest.DESCRIPTOR.fields_by_name["texts"].number == 1
    assert pb.ClassifyBatchResponse.DESCRIPTOR.fields_by_name["results"].number == 1
    assert {v.name: v.number for v in pb.Tier.DESCRIPTOR.values} == {
        "TIER_UNSPECIFIED": 0, "TIER_L1": 1, "TIER_L2": 2, "TIER_L3": 3, "TIER_MODEL": 4}
    assert pb.DESCRIPTOR.package == "tiergate.v1"
