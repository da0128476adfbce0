#!/usr/bin/env python3
"""Open N idle keep-alive connections to a server and report its memory.

Each connection sends one request (default `GET /v2/`, the gateway's version
document: answered locally, no upstream call), reads the whole answer, then
stays open and idle. Once all are open it waits a moment, then reads VmRSS of
PID from /proc and prints one JSON line:

  {"opened": 10000, "failed": 0, "open_fds": 10012, "rss_kib": 41234, ...}

With --settle S it then sends one more request on each connection (with
--again; a server that parks idle connections has parked them by then:
each is woken, served, and parks again), waits S more seconds with them
still open and idle and reads VmRSS again ("rss_settled_kib", with "open_fds_settled"): what an idle
connection costs once the server has done what it does with idle ones
(toastgate parks them) and the allocator has returned what was freed.

With --after-close S it then closes them all, waits S seconds and reads
VmRSS again ("rss_after_close_kib"): whether the server gave the memory back.

Bounded in time: the whole run gives up after --deadline seconds.
Usage: idle_conns.py --port PORT --pid PID [--count 10000] [--hold 3] [--again] [--settle 15] [--after-close 60]
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import sys
import time


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def one_request(reader, writer, host, port, path):
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    if status != b"200":
        raise RuntimeError(f"status {status.decode()}")


async def open_one(host, port, path, sem, conns):
    async with sem:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await one_request(reader, writer, host, port, path)
        except BaseException:
            writer.close()
            raise
        conns.append((reader, writer))


async def again(conn, host, port, path, sem):
    async with sem:
        await one_request(*conn, host, port, path)


async def run(args):
    conns = []
    sem = asyncio.Semaphore(args.parallel)
    rss_before = vm_rss_kib(args.pid)
    started = time.monotonic()
    results = await asyncio.gather(
        *(open_one(args.host, args.port, args.path, sem, conns) for _ in range(args.count)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    open_secs = time.monotonic() - started
    # Let the server settle (buffers released, timers armed) before reading.
    await asyncio.sleep(args.hold)
    out = {
        "opened": len(conns),
        "failed": len(errors),
        "first_error": repr(errors[0]) if errors else None,
        "open_seconds": round(open_secs, 2),
        "open_fds": open_fds(args.pid),
        "rss_before_kib": rss_before,
        "rss_kib": vm_rss_kib(args.pid),
    }
    if args.settle > 0:
        if args.again:
            results = await asyncio.gather(
                *(again(c, args.host, args.port, args.path, sem) for c in conns),
                return_exceptions=True,
            )
            again_errors = [r for r in results if isinstance(r, BaseException)]
            out["again_failed"] = len(again_errors)
            out["failed"] += len(again_errors)
            if again_errors and not out["first_error"]:
                out["first_error"] = repr(again_errors[0])
        await asyncio.sleep(args.settle)
        out["rss_settled_kib"] = vm_rss_kib(args.pid)
        out["open_fds_settled"] = open_fds(args.pid)
    for _, w in conns:
        # Reset instead of a FIN: 10,000 client sockets in TIME_WAIT would hold
        # that many loopback ports for a minute and starve the next run.
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.close()
    if args.after_close > 0:
        await asyncio.sleep(args.after_close)
        out["rss_after_close_kib"] = vm_rss_kib(args.pid)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True, help="process whose VmRSS is read")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--path", default="/v2/")
    p.add_argument("--parallel", type=int, default=256, help="connections opened at once")
    p.add_argument("--hold", type=float, default=3.0, help="seconds idle before reading RSS")
    p.add_argument("--settle", type=float, default=0.0,
                   help="then seconds more, still idle, before reading RSS again")
    p.add_argument("--again", action="store_true",
                   help="with --settle: before its seconds, one more request on each connection")
    p.add_argument("--after-close", type=float, default=0.0,
                   help="seconds to wait after closing them before reading RSS again")
    p.add_argument("--deadline", type=float, default=90.0)
    args = p.parse_args()
    if not args.host.startswith("127.") and args.host != "localhost":
        sys.exit("only loopback targets")

    # One descriptor per connection on this side too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    try:
        out = asyncio.run(asyncio.wait_for(run(args), args.deadline))
    except asyncio.TimeoutError:
        sys.exit(f"gave up after {args.deadline}s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
