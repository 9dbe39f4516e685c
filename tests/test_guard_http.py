"""The guard's HTTP receiver on loopback: any request gets an HTTP answer in time, nothing
unsigned or replayed is ever queued for a reconcile, slow clients are timed out without
blocking deliveries, and the queue is bounded.

The receiver runs in this process (uvicorn in a thread) with a real :class:`Guard` whose worker
is not started: what a delivery would reconcile is exactly what sits in ``guard.jobs``.
Requests are written byte for byte on raw sockets, so malformed ones reach the server as sent.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.errors import ConfigError
from lifecycle.policies import load_policy
from lifecycle.registry.guard_http import _Redact, make_server
from lifecycle.registry.receiver import Guard, GuardSettings, Jobs, install
from lifecycle.registry.signature import MAX_SKEW_S, SeenDeliveries, sign
from tests import servers
from tests.cli import cli

SECRET = "http-test-secret-5f0c"
CAP = 2048
ANSWERS = {200, 202, 400, 401, 409, 411, 413, 503}


class Running:
    """A receiver serving on a free loopback port from a background thread."""

    def __init__(self, **limits: object) -> None:
        self.guard = Guard(load_policy(None), SECRET, settings=GuardSettings(**limits))  # type: ignore[arg-type]
        self.rx = make_server(self.guard, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.rx.serve_forever, daemon=True)
        self.thread.start()
        servers.wait_http(f"{self.rx.url}/health", timeout=30)

    def stop(self) -> None:
        self.rx.shutdown()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the receiver did not shut down"

    def queued(self) -> list[tuple[str, str]]:
        """Take every queued reconcile (what the worker would have run)."""
        jobs = []
        while (job := self.guard.jobs.take(timeout=0)) is not None:
            jobs.append((job.name, job.alias))
        return jobs


@pytest.fixture(scope="module")
def running():
    rx = Running(read_timeout_s=0.5, max_body_bytes=CAP)
    yield rx
    rx.stop()


def request(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``raw`` as is; (status, body) of the answer. A dropped connection raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def post(headers: dict[str, str], body: bytes, *, length: str | None = "exact", close: bool = True) -> bytes:
    """A POST /webhook request; ``length`` "exact" is the body's size, None leaves it out."""
    lines = [b"POST /webhook HTTP/1.1", b"Host: 127.0.0.1"]
    if length is not None:
        lines.append(b"Content-Length: " + (str(len(body)) if length == "exact" else length).encode())
    if close:
        lines.append(b"Connection: close")
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def payload(name: str, alias: str = "production") -> bytes:
    return json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"name": name, "alias": alias, "version": "3"}}).encode()


def signed(body: bytes, delivery_id: str | None = None, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if ts is None else ts)
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": sign(secret, delivery_id, stamp, body)}


# Header values: any latin-1 text but CR/LF (those would end the header, i.e. make another request).
HEADER = st.text(st.characters(min_codepoint=0, max_codepoint=0xFF, exclude_characters="\r\n"), max_size=40)
LENGTHS = st.one_of(st.none(), st.just("exact"), st.just("exact"), st.integers(-2 ** 70, 2 ** 70).map(str), HEADER,
                    st.sampled_from(["", " ", "+5", "0x10", "1e3", "5, 5", "5,6", "\u0663", "00", "-0", "9" * 21]))
BODIES = st.one_of(st.binary(max_size=CAP + 600), st.sampled_from(["production", "staging", "champion", ""])
                   .map(lambda alias: payload("@NAME@", alias)))
MODES = st.sampled_from(["none", "garbage", "wrong-secret", "stale", "valid", "replay"])


def _declared(length: str | None, body: bytes) -> int | None:
    """The length h11 would read from the header, or None when it refuses it / there is none."""
    if length is None:
        return None
    # h11 takes "5, 5" (a list of equal values) as 5, and nothing else but plain digits.
    values = {v.strip(" \t") for v in (str(len(body)) if length == "exact" else length).split(",")}
    text = values.pop() if len(values) == 1 else ""
    return int(text) if re.fullmatch(r"[0-9]{1,20}", text) else None


@pytest.mark.tried("guard", "any Content-Length (negative, huge, non-numeric, missing), any body bytes, any "
                   "signature / timestamp / delivery-id strings, signed deliveries replayed (hypothesis, raw sockets)",
                   "always an HTTP answer (200/202/400/401/409/411/413/503, or 408 for a body shorter than "
                   "announced) within the timeout; only fresh signed deliveries are queued for a reconcile")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=LENGTHS, body=BODIES, mode=MODES, delivery_id=HEADER, stamp=HEADER, signature=HEADER)
def test_any_request_gets_an_answer_and_only_fresh_signed_ones_reconcile(running, length, body, mode, delivery_id,
                                                                         stamp, signature):
    name = f"lm-{uuid.uuid4().hex[:10]}"
    body = body.replace(b"@NAME@", name.encode())
    headers = {"none": {},
               "garbage": {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
                           "X-MLflow-Signature": signature},
               "wrong-secret": signed(body, secret="not-" + SECRET),
               "stale": signed(body, ts=int(time.time()) - MAX_SKEW_S - 60),
               "valid": signed(body), "replay": signed(body)}[mode]
    status, reply = request(running.rx.port, post(headers, body, length=length))
    declared = _declared(length, body)
    allowed = ANSWERS | ({408} if declared is not None and len(body) < declared <= CAP else set())
    assert status in allowed, (status, reply)
    # The exact answer where every other header is plain text (h11 has its own rules for control characters).
    if any(re.search(r"[\x00-\x1f\x7f]", value) for value in headers.values()):
        pass
    elif length is None:
        assert status == 411
    elif declared is None:
        assert status == 400, (status, reply)
    elif declared > CAP:
        assert status == 413, (status, reply)
    authentic = mode in ("valid", "replay") and declared == len(body)
    if status in (200, 202):
        assert authentic
    if mode == "replay":
        again, reply = request(running.rx.port, post(headers, body, length=length))
        if status < 300:
            assert again == 409 and b"replay refused" in reply, (again, reply)
        else:
            assert again == status  # a refused delivery was not remembered; refused again for its own reason
    jobs = running.queued()
    routed = authentic and status == 202
    assert jobs == ([(name, json.loads(body)["data"]["alias"])] if routed else []), (mode, status, jobs)
    if status == 202:
        assert json.loads(body)["data"]["alias"] in ("production", "staging")


@pytest.mark.tried("guard", "any bytes as a whole request: garbage, bare LF, NUL and CR/LF inside header lines, "
                   "other methods and HTTP versions (hypothesis, raw sockets)",
                   "always an HTTP answer (4xx, or 200 for a well-formed GET) within the timeout; nothing queued")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=300),
                     st.lists(st.sampled_from([b"POST /webhook HTTP/1.1", b"GET / HTTP/1.0", b"PUT /x HTTP/1.1",
                                               b"POST / HTTP/2.0", b"Host: x", b"Content-Length: 3", b"\x00",
                                               b"Content-Length: 2", b"Transfer-Encoding: chunked", b"X: a\rb",
                                               b"Transfer-Encoding: gzip", b"Expect: 100-continue", b" folded",
                                               b"Connection: close", b"", b"abc", b"3", b"0"]), max_size=10)
                     .map(lambda lines: b"\r\n".join(lines)),
                     st.binary(max_size=200).map(lambda tail: b"POST /webhook HTTP/1.1\r\n" + tail)))
def test_any_bytes_as_a_request_get_an_answer(running, raw):
    status, _ = request(running.rx.port, raw)
    assert status in ANSWERS | {404, 405, 408}, status
    assert running.queued() == []


@pytest.mark.tried("guard", "a client that connects and sends nothing, half a request line, or headers announcing "
                   "a body it never sends, while a real delivery arrives", "the delivery is answered at once (202); "
                   "each slow client gets 408 after the read timeout and its connection is closed")
def test_slow_clients_are_timed_out_and_do_not_block_deliveries():
    rx = Running(read_timeout_s=1.5, max_connections=8)
    try:
        stalls = []
        for raw in (b"", b"POST /webhook HTT", post({}, b"", length="100", close=False)):
            sock = socket.create_connection(("127.0.0.1", rx.rx.port), timeout=10)
            sock.sendall(raw)
            stalls.append(sock)
        started = time.monotonic()
        body = payload("lm-slow")
        status, _ = request(rx.rx.port, post(signed(body), body), timeout=5)
        assert status == 202 and time.monotonic() - started < 1.0
        for sock in stalls:
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            assert resp.status == 408 and b"not received within" in resp.read()
            assert sock.recv(1) == b""  # closed by the server
            sock.close()
        assert time.monotonic() - started < 5.0
    finally:
        rx.stop()


@pytest.mark.tried("guard", "more open connections than --max-connections (all stalled)",
                   "the extra ones get 503 at once; once the stalled ones time out, deliveries get through")
def test_connection_limit_answers_503_then_recovers():
    rx = Running(read_timeout_s=1.0, max_connections=4)
    try:
        stalls = []
        for _ in range(3):  # uvicorn counts open connections, the new one included: 3 + 1 reach the limit
            stalls.append(socket.create_connection(("127.0.0.1", rx.rx.port), timeout=10))
            stalls[-1].sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            time.sleep(0.1)
        body = payload("lm-limit")
        assert request(rx.rx.port, post(signed(body), body), timeout=5)[0] == 503
        time.sleep(1.5)  # the stalled ones time out (408) and their connections close
        for sock in stalls:
            sock.close()
        assert request(rx.rx.port, post(signed(body), body), timeout=5)[0] == 202
    finally:
        rx.stop()


@pytest.mark.tried("guard", "the same signed delivery twice; a delivery refused with 503 (queue full) retried with "
                   "its id, as MLflow does", "the second copy gets 409 'replay refused' and is not reconciled; "
                   "the retried 503 delivery is accepted")
def test_replayed_delivery_refused_and_full_queue_answers_503():
    rx = Running(queue_size=2)
    try:
        first, second, third = (payload(f"lm-q{i}") for i in range(3))
        h1 = signed(first)
        assert request(rx.rx.port, post(h1, first))[0] == 202
        status, reply = request(rx.rx.port, post(h1, first))
        assert status == 409 and b"already received" in reply
        # Another delivery for the same model and alias is coalesced with the waiting one.
        assert json.loads(request(rx.rx.port, post(signed(first), first))[1])["status"] == "pending"
        assert request(rx.rx.port, post(signed(second), second))[0] == 202
        h3 = signed(third)
        status, reply = request(rx.rx.port, post(h3, third))
        assert status == 503 and b"queue is full" in reply
        assert rx.queued() == [("lm-q0", "production"), ("lm-q1", "production")]
        assert request(rx.rx.port, post(h3, third))[0] == 202  # MLflow's retry of the 503 goes through
        assert rx.queued() == [("lm-q2", "production")]
    finally:
        rx.stop()


def test_body_over_the_cap_is_refused_before_it_is_read(running):
    status, reply = request(running.rx.port, post({}, b"", length=str(10 ** 12)))
    assert status == 413 and b"too large" in reply
    with socket.create_connection(("127.0.0.1", running.rx.port), timeout=10) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n" % (CAP + 1, b"x" * (CAP + 1)))
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 413


@pytest.mark.tried("guard", "signed deliveries whose body is not a webhook payload (JSON nested 2000 deep, "
                   "invalid UTF-8, lists, null, data of the wrong type, other entities)",
                   "400 (or 200 'ignored' for another entity); nothing queued, the receiver keeps answering")
@pytest.mark.parametrize("body,expected", [(b"[" * 2000, 400), (b"not json", 400), (b"\xff\xfe{", 400),
                                           (b"[]", 400), (b"null", 400), (b'{"data": 5}', 400),
                                           (b'{"entity": "model_version", "data": {"name": "m"}}', 200),
                                           (b'{"entity": "model_version_alias", "data": {"name": 5, "alias": []}}',
                                            200)])
def test_signed_but_malformed_payloads(running, body, expected):
    status, reply = request(running.rx.port, post(signed(body), body))
    assert status == expected, reply
    assert running.queued() == []
    assert request(running.rx.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


@pytest.mark.tried("guard", "signed delivery ids of any text, remembered up to the capacity, timestamps across the "
                   "signature window (hypothesis)", "an id is refused while its timestamp can still pass and "
                   "forgotten after; memory never exceeds the capacity")
@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.text(max_size=30), min_size=1, max_size=40), offsets=st.lists(st.integers(-400, 400),
                                                                                      min_size=40, max_size=40))
def test_seen_deliveries_are_bounded_and_forgotten_after_the_window(ids, offsets):
    now = 1_800_000_000.0
    seen = SeenDeliveries(capacity=10)
    accepted = {}
    for delivery_id, offset in zip(ids, offsets, strict=False):
        stamp = str(int(now) + offset)
        if seen.remember(delivery_id, stamp, now=now):
            accepted[delivery_id] = int(stamp)
        assert len(seen) <= 10
    for delivery_id, stamp in accepted.items():
        assert seen.seen(delivery_id, now=now) == (stamp + MAX_SKEW_S >= now)
    for delivery_id, stamp in sorted(accepted.items(), key=lambda kv: kv[1]):  # time only moves forward
        assert not seen.seen(delivery_id, now=stamp + MAX_SKEW_S + 1)


def test_jobs_queue_coalesces_and_orders_retries_by_due_time():
    jobs = Jobs(2)
    assert [jobs.offer("a", "production"), jobs.offer("a", "production"), jobs.offer("b", "staging"),
            jobs.offer("c", "production")] == ["queued", "pending", "queued", "full"]
    a = jobs.take(timeout=0)
    assert (a.name, jobs.offer("a", "production")) == ("a", "queued")  # taken: a new move needs a new reconcile
    jobs.later(a, 0.3)
    assert jobs.take(timeout=0).name == "b" and jobs.take(timeout=0).name == "a"
    assert jobs.take(timeout=0.1) is None
    started = time.monotonic()
    assert jobs.take(timeout=2).name == "a" and time.monotonic() - started >= 0.1
    assert jobs.close() == 0 and jobs.take() is None


@pytest.mark.parametrize("bad", [dict(queue_size=0), dict(max_attempts=-1), dict(retry_delay_s=0),
                                 dict(read_timeout_s=float("nan")), dict(retry_delay_s=5, retry_max_delay_s=1),
                                 dict(max_connections="8")])
def test_guard_settings_are_validated(bad):
    with pytest.raises(ConfigError):
        GuardSettings(**bad)


@pytest.mark.tried("guard", "the webhook secret in a URL, in a log message, in a refused delivery",
                   "masked as *** in errors and logs; never echoed to the client")
def test_secret_never_reaches_errors_or_logs(running, caplog):
    with pytest.raises(ConfigError) as err:
        install(f"ftp://user:{SECRET}@host/", secret=SECRET)
    assert SECRET not in str(err.value) and "***" in str(err.value)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed with %s", (SECRET,), None)
    assert _Redact(SECRET).filter(record) and SECRET not in record.getMessage()
    body = payload("lm-secret")
    with caplog.at_level(logging.DEBUG):
        for headers in (signed(body, secret=SECRET + "x"), {"X-MLflow-Signature": SECRET}):
            status, reply = request(running.rx.port, post(headers, body))
            assert status == 401 and SECRET.encode() not in reply
    assert SECRET not in caplog.text
    running.queued()


@pytest.mark.tried("guard", "`lifecycle guard serve` with no secret, a port in use, a port out of range, a retry "
                   "ceiling below the first delay, a zero queue",
                   "exit 2 (15 for the port in use) with a one-line error (no traceback, "
                   "no secret in it); nothing starts listening")
def test_serve_refuses_bad_flags_with_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("LIFECYCLE_GUARD_SECRET", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        cases = [([], "needs a webhook secret"),
                 (["--secret", SECRET, "--port", port], "cannot listen on 127.0.0.1:" + port),
                 (["--secret", SECRET, "--port", "70000"], "70000"),
                 (["--secret", SECRET, "--retry-delay", "5", "--retry-max-delay", "1"], "retry_max_delay_s"),
                 (["--secret", SECRET, "--queue-size", "0"], "queue-size")]
        for args, message in cases:
            capsys.readouterr()
            assert cli("guard", "serve", *args) == (15 if message.startswith("cannot listen") else 2), args
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err and SECRET not in err, (args, err)
