"""Bad input gets a clear status and a message without internals."""

from __future__ import annotations

import grpc
import pytest

from protos import classifier_pb2

INTERNALS = ("Traceback", "Exception", "File \"", "DecodeError", "line ")


@pytest.fixture
def gateway(procs, tmp_path, tiny_model):
    inference = procs.inference(tiny_model)
    return procs.gateway(inference, tmp_path / "l2", None, "--max-text-bytes", "100", "--max-batch", "5")


def call_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args)
    for fragment in INTERNALS:
        assert fragment not in err.value.details()
    return err.value


@pytest.mark.parametrize(
    "text, fragment",
    [("", "empty"), ("   \n\t ", "empty"), ("x" * 101, "101 bytes of UTF-8; the limit is 100"), ("é" * 51, "102 bytes")],
)
def test_bad_texts_are_invalid_argument(gateway, connect, text, fragment):
    client = connect(gateway)
    err = call_error(client.classify, text)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.details()
    # The limit is inclusive: exactly max bytes is fine.
    assert client.classify("y" * 100).label


def test_batch_over_the_limit_and_bad_items_name_the_problem(gateway, connect):
    client = connect(gateway)
    err = call_error(client.batch, ["t"] * 6)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "6 texts; the limit is 5" in err.details()
    err = call_error(client.batch, ["fine", ""])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1]" in err.details()


def raw_call(address: str, method: str, payload: bytes, stream: bool = False):
    with grpc.insecure_channel(address) as channel:
        if stream:
            rpc = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
            return list(rpc(iter([payload]), timeout=5))
        return channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=5)


# Field 1 (text), wire type 2, length 2, then two bytes that are not UTF-8.
INVALID_UTF8_REQUEST = b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize("method", ["Classify", "ClassifyBatch"])
def test_invalid_utf8_is_invalid_argument_not_unknown(gateway, method):
    err = call_error(raw_call, gateway.address, f"/tiergate.v1.Classifier/{method}", INVALID_UTF8_REQUEST)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "valid UTF-8" in err.details()
    if method == "ClassifyBatch":
        assert "texts[0]" in err.details()


def test_garbage_bytes_are_invalid_argument(gateway):
    err = call_error(raw_call, gateway.address, "/tiergate.v1.Classifier/Classify", b"\xff\xff\xff\xff")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stream_answers_bad_texts_in_band_and_goes_on(gateway):
    from protos import classifier_pb2_grpc

    texts = ("good one", "good two", "", "x" * 101, "after them")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        replies = list(stub.ClassifyStream(iter(classifier_pb2.ClassifyRequest(text=t) for t in texts), timeout=10))
        raw = list(channel.stream_stream("/tiergate.v1.Classifier/ClassifyStream")(
            iter([INVALID_UTF8_REQUEST, classifier_pb2.ClassifyRequest(text="fine").SerializeToString()]), timeout=10))
    assert len(replies) == len(texts)
    assert [bool(r.label) for r in replies] == [True, True, False, False, True]
    for bad, fragment in ((replies[2], "empty"), (replies[3], "101 bytes")):
        assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert fragment in bad.error.message
    first, second = (classifier_pb2.ClassifyResponse.FromString(r) for r in raw)
    assert first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "valid UTF-8" in first.error.message
    assert second.label and not second.HasField("error")
