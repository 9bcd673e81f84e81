"""`tiergate classify INPUT --column C`: score one column of every row of a CSV or JSON Lines file.

Through a running gateway (--target) or a stack of its own (embedded.py).
The job (job.py) streams rows in input order with bounded memory, adapts its
texts in flight to what the gateway accepts and retries backpressure instead
of failing (flow.py), and writes to a partial file that becomes the output
only when complete (output.py), so that `--resume` can carry on after Ctrl-C.

Exit status: 0 every row scored; 3 the output is complete but some rows have
an error value; 1 stopped before the end (the partial output is kept);
130 interrupted (likewise).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass

from gateway.classify.job import ClassifyJob, JobOptions, JobStopped, Tally
from gateway.classify.output import OutputFile
from gateway.classify.rows import RowSource, format_of, guess_format
from protos.security import ClientSecurity

__all__ = ["ClassifyRequest", "run_classify", "request_from_args", "embedded_stack_factory", "EXIT_OK", "EXIT_ROW_ERRORS", "EXIT_STOPPED", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_STOPPED, EXIT_ROW_ERRORS, EXIT_INTERRUPTED = 0, 1, 3, 130
_POSTFIX_EVERY_S = 0.5


@dataclass(frozen=True)
class ClassifyRequest:
    """What the command line asked for."""

    input: str                   # a path, or "-" for stdin
    column: str
    output: str | None = None    # None: next to the input (stdout for stdin); "-": stdout
    input_format: str | None = None  # csv or jsonl; None: from the input's name
    format: str | None = None        # of the output; None: the input's
    target: str | None = None        # a running gateway; None: the embedded stack
    resume: bool = False
    progress: bool = True
    options: JobOptions = JobOptions()
    security: ClientSecurity = ClientSecurity()  # TLS and token towards --target


def _default_output(path: str, fmt: str) -> str:
    if path == "-":
        return "-"
    stem = path
    for suffix in (".csv", ".jsonl", ".ndjson"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}.scored.{fmt}"


class _Progress:
    """A tqdm bar of rows written, with rows/s and the share of each tier."""

    def __init__(self, enabled: bool, total: int | None, initial: int, tally: Tally) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="row", disable=not enabled, file=sys.stderr,
                         dynamic_ncols=True)
        self._tally = tally
        self._shown_at = 0.0

    def written(self, rows: int) -> None:
        self._bar.update(rows)
        now = time.monotonic()
        if now - self._shown_at >= _POSTFIX_EVERY_S:
            self._shown_at = now
            self._bar.set_postfix_str(self._tally.shares(), refresh=False)

    def close(self) -> None:
        self._bar.set_postfix_str(self._tally.shares(), refresh=False)
        self._bar.close()


def _summary(tally: Tally, seconds: float, out: str, skipped: int, skipped_errors: int,
             model_needed: bool | None) -> str:
    t = tally.tiers
    line = (f"classified {tally.rows} rows in {seconds:.1f} s: {t['MODEL']} scored by the model, {t['L1']} from L1, "
            f"{t['L2']} from L2, {t['L3']} from L3, {tally.errors} errors -> {out}")
    if skipped:
        line += f" (resumed after {skipped} rows, {skipped_errors} of them with errors)"
    if model_needed is False:
        line += "; the model was not needed"
    return line


async def run_classify(request: ClassifyRequest, start_stack=None) -> int:
    """Run the job; its exit status. `start_stack()` makes the embedded stack
    (an object with `await start() -> address`, `await stop()`, `model_started`)
    when there is no target."""
    started = time.perf_counter()
    in_format = request.input_format or guess_format(request.input)
    out_format = request.format or in_format
    if in_format == "jsonl" and out_format == "csv":
        raise ValueError("--format csv needs CSV input: JSON Lines objects have no fixed columns (use --format jsonl)")
    if request.resume and (request.input == "-" or not os.path.isfile(request.input)):
        raise ValueError("--resume needs the input as a file: rows from stdin or a pipe cannot be checked to "
                         "be the same as the interrupted run's")
    out_path = request.output or _default_output(request.input, out_format)
    if out_path != "-" and os.path.isdir(out_path):
        raise IsADirectoryError(f"the output {out_path} is a directory; give a file name (-o DIR/NAME)")
    source = RowSource(request.input, request.column, in_format)
    render = format_of(out_format, source.fields)
    output = OutputFile(out_path, {"input": source.identity(), "column": request.column, "format": out_format})
    try:
        skipped = output.start(render.header(), request.resume)
    except (ValueError, OSError):
        source.close()
        raise
    if output.replaced_partial:
        print(f"tiergate classify: starting over; {output.partial} of an interrupted run is replaced "
              "(--resume would carry on from it)", file=sys.stderr)
    rows = iter(source)
    if skipped:
        for _ in itertools.islice(rows, skipped):  # already written by the interrupted run
            pass
    total = source.estimated_rows() if request.progress else None
    tally = Tally()
    progress = _Progress(request.progress, total, skipped, tally)
    stack = job = None
    interrupted = False
    finished = False
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # installed once the job exists; before, Ctrl-C cancels the start-up
        nonlocal interrupted
        if interrupted:  # the second one: do not wait for calls in flight
            job.cancel_in_flight()
        interrupted = True
        job.stop()

    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        target = request.target
        if target is None:
            stack = start_stack()
            target = await stack.start()
        async with request.security.aio_channel(target) as channel:
            job = ClassifyJob(channel, target, output, render.render, request.options, on_written=progress.written,
                              metadata=request.security.metadata)
            job.tally = tally
            for sig in signals:
                loop.add_signal_handler(sig, on_signal)
            finished = await job.run(rows)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        progress.close()
        source.close()
        try:
            if finished:
                output.finish()
            elif output.rows == 0 and not skipped:
                output.discard()  # nothing to resume
            else:
                output.keep()
        finally:
            if stack is not None:
                await stack.stop()
    seconds = time.perf_counter() - started
    if not finished:
        why = ("interrupted" if interrupted and job.failure is None
               else f"error: {job.failure}" if isinstance(job.failure, JobStopped)
               else f"error: {job.failure!r}")
        if output.to_stdout:
            kept = f"{output.rows} rows were written to stdout"
        elif output.rows:
            kept = f"{output.rows} rows are written to {output.partial}; run the same command with --resume to go on"
        else:
            kept = "no row was written"
        print(f"tiergate classify: {why}; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted and job.failure is None else EXIT_STOPPED
    model_needed = stack.model_started if stack is not None else None
    print(_summary(tally, seconds, out_path, skipped, output.errors - tally.errors, model_needed), file=sys.stderr)
    return EXIT_ROW_ERRORS if output.errors else EXIT_OK  # output.errors includes a resumed run's


def request_from_args(args, security: ClientSecurity = ClientSecurity()) -> ClassifyRequest:
    options = JobOptions(batch_size=args.batch_size, max_retry_s=args.max_retry_s, call_timeout_s=args.call_timeout_s)
    progress = not args.no_progress and sys.stderr.isatty()
    return ClassifyRequest(input=args.input, column=args.column, output=args.output, input_format=args.input_format,
                           format=args.format, target=args.target, resume=args.resume, progress=progress,
                           options=options, security=security)


def embedded_stack_factory(args, model_args: list[str], config, log_level: str):
    """The embedded stack for `run_classify`, from the command's flags."""
    from gateway.classify.embedded import EmbeddedStack

    return lambda: EmbeddedStack(config, model_args, model=args.model,
                                 answer_flags={"device": args.device, "quantize": args.quantize,
                                               "runtime": args.runtime},
                                 log_level=log_level)

