"""`tiergate classify` as a user runs it, on a real stack: the embedded one
(in-process gateway, inference child, LMDB in a temp dir) or a running gateway."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import children_of, eventually

SCORE_TOLERANCE = 2e-5  # answers are batch-invariant to 1e-5; the file prints 6 decimals


def write_csv(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: pathlib.Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def review_rows(count: int, tag: str = "") -> list[dict]:
    words = "fine ripe dull bright sour sweet oaky flat crisp lush thin bold".split()
    return [{"id": str(i), "description": " ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 5))
             + f" {tag}{i}", "points": str(80 + i % 20)} for i in range(count)]


def classify_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "classify", *args]


def run_classify(*args: str, env: dict, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(classify_argv(*args), capture_output=True, timeout=timeout, env={**os.environ, **env},
                          input=stdin)


@pytest.fixture
def env(cache_dir) -> dict:
    return {"TIERGATE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def embedded_args(model: pathlib.Path, l2: pathlib.Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--lmdb-path", str(l2), "--no-progress", *extra]


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [(r["label"], r["error"]) for r in got] == [(r["label"], r["error"]) for r in want]
    for a, b in zip(got, want):
        if a["score"]:
            assert abs(float(a["score"]) - float(b["score"])) <= SCORE_TOLERANCE, (a, b)


def test_a_file_larger_than_the_model_queue_finishes_in_order(tmp_path, tiny_model, env):
    rows = review_rows(400)
    source = write_csv(tmp_path / "reviews.csv", rows)
    # A queue of 4 texts against calls of 64: nearly every call is refused at
    # first; the job must slow down and split its calls, not fail.
    done = run_classify(str(source), "--column", "description",
                        *embedded_args(tiny_model, tmp_path / "l2", "--max-queue", "4"), env=env)
    assert done.returncode == 0, done.stderr.decode()
    out = read_csv(tmp_path / "reviews.scored.csv")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert [r["description"] for r in out] == [r["description"] for r in rows]
    assert all(r["label"] in ("negative", "positive") and r["error"] == "" for r in out)
    assert all(r["tier"] == "MODEL" or r["tier"] == "L1" for r in out)
    stderr = done.stderr.decode()
    assert "classified 400 rows" in stderr and "0 errors" in stderr
    assert "Traceback" not in stderr and "ERROR" not in stderr and "WARNING" not in stderr


def test_rows_the_gateway_rejects_get_an_error_value_and_the_rest_are_scored(tmp_path, tiny_model, env):
    rows = review_rows(40)
    rows[3]["description"] = "   "
    rows[11]["description"] = "x" * 9000  # over the gateway's --max-text-bytes
    source = write_csv(tmp_path / "reviews.csv", rows)
    done = run_classify(str(source), "--column", "description", *embedded_args(tiny_model, tmp_path / "l2"), env=env)
    assert done.returncode == 3, done.stderr.decode()  # complete, but some rows failed
    out = read_csv(tmp_path / "reviews.scored.csv")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert out[3]["error"] == "the text is empty or only whitespace" and out[3]["label"] == ""
    assert "9000 bytes" in out[11]["error"] and "--max-text-bytes" in out[11]["error"] and out[11]["label"] == ""
    scored = [r for i, r in enumerate(out) if i not in (3, 11)]
    assert all(r["label"] and r["error"] == "" and 0 <= float(r["score"]) <= 1 for r in scored)
    assert "2 errors" in done.stderr.decode()


def _wait_for_rows(record: pathlib.Path, at_least: int, proc: subprocess.Popen) -> None:
    def written() -> bool:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        try:
            return json.loads(record.read_text())["rows"] >= at_least
        except (OSError, ValueError):
            return False

    eventually(written, timeout_s=120, interval_s=0.01)


def test_an_interrupted_run_resumed_gives_the_uninterrupted_file(tmp_path, tiny_model, env):
    rows = review_rows(3000)
    source = write_csv(tmp_path / "reviews.csv", rows)
    whole = tmp_path / "whole.csv"
    done = run_classify(str(source), "--column", "description", "-o", str(whole),
                        *embedded_args(tiny_model, tmp_path / "l2-whole"), env=env)
    assert done.returncode == 0, done.stderr.decode()

    out = tmp_path / "resumed.csv"
    partial, record = pathlib.Path(f"{out}.partial"), pathlib.Path(f"{out}.partial.json")
    # Small calls and a small queue keep the job going long enough to stop it halfway.
    args = ["--column", "description", "-o", str(out), "--batch-size", "8",
            *embedded_args(tiny_model, tmp_path / "l2-resumed", "--max-queue", "8")]
    proc = subprocess.Popen(classify_argv(str(source), *args), stderr=subprocess.PIPE, env={**os.environ, **env})
    _wait_for_rows(record, 200, proc)
    assert not out.exists(), "the output must not exist under its final name before it is complete"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert "--resume" in stderr.decode() and "Traceback" not in stderr.decode()
    assert not out.exists() and partial.exists()
    done_rows = json.loads(record.read_text())["rows"]
    assert 200 <= done_rows < len(rows)
    first_part = read_csv(partial)
    assert len(first_part) == done_rows  # every written row is whole

    done = run_classify(str(source), *args, "--resume", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert f"resumed after {done_rows} rows" in done.stderr.decode()
    assert not partial.exists() and not record.exists()
    resumed = read_csv(out)
    assert_same_answers(resumed, read_csv(whole))
    # Rows written before the interruption were not scored again.
    assert f"classified {len(rows) - done_rows} rows" in done.stderr.decode()


def test_a_warm_embedded_rerun_answers_from_l2_without_starting_the_model(tmp_path, tiny_model, env):
    rows = review_rows(300, tag="warm")
    source = write_csv(tmp_path / "reviews.csv", rows)
    l2 = tmp_path / "l2"
    cold = run_classify(str(source), "--column", "description", "-o", str(tmp_path / "cold.csv"),
                        *embedded_args(tiny_model, l2), env=env)
    assert cold.returncode == 0, cold.stderr.decode()
    assert "300 scored by the model" in cold.stderr.decode()

    proc = subprocess.Popen(classify_argv(str(source), "--column", "description", "-o", str(tmp_path / "warm.csv"),
                                          *embedded_args(tiny_model, l2)),
                            stderr=subprocess.PIPE, env={**os.environ, **env})
    children: set[int] = set()
    while proc.poll() is None:
        children |= set(children_of(proc.pid))
        time.sleep(0.005)
    stderr = proc.communicate()[1].decode()
    assert proc.returncode == 0, stderr
    assert children == set(), "the warm run started a child process (the inference service)"
    assert "300 from L2" in stderr and "the model was not needed" in stderr
    assert_same_answers(read_csv(tmp_path / "warm.csv"), read_csv(tmp_path / "cold.csv"))

    # New rows in the same file: the model starts at the first miss, and both kinds are answered.
    more = write_csv(tmp_path / "more.csv", rows + review_rows(5, tag="new"))
    done = run_classify(str(more), "--column", "description", *embedded_args(tiny_model, l2), env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert "5 scored by the model" in done.stderr.decode() and "300 from L2" in done.stderr.decode()


def test_stdin_and_json_lines(tmp_path, tiny_model, env):
    lines = [json.dumps({"id": 1, "text": "ripe and lush"}), "not json", json.dumps({"id": 2}),
             json.dumps({"id": 3, "text": "flat and thin"})]
    done = run_classify("-", "--column", "text", "--input-format", "jsonl", *embedded_args(tiny_model, tmp_path / "l2"),
                        env=env, stdin=("\n".join(lines) + "\n").encode())
    assert done.returncode == 3, done.stderr.decode()
    out = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [o.get("id") for o in out] == [1, None, 2, 3]
    assert out[0]["label"] in ("negative", "positive") and isinstance(out[0]["score"], float) and out[0]["error"] is None
    assert out[1] == {"input": "not json", "label": None, "score": None, "tier": None, "model": None,
                      "error": "line 2 is not JSON"}
    assert out[2]["error"] == "line 3 has no text in 'text'"
    assert out[3]["label"] and out[3]["tier"] == "MODEL"


def test_text_that_is_not_utf8_gets_an_error_and_its_bytes_are_kept(tmp_path, tiny_model, env):
    source = tmp_path / "bytes.csv"
    source.write_bytes(b"id,description\n1,caf\xe9 bad bytes\n2,good wine\n")
    out = tmp_path / "bytes.scored.csv"
    done = run_classify(str(source), "--column", "description", "-o", str(out),
                        *embedded_args(tiny_model, tmp_path / "l2"), env=env)
    assert done.returncode == 3, done.stderr.decode()
    raw = out.read_bytes()
    assert b"caf\xe9 bad bytes" in raw  # not "repaired" into another text
    rows = list(csv.reader(raw.decode("utf-8", "replace").splitlines()))
    assert rows[1][-1] == "the text in column 'description' is not valid UTF-8"
    assert rows[2][2] in ("negative", "positive")  # id, description, label, ...


def test_through_a_running_gateway(procs, tmp_path, tiny_model, env):
    gateway = procs.gateway(procs.inference(tiny_model, "--max-queue", "4"), tmp_path / "l2")
    rows = review_rows(200, tag="target")
    source = write_csv(tmp_path / "reviews.csv", rows)
    done = run_classify(str(source), "--column", "description", "--target", gateway.address, "--no-progress",
                        env=env)
    assert done.returncode == 0, done.stderr.decode()
    first = read_csv(tmp_path / "reviews.scored.csv")
    assert [r["id"] for r in first] == [r["id"] for r in rows] and all(r["label"] for r in first)
    again = run_classify(str(source), "--column", "description", "--target", gateway.address, "--no-progress",
                         "--format", "jsonl", env=env)
    assert again.returncode == 0 and "200 from L1" in again.stderr.decode()
    second = [json.loads(line) for line in (tmp_path / "reviews.scored.jsonl").read_text().splitlines()]
    assert [(o["id"], o["label"], o["tier"]) for o in second] == [(r["id"], r["label"], "L1") for r in first]


def test_an_unreachable_gateway_stops_the_job_after_max_retry_s_and_keeps_nothing(tmp_path, env):
    source = write_csv(tmp_path / "reviews.csv", review_rows(5))
    started = time.monotonic()
    done = run_classify(str(source), "--column", "description", "--target", "127.0.0.1:1", "--max-retry-s", "1",
                        env=env)
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert "UNAVAILABLE" in stderr and "--max-retry-s 1" in stderr and "Traceback" not in stderr
    assert time.monotonic() - started < 30
    assert list(tmp_path.iterdir()) == [source]  # no output, no partial file: nothing was done


def test_a_missing_column_is_named(tmp_path, env):
    source = write_csv(tmp_path / "rows.csv", [{"id": "1", "text": "x"}])
    done = run_classify(str(source), "--column", "description", "--target", "127.0.0.1:1", env=env)
    assert done.returncode == 1
    assert b"column 'description' is not in" in done.stderr and b"id, text" in done.stderr
    assert b"Traceback" not in done.stderr
