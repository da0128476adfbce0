#!/usr/bin/env python3
"""The Redis round trip on loopback, measured by a second client while the
gateway's (f) run loads the machine: one call of a one-line script (an INCR;
the gateway's decision script does a little more work inside Redis) at a
time, one every INTERVAL, for SECONDS. Paced, not back to back,
so the measuring takes almost no CPU from what it measures. Python's own
scheduling is inside each measured round trip, so the figures are an upper
bound.

    redis_rtt.py --port PORT --seconds 12 [--interval 0.002]

Prints one JSON line: {"count", "p50_us", "p99_us", "max_us"}.
"""

import argparse
import json
import math
import socket
import sys
import time

SCRIPT = "return redis.call('INCR', KEYS[1])"


def resp(*args):
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_reply(sock, buf):
    """Reads one integer or simple reply (":N\\r\\n" / "+OK\\r\\n"); fails on an error reply."""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("redis_rtt: Redis closed the connection")
        buf += chunk
    line, _, rest = buf.partition(b"\r\n")
    if line.startswith(b"-"):
        sys.exit("redis_rtt: Redis answered an error: %s" % line.decode(errors="replace"))
    return rest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--interval", type=float, default=0.002)
    args = ap.parse_args()

    sock = socket.create_connection(("127.0.0.1", args.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = resp("EVAL", SCRIPT, "1", "bench:rtt")
    buf = b""
    samples = []
    end = time.monotonic() + args.seconds
    next_send = time.monotonic()
    while time.monotonic() < end:
        start = time.perf_counter()
        sock.sendall(request)
        buf = read_reply(sock, buf)
        samples.append((time.perf_counter() - start) * 1e6)
        next_send += args.interval
        pause = next_send - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    if not samples:
        sys.exit("redis_rtt: no round trip measured")
    samples.sort()

    def pct(p):
        # Nearest rank: the smallest sample with at least p of them at or below it.
        return round(samples[max(0, math.ceil(p * len(samples)) - 1)])

    print(json.dumps({"count": len(samples), "p50_us": pct(0.50), "p99_us": pct(0.99),
                      "max_us": round(samples[-1])}))


if __name__ == "__main__":
    main()
