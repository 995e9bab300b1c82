"""The shared state in Redis (one server, or a Cluster with ``FILEPROXY_REDIS_CLUSTER=on``).

Every read-modify-write is one Lua script, loaded once and called by SHA (redis-py's
``register_script``: EVALSHA, then EVAL on NOSCRIPT), taking the time from ``TIME``.
Times travel as milliseconds with three decimals, formatted in Lua with ``%.3f``
(Lua's ``tostring`` keeps 14 digits, which would drop the milliseconds of an epoch).
Every key starts with ``FILEPROXY_REDIS_PREFIX``, carries a hash tag (per upstream, or
``{fleet}`` for the reports) and a TTL; see ``state_store`` for the semantics.

The client retries nothing and waits at most ``FILEPROXY_REDIS_TIMEOUT`` for a
connection, a free pool slot or an answer: the caller's circuit breaker decides what
a failure means.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from fileproxy.adaptive import Decision, LimiterState, WindowClose
from fileproxy.settings import Settings, redact_url
from fileproxy.state.store import (
    ADMISSION_KEEP_S,
    LEASE_S,
    REPORT_AGE_OUT_S,
    REPORTS_TTL_S,
    STATE_TTL_S,
    Report,
    SharedLimiter,
    StoreError,
    Tick,
    WindowCounts,
    admission_key,
    limiter_key,
    report_keys,
)

log = logging.getLogger("fileproxy.state")

_NOW = """
local function fmt(x) return string.format('%.3f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

#: KEYS[1] limiter hash. ARGV: successes errors admitted window_ms lease_ms token ttl_s
#: initial_limit initial_enforcing. Returns now_ms, lease (0/1) and the fields. A tick that
#: brings a sample (a success or an error) stamps ``last_sample`` (the idle rule's clock).
TICK = (
    _NOW
    + """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'limit', ARGV[8], 'window_start', fmt(now), 'successes', 0,
             'errors', 0, 'admitted', 0, 'carried', 0, 'enforcing', ARGV[9], 'decisions', 0)
end
local names = {'successes', 'errors', 'admitted'}
for i = 1, 3 do
  if tonumber(ARGV[i]) ~= 0 then redis.call('HINCRBY', key, names[i], ARGV[i]) end
end
if tonumber(ARGV[1]) + tonumber(ARGV[2]) > 0 then  -- a sample: the idle rule's clock
  redis.call('HSET', key, 'last_sample', fmt(now))
end
local f = redis.call('HMGET', key, 'limit', 'window_start', 'successes', 'errors', 'admitted',
                     'cooldown_until', 'carried', 'enforcing', 'decisions', 'last_decision',
                     'level', 'last_sample', 'lease', 'lease_until')
local lease = 0
if now - tonumber(f[2]) >= tonumber(ARGV[4]) and (not f[13] or tonumber(f[14]) < now) then
  redis.call('HSET', key, 'lease', ARGV[6], 'lease_until', fmt(now + tonumber(ARGV[5])))
  lease = 1
end
redis.call('EXPIRE', key, ARGV[7])
local out = {fmt(now), tostring(lease)}
for i = 1, 12 do out[#out + 1] = f[i] or '' end
return out
"""
)

#: KEYS[1] limiter hash. ARGV: token resets seen_successes seen_errors seen_admitted limit
#: window_start_ms cooldown_until_ms|'' carried enforcing decided decision_json level|''
#: ttl_s. Returns 1 when applied, 0 when the lease was not the caller's.
COMMIT = """
local key = KEYS[1]
if redis.call('HGET', key, 'lease') ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  local names = {'successes', 'errors', 'admitted'}
  for i = 1, 3 do  -- ARGV holds what the decider saw; what came since stays
    if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', key, names[i], '-' .. ARGV[i + 2]) end
  end
end
redis.call('HSET', key, 'limit', ARGV[6], 'window_start', ARGV[7], 'carried', ARGV[9],
           'enforcing', ARGV[10])
if ARGV[8] == '' then redis.call('HDEL', key, 'cooldown_until')
else redis.call('HSET', key, 'cooldown_until', ARGV[8]) end
if ARGV[11] == '1' then
  redis.call('HINCRBY', key, 'decisions', 1)
  redis.call('HSET', key, 'last_decision', ARGV[12])
end
if ARGV[13] ~= '' then redis.call('HSET', key, 'level', ARGV[13]) end
redis.call('HDEL', key, 'lease', 'lease_until')
redis.call('EXPIRE', key, ARGV[14])
return 1
"""

#: KEYS[1] theoretical arrival time. ARGV: interval_ms tolerance_ms keep_ms.
#: A new clock starts drained (no burst credit). Returns {1, '0'} when admitted,
#: {0, wait_ms} when not.
ADMIT = (
    _NOW
    + """
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or fmt(now + tolerance))
if tat < now then tat = now end
local wait = tat - now - tolerance
-- the rule of adaptive/gcra.py gcra_step, in Lua
if wait > 0.001 then return {0, fmt(wait)} end  -- past the rounding of fmt
local after = tat + tonumber(ARGV[1])
redis.call('SET', KEYS[1], fmt(after), 'PX', math.ceil(after - now + tonumber(ARGV[3])))
return {1, '0'}
"""
)

#: KEYS[1] reports, KEYS[2] when each arrived. ARGV: worker payload age_out_ms ttl_s.
#: Drops the reports older than the age-out; returns now_ms then (worker, at_ms,
#: payload) for each report left.
PUBLISH = (
    _NOW
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], fmt(now))
local seen = redis.call('HGETALL', KEYS[2])
local out = {fmt(now)}
for i = 1, #seen, 2 do
  local worker, at = seen[i], seen[i + 1]
  local payload = redis.call('HGET', KEYS[1], worker)
  if now - tonumber(at) > tonumber(ARGV[3]) or not payload then
    redis.call('HDEL', KEYS[1], worker)
    redis.call('HDEL', KEYS[2], worker)
  else
    out[#out + 1] = worker
    out[#out + 1] = at
    out[#out + 1] = payload
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return out
"""
)

# RedisClusterException (e.g. no node reachable) is not a RedisError
_STORE_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1000:.3f}"


def _seconds(text: bytes) -> float | None:
    return float(text) / 1000 if text else None


def connect(settings: Settings, timeout_s: float | None = None) -> Any:
    """The redis-py asyncio client for ``REDIS_URL``: one server, or a Cluster."""
    assert settings.redis_url is not None
    url = str(settings.redis_url)
    timeout = settings.redis_timeout if timeout_s is None else timeout_s
    timeouts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(url, max_connections=settings.redis_pool_size, **timeouts)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool_size,
        timeout=timeout,  # waiting for a free connection of the pool
        **timeouts,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisStore:
    scope = "cluster"
    report_age_out_s = REPORT_AGE_OUT_S

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        assert settings.redis_url is not None
        self.prefix = settings.redis_prefix
        kind = "redis cluster" if settings.redis_cluster else "redis"
        self.description = f"{kind} {redact_url(settings.redis_url)}"
        self.client = client if client is not None else connect(settings)
        self._tick = self.client.register_script(TICK)
        self._commit = self.client.register_script(COMMIT)
        self._admit = self.client.register_script(ADMIT)
        self._publish = self.client.register_script(PUBLISH)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except _STORE_FAILURES as exc:
            raise StoreError(type(exc).__name__) from exc
        except Exception as exc:
            # whatever else goes wrong with the store, the requests go on without it
            log.exception("unexpected state store failure")
            raise StoreError(type(exc).__name__) from exc

    async def tick(
        self,
        upstream: str,
        counts: WindowCounts,
        *,
        token: str,
        window_s: float,
        initial: SharedLimiter,
    ) -> Tick:
        reply = await self._call(
            self._tick,
            [limiter_key(self.prefix, upstream)],
            [
                counts.successes,
                counts.errors,
                counts.admitted,
                _ms(window_s),
                _ms(LEASE_S),
                token,
                STATE_TTL_S,
                repr(initial.state.limit),
                int(initial.enforcing),
            ],
        )
        (now, lease, limit, start, successes, errors, admitted, cooldown, carried,
         enforcing, decisions, last_decision, level, last_sample) = reply  # fmt: skip
        state = LimiterState(
            limit=float(limit),
            window_start=_seconds(start),
            successes=int(successes),
            errors=int(errors),
            admitted=int(admitted),
            cooldown_until=_seconds(cooldown),
            carried=int(carried),
            last_sample_at=_seconds(last_sample),
        )
        limiter = SharedLimiter(
            state=state,
            enforcing=enforcing == b"1",
            decisions=int(decisions),
            last_decision=orjson.loads(last_decision) if last_decision else None,
            level=level.decode() if level else None,
        )
        return Tick(float(now) / 1000, limiter, lease == b"1")

    async def commit(
        self,
        upstream: str,
        *,
        token: str,
        seen: WindowCounts,
        closed: WindowClose,
        enforcing: bool,
        level: str | None,
    ) -> bool:
        decision: Decision | None = closed.decision
        state = closed.state
        reply = await self._call(
            self._commit,
            [limiter_key(self.prefix, upstream)],
            [
                token,
                int(closed.outcome.resets_counts),
                seen.successes,
                seen.errors,
                seen.admitted,
                repr(state.limit),
                _ms(state.window_start),
                _ms(state.cooldown_until),
                state.carried,
                int(enforcing),
                int(decision is not None),
                orjson.dumps(decision.to_dict()) if decision is not None else "",
                level or "",
                STATE_TTL_S,
            ],
        )
        return bool(reply == 1)

    async def pace(self, upstream: str, rate: float, burst: int) -> tuple[bool, float]:
        interval_ms = 1000.0 / rate
        admitted, wait_ms = await self._call(
            self._admit,
            [admission_key(self.prefix, upstream)],
            [f"{interval_ms:.3f}", f"{(burst - 1) * interval_ms:.3f}", _ms(ADMISSION_KEEP_S)],
        )
        return admitted == 1, float(wait_ms) / 1000

    async def publish(self, worker: str, payload: bytes) -> tuple[float, list[Report]]:
        reply = await self._call(
            self._publish,
            list(report_keys(self.prefix)),
            [worker, payload, _ms(self.report_age_out_s), REPORTS_TTL_S],
        )
        now, rest = reply[0], reply[1:]
        reports = [
            Report(rest[i].decode(), float(rest[i + 1]) / 1000, rest[i + 2])
            for i in range(0, len(rest), 3)
        ]
        return float(now) / 1000, reports

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except _STORE_FAILURES as exc:
            raise StoreError(type(exc).__name__) from exc

    async def close(self) -> None:
        with contextlib.suppress(*_STORE_FAILURES):
            await self.client.aclose()
