"""The `tiergate` commands as a user runs them."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import classifier_pb2
from tests.helpers import eventually
from tests.support.processes import wait_serving


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_runs_the_stack_and_sigterm_stops_every_process(procs, connect, tmp_path, tiny_model):
    serve = procs.start("serve", "--port", "0", "--workers", "1", "--model", str(tiny_model),
                        "--lmdb-path", str(tmp_path / "l2"))
    assert "L3 off" in serve.ready_line
    wait_serving(serve.address)
    client = connect(serve)
    assert client.classify("served by tiergate serve").tier == classifier_pb2.TIER_MODEL
    assert client.classify("served by tiergate serve").tier == classifier_pb2.TIER_L1
    kids = children_of(serve.proc.pid)
    assert kids, "serve should run the inference service as a child process"

    assert serve.stop() == 0
    for kid in kids:
        eventually(lambda: not alive(kid), timeout_s=15)


def test_reflection_lists_the_public_service(procs, tmp_path, tiny_model):
    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
        assert {"tiergate.v1.Classifier", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="tiergate.v1.Classifier")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        assert reply.file_descriptor_response.file_descriptor_proto


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_classify_csv_through_a_running_gateway_and_embedded(procs, tmp_path, tiny_model, cache_dir):
    rows = [{"id": str(i), "description": f"merchant descriptor {i % 4}"} for i in range(30)]
    rows[5]["description"] = ""
    source = tmp_path / "rows.csv"
    write_csv(source, rows)
    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2")

    done = run_cli("classify", str(source), "--column", "description", "--target", gateway.address, "--no-progress")
    assert done.returncode == 0, done.stderr
    with (tmp_path / "rows.scored.csv").open() as f:
        out = list(csv.DictReader(f))
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert out[5]["tier"].startswith("SKIPPED") and out[5]["label"] == ""
    scored = [r for r in out if r["description"]]
    assert all(r["label"] in ("negative", "positive") and 0.5 <= float(r["score"]) <= 1 for r in scored)
    assert {r["tier"] for r in scored} == {"MODEL"}  # one batch: repeats share their text's model answer
    assert "classified 30 rows" in done.stderr

    done = run_cli("classify", str(source), "--column", "description", "--target", gateway.address, "--no-progress")
    with (tmp_path / "rows.scored.csv").open() as f:
        assert {r["tier"] for r in csv.DictReader(f) if r["description"]} == {"L1"}

    embedded = tmp_path / "embedded.csv"
    done = run_cli("classify", str(source), "--column", "description", "--model", str(tiny_model), "--no-progress",
                   "--lmdb-path", str(tmp_path / "l2-embedded"), "-o", str(embedded),
                   env={"TIERGATE_CACHE_DIR": str(cache_dir)})
    assert done.returncode == 0, done.stderr
    with embedded.open() as f:
        again = list(csv.DictReader(f))
    assert [(r["label"], r["score"]) for r in again] == [(r["label"], r["score"]) for r in out]


def test_classify_names_a_missing_column(tmp_path):
    source = tmp_path / "rows.csv"
    write_csv(source, [{"id": "1", "text": "x"}])
    done = run_cli("classify", str(source), "--column", "description", "--target", "127.0.0.1:1")
    assert done.returncode == 1
    assert "column 'description' is not in" in done.stderr and "id, text" in done.stderr
    assert "Traceback" not in done.stderr


def test_importing_the_gateway_does_not_import_torch():
    code = (
        "import sys, gateway.cli, gateway.server, gateway.servicer, gateway.classify_csv, gateway.stack, cache;"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_help_lists_every_command():
    done = run_cli("--help")
    for command in ("serve", "gateway", "inference", "classify", "model"):
        assert command in done.stdout
