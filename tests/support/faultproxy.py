"""A TCP forwarder on 127.0.0.1 that injects object-store faults between a client and a server.

    proxy = FaultProxy(("127.0.0.1", server_port)).start()    # clients use http://127.0.0.1:{proxy.port}
    proxy.latency = 0.02          # seconds added before forwarding each request (each client->server chunk)
    proxy.drop_next(3)            # the next 3 answers are cut (RST) after half their first bytes
    proxy.refuse_for(1.5)         # connections refused (nothing listens on the port) for 1.5 s
    proxy.at_request(40, lambda: proxy.refuse_for(1.5))    # ... starting when the 40th request arrives
    proxy.at_request(1, lambda: proxy.drop_next(1), match=b"GET /bucket/data/")   # cut the first read there
    proxy.fail_next(2, 503, "SlowDown", match=b"PUT ")   # the next 2 writes answered 503 SlowDown by the proxy
    proxy.fail_next(3, 500, "InternalError")               # a burst: the next 3 requests answered 500
    proxy.stall_next(1, 3.0, match=b"GET ")   # the next read's answer held 3 s (past a client's read timeout)
    proxy.stop()

Hand-written because the faults must happen inside one test process on loopback, switched on and off
between calls: the maintained tools (toxiproxy, tc netem) are separate daemons or need root, and no
Python library we could find injects refused connections or mid-stream drops into a plain TCP stream.
One thread per connection: the traffic is a test's or a benchmark's, a few connections at a time.

`latency` is charged once per request, not per packet: a chunk the client sends after the server has
answered (or the first one) starts a request; an HTTP request's body arriving in several chunks pays once,
as does one sent after the server's interim "100 Continue".

HTTP-level faults: `fail_next` answers a request itself with an S3 error document (the status and code an
object store sends when it throttles or fails: 503 SlowDown, 500 InternalError), after reading the request's
body, and never forwards it; the connection is then closed. `stall_next` forwards the request and holds the
server's answer for the given seconds, so that a client with a shorter read timeout gives up on it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, target: tuple[str, int], port: int = 0):
        self.target = target
        self.latency = 0.0
        self._drop = 0  # answers still to cut mid-stream
        self._refuse_until = 0.0
        self.port = port
        self.connections = 0  # accepted, for tests to see traffic went through
        self.dropped = 0
        self.requests = 0  # requests forwarded
        self.trace: list | None = None  # a list: (time.monotonic(), request line) of each request is appended
        self._triggers: list[list] = []
        self._http: list[list] = []  # [requests still to fault, match, ("fail", status, code) | ("stall", s)]
        self.faulted: list[tuple[str, bytes]] = []  # ("fail" | "stall", request line) of each HTTP-level fault
        self._active: set[socket.socket] = set()  # client sides of open connections
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ knobs
    def drop_next(self, n: int) -> None:
        with self._lock:
            self._drop += n

    def at_request(self, n: int, fault, match: bytes | None = None) -> None:
        """Call `fault()` when the n-th request from now arrives (of those whose request line, e.g.
        b"PUT /bucket/key HTTP/1.1", contains `match`): a fault at a chosen point of a run."""
        with self._lock:
            self._triggers.append([n, match, fault])

    def fail_next(self, n: int, status: int = 503, code: str = "SlowDown", match: bytes | None = None) -> None:
        """The next n requests (whose request line contains `match`) get an S3 error answer from the proxy."""
        with self._lock:
            self._http.append([n, match, ("fail", status, code)])

    def stall_next(self, n: int, seconds: float, match: bytes | None = None) -> None:
        """The answers to the next n requests (whose request line contains `match`) are held `seconds`."""
        with self._lock:
            self._http.append([n, match, ("stall", seconds)])

    def _http_fault(self, line: bytes):
        with self._lock:
            for f in self._http:
                if f[1] is None or f[1] in line:
                    f[0] -= 1
                    if f[0] <= 0:
                        self._http.remove(f)
                    return f[2]
        return None

    def refuse_for(self, seconds: float) -> None:
        """The store goes away for `seconds`: open connections are cut, and the listening socket is closed (a
        connect() gets ECONNREFUSED) until it listens again."""
        with self._lock:
            self._refuse_until = time.monotonic() + seconds
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for sock in list(self._active):  # kept-alive connections would go on working otherwise
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ life
    def start(self) -> FaultProxy:
        self._listen()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="faultproxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.05)
        self.port = s.getsockname()[1]
        self._listener = s

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                listener = self._listener
                if listener is None and time.monotonic() >= self._refuse_until and not self._stop.is_set():
                    try:
                        self._listen()
                    except OSError:  # a refused client bound the free port itself (a TCP self-connect): soon gone
                        pass
                    listener = self._listener
            if listener is None:
                time.sleep(0.01)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):  # timeout, or the listener closed by refuse_for
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe_pair, args=(client,), daemon=True).start()

    # ------------------------------------------------------------------ one connection
    def _pipe_pair(self, client: socket.socket) -> None:
        """Both directions in one thread (select), so a cut closes sockets no other thread is blocked on:
        a close while another thread waits in recv() would send nothing until that recv returned."""
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        answered, drop = True, False  # answered: the server has sent something since the client's last request
        stall, went_on = 0.0, False  # seconds to hold the answer to the request under way; its "go on" sent
        with self._lock:
            self._active.add(client)
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([client, server], [], [], 0.5)
                if client in readable:
                    data = client.recv(1 << 16)
                    if not data:
                        break
                    if answered:  # a new request: count it, fire due faults, pay the latency once
                        went_on = False  # no "100 Continue" relayed for it yet
                        line = data.split(b"\r\n", 1)[0][:200]
                        self._new_request(line)
                        if self.trace is not None:
                            self.trace.append((time.monotonic(), line))
                        if self.latency:
                            time.sleep(self.latency)
                        fault = self._http_fault(line)
                        if fault is not None:
                            with self._lock:
                                self.faulted.append((fault[0], line))
                        if fault is not None and fault[0] == "fail":
                            _answer_error(client, data, *fault[1:])
                            return
                        stall = fault[1] if fault is not None else 0.0
                    answered = False
                    server.sendall(data)
                if server in readable:
                    data = server.recv(1 << 16)
                    if not data:
                        break
                    while not answered and data.startswith(b"HTTP/1.1 100 "):  # "go on" to a client that sent
                        interim, sep, data = data.partition(b"\r\n\r\n")  # Expect: 100-continue: its body follows,
                        if not went_on:  # not a new request. Only the first: moto's server sends two, which
                            client.sendall(interim + sep)  # aiohttp takes for the answer when apart (and then
                        went_on = True  # no read timeout applies to the real one)
                    if not data:
                        continue
                    if not answered and stall:  # the answer is ready: hold it
                        time.sleep(stall)
                        stall = 0.0
                    if not answered:  # the first bytes of an answer: is it one to cut?
                        with self._lock:
                            drop, self._drop = self._drop > 0, max(0, self._drop - 1)
                            self.dropped += drop
                    if drop:  # mid-stream: the client sent its request and sees part of an answer, then RST
                        client.sendall(data[: max(1, len(data) // 2)])
                        _reset(client)
                        return
                    client.sendall(data)
                    answered = True
        except OSError:
            pass
        finally:
            with self._lock:
                self._active.discard(client)
            _close(client)
            _close(server)


    def _new_request(self, line: bytes) -> None:
        with self._lock:
            self.requests += 1
            due = []
            for t in self._triggers:  # [requests still to see, match, fault]
                if t[1] is None or t[1] in line:
                    t[0] -= 1
                    if t[0] <= 0:
                        due.append(t)
            self._triggers = [t for t in self._triggers if t not in due]
        for _, _, fault in due:  # outside the lock: a fault takes it
            fault()


REASONS = {500: "Internal Server Error", 503: "Slow Down"}


def _answer_error(client: socket.socket, first: bytes, status: int, code: str) -> None:
    """Read the rest of the request that began with `first` (its body: Content-Length or chunked), answer it
    with an S3 error document, and close the connection."""
    client.settimeout(5)
    data = first
    try:
        while b"\r\n\r\n" not in data:
            data += client.recv(1 << 16) or b"\r\n\r\n"
        head, body = data.split(b"\r\n\r\n", 1)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])}
        if headers.get(b"expect", b"").lower() != b"100-continue":  # else the client waits for us to say go on
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while not body.endswith(b"0\r\n\r\n") and b"\r\n0\r\n" not in body[-64:]:
                    chunk = client.recv(1 << 16)
                    if not chunk:
                        break
                    body += chunk
            else:
                left = int(headers.get(b"content-length", b"0")) - len(body)
                while left > 0:
                    chunk = client.recv(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
        doc = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by the fault '
               f'proxy</Message><RequestId>faultproxy</RequestId></Error>').encode()
        is_head = head.startswith(b"HEAD ")
        client.sendall(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
                       f"Content-Length: {len(doc)}\r\nConnection: close\r\n\r\n".encode() + (b"" if is_head else doc))
        client.shutdown(socket.SHUT_WR)
        client.recv(1 << 16)  # until the client closes (or the timeout): no RST over the answer
    except OSError:
        pass
    finally:
        _close(client)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox cutting the connection does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


if __name__ == "__main__":  # a proxy in its own process (bench/object_store.py): its CPU is not the caller's
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="forward 127.0.0.1:<port> to 127.0.0.1:TARGET, adding latency")
    ap.add_argument("target", type=int)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    a = ap.parse_args()
    p = FaultProxy(("127.0.0.1", a.target)).start()
    p.latency = a.latency_ms / 1000
    print(p.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    p.stop()
