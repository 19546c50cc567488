-- wrk script for bench/load.sh: POSTs the file named by ARCGUARD_BENCH_BODY as JSON (or GETs
-- when it is unset), and prints one machine-readable RESULT line when the run is done, with the
-- p99.9 that wrk's own --latency report leaves out. Latencies are in microseconds.

local body_path = os.getenv("ARCGUARD_BENCH_BODY")
if body_path and body_path ~= "" then
  local file = assert(io.open(body_path, "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
else
  wrk.method = "GET"
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f rps=%.1f p50=%d p90=%d p99=%d p999=%d max=%d "
      .. "connect_errors=%d read_errors=%d write_errors=%d status_errors=%d timeouts=%d\n",
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
