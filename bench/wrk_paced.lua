-- wrk script: paced load, exponential think time per connection.
--
--   wrk -t2 -c256 -d60s -s bench/wrk_paced.lua http://host:port/1k.bin -- MEAN_MS SEED
--
-- Before each request a connection waits an exponentially distributed time of
-- mean MEAN_MS (a constant delay makes the connections fire in lock-step). With
-- C connections the offered rate is about C / (MEAN_MS / 1000 + response time)
-- requests per second: below the knee, close to C * 1000 / MEAN_MS. wrk times a
-- request from when it is sent, so the think time is not in the latencies.
-- Prints the usual WRK_JSON line (bench/wrk_report.lua).

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "wrk_report.lua")

local threads = {}
local mean_ms = 10

setup = function(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

init = function(args)
   mean_ms = tonumber(args[1]) or mean_ms
   math.randomseed((tonumber(args[2]) or 1) * 104729 + id)
end

-- wrk takes whole milliseconds (it truncates): round, so the mean stays MEAN_MS
delay = function()
   return math.floor(-mean_ms * math.log(1 - math.random()) + 0.5)
end
