"""Shared fixtures: tiny real models, tiergate processes on port 0, a private Redis."""

from __future__ import annotations

import pathlib

import protos  # noqa: F401  (before grpc: the gRPC experiments tiergate's processes run with)
import grpc
import pytest

from tests.support.models import save_tiny_model
from tests.support.processes import TiergateProcess
from tests.support.redis_server import redis_server  # noqa: F401  (fixture)
from protos import classifier_pb2, classifier_pb2_grpc


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    # Keeps every tiergate process of the test run out of the user's real cache dir.
    return tmp_path_factory.mktemp("tiergate-cache")


@pytest.fixture(scope="session")
def default_model_build(tmp_path_factory):
    """The real default model, built once per test run (a minute or two)."""
    from inference import build

    out = tmp_path_factory.mktemp("models") / build.DEFAULT_MODEL_NAME
    return build.build_default_model(out, progress=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model-a"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> pathlib.Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)


class Processes:
    """Starts tiergate commands as child processes; kills whatever is left at teardown."""

    def __init__(self, cache_dir: pathlib.Path) -> None:
        self.env = {"TIERGATE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.started: list[TiergateProcess] = []

    def start(self, *args: str) -> TiergateProcess:
        proc = TiergateProcess(list(args), env=self.env)
        self.started.append(proc)
        return proc.start()

    def inference(self, model: pathlib.Path, *extra: str) -> TiergateProcess:
        return self.start("inference", "--model", str(model), "--port", "0", *extra)

    def gateway(self, inference: TiergateProcess, lmdb: pathlib.Path | None, redis_url: str | None = None,
                *extra: str, workers: int = 1) -> TiergateProcess:
        # One worker unless a test asks for more: L1 is per worker process, and
        # tests that expect an L1 hit on a new connection need the same process.
        args = ["gateway", "--port", "0", "--workers", str(workers), "--inference", inference.address]
        args += ["--lmdb-path", str(lmdb)] if lmdb is not None else ["--no-l2"]
        if redis_url:
            args += ["--redis-url", redis_url]
        return self.start(*args, *extra)

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item.call_failed = outcome.get_result().failed


@pytest.fixture
def procs(cache_dir, request):
    processes = Processes(cache_dir)
    yield processes
    processes.close()
    if getattr(request.node, "call_failed", False):  # pytest shows this as the test's captured teardown output
        for proc in processes.started:
            print(f"----- tiergate {' '.join(proc.args[:1])}: last lines of its log -----")
            print("".join(proc.output[-60:]), end="")


class Client:
    """A plain synchronous client of one gateway."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = classifier_pb2_grpc.ClassifierStub(self.channel)
        self.admin = classifier_pb2_grpc.GatewayAdminStub(self.channel)

    def classify(self, text: str, timeout: float = 10.0) -> classifier_pb2.ClassifyResponse:
        return self.stub.Classify(classifier_pb2.ClassifyRequest(text=text), timeout=timeout)

    def batch(self, texts: list[str], timeout: float = 10.0) -> list[classifier_pb2.ClassifyResponse]:
        return list(self.stub.ClassifyBatch(classifier_pb2.ClassifyBatchRequest(texts=texts), timeout=timeout).results)

    def stats(self) -> classifier_pb2.GatewayStats:
        return self.admin.GetStats(classifier_pb2.GetStatsRequest(), timeout=5)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def connect():
    clients: list[Client] = []

    def make(proc_or_address) -> Client:
        address = proc_or_address if isinstance(proc_or_address, str) else proc_or_address.address
        clients.append(Client(address))
        return clients[-1]

    yield make
    for client in clients:
        client.close()
