"""Several gateway workers on one port: they share L2 and their counters add up."""

from __future__ import annotations

import pathlib

import grpc

from protos import classifier_pb2, classifier_pb2_grpc
from tests.helpers import eventually, inference_counters
from tests.test_cli import alive, children_of

L1, L2, MODEL = classifier_pb2.TIER_L1, classifier_pb2.TIER_L2, classifier_pb2.TIER_MODEL


def classify_on_new_connection(address: str, text: str) -> classifier_pb2.ClassifyResponse:
    # A new channel is a new TCP connection, which SO_REUSEPORT may give to another worker.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return classifier_pb2_grpc.ClassifierStub(channel).Classify(classifier_pb2.ClassifyRequest(text=text), timeout=10)


def test_two_workers_share_the_port_l2_and_counters(procs, connect, tmp_path, tiny_model):
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2", None, workers=2)
    assert "2 workers" in gateway.ready_line
    # The gateway process is worker 0; the other is a fresh interpreter.
    others = [pid for pid in children_of(gateway.proc.pid)
              if b"gateway.workers" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(others) == 1

    client = connect(gateway)
    first = classify_on_new_connection(gateway.address, "scored once, shared by every worker")
    assert first.tier == MODEL
    # L2 writes are write-behind: wait until it landed before asking the other worker.
    eventually(lambda: client.stats().counters["l2_writes"] >= 1, timeout_s=10)
    tiers = [classify_on_new_connection(gateway.address, "scored once, shared by every worker").tier for _ in range(16)]
    # Whichever worker a connection reached, the answer came from its L1 or the shared L2, never the model again.
    assert set(tiers) <= {L1, L2}
    assert L2 in tiers, "16 new connections all reached the first worker"
    assert inference_counters(inference.address)["texts_scored"] == 1

    def summed() -> classifier_pb2.GatewayStats:
        stats = client.stats()
        counted = stats.counters["hits_l1"] + stats.counters["hits_l2"]
        return stats if stats.workers == 2 and counted == 16 else None

    stats = eventually(summed, timeout_s=10)
    assert stats.counters["model_texts"] == 1

    assert gateway.stop() == 0
    eventually(lambda: not alive(others[0]), timeout_s=15)


def test_a_killed_worker_is_replaced(procs, connect, tmp_path, tiny_model):
    import os
    import signal

    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2", None, workers=2)

    def other_workers() -> list[int]:
        return [pid for pid in children_of(gateway.proc.pid)
                if alive(pid) and b"gateway.workers" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]

    (victim,) = other_workers()
    os.kill(victim, signal.SIGKILL)
    replacement = eventually(lambda: [p for p in other_workers() if p != victim], timeout_s=30)
    assert len(replacement) == 1
    client = connect(gateway)
    eventually(lambda: client.stats().workers == 2, timeout_s=10)


def test_no_secret_reaches_any_command_line(procs, connect, tmp_path, tiny_model, redis_server):
    """Issue 9, item 12: a worker's config (the Redis password with it) never travels in argv,
    which any local user can read from /proc, not even encoded."""
    import base64
    import binascii

    import redis

    from tests.support.processes import TiergateProcess

    password = "s3cretpw-d0-not-leak"
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("requirepass", password)
    admin.close()
    url = redis_server.url.replace("redis://", f"redis://:{password}@")
    inference = procs.inference(tiny_model)
    gateway = procs.gateway(inference, tmp_path / "l2", url, workers=2)
    # The documented way to keep it off the parent's command line too: the environment.
    from_env = TiergateProcess(["gateway", "--port", "0", "--workers", "2", "--no-l2", "--inference",
                                inference.address], env={**procs.env, "TIERGATE_REDIS_URL": url})
    procs.started.append(from_env)
    from_env.start()

    def decoded_forms(arg: bytes) -> list[bytes]:
        """The argument, and what it decodes to if it is base64 or hex (the workers' argv used to be a base64 pickle)."""
        padded = arg + b"=" * (-len(arg) % 4)
        forms = [arg]
        for decode in (lambda: base64.b64decode(padded), lambda: base64.urlsafe_b64decode(padded),
                       lambda: bytes.fromhex(arg.decode("ascii", errors="replace"))):
            try:
                forms.append(decode())
            except (ValueError, binascii.Error):
                pass
        return forms

    secret = password.encode()
    for root, children in ((gateway, children_of(gateway.proc.pid)), (from_env, children_of(from_env.proc.pid))):
        workers = [pid for pid in children if b"gateway.workers" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 1
        pids = children + ([root.proc.pid] if root is from_env else [])
        for pid in pids:
            for arg in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                assert not any(secret in form for form in decoded_forms(arg)), (pid, arg[:80])

    # And the workers did get it: answers land in the password-protected Redis.
    client = connect(gateway)
    for i in range(8):
        classify_on_new_connection(gateway.address, f"written to L3 by whichever worker {i}")
    authed = redis.Redis.from_url(url)
    eventually(lambda: len(authed.keys("tg:*")) >= 8, timeout_s=15)
    authed.close()
    assert client.stats().workers == 2
