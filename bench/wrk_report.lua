-- wrk script: print one JSON line when the run is done.
--
--   wrk -t2 -c100 -d10s --timeout 30s -s bench/wrk_report.lua http://host:port/path
--
-- The line starts with "WRK_JSON " and holds:
--   requests, duration_s, requests_per_s, bytes (every byte read, also of
--   responses the run ended in the middle of), bytes_per_s,
--   latency_us {mean, stdev, min, max, p50, p90, p99, p99_9} (of completed
--   responses; wrk records only latencies up to --timeout),
--   errors {connect, read, write, timeout, status (responses >= 400)},
--   errors_total.
-- Latencies are microseconds. wrk under-samples stalls above the knee
-- (coordinated omission): trust its percentiles below it.

local function num(x)
   if x ~= x or x == math.huge or x == -math.huge then
      return "null"
   end
   if x == math.floor(x) and math.abs(x) < 2^53 then
      return string.format("%d", x)
   end
   return string.format("%.3f", x)
end

done = function(summary, latency, requests)
   local seconds = summary.duration / 1e6
   local e = summary.errors
   local completed = summary.requests
   local lat = "null"
   if completed > 0 and latency.max > 0 then
      lat = string.format(
         '{"mean":%s,"stdev":%s,"min":%s,"max":%s,"p50":%s,"p90":%s,"p99":%s,"p99_9":%s}',
         num(latency.mean), num(latency.stdev), num(latency.min), num(latency.max),
         num(latency:percentile(50)), num(latency:percentile(90)),
         num(latency:percentile(99)), num(latency:percentile(99.9)))
   end
   io.write(string.format(
      'WRK_JSON {"requests":%s,"duration_s":%s,"requests_per_s":%s,"bytes":%s,' ..
      '"bytes_per_s":%s,"latency_us":%s,"errors":{"connect":%s,"read":%s,"write":%s,' ..
      '"timeout":%s,"status":%s},"errors_total":%s}\n',
      num(completed), num(seconds), num(completed / seconds), num(summary.bytes),
      num(summary.bytes / seconds), lat,
      num(e.connect), num(e.read), num(e.write), num(e.timeout), num(e.status),
      num(e.connect + e.read + e.write + e.timeout + e.status)))
end
