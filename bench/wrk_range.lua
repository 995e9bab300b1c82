-- wrk script: random byte ranges of one file, each response checked.
--
--   wrk -t2 -c16 -d5s -s bench/wrk_range.lua http://host:port/64m.bin -- SIZE MAXLEN SEED
--
-- Every request asks for `Range: bytes=a-b`, a uniform in [0, SIZE - len],
-- len uniform in [1, MAXLEN]. A response is "good" when its status is 206,
-- its Content-Range is "bytes a-b/SIZE" with b - a + 1 equal to its
-- Content-Length, and the body read has exactly that length (wrk runs one
-- request at a time per connection, but response() does not know which
-- request it answers, so the check is of the response's own consistency and
-- of the file size). not_206 counts statuses below 400 other than 206 (wrk
-- counts >= 400 as its own "status" errors). Prints the usual WRK_JSON line (bench/wrk_report.lua) and
--   RANGE_JSON {"good":..,"not_206":..,"bad_length":..,"bad_range":..}
-- summed over the threads.

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "wrk_report.lua")
local report_done = done

local threads = {}
local size, maxlen = 64 * 1024 * 1024, 256 * 1024

setup = function(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

init = function(args)
   size = tonumber(args[1]) or size
   maxlen = tonumber(args[2]) or maxlen
   math.randomseed((tonumber(args[3]) or 1) * 7919 + id)
   good, not_206, bad_length, bad_range = 0, 0, 0, 0
end

request = function()
   local len = math.random(1, maxlen)
   local a = math.random(0, size - len)
   return wrk.format("GET", nil, { Range = string.format("bytes=%d-%d", a, a + len - 1) })
end

response = function(status, headers, body)
   if status ~= 206 then
      -- >= 400 is already one of wrk's own "status" errors
      if status < 400 then
         not_206 = not_206 + 1
      end
      return
   end
   local cl = tonumber(headers["Content-Length"] or headers["content-length"] or "")
   local cr = headers["Content-Range"] or headers["content-range"] or ""
   local a, b, total = cr:match("^bytes (%d+)%-(%d+)/(%d+)$")
   a, b, total = tonumber(a), tonumber(b), tonumber(total)
   if not a or total ~= size or b < a or b >= size or (cl and cl ~= b - a + 1) then
      bad_range = bad_range + 1
   elseif #body ~= b - a + 1 then
      bad_length = bad_length + 1
   else
      good = good + 1
   end
end

done = function(summary, latency, requests)
   report_done(summary, latency, requests)
   local t = { good = 0, not_206 = 0, bad_length = 0, bad_range = 0 }
   for _, thread in ipairs(threads) do
      for k, _ in pairs(t) do
         t[k] = t[k] + (tonumber(thread:get(k)) or 0)
      end
   end
   io.write(string.format(
      'RANGE_JSON {"good":%d,"not_206":%d,"bad_length":%d,"bad_range":%d}\n',
      t.good, t.not_206, t.bad_length, t.bad_range))
end
