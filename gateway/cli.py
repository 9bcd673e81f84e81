"""The `tiergate` command line. The only module that reads flags and environment variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

__all__ = ["main", "build_parser"]

from gateway.lifecycle import exit_with_parent, until_signalled
from inference.model import MAX_AUTO_LANES  # light: torch loads only when a model does

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
    g.add_argument("--l2-ttl-s", type=_positive_int, default=7 * 86400, help="L2 entry lifetime (default: 7 days)")
    g.add_argument("--redis-url", default=os.environ.get("TIERGATE_REDIS_URL"),
                   help="turns L3 on, e.g. redis://localhost:6379/0 (default: $TIERGATE_REDIS_URL; none: L3 off)")
    g.add_argument("--l3-ttl-s", type=_positive_int, default=86400, help="L3 entry lifetime (default: 1 day)")
    g.add_argument("--l1-entries", type=_positive_int, default=100_000, help="L1 capacity in entries (default: %(default)s)")
    g.add_argument("--max-text-bytes", type=_positive_int, default=8192,
                   help="longest accepted text in UTF-8 bytes; longer: INVALID_ARGUMENT (default: %(default)s)")
    g.add_argument("--max-batch", type=_positive_int, default=1000,
                   help="most texts in one ClassifyBatch; more: INVALID_ARGUMENT (default: %(default)s)")
    g.add_argument("--max-concurrent-rpcs", type=_positive_int, default=None,
                   help="calls in progress at once; more: RESOURCE_EXHAUSTED at once (default: no limit)")
    g.add_argument("--max-pending-misses", type=_positive_int, default=4096,
                   help="texts one gateway process has waiting for the model; more: RESOURCE_EXHAUSTED at once "
                   "(default: %(default)s)")


def _add_workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="gateway worker processes sharing the port (SO_REUSEPORT) and L2 (default: one per core, "
                   "at most 8; for serve, one per two cores: the model needs the rest)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint directory or hub id (default: the built-in "
                   "sentiment model, built on first use)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--quantize", choices=("auto", "on", "off"), default="auto",
                   help="int8 dynamic quantization of Linear layers, CPU only (default: auto = on where the model's "
                   "build measured at most 1 point of held-out accuracy lost, i.e. the built-in model on CPU)")
    g.add_argument("--torchscript", choices=("auto", "on", "off"), default="auto",
                   help="serve a frozen TorchScript graph of the model, checked against the model at load (default: "
                   "auto = on a CPU, falling back to the model itself if the check fails; on: fail instead)")
    g.add_argument("--lanes", type=_positive_int, default=None,
                   help="model calls that run at once, each in a thread of its own (default: on a CPU one per core, "
                   f"at most {MAX_AUTO_LANES}; on CUDA 1)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per lane (default: the cores divided among the lanes)")
    g.add_argument("--model-nice", type=int, default=10, choices=range(0, 20), metavar="0..19",
                   help="how much nicer than the rest of the inference process the model's threads run, so that "
                   "answering calls never waits behind a forward pass; 0: same priority (default: %(default)s)")
    g.add_argument("--max-batch-texts", type=_positive_int, default=None,
                   help="texts per model call (default: 4 on a CPU, where less padding beats bigger batches; 64 on CUDA)")
    g.add_argument("--max-batch-tokens", type=_positive_int, default=8192,
                   help="padded tokens per model call (default: %(default)s)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more texts after its first (default: %(default)s)")
    g.add_argument("--max-queue", type=_positive_int, default=2048,
                   help="texts waiting for the model; more: RESOURCE_EXHAUSTED (default: %(default)s)")
    g.add_argument("--max-queue-wait-ms", type=_positive_int, default=1000,
                   help="or when the queue holds this much model time at the measured speed: RESOURCE_EXHAUSTED "
                   "(default: %(default)s)")


_AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def _model_args(args) -> list[str]:
    """The model flags of `serve`/`classify`, passed on to the inference child."""
    out = ["--device", args.device, "--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue), "--max-queue-wait-ms", str(args.max_queue_wait_ms)]
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
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the whole stack: inference service + gateway (no Redis needed)",
                       description="Runs the inference service (a child process) and the gateway. Prints one line "
                       "with the address when ready; SIGINT/SIGTERM stop every process it started.")
    _add_gateway_flags(p)
    _add_workers_flag(p)
    _add_model_flags(p)

    p = sub.add_parser("gateway", help="run the gateway alone, against running inference service(s)")
    _add_gateway_flags(p)
    _add_workers_flag(p)
    p.add_argument("--inference", default="127.0.0.1:50052", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the inference service, or several replicas separated by commas: misses go to the least "
                   "loaded one that is up (default: %(default)s)")

    p = sub.add_parser("inference", help="run the inference service alone")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=50052, help="port, 0 for any free port (default: %(default)s)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    _add_model_flags(p)

    p = sub.add_parser("classify", help="score every row of a CSV file",
                       description="Scores one column of a CSV and writes the rows again with label, score and "
                       "tier columns added, through a running gateway (--target) or an embedded stack.")
    p.add_argument("csv", metavar="FILE.csv")
    p.add_argument("--column", required=True, help="the column holding the text")
    p.add_argument("--output", "-o", metavar="OUT.csv", help="where to write (default: FILE.scored.csv; - for stdout)")
    p.add_argument("--target", metavar="HOST:PORT", help="a running gateway (default: start an embedded stack)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="texts per ClassifyBatch call (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_gateway_flags(p, port_default=0)
    _add_model_flags(p)

    p = sub.add_parser("model", help="model tools")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    b = msub.add_parser("build", help="build the default sentiment model offline and print its held-out accuracy")
    b.add_argument("--output", metavar="DIR", help="where to store it (default: <cache dir>/models/<name>)")
    b.add_argument("--force", action="store_true", help="rebuild even if it exists")

    from gateway.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def gateway_config(args, inference_targets: list[str]):
    from cache import LmdbConfig, RedisConfig
    from gateway.classifier import Limits
    from gateway.server import GatewayConfig
    from inference.paths import cache_root

    lmdb = None
    if not args.no_l2:
        path = args.lmdb_path or str(cache_root() / "l2")
        lmdb = LmdbConfig(path=path, max_bytes=args.l2_max_mb * MIB, ttl_s=args.l2_ttl_s)
    redis = RedisConfig(url=args.redis_url, ttl_s=args.l3_ttl_s) if args.redis_url else None
    return GatewayConfig(
        inference_targets=tuple(inference_targets), host=args.host, port=args.port, l1_max_entries=args.l1_entries,
        lmdb=lmdb, redis=redis, max_concurrent_rpcs=args.max_concurrent_rpcs,
        limits=Limits(max_text_bytes=args.max_text_bytes, max_batch=args.max_batch,
                      max_pending_misses=args.max_pending_misses),
    )


def _tiers_summary(config) -> str:
    l2 = config.lmdb.path if config.lmdb else "off"
    l3 = "on" if config.redis else "off"
    return f"L1 on, L2 {l2}, L3 {l3}"


async def run_inference(args) -> None:
    from inference.batcher import BatcherConfig
    from inference.model import ModelConfig
    from inference.service import InferenceConfig, InferenceServer


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
        model=ModelConfig(source=model, device=args.device, lanes=args.lanes, threads=args.threads, nice=args.model_nice,
                          quantize=_AUTO_ON_OFF[args.quantize], torchscript=_AUTO_ON_OFF[args.torchscript]),
        batcher=BatcherConfig(max_batch=args.max_batch_texts, max_tokens=args.max_batch_tokens,
                              max_wait_s=args.max_wait_ms / 1000, max_queue=args.max_queue,
                              max_queue_wait_s=args.max_queue_wait_ms / 1000),
        host=args.host, port=args.port,
    )
    server = InferenceServer(config)
    watcher = asyncio.ensure_future(exit_with_parent(os.getppid())) if args.exit_with_parent else None
    await server.start()
    info = server.model.info
    print(f"tiergate inference listening on {server.address} (model {info.model_id}@{info.fingerprint}, "
          f"{info.device}, {info.dtype}, {info.graph}, {info.lanes} lane(s) x {info.threads} thread(s))", flush=True)
    try:
        await until_signalled()
    finally:
        if watcher:
            watcher.cancel()
        await server.stop()


async def run_gateway(args, inference_targets: list[str], label: str = "gateway") -> None:
    from gateway.workers import default_workers, run_gateway_workers

    config = gateway_config(args, inference_targets)
    workers = args.workers or default_workers(model_on_host=label == "serve")

    def ready(server) -> None:
        print(f"tiergate {label} listening on {server.address} ({workers} worker{'s' if workers > 1 else ''}; "
              f"model {server.handlers.core.model_display}; {_tiers_summary(config)})", flush=True)

    await run_gateway_workers(config, workers, until_signalled, ready, args.log_level.upper())


async def run_serve(args) -> None:
    from gateway.stack import InferenceProcess

    child = InferenceProcess(_model_args(args))
    await child.start()
    try:
        await run_gateway(args, [child.address], label="serve")
    finally:
        await child.stop()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            asyncio.run(run_serve(args))
        elif args.command == "gateway":
            asyncio.run(run_gateway(args, [t.strip() for t in args.inference.split(",") if t.strip()]))
        elif args.command == "inference":
            asyncio.run(run_inference(args))
        elif args.command == "classify":
            from gateway.classify_csv import run_classify

            asyncio.run(run_classify(args))
        elif args.command == "model":
            from inference.build import build_default_model, default_model_dir

            out = args.output or default_model_dir()
            if not args.force and os.path.exists(os.path.join(out, "tiergate_build.json")):
                print(f"the model already exists at {out} (--force rebuilds it)")
                return
            report = build_default_model(out)
            print(f"built {report.path}: held-out accuracy {report.accuracy:.4f} (int8: {report.accuracy_int8:.4f}) "
                  f"on {report.eval_size} balanced positive/negative texts (trained on {report.train_size}) "
                  f"in {report.seconds:.0f} s")
        elif args.command == "bench":
            from gateway.bench import run_bench

            run_bench(args)
    except KeyboardInterrupt:
        pass
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"tiergate {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(1)
