"""What a job costs in Redis (issue 11): the job hash stays a listpack under Redis's default limits whatever its
values, the timeline is compact, a stored job has no request left, and jobs written in the older layout read the
same. Against a real redis-server with its default config (`hash-max-listpack-value` 64)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import redis

from kling_relay.shared import keys
from kling_relay.shared.jobs import Event, IdempotencyConflict, JobState, JobStore
from kling_relay.shared.jobs_model import NOTIFY_STATES, PIECE_BYTES, dumps, iso_utc, joined, pieces
from tests.support.clock import FakeClock

S = JobState
LONG_PROMPT = "a slow aerial shot over a coastline at sunrise, waves rolling in, gulls crossing the frame " * 25
REQUEST: dict[str, Any] = {"model_name": "kling-v1-6", "prompt": LONG_PROMPT[:2500], "mode": "std", "duration": "5",
                           "image_list": [{"image": "https://img.example.com/" + "a" * 300 + ".jpg"}]}
LONG_URL = "https://app.example.com/hooks/kling/" + "x" * 400
LONG_METADATA = {"customer": "c-12345", "note": "é€😀" * 150, "tags": [f"tag-{i}" for i in range(40)]}
VIDEO = {"bucket": "kling-relay", "key": "videos/2026/12/02/job_x/video.mp4", "sha256": "ab" * 32,
         "bytes": 9_876_543, "duration": "5.1", "content_type": "video/mp4"}


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture()
def store(redis_client: redis.Redis, clock: FakeClock) -> JobStore:
    return JobStore(redis_client, clock=clock, job_ttl_seconds=3600)


def encoding(client: redis.Redis, key: str) -> str:
    return str(client.object("encoding", key))


def stored_job(store: JobStore, **create: Any) -> str:
    job, _ = store.create(dict(REQUEST), notify_url=LONG_URL, metadata=LONG_METADATA, idempotency_key="k",
                          notify_events=list(NOTIFY_STATES), **create)
    store.set_kling_task_id(job.id, "8" * 18, source="worker")
    for to in (S.SUBMITTED, S.PROCESSING, S.GENERATED):
        store.step(job.id, to, source="callback", detail={"kling_status": to.value})
    store.bump_attempt(job.id, "copy")
    store.note(job.id, source="worker", detail={"copy": "started"})
    store.step(job.id, S.STORED, source="worker", set_fields={"videos": [VIDEO, {**VIDEO, "key": "v/2.mp4"}]})
    return job.id


def test_the_default_redis_config_is_what_the_layout_is_designed_for(redis_client: redis.Redis) -> None:
    assert redis_client.config_get("hash-max-listpack-value")["hash-max-listpack-value"] == str(PIECE_BYTES)


def test_a_stored_job_with_long_values_keeps_a_compact_hash(store: JobStore, redis_client: redis.Redis) -> None:
    """Issue 11: one value over 64 bytes (a notify_url, metadata, the videos, an error) turned the whole hash into
    a hashtable, about three times the memory; long values are kept in pieces, and read back whole."""
    job_id = stored_job(store)
    assert encoding(redis_client, keys.job(job_id)) == "listpack"
    raw = redis_client.hgetall(keys.job(job_id))
    assert max(len(v.encode()) for v in raw.values()) <= PIECE_BYTES and "videos~1" in raw
    job = store.require(job_id)
    assert job.notify_url == LONG_URL and job.metadata == LONG_METADATA
    assert job.videos == [VIDEO, {**VIDEO, "key": "v/2.mp4"}]
    assert job.notify_events == NOTIFY_STATES and job.kling_task_id == "8" * 18
    assert store.find_by_idempotency_key("k") == job


def test_a_failed_job_with_a_long_error_keeps_a_compact_hash_and_retry_clears_every_piece(
        store: JobStore, redis_client: redis.Redis) -> None:
    job, _ = store.create(dict(REQUEST))
    error = {"reason": "copy_exhausted", "message": "could not copy the video: " + "ü" * 300}
    store.step(job.id, S.FAILED, source="worker", set_fields={"error": error})
    assert encoding(redis_client, keys.job(job.id)) == "listpack"
    assert store.require(job.id).error == error
    assert store.retry(job.id, source="api").applied
    assert store.require(job.id).error is None
    assert not [f for f in redis_client.hkeys(keys.job(job.id)) if f.startswith("error~")]
    assert store.events(job.id)[-1].detail == {"previous_error": error}  # the error read whole by the script
    short = {"reason": "submit_exhausted", "message": "no"}
    store.step(job.id, S.FAILED, source="worker", set_fields={"error": short})
    assert store.require(job.id).error == short


def test_a_shorter_value_written_over_a_long_one_leaves_no_piece_behind(store: JobStore,
                                                                        redis_client: redis.Redis) -> None:
    job, _ = store.create(dict(REQUEST))
    store.step(job.id, S.SUBMITTED, source="worker", set_fields={"videos": [VIDEO, VIDEO, VIDEO]})
    store.step(job.id, S.PROCESSING, source="worker", set_fields={"videos": [{"key": "k"}]})
    assert store.require(job.id).videos == [{"key": "k"}]
    assert not [f for f in redis_client.hkeys(keys.job(job.id)) if "~" in f]


def test_notify_events_in_pieces_still_decide_the_notifications(store: JobStore, redis_client: redis.Redis) -> None:
    """Every state asked for is longer than 64 bytes as JSON: the step script reads it whole."""
    assert len(json.dumps(list(NOTIFY_STATES), separators=(",", ":"))) > PIECE_BYTES
    job, _ = store.create(dict(REQUEST), notify_url="https://app.example.com/h", notify_events=list(NOTIFY_STATES))
    for to in (S.SUBMITTED, S.PROCESSING, S.GENERATED, S.STORED):
        store.step(job.id, to, source="worker")
    announced = {m.split("|")[1] for m in redis_client.zrange(keys.OUTBOX, 0, -1)}
    assert announced == {"submitted", "processing", "generated", "stored"}


@pytest.mark.parametrize("value", ["", "a" * 64, "a" * 65, "é" * 33, "😀" * 17 + "a", "a" + "😀" * 40])
def test_pieces_never_cut_a_character_and_join_back(value: str) -> None:
    flat = pieces("f", value)
    h = dict(zip(flat[0::2], flat[1::2], strict=True))
    assert all(len(p.encode()) <= PIECE_BYTES for p in h.values())
    assert list(h) == ["f", *(f"f~{n}" for n in range(1, len(h)))]
    assert joined(h) == {"f": value}


def test_defaults_are_not_written_and_the_timeline_is_compact(store: JobStore, redis_client: redis.Redis,
                                                               clock: FakeClock) -> None:
    job, _ = store.create(dict(REQUEST))
    # `id` is read from the key; it is still written for the previous release's scripts (rolling upgrade)
    assert set(redis_client.hkeys(keys.job(job.id))) == {"id", "state", "created_at", "updated_at", "tl"}
    clock.advance(2.5)
    store.note(job.id, source="worker", detail={"x": 1})
    ms = int(job.created_at * 1000)
    assert redis_client.hget(keys.job(job.id), "tl") == f'{ms},-0a\n2500,00w{{"x":1}}'
    assert not redis_client.exists(keys.job_events(job.id))
    assert store.events(job.id) == [Event(job.created_at, None, "queued", "api", {}),
                                     Event(job.created_at + 2.5, "queued", "queued", "worker", {"x": 1})]


def test_a_stored_job_is_one_key_without_its_request_timeline_list_or_callbacks(
        store: JobStore, redis_client: redis.Redis) -> None:
    """Issue 11: the timeline lives in the job hash (a list key of its own cost ~220 bytes of Redis bookkeeping
    besides its events), and what the callbacks said (`kr:job:<id>:heard`, ~1 KB with a video URL) is dropped by
    the step into `stored`, as the request is: nothing reads them once the job is stored."""
    job, _ = store.create(dict(REQUEST))
    redis_client.hset(keys.job_heard(job.id), "succeed:8", '{"task_id": "8"}')
    job_id = stored_job(store)
    assert redis_client.keys(f"{keys.job(job_id)}*") == [keys.job(job_id)]
    assert store.require(job_id).attempts == {}  # the copy's counter (bumped above): dead once stored
    assert encoding(redis_client, keys.job(job_id)) == "listpack"
    events = store.events(job_id)
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, "queued"), ("queued", "queued"), ("queued", "submitted"), ("submitted", "processing"),
        ("processing", "generated"), ("generated", "generated"), ("generated", "stored")]
    objects = [json.dumps({**e.as_dict(), "at": e.at}) for e in events]  # the timeline list before 2026-12
    assert len(redis_client.hget(keys.job(job_id), "tl") or "") < sum(map(len, objects)) * 0.5
    store.step(job.id, S.STORED, source="worker")
    assert not redis_client.exists(keys.job_heard(job.id), keys.job_request(job.id))


def test_times_in_the_timeline_read_as_the_job_shows_them(store: JobStore, clock: FakeClock) -> None:
    """The timeline keeps milliseconds (what the API shows): an event's time reads as the job's own, to the ms."""
    clock.now = 1_800_000_000.0389996  # rounds up to .039 in ISO form, as `iso_utc` does
    job, _ = store.create(dict(REQUEST))
    clock.now = 1_800_000_090.9999997
    step = store.step(job.id, S.SUBMITTED, source="worker").job
    first, last = store.events(job.id)
    assert (iso_utc(first.at), iso_utc(last.at)) == (iso_utc(job.created_at), iso_utc(step.updated_at))
    assert iso_utc(last.at) == "2027-01-15T08:01:31.000Z"


def test_a_long_timeline_moves_to_its_list_with_the_job_s_expiry(store: JobStore, redis_client: redis.Redis,
                                                                  clock: FakeClock) -> None:
    """Past TIMELINE_MAX_BYTES the timeline moves, whole and in order, to the job's list (absolute times), where a
    long timeline stays cheap and capped; the list expires with the job."""
    job, _ = store.create(dict(REQUEST), request_id="r-1")
    store.step(job.id, S.FAILED, source="worker", set_fields={"error": {"reason": "x"}})  # the job expires now
    expected = [(job.created_at, "queued", {"request_id": "r-1"}), (job.created_at, "failed", {})]
    for n in range(40):
        clock.advance(0.25)
        detail = {"n": n, "note": "ü€😀" * (n % 7)}
        store.note(job.id, source="reconciler", detail=detail)
        expected.append((clock.now, "failed", detail))
        raw = redis_client.hgetall(keys.job(job.id))
        assert all(len(v.encode()) <= PIECE_BYTES for v in raw.values())  # never a character cut in two
    assert not redis_client.hexists(keys.job(job.id), "tl")
    assert 0 < redis_client.ttl(keys.job_events(job.id)) <= 3600
    assert [(e.at, e.to_state, e.detail) for e in store.events(job.id)] == expected
    assert store.events(job.id, limit=3) == store.events(job.id)[-3:]
    assert encoding(redis_client, keys.job(job.id)) == "listpack"


def test_a_timeline_of_more_than_max_events_moves_to_its_capped_list(redis_client: redis.Redis,
                                                                     clock: FakeClock) -> None:
    store = JobStore(redis_client, clock=clock, max_events=3)
    job, _ = store.create(dict(REQUEST))
    for n in range(5):
        store.note(job.id, source="worker", detail={"n": n})
    assert [e.detail for e in store.events(job.id)] == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert redis_client.llen(keys.job_events(job.id)) == 3


def test_a_job_with_a_timeline_list_keeps_appending_to_it(store: JobStore, redis_client: redis.Redis,
                                                          clock: FakeClock) -> None:
    """A job written before 2026-12-08 has its timeline in its list, as compact JSON arrays: new events go there."""
    job, _ = store.create(dict(REQUEST))
    redis_client.hdel(keys.job(job.id), "tl")
    redis_client.rpush(keys.job_events(job.id), json.dumps([job.created_at, None, "queued", "api"]))
    clock.advance(1)
    store.step(job.id, S.SUBMITTED, source="worker", detail={"kling_task_id": "8"})
    assert not redis_client.hexists(keys.job(job.id), "tl")
    assert store.events(job.id) == [Event(job.created_at, None, "queued", "api", {}),
                                    Event(clock.now, "queued", "submitted", "worker", {"kling_task_id": "8"})]


def test_a_job_written_in_the_older_layout_reads_and_steps_the_same(store: JobStore, redis_client: redis.Redis,
                                                                    clock: FakeClock) -> None:
    """A job stored before this layout (every field written, long values whole, events as JSON objects) still
    reads the same through the store and the API view, and moves on (new events beside the old ones)."""
    job_id, now = "job_01KB0000000000000000000000", clock.now
    error = {"reason": "copy_exhausted", "message": "could not copy the video: " + "x" * 200}
    redis_client.hset(keys.job(job_id), mapping={
        "id": job_id, "state": "failed", "notify_url": LONG_URL, "metadata": json.dumps(LONG_METADATA),
        "kling_task_id": "812345", "notify_events": "", "created_at": repr(now), "updated_at": repr(now + 5),
        "error": json.dumps(error), "videos": "[]", "deadline_at": "", "app": ""})
    redis_client.set(keys.job_request(job_id), json.dumps(REQUEST))
    redis_client.rpush(keys.job_events(job_id), *[json.dumps(e) for e in (
        {"at": now, "from": None, "to": "queued", "source": "api", "detail": {"request_id": "r-1"}},
        {"at": now + 5, "from": "queued", "to": "failed", "source": "worker", "detail": {}})])
    for state, index in (("failed", keys.jobs_in_state("failed")), (None, keys.JOBS_ALL)):
        redis_client.zadd(index, {job_id: now})
        assert state is None or store.list(state=S(state))[0][0].id == job_id
    job = store.require(job_id)
    assert (job.state, job.notify_url, job.metadata, job.error) == (S.FAILED, LONG_URL, LONG_METADATA, error)
    assert job.public_dict()["updated_at"] == iso_utc(now + 5) and job.app is None and job.deadline_at is None
    assert store.events(job_id) == [Event(now, None, "queued", "api", {"request_id": "r-1"}),
                                    Event(now + 5, "queued", "failed", "worker", {})]
    assert store.request(job_id) == REQUEST
    clock.advance(10)
    assert store.retry(job_id, source="api").applied
    assert store.events(job_id)[-1] == Event(clock.now, "failed", "queued", "api", {"previous_error": error})
    assert store.step(job_id, S.CANCELED, source="api").applied
    assert store.require(job_id).error is None and encoding(redis_client, keys.job(job_id)) == "hashtable"


def test_a_json_value_an_older_process_wrote_over_its_pieces_reads_whole(store: JobStore,
                                                                         redis_client: redis.Redis) -> None:
    """During a rolling upgrade a process of the older layout may write `error` whole over a job whose error is in
    pieces (its retry writes `null`) without clearing them: the stale pieces are ignored, by the reads and by the
    retry script, rather than glued onto the new value (which would leave the job and its timeline unreadable)."""
    job, _ = store.create(dict(REQUEST))
    long_error = {"reason": "copy_exhausted", "message": "x" * 300}
    store.step(job.id, S.FAILED, source="worker", set_fields={"error": long_error})
    assert redis_client.hexists(keys.job(job.id), "error~1")
    redis_client.hset(keys.job(job.id), "error", json.dumps({"reason": "submit_exhausted", "message": "older"}))
    assert store.require(job.id).error == {"reason": "submit_exhausted", "message": "older"}
    assert store.retry(job.id, source="api").applied
    assert store.events(job.id)[-1].detail == {"previous_error": {"reason": "submit_exhausted", "message": "older"}}
    redis_client.hset(keys.job(job.id), mapping={"error": "null", "error~1": "stale"})  # an older retry's write
    assert store.require(job.id).error is None


def test_an_idempotency_record_is_one_short_string(store: JobStore, redis_client: redis.Redis) -> None:
    """Issue 11: `<job id without job_><12 bytes of the body's sha256, base64url>`, 42 characters: Redis keeps it
    with its object in one allocation (embstr), ~80 bytes less than the hash of `job_id` and `body` it replaces."""
    job, _ = store.create(dict(REQUEST), idempotency_key="k")
    (name,) = redis_client.keys("kr:idem:*")
    record = redis_client.get(name) or ""
    assert len(record) == 42 and record.startswith(job.id.removeprefix("job_"))
    assert encoding(redis_client, name) == "embstr"
    assert store.create(dict(REQUEST), idempotency_key="k") == (job, False)
    with pytest.raises(IdempotencyConflict):
        store.create({**REQUEST, "prompt": "other"}, idempotency_key="k")


def test_an_idempotency_record_of_the_older_form_still_answers(store: JobStore, redis_client: redis.Redis) -> None:
    """A record written before 2026-12-08 (a hash: `job_id`, `body` = sha256 hex of the canonical body) still finds
    its job, replays it and refuses another body; once its job is gone, a create replaces it with the new form."""
    job, _ = store.create(dict(REQUEST), metadata={"m": 1}, idempotency_key="k")
    (name,) = redis_client.keys("kr:idem:*")
    body = hashlib.sha256(dumps([REQUEST, None, {"m": 1}]).encode()).hexdigest()
    redis_client.delete(name)
    redis_client.hset(name, mapping={"job_id": job.id, "body": body})
    assert store.find_by_idempotency_key("k") == job
    assert store.create(dict(REQUEST), metadata={"m": 1}, idempotency_key="k") == (job, False)
    with pytest.raises(IdempotencyConflict):
        store.create(dict(REQUEST), idempotency_key="k")
    redis_client.delete(keys.job(job.id))  # as if it expired
    again, created = store.create(dict(REQUEST), idempotency_key="k")
    assert created and again.id != job.id and redis_client.type(name) == "string"
    assert store.find_by_idempotency_key("k") == again
