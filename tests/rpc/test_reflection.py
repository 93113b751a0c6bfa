"""Reflection (protocol.md §10.1): a worker serving a protobuf service
describes its methods' types, so `kelpie ls` shows them and `kelpie call`
takes JSON for a typed method and prints JSON back, with no generated module
on the caller's side."""

import json

import kelpie.sync
from kelpie import _reflection
from test_cli import kelpie_cli

GREETER = "kelpie.test.Greeter"


def _json_docs(text):
    """Every JSON document in text (the CLI prints one per reply or chunk)."""
    dec, i, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while i < len(text):
        doc, i = dec.raw_decode(text, i)
        out.append(doc)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def test_ls_shows_methods_and_types(broker, procs, greeter_path):
    procs.worker(broker, extra_path=[greeter_path])
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service(GREETER)
        client.wait_for_service("echo")
        described = _reflection.Description(client.call(GREETER, _reflection.METHOD, b"",
                                                        timeout=5))
    assert described.service == GREETER
    assert described.signature("Chat") == \
        "Chat(stream kelpie.test.HelloRequest) returns (stream kelpie.test.HelloReply)"
    r = kelpie_cli(broker, "ls")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "kelpie.Reflect" not in out  # the protocol's method, not the service's
    section = out.split(f"service {GREETER}\n", 1)[1].splitlines()
    assert "  rpc SayHello(kelpie.test.HelloRequest) returns (kelpie.test.HelloReply)" in section
    assert "  rpc CountTo(kelpie.test.HelloRequest) returns (stream kelpie.test.HelloReply)" \
        in section
    assert "  rpc JoinNames(stream kelpie.test.HelloRequest) returns (kelpie.test.HelloReply)" \
        in section
    assert "service echo" not in out  # untyped: no description


def test_call_takes_and_prints_json_by_reflection(broker, procs, greeter_path):
    procs.worker(broker, extra_path=[greeter_path])
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service(GREETER)
        client.wait_for_service("echo")
    # No --proto and no greeter_pb2 on the CLI's path: the types come from
    # the worker.
    r = kelpie_cli(broker, "call", GREETER, "SayHello", '{"name": "ann"}')
    assert r.returncode == 0, r.stderr
    assert _json_docs(r.stdout.decode()) == [{"message": "hello ann"}]
    r = kelpie_cli(broker, "call", GREETER, "CountTo", '{"name": "x", "count": 3}', "--stream")
    assert r.returncode == 0, r.stderr
    assert _json_docs(r.stdout.decode()) == [
        {"message": "x"}, {"message": "x", "index": 1}, {"message": "x", "index": 2}]
    # JSON that does not fit the request type is a usage error.
    r = kelpie_cli(broker, "call", GREETER, "SayHello", '{"nosuchfield": 1}')
    assert r.returncode == 2 and b"nosuchfield" in r.stderr
    # A method the service does not have is named, with the ones it has.
    r = kelpie_cli(broker, "call", GREETER, "Nope", "{}")
    assert r.returncode == 2 and b"SayHello" in r.stderr
    # --raw: bytes both ways, as before reflection.
    r = kelpie_cli(broker, "call", GREETER, "SayHello", "--raw", "--data", "")
    assert r.returncode == 0 and r.stdout == b"\n\x06hello "
    # An untyped service still takes raw bytes.
    r = kelpie_cli(broker, "call", "echo", "Echo", "plain bytes")
    assert (r.returncode, r.stdout) == (0, b"plain bytes"), r.stderr
