"""`tiergate bench`: the benchmark command (not a test; never part of CI's pass/fail).

Starts the stack (or uses --target), runs named scenarios with ghz, grpcload
or a built-in Python load generator, and reports calls/s, texts/s, latency
percentiles, errors, hits per tier (the gateway's own counters) and the summed
RSS of every process of the stack, with ratios against baselines measured in
the same run (--compare: gostub, a trivial grpc.aio server, the transformers
pipeline). The miss path (miss, miss-idle against one bare forward pass,
miss-80, overload with a recovery probe) and the classify scenario (the CSV
job, against the seed documents' pipeline script) are checked against the
issues' targets in a PASS/FAIL "targets" section (goals.py). Light on purpose:
nothing here imports torch; the pipeline and bare forward baselines run in
child processes.

This module only builds the argument parser and the BenchConfig; the work is
in runner.py, scenarios in scenarios.py, miss_scenarios.py and
classify_scenario.py (catalog.py lists them). `tiergate` hands every argument after `bench` to main() here
unparsed, so no other command imports any of this package.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from gateway import cli_security
from protos.security import ClientSecurity

from gateway.bench.catalog import SCENARIOS, check_scenarios, default_scenarios
from gateway.bench.config import LOAD_CHOICES, BenchConfig, parse_duration, parse_rates

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    listing = "; ".join(f"{s.name}: {s.about}" for s in SCENARIOS.values())
    plain = default_scenarios(False)
    baselines = [n for n in default_scenarios(True) if n not in plain]
    p = argparse.ArgumentParser(
        prog="tiergate bench",
        description="Starts `tiergate serve` (or uses --target), runs the scenarios, prints one table, writes "
        "OUT/bench.json and OUT/hit_unary_latency.png (needs matplotlib: pip install -e '.[bench]'). "
        f"Scenarios: {listing}.",
    )
    g = p.add_argument_group("what to measure")
    g.add_argument("--scenarios", metavar="LIST", help=f"comma-separated (default: {','.join(plain)}; "
                   f"with --compare also {','.join(baselines)})")
    g.add_argument("--compare", action="store_true",
                   help="also run the baselines in the same run: gostub and a trivial grpc.aio server "
                   "(hit-unary), the transformers pipeline (miss texts) and classify (the CSV job against "
                   "the pipeline script)")
    g.add_argument("--target", metavar="HOST:PORT", help="a running gateway (default: start `tiergate serve` "
                   "on a free port with a fresh L2 in a temporary directory)")
    g.add_argument("--pid", type=int, help="with --target: the gateway's root process; the RSS of its "
                   "process tree is summed (without it: RSS n/a)")
    g.add_argument("--model", metavar="PATH_OR_ID", help="the model of the started stack and of the pipeline "
                   "baseline (default: the built-in sentiment model)")
    g.add_argument("--workers", type=int, help="gateway worker processes of the started stack "
                   "(default: serve's own default)")
    g.add_argument("--serve-args", default="", metavar="'FLAGS'",
                   help="more flags for the started `tiergate serve`, e.g. '--quantize off --max-wait-ms 2'")
    cli_security.add_client_flags(p, prefix="", token_flag="auth-token-file", token_env=cli_security.AUTH_TOKEN_ENV,
                                  what="the --target gateway", note="load from ghz or the Python generator: grpcload "
                                  "speaks neither")
    g = p.add_argument_group("load")
    g.add_argument("--load", choices=LOAD_CHOICES, default="auto", help="load generator (default: auto = ghz "
                   "(--ghz, PATH or ../shared/tools/bin), else grpcload, else the built-in Python one; ghz runs "
                   "closed-loop unary and batch calls, grpcload or Python the streams and open-loop runs)")
    g.add_argument("-c", "--concurrency", type=int, default=50, help="calls in flight (default: %(default)s)")
    g.add_argument("--connections", type=int, default=4, help="client connections (default: %(default)s)")
    g.add_argument("--duration", default="10s", help="per scenario (default: %(default)s)")
    g.add_argument("--warmup", default="2s",
                   help="the same load before each cached-text scenario (default: %(default)s)")
    g.add_argument("--rps", type=float,
                   help="run every scenario open loop at this offered calls/s (default: closed loop)")
    g.add_argument("--rps-sweep", default="250,500,1000,2000,4000,8000", metavar="LIST",
                   help="offered rates (calls/s) for the hit-unary latency PNG, run with hit-unary; stops once "
                   "the server falls far behind; 'none' skips it (default: %(default)s)")
    g.add_argument("--sweep-duration", default="3s", help="per sweep point (default: %(default)s)")
    g.add_argument("--pipeline-texts", type=int, default=1000,
                   help="texts the pipeline baseline scores (default: %(default)s)")
    g.add_argument("--classify-rows", type=int, default=1000, metavar="N",
                   help="rows of the classify scenario's CSV, 40-60 words each, scored by the transformers "
                   "pipeline script (as written and with batch_size=8) and by `tiergate classify` (cold, warm, "
                   "--target) (default: %(default)s)")
    g.add_argument("--miss-words", type=int, default=20,
                   help="at least this many words per text of the miss scenarios and the pipeline baseline, joined from corpus texts "
                   "(default: %(default)s, about 60 tokens; 0: single corpus texts)")
    g.add_argument("--miss-concurrency", type=int, default=32,
                   help="calls in flight in the miss scenario, whose texts/s is the measured miss capacity that "
                   "miss-80 and overload offer 0.8x and 2x of (default: %(default)s)")
    g.add_argument("--overload-duration", default="30s",
                   help="overload: how long 2x the miss capacity is offered (default: %(default)s)")
    g.add_argument("--chaos-seconds", default="180s", help="--scenarios chaos (alone): faults and an oracle on a "
                   "stack of its own, see gateway/bench/chaos.py; how long its traffic runs (default: %(default)s)")
    g = p.add_argument_group("tools and output")
    g.add_argument("--out", default="bench-out", metavar="DIR",
                   help="where bench.json, the PNG and the servers' logs go (default: %(default)s)")
    g.add_argument("--ghz", metavar="PATH", help="ghz executable, v0.121.0 or one whose --help lists the same "
                   "flags (default: PATH, then ../shared/tools/bin)")
    g.add_argument("--grpcload", metavar="PATH", help="grpcload (default: PATH, then ../shared/tools/bin)")
    g.add_argument("--gostub", metavar="PATH", help="gostub (default: PATH, then ../shared/tools/bin)")
    return p


def config_from_args(args) -> BenchConfig:
    names = tuple(n.strip() for n in args.scenarios.split(",") if n.strip()) if args.scenarios is not None \
        else default_scenarios(args.compare)
    check_scenarios(names)
    flags = dict(prefix="", token_flag="auth-token-file")
    if args.target:
        security = cli_security.client_security(args, **flags, token_env=cli_security.AUTH_TOKEN_ENV,
                                                environ=os.environ)
    elif cli_security.client_flags_given(args, **flags):
        raise ValueError(f"{', '.join(cli_security.client_flags_given(args, **flags))} only apply with --target "
                         "(bench's own stack is plaintext)")
    else:
        security = ClientSecurity()
    return BenchConfig(
        security=security,
        scenarios=names, target=args.target, pid=args.pid, model=args.model, workers=args.workers,
        serve_args=tuple(shlex.split(args.serve_args)), load=args.load, concurrency=args.concurrency,
        connections=args.connections, duration_s=parse_duration(args.duration), warmup_s=parse_duration(args.warmup),
        rps=args.rps, out=Path(args.out), compare=args.compare, rps_sweep=parse_rates(args.rps_sweep),
        sweep_duration_s=parse_duration(args.sweep_duration), pipeline_texts=args.pipeline_texts,
        classify_rows=args.classify_rows,
        miss_words=args.miss_words,
        miss_concurrency=args.miss_concurrency, overload_duration_s=parse_duration(args.overload_duration),
        ghz=args.ghz, grpcload=args.grpcload, gostub=args.gostub,
    )


def main(argv: list[str]) -> None:
    """`tiergate bench ARGV...`."""
    from gateway.bench.runner import run

    args = build_parser().parse_args(argv)
    if (args.scenarios or "").strip() == "chaos":  # its own stack, faults and oracle: not a runner scenario
        from gateway.bench.chaos import run_chaos_args

        sys.exit(run_chaos_args(args))
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"tiergate bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    code = run(config)
    if code:
        sys.exit(code)
