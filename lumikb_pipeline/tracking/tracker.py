"""Job progress in Redis, updated atomically by the workers and rebuilt from the ledger.

Every update is "document D of job J is now in state S (at T, with cost C and error E)", applied by
one Lua script that keeps the counters in step. Updates are idempotent and order-independent: a
document's state only moves forward (pending < running < failed/cancelled < succeeded), so the
ledger — the source of truth — can be replayed into Redis at any time (after a restart, a FLUSHALL
or an eviction) through the very same script, racing with live workers, and the figures converge
on the ledger's. Keys expire 7 days after the job's last update.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from lumikb_pipeline.core.names import JOB_KEY_TTL_S
from lumikb_pipeline.domain.eta import MAX_FINISHES_READ

MAX_RECENT_ERRORS = 10
RANK = {"pending": 0, "running": 1, "cancelled": 2, "failed": 2, "skipped": 3, "succeeded": 3}

# KEYS: meta, docs, costs, finishes, errors, error_times
# ARGV: doc_id, status, rank_json, at (epoch s), cost, error_json ("" for none), ttl, max_errors
_RECORD = """
local meta, docs, costs, finishes, errors, error_times = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local doc, status, at, cost, error_json, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local rank = cjson.decode(ARGV[3])
local old = redis.call('HGET', docs, doc)
if old and rank[old] > rank[status] then return 0 end
if old == status then return 0 end
local function class(s)
  if s == 'succeeded' or s == 'skipped' then return 'completed' end
  if s == 'failed' or s == 'cancelled' then return s end
  return nil
end
redis.call('HSET', docs, doc, status)
local old_class, new_class = old and class(old) or nil, class(status)
if old_class ~= new_class then
  if old_class then redis.call('HINCRBY', meta, old_class, -1) end
  if new_class then redis.call('HINCRBY', meta, new_class, 1) end
end
-- The rate counts documents the job worked on: skipped and cancelled ones cost no work.
if status == 'succeeded' or status == 'failed' then
  redis.call('ZADD', finishes, at, doc)
else
  redis.call('ZREM', finishes, doc)
end
local old_cost = tonumber(redis.call('HGET', costs, doc) or '0')
if cost > old_cost then
  redis.call('HSET', costs, doc, cost)
  redis.call('HINCRBYFLOAT', meta, 'spend_usd', cost - old_cost)
end
if error_json ~= '' and new_class == 'failed' then
  redis.call('HSET', errors, doc, error_json)
  redis.call('ZADD', error_times, at, doc)
  local excess = redis.call('ZCARD', error_times) - tonumber(ARGV[8])
  if excess > 0 then
    local gone = redis.call('ZRANGE', error_times, 0, excess - 1)
    for _, d in ipairs(gone) do redis.call('HDEL', errors, d) end
    redis.call('ZREMRANGEBYRANK', error_times, 0, excess - 1)
  end
elseif new_class ~= 'failed' then
  redis.call('HDEL', errors, doc)
  redis.call('ZREM', error_times, doc)
end
local updated = tonumber(redis.call('HGET', meta, 'updated_at') or '0')
if at > updated then redis.call('HSET', meta, 'updated_at', at) end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
return 1
"""


@dataclass
class RecentError:
    doc_id: str
    error: str
    at: float


@dataclass
class RedisProgress:
    """What Redis holds for a job; `present` is False when its keys are gone."""

    present: bool
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    spend_usd: float = 0.0
    started_at: float | None = None
    updated_at: float | None = None
    finishes: list[float] = field(default_factory=list)
    recent_errors: list[RecentError] = field(default_factory=list)


def _keys(job_id: str) -> list[str]:
    prefix = f"lumikb:job:{job_id}"
    return [f"{prefix}:{part}" for part in ("meta", "docs", "costs", "finishes", "errors", "error_times")]


class ProgressTracker:
    """Reads and writes one Redis's job progress."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._record = client.register_script(_RECORD)

    def start(self, job_id: str, total: int, started_at: float | None = None) -> None:
        """Create (or refresh) a job's meta: its total and start time; idempotent."""
        meta = _keys(job_id)[0]
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(meta, "total", str(total))
        pipe.hsetnx(meta, "started_at", str(started_at or time.time()))
        for counter in ("completed", "failed", "cancelled", "spend_usd"):
            pipe.hsetnx(meta, counter, "0")
        pipe.expire(meta, JOB_KEY_TTL_S)
        pipe.execute()

    def record(
        self,
        job_id: str,
        doc_id: str,
        status: str,
        *,
        at: float | None = None,
        cost_usd: float = 0.0,
        error: str | None = None,
    ) -> bool:
        """Record a document's state; returns False when it changed nothing (an older state)."""
        at = at if at is not None else time.time()
        error_json = json.dumps({"doc_id": doc_id, "error": error, "at": at}) if error else ""
        result = self._record(
            keys=_keys(job_id),
            args=[doc_id, status, json.dumps(RANK), at, cost_usd, error_json, JOB_KEY_TTL_S, MAX_RECENT_ERRORS],
        )
        return bool(result)

    def read(self, job_id: str) -> RedisProgress:
        """The job's figures (with its latest `MAX_FINISHES_READ` finish times, for the rate), or
        `present=False` when Redis has lost them."""
        meta_key, _, _, finishes_key, errors_key, error_times_key = _keys(job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(meta_key)
        pipe.zrange(finishes_key, -MAX_FINISHES_READ, -1, withscores=True)
        pipe.zrevrange(error_times_key, 0, MAX_RECENT_ERRORS - 1)
        pipe.hgetall(errors_key)
        meta, finishes, error_docs, errors = pipe.execute()
        if not meta or "total" not in meta:
            return RedisProgress(present=False)
        recent: list[RecentError] = []
        for doc in error_docs:
            raw = errors.get(doc)
            if raw:
                item: dict[str, Any] = json.loads(raw)
                recent.append(RecentError(doc_id=item["doc_id"], error=item["error"], at=float(item["at"])))
        return RedisProgress(
            present=True,
            total=int(meta.get("total", 0)),
            completed=int(meta.get("completed", 0)),
            failed=int(meta.get("failed", 0)),
            cancelled=int(meta.get("cancelled", 0)),
            spend_usd=float(meta.get("spend_usd", 0.0)),
            started_at=float(meta["started_at"]) if "started_at" in meta else None,
            updated_at=float(meta["updated_at"]) if "updated_at" in meta else None,
            finishes=[score for _, score in finishes],
            recent_errors=recent,
        )

    def forget(self, job_id: str) -> None:
        self._redis.delete(*_keys(job_id))
