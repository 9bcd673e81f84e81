"""`tiergate classify`'s job layer (gateway.classify) against a fake gateway
(tests/support/fake_gateway.py) on a real gRPC server: backpressure, retries,
per-row rejections, bounded read-ahead, the partial output and --resume, and
the adaptive window. The real stack end to end is tests/test_classify_cli.py.

No pytest-asyncio here: the tests run their coroutines on one event loop
of this module (see `_one_loop`), as `tiergate classify` runs on one loop
(run_classify installs its SIGINT handlers on it).
"""

from __future__ import annotations

import asyncio
import csv
import gc
import json
import logging
import os
import re
import signal
import time

import grpc
import pytest

from gateway.classify import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS, EXIT_STOPPED, ClassifyRequest, run_classify
from gateway.classify.flow import AdaptiveWindow, Backoff
from gateway.classify.job import ClassifyJob, JobOptions
from gateway.classify.output import OutputFile, ResumeError
from gateway.classify.rows import RowSource, format_of
from protos import classifier_pb2 as pb
from tests.support.fake_gateway import MODEL_DISPLAY, FakeGateway, Refuse, answer_for

TIER_NAMES = {pb.TIER_MODEL: "MODEL", pb.TIER_L1: "L1", pb.TIER_L2: "L2", pb.TIER_L3: "L3"}
FAST_BACKOFF = Backoff(first_s=0.001, max_s=0.01)  # retries without the real pauses


def options(**changes) -> JobOptions:
    values = dict(batch_size=16, max_retry_s=5.0, call_timeout_s=5.0, backoff=FAST_BACKOFF)
    values.update(changes)
    return JobOptions(**values)


def refuse_from(first: int, code: grpc.StatusCode, message: str = "refused (fake)"):
    """A policy: calls numbered `first` and later get `code`."""

    async def policy(call):
        return Refuse(code, message) if call.number >= first else None

    return policy


def row_number(text: str) -> int:
    """The row of a text of write_input's default kind."""
    return int(text.split(":")[0].removeprefix("row "))


def refuse_rows(predicate, code: grpc.StatusCode, message: str = "refused (fake)"):
    """A policy: every call holding a text whose row matches gets `code` (calls
    arrive in no fixed order, so which rows are done must not hang on that)."""

    async def policy(call):
        return Refuse(code, message) if any(predicate(row_number(t)) for t in call.texts) else None

    return policy


# --- the files -----------------------------------------------------------------------------------------------------

def write_input(path, n: int, text=lambda i: f"row {i}: a text to score") -> list[str]:
    texts = [text(i) for i in range(n)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "other"])
        w.writerows([str(i), t, f"other {i}"] for i, t in enumerate(texts))
    return texts


def read_output(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_scored_in_order(rows: list[dict], texts: list[str]) -> None:
    """Every row, in input order, with the fake's answer for its text."""
    assert [r["id"] for r in rows] == [str(i) for i in range(len(texts))]
    for row, text in zip(rows, texts):
        label, score, tier = answer_for(text)
        assert (row["text"], row["label"], float(row["score"]), row["tier"], row["model"], row["error"]) == \
            (text, label, score, TIER_NAMES[tier], MODEL_DISPLAY, "")


def classify(fake: FakeGateway, input_path, out_path, job_options: JobOptions | None = None, **request) -> int:
    """`tiergate classify INPUT --column text -o OUT --target FAKE`: its exit status."""
    column = request.pop("column", "text")

    async def main() -> int:
        async with fake:
            return await run_classify(ClassifyRequest(input=str(input_path), column=column, output=str(out_path),
                                                      target=fake.address, progress=False,
                                                      options=job_options or options(), **request))

    return run(main())


async def run_job(fake: FakeGateway, input_path, out_path, job_options: JobOptions, wrap_rows=None):
    """ClassifyJob alone over a CSV input, as run_classify drives it: (job, finished)."""
    source = RowSource(str(input_path), "text", "csv")
    render = format_of("csv", source.fields)
    output = OutputFile(str(out_path), {"input": source.identity(), "column": "text", "format": "csv"})
    output.start(render.header(), False)
    finished = False
    try:
        async with fake, grpc.aio.insecure_channel(fake.address) as channel:
            job = ClassifyJob(channel, fake.address, output, render.render, job_options)
            rows = iter(source) if wrap_rows is None else wrap_rows(iter(source), output)
            finished = await job.run(rows)
    finally:
        source.close()
        output.finish() if finished else output.keep()
    return job, finished


# --- one event loop --------------------------------------------------------------------------------------------------

_RUNNER: asyncio.Runner | None = None


@pytest.fixture(scope="module", autouse=True)
def _one_loop():
    """Every run of this module on one loop. grpc.aio hands a completion to the
    loop that started the operation, and one that comes in after that loop
    closed, while a later test runs its own, is logged as "Exception in
    callback PollerCompletionQueue._handle_events ... Event loop is closed":
    noise from the tests, not from the job, which runs on a single loop."""
    global _RUNNER
    gc.collect()  # releases grpc.aio objects of earlier modules' loops
    with asyncio.Runner() as runner:
        _RUNNER = runner
        yield
    _RUNNER = None


def run(coro):
    return _RUNNER.run(coro)


# --- no noise: a run says what it has to say, and nothing from asyncio or gRPC ---------------------------------------

_NOISE = re.compile(r"Traceback|never retrieved|destroyed but it is pending|Exception in callback|Unclosed|"
                    r"ERROR|CRITICAL|^E\d{4} ", re.MULTILINE)


class Stderr:
    def __init__(self, capfd) -> None:
        self._capfd = capfd
        self.text = ""

    def read(self) -> str:
        """Everything written to stderr by this test so far."""
        self.text += self._capfd.readouterr().err
        return self.text


@pytest.fixture(autouse=True)
def stderr(capfd, caplog):
    """Fails a test whose runs log a warning or error or write asyncio/gRPC noise to stderr."""
    caplog.set_level(logging.WARNING)
    captured = Stderr(capfd)
    yield captured
    gc.collect()  # "Future exception was never retrieved" is logged when the future is collected
    records = caplog.get_records("call") + caplog.records  # the test's, then those of the collection just now
    # The one warning a run may give: that it is retrying an unreachable or slow gateway.
    told = [r for r in records if r.name == "gateway.classify.job" and "retrying with backoff" in r.getMessage()]
    assert len(told) <= 1
    assert [f"{r.name}: {r.getMessage()}" for r in records if r not in told] == []
    noise = _NOISE.search(captured.read())
    assert noise is None, f"noise on stderr: {captured.text!r}"


# --- backpressure and retries ----------------------------------------------------------------------------------------

def test_a_queue_smaller_than_one_batch_is_worked_through_in_order(tmp_path):
    # The fake refuses every call that would put more than 5 texts in flight,
    # as a full model queue does; calls are 64 texts. Refusing is the only
    # thing it does wrong: the job must shrink its window below one call.
    texts = write_input(tmp_path / "in.csv", 300)
    fake = FakeGateway(queue_limit=5, answer_s=0.002)
    job, finished = run(run_job(fake, tmp_path / "in.csv", tmp_path / "out.csv",
                                        options(batch_size=64, max_retry_s=10.0)))
    assert finished
    assert_scored_in_order(read_output(tmp_path / "out.csv"), texts)
    assert job.tally.refusals > 0 and job.window.decreases > 0
    assert job.window.limit <= job.window.max_texts
    assert sorted(fake.texts_answered) == sorted(texts)  # each text answered once: no duplicate work
    assert fake.most_in_flight <= 5
    assert not os.path.exists(tmp_path / "out.csv.partial")


def test_a_gateway_unavailable_for_a_while_is_waited_for(tmp_path, stderr):
    texts = write_input(tmp_path / "in.csv", 100)

    async def policy(call):  # restarting: the first 6 calls find nobody there
        return Refuse(grpc.StatusCode.UNAVAILABLE, "connection refused (fake)") if call.number < 6 else None

    fake = FakeGateway(policy)
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv") == EXIT_OK
    assert_scored_in_order(read_output(tmp_path / "out.csv"), texts)
    assert len(fake.refused) == 6
    assert "classified 100 rows" in stderr.read()


def test_a_gateway_that_stays_unavailable_stops_the_job_after_max_retry_s(tmp_path, stderr):
    texts = write_input(tmp_path / "in.csv", 200)
    fake = FakeGateway(refuse_rows(lambda row: row >= 40, grpc.StatusCode.UNAVAILABLE, "connection refused (fake)"))
    started = time.monotonic()
    code = classify(fake, tmp_path / "in.csv", tmp_path / "out.csv", options(max_retry_s=0.5))
    assert code == EXIT_STOPPED
    assert time.monotonic() - started < 5
    message = stderr.read()
    assert "UNAVAILABLE" in message and "--max-retry-s 0.5" in message and "--resume" in message
    # What was done is kept for --resume, and nothing is under the final name.
    assert not os.path.exists(tmp_path / "out.csv")
    with open(tmp_path / "out.csv.partial.json", encoding="utf-8") as f:
        record = json.load(f)
    done = read_output(tmp_path / "out.csv.partial")
    assert 0 < record["rows"] == len(done) <= 40
    assert record["bytes"] == os.path.getsize(tmp_path / "out.csv.partial")
    assert f"{record['rows']} rows are written to" in message
    assert_scored_in_order(done, texts[:len(done)])


def test_a_gateway_unavailable_from_the_start_leaves_nothing_behind(tmp_path, stderr):
    write_input(tmp_path / "in.csv", 50)
    fake = FakeGateway(refuse_from(0, grpc.StatusCode.UNAVAILABLE, "connection refused (fake)"))
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv", options(max_retry_s=0.3)) == EXIT_STOPPED
    assert "UNAVAILABLE" in stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["in.csv"]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL])
def test_a_status_that_retrying_cannot_fix_stops_the_job_at_once(tmp_path, stderr, code):
    write_input(tmp_path / "in.csv", 400)
    fake = FakeGateway(refuse_from(4, code, "no such token (fake)"))
    started = time.monotonic()
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv", options(max_retry_s=30.0)) == EXIT_STOPPED
    assert time.monotonic() - started < 3  # not retried for --max-retry-s
    message = stderr.read()
    assert code.name in message and "no such token (fake)" in message
    first_refused = min(call.at for call, _ in fake.refused)
    assert [c.number for c in fake.calls if c.at > first_refused + 0.2] == []  # nothing sent after it
    assert not os.path.exists(tmp_path / "out.csv")


def test_a_text_the_gateway_rejects_gets_an_error_value_and_the_rest_are_scored(tmp_path, stderr):
    texts = write_input(tmp_path / "in.csv", 120, lambda i: "BAD text" if i == 37 else f"row {i}")

    async def policy(call):
        if call.method == "Classify" and call.texts[0].startswith("BAD"):
            return Refuse(grpc.StatusCode.INVALID_ARGUMENT, "text: marked bad by the fake")
        for i, text in enumerate(call.texts):
            if text.startswith("BAD"):
                return Refuse(grpc.StatusCode.INVALID_ARGUMENT, f"texts[{i}]: marked bad by the fake")
        return None

    fake = FakeGateway(policy)
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv") == EXIT_ROW_ERRORS
    rows = read_output(tmp_path / "out.csv")
    bad = rows.pop(37)
    assert (bad["id"], bad["text"], bad["label"], bad["score"], bad["tier"]) == ("37", "BAD text", "", "", "")
    assert bad["error"] == "text: marked bad by the fake"
    good = texts[:37] + texts[38:]
    assert [r["text"] for r in rows] == good
    assert all(r["label"] == answer_for(r["text"])[0] and r["error"] == "" for r in rows)
    assert sorted(fake.texts_answered) == sorted(good)
    assert "1 errors" in stderr.read()


# Found while writing these tests, and fixed since.

def test_a_job_stopped_before_any_row_names_no_file_it_removed(tmp_path, stderr):
    write_input(tmp_path / "in.csv", 50)
    fake = FakeGateway(refuse_from(0, grpc.StatusCode.UNAVAILABLE, "connection refused (fake)"))
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv", options(max_retry_s=0.1)) == EXIT_STOPPED
    assert "out.csv.partial" not in stderr.read()


def test_the_stop_message_counts_the_rows_in_the_partial_file(tmp_path, stderr):
    write_input(tmp_path / "in.csv", 200)

    policy = refuse_rows(lambda row: row == 30, grpc.StatusCode.UNAVAILABLE, "connection reset (fake)")
    assert classify(FakeGateway(policy), tmp_path / "in.csv", tmp_path / "out.csv", options(max_retry_s=0.3)) == \
        EXIT_STOPPED
    rows = json.loads((tmp_path / "out.csv.partial.json").read_text())["rows"]
    assert f" {rows} rows are written to" in stderr.read()


# --- bounded memory --------------------------------------------------------------------------------------------------

def test_rows_are_read_no_further_ahead_than_the_read_ahead_limit(tmp_path):
    # One early call is slow, every later one quick: answers pile up behind
    # the slow one, and the job must stop reading rather than buffer the file.
    texts = write_input(tmp_path / "in.csv", 1000)
    first_slow = asyncio.Event()

    async def policy(call):
        if call.number == 1:
            first_slow.set()
            await asyncio.sleep(1.0)
        return None

    ahead: list[int] = []

    def counted(rows, output):
        for consumed, row in enumerate(rows, 1):
            ahead.append(consumed - output.rows)  # rows taken from the input but not yet written
            yield row

    fake = FakeGateway(policy)
    job, finished = run(run_job(fake, tmp_path / "in.csv", tmp_path / "out.csv",
                                        options(batch_size=8, max_calls=4), wrap_rows=counted))
    assert finished and first_slow.is_set()
    # Taken by the job: 4 windows of 4 calls of 8; the reading thread's buffer of 2 calls and the row it holds.
    assert job.read_ahead_limit == 8 * 4 * 4 + 2 * 8 + 1
    assert 8 * 4 * 4 <= max(ahead) <= job.read_ahead_limit  # reached (the slow call held it), never passed
    assert_scored_in_order(read_output(tmp_path / "out.csv"), texts)


# --- the partial output and --resume ---------------------------------------------------------------------------------

def interrupted_run(tmp_path, n: int = 300) -> list[str]:
    """A run stopped by the gateway after some rows: in.csv, out.csv.partial and its record."""
    texts = write_input(tmp_path / "in.csv", n)
    fake = FakeGateway(refuse_rows(lambda row: row >= 70, grpc.StatusCode.UNAUTHENTICATED, "token revoked (fake)"))
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv") == EXIT_STOPPED
    assert os.path.exists(tmp_path / "out.csv.partial.json")
    return texts


def reference_output(tmp_path, texts: list[str]) -> bytes:
    """What an uninterrupted run over the same rows writes."""
    ref = tmp_path / "ref"
    ref.mkdir()
    with open(ref / "in.csv", "wb") as f, open(tmp_path / "in.csv", "rb") as original:
        f.write(original.read())
    assert classify(FakeGateway(), ref / "in.csv", ref / "out.csv") == EXIT_OK
    return (ref / "out.csv").read_bytes()


def test_a_resumed_run_writes_what_an_uninterrupted_run_writes(tmp_path, stderr):
    texts = interrupted_run(tmp_path)
    done = json.loads((tmp_path / "out.csv.partial.json").read_text())["rows"]
    # A run killed between a write and its record leaves rows the record does not vouch for.
    with open(tmp_path / "out.csv.partial", "ab") as f:
        f.write(b"999,a row written after the last record,x,negative,0.5,MODEL,m,\r\n")
        f.write(b"999,half a row longer than the rest of the output" + b"." * 100_000)
    fake = FakeGateway()
    assert classify(fake, tmp_path / "in.csv", tmp_path / "out.csv", resume=True) == EXIT_OK
    assert (tmp_path / "out.csv").read_bytes() == reference_output(tmp_path, texts)
    assert not os.path.exists(tmp_path / "out.csv.partial") and not os.path.exists(tmp_path / "out.csv.partial.json")
    assert sorted(fake.texts_answered) == sorted(texts[done:])  # the done rows are not sent again
    assert f"resumed after {done} rows" in stderr.read()


def test_an_interrupt_keeps_the_partial_output_and_resume_completes_it(tmp_path, stderr):
    texts = write_input(tmp_path / "in.csv", 400)

    async def policy(call):  # slow enough to be interrupted in the middle
        if call.number == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, to run_classify's handler
        await asyncio.sleep(0.01)
        return None

    assert classify(FakeGateway(policy), tmp_path / "in.csv", tmp_path / "out.csv") == EXIT_INTERRUPTED
    assert "interrupted" in stderr.read() and not os.path.exists(tmp_path / "out.csv")
    done = read_output(tmp_path / "out.csv.partial")
    assert 0 < len(done) < len(texts)
    assert classify(FakeGateway(), tmp_path / "in.csv", tmp_path / "out.csv", resume=True) == EXIT_OK
    assert (tmp_path / "out.csv").read_bytes() == reference_output(tmp_path, texts)


def test_a_second_interrupt_does_not_wait_for_calls_in_flight(tmp_path, stderr):
    write_input(tmp_path / "in.csv", 100)
    hung = 0

    async def policy(call):  # a gateway that never answers (within the test)
        nonlocal hung
        hung += 1
        if hung == 2:
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
            loop.call_later(0.15, os.kill, os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)
        return None

    started = time.monotonic()
    assert classify(FakeGateway(policy), tmp_path / "in.csv", tmp_path / "out.csv") == EXIT_INTERRUPTED
    assert time.monotonic() - started < 3  # not the 10 s grace for calls in flight
    assert "interrupted" in stderr.read()


@pytest.mark.parametrize("change", ["column", "format", "input size", "input mtime", "no record", "short partial"])
def test_resume_refuses_a_partial_output_of_another_job(tmp_path, change):
    interrupted_run(tmp_path, n=200)
    request = {}
    if change == "column":
        request["column"] = "other"
    elif change == "format":
        request["format"] = "jsonl"
    elif change == "input size":
        with open(tmp_path / "in.csv", "a", encoding="utf-8") as f:
            f.write("200,a row added since,x\n")
    elif change == "input mtime":
        st = os.stat(tmp_path / "in.csv")
        os.utime(tmp_path / "in.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "no record":
        os.unlink(tmp_path / "out.csv.partial.json")
    elif change == "short partial":
        with open(tmp_path / "out.csv.partial", "r+b") as f:
            f.truncate(os.path.getsize(tmp_path / "out.csv.partial") - 10)
    kept = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith("out.csv")}
    fake = FakeGateway()
    with pytest.raises(ResumeError, match="without --resume"):
        classify(fake, tmp_path / "in.csv", tmp_path / "out.csv", resume=True, **request)
    assert fake.calls == []
    # A refused resume leaves the interrupted run's files as they were.
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith("out.csv")} == kept


def test_resume_of_a_complete_output_is_refused(tmp_path):
    write_input(tmp_path / "in.csv", 20)
    assert classify(FakeGateway(), tmp_path / "in.csv", tmp_path / "out.csv") == EXIT_OK
    with pytest.raises(ResumeError, match="already complete"):
        classify(FakeGateway(), tmp_path / "in.csv", tmp_path / "out.csv", resume=True)


# --- the adaptive window ---------------------------------------------------------------------------------------------

def test_the_window_grows_while_calls_succeed_up_to_its_ceiling():
    window = AdaptiveWindow(10, max_calls=4)
    assert window.limit == 20 and window.max_texts == 40
    limits = []
    for _ in range(200):
        window.on_success(window.call_size())
        limits.append(window.limit)
    assert limits == sorted(limits) and limits[0] > 20
    assert limits[-1] == 40 and max(limits) == 40
    assert window.call_size() == 10 and window.may_send(30, 10) and not window.may_send(31, 10)


def test_a_burst_of_refusals_halves_the_window_once_per_epoch():
    window = AdaptiveWindow(10, max_calls=4, initial_calls=4)
    sent_in = window.epoch
    for _ in range(8):  # eight calls sent together, all refused by one full queue
        window.on_slow_down(sent_in)
    assert (window.limit, window.decreases) == (20, 1)
    window.on_slow_down(window.epoch)  # a call sent after that decrease: a new signal
    assert (window.limit, window.decreases) == (10, 2)


def test_the_window_never_goes_below_one_text():
    window = AdaptiveWindow(64)
    for _ in range(50):
        window.on_slow_down(window.epoch)
    assert window.limit == 1 and window.call_size() == 1
    assert window.may_send(0, 1) and not window.may_send(1, 1)
    window.on_success(1)
    assert window.limit > 1
    with pytest.raises(ValueError, match="got 0"):
        AdaptiveWindow(0)


# --- inputs that once broke the job (a hostile read of it) -----------------------------------------------------------

def test_a_json_lone_surrogate_gets_an_error_value_and_the_output_stays_valid(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "row 0: fine"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "row 2: fine"}\n',
                      encoding="ascii")
    code = classify(FakeGateway(), source, tmp_path / "out.jsonl")
    assert code == EXIT_ROW_ERRORS
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["error"] for o in out] == [None, "the text in 'text' is not valid UTF-8", None]
    assert out[1]["text"] == "lone \ud800 surrogate" and out[0]["label"] and out[2]["label"]


def test_a_text_over_the_gateways_message_limit_gets_an_error_value(tmp_path):
    # The fake's server takes messages of at most 1 MiB; the rows around the big one are scored.
    texts = write_input(tmp_path / "in.csv", 40, text=lambda i: ("x" * (2 << 20)) if i == 7 else f"row {i}: ok")
    code = classify(FakeGateway(max_message_bytes=1 << 20), tmp_path / "in.csv", tmp_path / "out.csv")
    assert code == EXIT_ROW_ERRORS
    out = read_output(tmp_path / "out.csv")
    assert [r["id"] for r in out] == [str(i) for i in range(len(texts))]
    assert "larger than the gateway accepts in one message" in out[7]["error"] and out[7]["label"] == ""
    assert all(r["label"] and not r["error"] for i, r in enumerate(out) if i != 7)


def test_an_unterminated_quote_stops_the_job_with_the_line_instead_of_swallowing_the_file(tmp_path, stderr):
    source = tmp_path / "in.csv"
    source.write_text('id,text\n1,row 1: fine\n2,"row 2: a quote that never ends\n3,row 3\n4,row 4\n')
    with pytest.raises(ValueError, match=r"not valid CSV at line \d+"):
        classify(FakeGateway(), source, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_a_byte_order_mark_and_a_field_over_csvs_default_limit_are_read(tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes(b"\xef\xbb\xbftext,id\n" + b"y" * 200_000 + b",1\nrow 2: fine,2\n")
    assert classify(FakeGateway(), source, tmp_path / "out.csv") == EXIT_OK
    out = read_output(tmp_path / "out.csv")
    assert [r["id"] for r in out] == ["1", "2"] and len(out[0]["text"]) == 200_000


def test_refusals_that_would_write_a_wrong_file(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "row 0: a"}\n')
    with pytest.raises(ValueError, match="--format csv needs CSV input"):
        classify(FakeGateway(), tmp_path / "in.jsonl", tmp_path / "out.csv", format="csv")
    write_input(tmp_path / "in.csv", 5)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        classify(FakeGateway(), tmp_path / "in.csv", tmp_path)
    with pytest.raises(ValueError, match="--resume needs the input as a file"):
        run(run_classify(ClassifyRequest(input="-", column="text", output=str(tmp_path / "o.csv"), resume=True,
                                         target="127.0.0.1:1", progress=False)))


def test_two_jobs_cannot_write_the_same_output(tmp_path):
    write_input(tmp_path / "in.csv", 5)
    holder = OutputFile(str(tmp_path / "out.csv"), {"job": 1})
    holder.start(b"id,text\n", False)
    try:
        with pytest.raises(ValueError, match="another tiergate classify is writing"):
            classify(FakeGateway(), tmp_path / "in.csv", tmp_path / "out.csv")
    finally:
        holder.keep()


def test_an_edited_progress_record_is_refused(tmp_path):
    interrupted_run(tmp_path)
    record_path = tmp_path / "out.csv.partial.json"
    record = json.loads(record_path.read_text())
    record["bytes"] -= 10  # now in the middle of a row
    record_path.write_text(json.dumps(record))
    with pytest.raises(ResumeError, match="does not match"):
        classify(FakeGateway(), tmp_path / "in.csv", tmp_path / "out.csv", resume=True)


def test_rows_from_a_slow_producer_are_scored_as_they_arrive(tmp_path):
    # A pipe that yields one row, then stalls: the row is answered (and written)
    # while the producer still holds the rest, and the loop stays free meanwhile.
    read, write = os.pipe()
    os.write(write, b"id,text\n0,row 0: first\n")
    out = tmp_path / "out.csv"

    async def main() -> int:
        async with FakeGateway() as fake:
            job = asyncio.ensure_future(run_classify(ClassifyRequest(
                input=f"/dev/fd/{read}", column="text", output=str(out), target=fake.address, progress=False,
                options=options())))
            deadline = time.monotonic() + 10
            while not (out.with_name("out.csv.partial").exists()
                       and b"row 0: first" in out.with_name("out.csv.partial").read_bytes()):
                assert time.monotonic() < deadline, "the first row was not written while the producer stalled"
                await asyncio.sleep(0.02)
            os.write(write, b"1,row 1: second\n")
            os.close(write)
            return await job

    try:
        assert run(main()) == EXIT_OK
    finally:
        os.close(read)
    assert [r["text"] for r in read_output(out)] == ["row 0: first", "row 1: second"]
