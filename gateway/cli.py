"""The `tiergate` command line. The only module that reads flags and environment variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys

__all__ = ["main", "build_parser"]

from gateway import cli_security, event_loop
from gateway.lifecycle import DrainConfig, StopSignals, drain_and_stop, exit_with_parent, reload_on_sighup
from protos.logs import FORMAT_ENV, FORMATS, configure_logging
from inference.model import MAX_AUTO_LANES, RUNTIMES  # light: torch loads only when a model does

log = logging.getLogger("tiergate")

MIB = 1024 * 1024


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_gateway_flags(p: argparse.ArgumentParser, *, port_default: int = 50051) -> None:
    g = p.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=port_default, help="gateway port, 0 for any free port (default: %(default)s)")
    g.add_argument("--lmdb-path", metavar="DIR", help="L2 directory (default: <cache dir>/l2, where the cache dir is "
                   "$TIERGATE_CACHE_DIR, else $XDG_CACHE_HOME/tiergate, else ~/.cache/tiergate)")
    g.add_argument("--no-l2", action="store_true", help="run without the LMDB tier")
    g.add_argument("--l2-max-mb", type=_positive_int, default=512, help="L2 size budget in MiB (default: %(default)s)")
    g.add_argument("--filter-capacity", type=_positive_int, default=None, metavar="N",
                   help="keys per generation of the Bloom filter of L2's keys, at least 1000 (default: as many "
                   "entries as --l2-max-mb holds, about 7000 per MiB)")
    g.add_argument("--l2-ttl-s", type=_positive_int, default=7 * 86400, help="L2 entry lifetime (default: 7 days)")
    g.add_argument("--redis-url", default=os.environ.get("TIERGATE_REDIS_URL"),
                   help="turns L3 on, e.g. redis://localhost:6379/0 (default: $TIERGATE_REDIS_URL, the place for a URL "
                   "with a password: any local user can read a command line; none: L3 off)")
    g.add_argument("--l3-ttl-s", type=_positive_int, default=86400, help="L3 entry lifetime (default: 1 day)")
    g.add_argument("--cache-secret-file", metavar="FILE", default=os.environ.get("TIERGATE_CACHE_SECRET_FILE"),
                   help="a secret (at least 16 bytes, the same on every gateway host) that authenticates every value "
                   "in L2 and L3 with a MAC, so that whoever can write to Redis without it cannot choose answers "
                   "(default: $TIERGATE_CACHE_SECRET_FILE, else the secret itself in $TIERGATE_CACHE_SECRET; none: "
                   "values carry a checksum, which catches damage but not forgery)")
    g.add_argument("--l1-entries", type=_positive_int, default=100_000, help="L1 capacity in entries (default: %(default)s)")
    g.add_argument("--max-text-bytes", type=_positive_int, default=8192,
                   help="longest accepted text in UTF-8 bytes; longer: INVALID_ARGUMENT (default: %(default)s)")
    g.add_argument("--max-batch", type=_positive_int, default=1000,
                   help="most texts in one ClassifyBatch; more: INVALID_ARGUMENT (default: %(default)s)")
    g.add_argument("--max-concurrent-rpcs", type=_positive_int, default=None,
                   help="calls in progress at once; more: RESOURCE_EXHAUSTED at once (default: no limit)")
    c = p.add_argument_group("client connections")
    c.add_argument("--min-client-ping-s", type=_nonnegative_seconds, default=5.0, metavar="SECONDS",
                   help="clients may send keepalive pings this often, with or without calls in flight; more often "
                   "and gRPC closes the connection with too_many_pings (default: %(default)s)")
    c.add_argument("--keepalive-s", type=_positive_seconds, default=60.0, metavar="SECONDS",
                   help="the gateway pings a connection idle this long, and closes it when the ping goes "
                   "unanswered for --keepalive-timeout-s (default: %(default)s)")
    c.add_argument("--keepalive-timeout-s", type=_positive_seconds, default=20.0, metavar="SECONDS",
                   help="(default: %(default)s)")
    c.add_argument("--max-connection-age-s", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="close each client connection (GOAWAY) after this long, so that long-lived clients "
                   "reconnect and spread again over the --workers (one connection always stays on one worker); "
                   "calls in flight get --max-connection-age-grace-s (default: no limit)")
    c.add_argument("--max-connection-age-grace-s", type=_nonnegative_seconds, default=30.0, metavar="SECONDS",
                   help="(default: %(default)s)")
    c.add_argument("--max-concurrent-streams", type=_positive_int, default=None, metavar="N",
                   help="calls at once on one client connection; more wait for a free one (default: gRPC's, "
                   "unlimited)")
    g.add_argument("--max-pending-misses", type=_positive_int, default=4096,
                   help="texts one gateway process has waiting for the model; more: RESOURCE_EXHAUSTED at once "
                   "(default: %(default)s)")


def _add_metrics_flag(p: argparse.ArgumentParser, what: str, default: int = 9464) -> None:
    p.add_argument("--metrics-port", type=int, default=default, metavar="PORT",
                   help=f"serve Prometheus metrics of {what} at http://HOST:PORT/metrics on the --host address "
                   "(plain HTTP, no token: keep --host private or firewall the port); 0: no metrics "
                   "(default: %(default)s)")


def _metrics_port(args) -> int | None:
    port = getattr(args, "metrics_port", 0)
    if not 0 <= port <= 65535:
        raise SystemExit(f"tiergate: error: --metrics-port must be in 0..65535, got {port}")
    return port or None


def _nonnegative_seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _nonnegative_seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a number of seconds > 0, got 0")
    return value


def _add_drain_flags(p: argparse.ArgumentParser, what: str) -> None:
    d = DrainConfig()
    g = p.add_argument_group("shutdown (SIGTERM or SIGINT; a second signal ends the drain period at once)")
    g.add_argument("--drain-s", type=_nonnegative_seconds, default=d.drain_s, metavar="SECONDS",
                   help=f"on SIGTERM health says NOT_SERVING at once and {what} keeps serving this long, so load "
                   "balancers and health-checking clients move traffic away first (default: %(default)s)")
    g.add_argument("--grace-s", type=_nonnegative_seconds, default=d.grace_s, metavar="SECONDS",
                   help="then new calls are refused (UNAVAILABLE) and calls in flight get this long to finish "
                   "before they are cancelled (default: %(default)s)")


def _drain(args) -> DrainConfig:
    return DrainConfig(drain_s=args.drain_s, grace_s=args.grace_s)


def _add_workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="gateway worker processes sharing the port (SO_REUSEPORT) and L2 (default: one per core, "
                   "at most 8; for serve, one per two cores: the model needs the rest)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint directory or hub id (default: the built-in "
                   "sentiment model, built on first use)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="what runs the model: onnxruntime (an ONNX graph exported once per checkpoint and precision "
                   "and checked against the model; no torch in the serving process; float32 measured 2x torch's "
                   "speed on a CPU) or torch (default: auto = onnxruntime on a CPU, falling back to torch if the "
                   "export fails; torch for --torchscript on and CUDA)")
    g.add_argument("--quantize", choices=("auto", "on", "off"), default="auto",
                   help="int8 on a CPU. With onnxruntime: every encoder MatMul in int8 with a scale per token, so "
                   "answers never depend on the batch; its export measures it against float32 (label agreement on "
                   "texts unlike the training data, held-out accuracy, speed on this CPU). With --runtime torch: "
                   "int8 dynamic, one text per pass. (default: auto = int8 only where that export measured at least "
                   "98%% agreement, at most 1 point of held-out accuracy lost and more speed than float32 -- so only "
                   "for a model tiergate built; the built-in model passes on CPUs with VNNI; the ready line says "
                   "which precision serves; decided per machine, so pin on or off for replicas on mixed CPUs). "
                   "With --runtime torch, auto is on where the model's build measured int8 dynamic within 1 point)")
    g.add_argument("--torchscript", choices=("auto", "on", "off"), default="auto",
                   help="(the torch runtime; on picks it) serve a frozen TorchScript graph of the model, checked "
                   "against the model at load (default: "
                   "auto = on a CPU, falling back to the model itself if the check fails; on: fail instead)")
    g.add_argument("--lanes", type=_positive_int, default=None,
                   help="model calls that run at once, each in a thread of its own (default: on a CPU one per core, "
                   f"at most {MAX_AUTO_LANES}; on CUDA 1)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="threads per lane (default: the cores divided among the lanes)")
    g.add_argument("--model-nice", type=int, default=10, choices=range(0, 20), metavar="0..19",
                   help="how much nicer than the rest of the inference process the model's threads run, so that "
                   "answering calls never waits behind a forward pass; 0: same priority (default: %(default)s)")
    g.add_argument("--max-batch-texts", type=_positive_int, default=None,
                   help="texts per model call (default: 4 on a CPU, where less padding beats bigger batches; 64 on CUDA; "
                   "always 1 for torch's int8 dynamic, whose answers would otherwise depend on the batch)")
    g.add_argument("--max-batch-tokens", type=_positive_int, default=8192,
                   help="padded tokens per model call (default: %(default)s)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more texts after its first; 0: not at all; a wait under 1 ms "
                   "is timed as 1 ms (default: %(default)s)")
    g.add_argument("--max-queue", type=_positive_int, default=2048,
                   help="texts waiting for the model; more: RESOURCE_EXHAUSTED (default: %(default)s)")
    g.add_argument("--max-queue-wait-ms", type=_positive_int, default=1000,
                   help="or when the queue holds this much model time at the measured speed: RESOURCE_EXHAUSTED "
                   "(default: %(default)s)")


_AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def _model_args(args) -> list[str]:
    """The model flags of `serve`/`classify`, passed on to the inference child."""
    out = ["--device", args.device, "--runtime", args.runtime, "--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue), "--max-queue-wait-ms", str(args.max_queue_wait_ms),
           "--max-text-bytes", str(args.max_text_bytes)]  # the child's limit is the gateway's: the two agree
    if args.model:
        out += ["--model", args.model]
    out += ["--quantize", args.quantize, "--torchscript", args.torchscript]
    if args.max_batch_texts:
        out += ["--max-batch-texts", str(args.max_batch_texts)]
    if args.lanes:
        out += ["--lanes", str(args.lanes)]
    out += ["--model-nice", str(args.model_nice)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiergate", description="gRPC inference gateway with a tiered cache "
                                     "(L1 RAM, L2 LMDB, L3 Redis) in front of one shared model.")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING or ERROR (default: INFO; for classify WARNING)")
    parser.add_argument("--log-format", choices=FORMATS, default=os.environ.get(FORMAT_ENV) or "text",
                        help="text, or json: one object per line with ts, level, logger, pid, msg (and exc) "
                        f"(default: ${FORMAT_ENV}, else text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the whole stack: inference service + gateway (no Redis needed)",
                       description="Runs the inference service (a child process) and the gateway. Prints one line "
                       "with the address when ready; SIGINT/SIGTERM drain the gateway, then stop every process it "
                       "started.")
    _add_gateway_flags(p)
    _add_metrics_flag(p, "the gateway (every worker, summed) and its inference child")
    _add_workers_flag(p)
    _add_drain_flags(p, "the gateway")
    cli_security.add_server_flags(p, "the gateway's port")
    _add_model_flags(p)

    p = sub.add_parser("gateway", help="run the gateway alone, against running inference service(s)")
    _add_gateway_flags(p)
    _add_metrics_flag(p, "the gateway (every worker, summed)")
    _add_workers_flag(p)
    _add_drain_flags(p, "the gateway")
    p.add_argument("--inference", default="127.0.0.1:50052", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the inference service, or several replicas separated by commas: misses go to the least "
                   "loaded one that is up (default: %(default)s)")
    cli_security.add_server_flags(p, "the gateway's port")
    cli_security.add_client_flags(p, prefix="inference-", token_flag="inference-token-file",
                                  token_env=cli_security.INFERENCE_TOKEN_ENV, what="the inference service(s)")

    p = sub.add_parser("inference", help="run the inference service alone")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=50052, help="port, 0 for any free port (default: %(default)s)")
    p.add_argument("--uds", metavar="PATH", help="listen on this Unix socket instead of --host/--port (only who "
                   "may enter its directory can connect; serve uses one in a 0700 directory of its own)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    # Not the gateway's 9464: a gateway and an inference service on one host must both start.
    _add_metrics_flag(p, "the service", default=9465)
    _add_drain_flags(p, "the service")
    cli_security.add_server_flags(p, "TCP only")
    g = p.add_argument_group("limits (its own, so that nobody bypasses the gateway's by calling it directly)")
    g.add_argument("--max-text-bytes", type=_positive_int, default=8192,
                   help="longest text in UTF-8 bytes; longer: that text gets INVALID_ARGUMENT; keep the gateway's "
                   "--max-text-bytes at most this (serve passes its own on) (default: %(default)s)")
    g.add_argument("--max-message-texts", type=_positive_int, default=1024, metavar="N",
                   help="texts one Score message may carry, at least 256 (what a gateway sends at most); more: "
                   "each of its texts gets INVALID_ARGUMENT (default: %(default)s)")
    _add_model_flags(p)

    p = sub.add_parser("classify", help="score one column of every row of a CSV or JSON Lines file",
                       description="Scores one column of every row and writes the rows again with label, score, "
                       "tier, model and error columns added, in input order, through a running gateway (--target) "
                       "or a stack of its own, which loads the model only when a text misses every cache tier. "
                       "Backpressure is retried with backoff (texts in flight adapt to what the gateway accepts); "
                       "a text the gateway rejects gets an error value and the job goes on. The output appears "
                       "under its name only when complete: Ctrl-C keeps OUT.partial, and --resume carries on from it. "
                       "Exit status: 0 every row scored, 3 complete but some rows have an error, 1 stopped before "
                       "the end, 130 interrupted.")
    p.add_argument("input", metavar="INPUT", help="a .csv or .jsonl file, or - for stdin")
    p.add_argument("--column", required=True, help="the column (JSON Lines: the key) holding the text")
    p.add_argument("--output", "-o", metavar="OUT", help="where to write (default: INPUT.scored.csv or .jsonl next to "
                   "the input; for stdin, stdout; - for stdout)")
    p.add_argument("--format", choices=("csv", "jsonl"), help="output format (default: the input's)")
    p.add_argument("--input-format", choices=("csv", "jsonl"),
                   help="input format (default: jsonl for .jsonl/.ndjson names, else csv)")
    p.add_argument("--target", metavar="HOST:PORT", help="a running gateway (default: an embedded stack)")
    p.add_argument("--resume", action="store_true",
                   help="carry on an interrupted run from OUT.partial instead of starting over")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="texts per ClassifyBatch call (default: %(default)s)")
    p.add_argument("--max-retry-s", type=_nonnegative_seconds, default=300.0, metavar="SECONDS",
                   help="how long one call is retried while the gateway refuses it (RESOURCE_EXHAUSTED) or is "
                   "unreachable, before the job stops (default: %(default)s)")
    p.add_argument("--call-timeout-s", type=_positive_seconds, default=60.0, metavar="SECONDS",
                   help="deadline of one call; a call past it is retried (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not "
                   "a terminal)")
    _add_gateway_flags(p, port_default=0)
    cli_security.add_client_flags(p, prefix="", token_flag="auth-token-file", token_env=cli_security.AUTH_TOKEN_ENV,
                                  what="the --target gateway")
    _add_model_flags(p)

    p = sub.add_parser("model", help="model tools")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    b = msub.add_parser("build", help="build the default sentiment model offline and print its held-out accuracy")
    b.add_argument("--output", metavar="DIR", help="where to store it (default: <cache dir>/models/<name>)")
    b.add_argument("--force", action="store_true", help="rebuild even if it exists")

    # Only named here: its flags are gateway.bench's, parsed there (main()
    # hands it the rest of the command line), so that no other command
    # imports the benchmark harness.
    sub.add_parser("bench", add_help=False, help="benchmark the gateway (throughput, latency, tier hits, "
                   "whole-stack RSS, baselines); tiergate bench --help for its flags")
    return parser


def gateway_config(args, inference_targets: list[str]):
    from cache import LmdbConfig, RedisConfig
    from cache.entry import load_cache_secret
    from gateway.classifier import Limits
    from gateway.connections import ConnectionOptions
    from gateway.server import GatewayConfig
    from inference.paths import cache_root

    lmdb = None
    if not args.no_l2:
        path = args.lmdb_path or str(cache_root() / "l2")
        lmdb = LmdbConfig(path=path, max_bytes=args.l2_max_mb * MIB, ttl_s=args.l2_ttl_s)
    redis = RedisConfig(url=args.redis_url, ttl_s=args.l3_ttl_s) if args.redis_url else None
    try:
        secret = load_cache_secret(args.cache_secret_file, os.environ.get("TIERGATE_CACHE_SECRET"))
    except ValueError as exc:
        raise SystemExit(f"tiergate: error: {exc}") from None
    tls, auth_tokens = cli_security.server_security(args) if hasattr(args, "tls_cert") else (None, None)
    inference_security = cli_security.client_security(
        args, prefix="inference-", token_flag="inference-token-file", token_env=cli_security.INFERENCE_TOKEN_ENV,
        environ=os.environ) if hasattr(args, "inference_tls_ca") else None
    return GatewayConfig(
        cache_secret=secret, tls=tls, auth_tokens=auth_tokens,
        **({"inference_security": inference_security} if inference_security else {}),
        inference_targets=tuple(inference_targets), host=args.host, port=args.port, l1_max_entries=args.l1_entries,
        filter_capacity=args.filter_capacity,
        lmdb=lmdb, redis=redis, max_concurrent_rpcs=args.max_concurrent_rpcs, metrics_port=_metrics_port(args),
        connections=ConnectionOptions(
            min_client_ping_s=args.min_client_ping_s, keepalive_s=args.keepalive_s,
            keepalive_timeout_s=args.keepalive_timeout_s, max_connection_age_s=args.max_connection_age_s,
            max_connection_age_grace_s=args.max_connection_age_grace_s,
            max_concurrent_streams=args.max_concurrent_streams),
        limits=Limits(max_text_bytes=args.max_text_bytes, max_batch=args.max_batch,
                      max_pending_misses=args.max_pending_misses),
    )


def _classify_security(args):
    """TLS and token towards `classify --target`; the flags mean nothing for the stack of its own."""
    from protos.security import ClientSecurity

    names = dict(prefix="", token_flag="auth-token-file")
    if not args.target:
        given = cli_security.client_flags_given(args, **names)
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --target (the stack of its own is local and open)")
        return ClientSecurity()
    return cli_security.client_security(args, **names, token_env=cli_security.AUTH_TOKEN_ENV, environ=os.environ)


def _tiers_summary(config) -> str:
    l2 = config.lmdb.path if config.lmdb else "off"
    l3 = "on" if config.redis else "off"
    return f"L1 on, L2 {l2}, L3 {l3}"


async def run_inference(args) -> None:
    from inference.batcher import BatcherConfig
    from inference.model import ModelConfig
    from inference.limits import ScoreLimits
    from inference.service import InferenceConfig, InferenceServer

    tls, auth_tokens = cli_security.server_security(args)  # before a model build: a bad file fails at once
    if tls is not None and args.uds:
        raise ValueError("TLS is for TCP: a Unix socket (--uds) is protected by its directory's permissions")
    limits = ScoreLimits(max_text_bytes=args.max_text_bytes, max_message_texts=args.max_message_texts)
    model = args.model
    if not model:
        from inference.paths import default_model_dir

        model = str(default_model_dir())
        if not os.path.exists(os.path.join(model, "tiergate_build.json")):
            # Build in a child process: memory the build used is not given back
            # to the OS, and this process then serves for days.
            log.info("building the default model into %s (once; about a minute)", model)
            build = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from inference.build import ensure_default_model; ensure_default_model()")
            if await build.wait() != 0:
                raise RuntimeError("building the default model failed (see above)")
    config = InferenceConfig(
        model=ModelConfig(source=model, device=args.device, runtime=args.runtime, lanes=args.lanes,
                          threads=args.threads, nice=args.model_nice,
                          quantize=_AUTO_ON_OFF[args.quantize], torchscript=_AUTO_ON_OFF[args.torchscript]),
        batcher=BatcherConfig(max_batch=args.max_batch_texts, max_tokens=args.max_batch_tokens,
                              max_wait_s=args.max_wait_ms / 1000, max_queue=args.max_queue,
                              max_queue_wait_s=args.max_queue_wait_ms / 1000),
        host=args.host, port=args.port, uds=args.uds, metrics_port=_metrics_port(args),
        limits=limits, tls=tls, auth_tokens=auth_tokens,
    )
    server = InferenceServer(config)
    if server.reloadable:
        reload_on_sighup(server.reload)
    watcher = asyncio.ensure_future(exit_with_parent(os.getppid())) if args.exit_with_parent else None
    try:
        await server.start()
        signals = StopSignals()
        info = server.model.info
        print(f"tiergate inference listening on {server.address} (model {info.model_id}@{info.fingerprint}, "
              f"{info.device}, {info.dtype}, {info.graph}, {info.lanes} lane(s) x {info.threads} thread(s))",
              flush=True)
        await signals.wait()
        await drain_and_stop(server, _drain(args), signals)
    finally:
        if watcher:
            watcher.cancel()
        await server.stop(0)  # at once; nothing left to do after a drain


async def run_gateway(args, inference_targets: list[str], label: str = "gateway", config=None) -> None:
    from gateway.workers import default_workers, run_gateway_workers

    config = config or gateway_config(args, inference_targets)
    workers = args.workers or default_workers(model_on_host=label == "serve")

    def ready(server) -> None:
        model = server.handlers.core.current_model()
        served = f"{model.display} ({model.dtype} on {model.device})" if model is not None else "not known yet"
        print(f"tiergate {label} listening on {server.address} ({workers} worker{'s' if workers > 1 else ''}; "
              f"model {served}; {_tiers_summary(config)})", flush=True)

    await run_gateway_workers(config, workers, ready, drain=_drain(args), log_level=args.log_level.upper())


async def run_serve(args) -> None:
    from gateway.stack import InferenceProcess

    # The inference child stops after the gateway has drained and stopped (so
    # a miss in flight at SIGTERM still gets its answer), and then nothing
    # calls it any more: it needs no drain period of its own.
    child = InferenceProcess(_model_args(args), grace_s=args.grace_s)
    try:
        config = gateway_config(args, [child.address])  # first: a bad flag or file fails before the model loads
        await child.start()
        await run_gateway(args, [child.address], label="serve", config=config)
    finally:
        await child.stop()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.log_level = (args.log_level or ("WARNING" if args.command == "classify" else "INFO")).upper()
    os.environ[FORMAT_ENV] = args.log_format  # the processes this one starts log alike
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command in ("serve", "gateway", "inference", "classify"):
            event_loop.loop_factory()  # a bad $TIERGATE_EVENT_LOOP fails here, before any work
        if args.command == "serve":
            event_loop.run(run_serve(args))
        elif args.command == "gateway":
            event_loop.run(run_gateway(args, [t.strip() for t in args.inference.split(",") if t.strip()]))
        elif args.command == "inference":
            # transformers' fast tokenizers (the torch runtime) batch through
            # a thread pool whose threads spin on the cores the lanes need;
            # batches are a few texts, tokenized by one thread (as onnx_model does).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            event_loop.run(run_inference(args))
        elif args.command == "classify":
            from gateway.classify import embedded_stack_factory, request_from_args, run_classify

            stack = embedded_stack_factory(args, _model_args(args), gateway_config(args, []), args.log_level)
            sys.exit(event_loop.run(run_classify(request_from_args(args, _classify_security(args)), stack)))
        elif args.command == "model":
            from inference.build import build_default_model, default_model_dir

            out = args.output or default_model_dir()
            if not args.force and os.path.exists(os.path.join(out, "tiergate_build.json")):
                print(f"the model already exists at {out} (--force rebuilds it)")
                return
            report = build_default_model(out)
            print(f"built {report.path}: held-out accuracy {report.accuracy:.4f} (torch int8 dynamic: {report.accuracy_int8:.4f}) "
                  f"on {report.eval_size} balanced positive/negative texts (trained on {report.train_size}) "
                  f"in {report.seconds:.0f} s")
        elif args.command == "bench":
            from gateway import bench

            bench.main(rest)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"tiergate {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(1)
