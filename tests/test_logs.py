"""Log lines: JSON or text, one line per event, and failures told when they start, go on and end."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from protos.logs import Trouble


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_trouble_is_told_when_it_starts_goes_on_and_ends(caplog):
    caplog.set_level(logging.WARNING)
    clock = Clock()
    trouble = Trouble(logging.getLogger("t"), "L2 at /x", every_s=60, clock=clock)
    for second in range(0, 130):  # an error every second for 130 s
        clock.now = second
        trouble.failed("writes", OSError(28, "No space left on device"))
    assert trouble.failing
    clock.now = 130.5
    trouble.ok("writes")
    trouble.ok("writes")  # nothing more to tell
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "L2 at /x: writes errors started: OSError(28, 'No space left on device')"
    assert lines[1].startswith("L2 at /x: writes errors go on: 60 in the last 60 s, 61 in all")
    assert lines[2].startswith("L2 at /x: writes errors go on: 60 in the last 60 s, 121 in all")
    assert lines[3] == "L2 at /x: writes works again after 130.5 s (130 errors)"
    assert len(lines) == 4 and not trouble.failing


def test_json_logs_are_one_object_per_line_even_with_a_traceback():
    code = ("import logging; from protos.logs import configure_logging; configure_logging('INFO', 'json');"
            "log = logging.getLogger('tiergate.test'); log.warning('plain %d', 1);"
            "\ntry:\n    1/0\nexcept ZeroDivisionError:\n    log.exception('boom')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "WARNING" and first["logger"] == "tiergate.test" and first["msg"] == "plain 1"
    assert first["ts"].endswith("Z") and isinstance(first["pid"], int)
    assert second["msg"] == "boom" and "ZeroDivisionError" in second["exc"]


def test_the_cli_logs_json_in_every_process_it_starts(tmp_path, tiny_model):
    # The inference child inherits the format: its "loaded model" line is JSON too.
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--log-format", "json", "serve", "--port", "0",
                             "--workers", "1", "--model", str(tiny_model), "--lmdb-path", str(tmp_path / "l2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "listening on" in line:
                break
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(r["logger"].startswith("inference.") and r["msg"].startswith("loaded model") for r in records)
    assert len({r["pid"] for r in records}) >= 2  # serve and its inference child (and the worker)
