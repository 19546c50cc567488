#!/usr/bin/env python3
"""Sends N concurrent POST /validate requests of one body, each on its own TLS connection, all
released at once (a barrier), and prints one line: N, the HTTP status counts, and the p50 and
maximum latency in ms. Used by bench/memory.sh; standard library only.

Usage: flood.py PORT CA_FILE BODY_FILE N
"""
import http.client
import ssl
import sys
import threading
import time
from collections import Counter

port, ca, body_file, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(body_file, "rb") as f:
    body = f.read()
context = ssl.create_default_context(cafile=ca)
barrier = threading.Barrier(n)
results = []
lock = threading.Lock()


def one():
    connection = http.client.HTTPSConnection("127.0.0.1", int(port), context=context, timeout=60)
    refused = None
    try:
        connection.connect()
    except Exception as error:  # a connection the server refuses (its slots) is a result
        refused = type(error).__name__
    # Every thread reaches the barrier, connected or not, so none waits for a failed one.
    barrier.wait()
    if refused is not None:
        outcome = ("refused:" + refused, 0.0)
    else:
        try:
            start = time.monotonic()
            connection.request("POST", "/validate", body, {"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            outcome = (response.status, time.monotonic() - start)
        except Exception as error:  # a reset or timeout is a result, not a crash of the bench
            outcome = (type(error).__name__, 0.0)
    connection.close()
    with lock:
        results.append(outcome)


threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
statuses = Counter(str(s) for s, _ in results)
latencies = sorted(l for s, l in results if s == 200 or s == 503)
p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
worst = latencies[-1] * 1000 if latencies else 0.0
print(n, ",".join(f"{k}:{v}" for k, v in sorted(statuses.items())), f"{p50:.0f}", f"{worst:.0f}")
