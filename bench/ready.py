#!/usr/bin/env python3
"""Polls https://127.0.0.1:PORT/readyz until it answers 200; helper of bench/load.sh.

Usage: ready.py PORT CA_FILE STARTED_FILE [TIMEOUT_SECONDS]

Touches STARTED_FILE once it is polling, so the caller starts the server only then and the
interpreter's own start-up is not counted; then prints `READY <epoch ns> <failed attempts>` when
/readyz first answers 200. Each poll is an in-process TLS request (about a millisecond), a far
finer resolution than a curl process per poll; the figure includes that last request.
"""

import socket
import ssl
import sys
import time


def readyz(port: int, context: ssl.SSLContext) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            status = tls.recv(64)
    return status.startswith(b"HTTP/1.1 200")


def main() -> int:
    port, ca, started = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0
    context = ssl.create_default_context(cafile=ca)
    refused = 0
    with open(started, "w"):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if readyz(port, context):
                print(f"READY {time.time_ns()} {refused}")
                return 0
        except OSError:
            pass
        refused += 1
        time.sleep(0.0005)
    print("NOT READY", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
