"""Thousands of jobs in Redis at the cost of a few round trips: copies of one job the store made.

    template = new_job(rt, due_in=None)
    rt.store.step(template.id, JobState.STORED, source="worker")
    copy_job(rt.redis, template.id, 9_999)          # 10,000 stored jobs

Creating jobs one by one through the store (a script call per create and per step) takes minutes on a slow
machine; a test that only needs many jobs to exist fills Redis here instead. Each copy has its own id and
otherwise exactly what the store wrote for the template (hash, request, events, steps still to announce in the
outbox) and the same places, with the same scores, in the sorted sets it is in (every job, its state, due). The
keys come from the store's own key layout (`kling_relay.shared.keys`).
"""

from __future__ import annotations

import redis

from kling_relay.shared import keys
from kling_relay.shared.jobs import JobState
from kling_relay.shared.jobs_model import new_job_id

INDEXES = [keys.JOBS_ALL, keys.JOBS_DUE, *(keys.jobs_in_state(s.value) for s in JobState)]


def copy_job(client: redis.Redis, template_id: str, count: int, *, batch: int = 1000) -> list[str]:
    """Write `count` copies of the job `template_id` (pipelined, `batch` copies a round trip); their ids.

    `client` reads text (decode_responses=True), as the store's does."""
    fields = client.hgetall(keys.job(template_id))
    assert fields, f"no job {template_id}"
    request = client.get(keys.job_request(template_id))
    events = client.lrange(keys.job_events(template_id), 0, -1)
    scores = {index: client.zscore(index, template_id) for index in INDEXES}
    outbox = [(member.removeprefix(template_id), score)  # members are `<id>|<state>|<at>`
              for member, score in client.zrange(keys.OUTBOX, 0, -1, withscores=True)
              if member.startswith(f"{template_id}|")]
    ids = [new_job_id(float(fields["created_at"])) for _ in range(count)]
    pipe = client.pipeline(transaction=False)
    for n, job_id in enumerate(ids, start=1):
        pipe.hset(keys.job(job_id), mapping={**fields, "id": job_id})
        if request is not None:
            pipe.set(keys.job_request(job_id), request)
        if events:
            pipe.rpush(keys.job_events(job_id), *events)
        for index, score in scores.items():
            if score is not None:
                pipe.zadd(index, {job_id: score})
        for rest, score in outbox:
            pipe.zadd(keys.OUTBOX, {job_id + rest: score})
        if n % batch == 0:
            pipe.execute()
    pipe.execute()
    return ids
