"""The Kling API surface: auth codes, envelopes, validation, lookups, paging, methods, prefix, API key."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.simulator.conftest import CREATE_PATH, CallbackListener, create, create_body, png_base64, wait_task
from tests.support.sim import SimHandle, make_jwt, running_simulator


def error_of(r: requests.Response) -> tuple[int, int]:
    body = r.json()
    assert set(body) == {"code", "message", "request_id", "data"}
    assert body["message"]
    return r.status_code, body["code"]


# -- auth ------------------------------------------------------------------------------------------
def test_missing_authorization_is_1001(sim: SimHandle, http: requests.Session) -> None:
    r = http.post(sim.base_url + CREATE_PATH, json=create_body(), timeout=10)
    assert error_of(r) == (401, 1001)
    assert sim.stats()["tasks_created"] == 0


@pytest.mark.parametrize("token", [
    "not-a-jwt",
    make_jwt("test-access-key", "the-wrong-secret-key-0123456789abcdefgh"),
    make_jwt("someone-else", "test-secret-key-0123456789abcdef-0123456"),
])
def test_bad_token_is_1002(sim: SimHandle, http: requests.Session, token: str) -> None:
    r = http.get(sim.base_url + CREATE_PATH, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert error_of(r) == (401, 1002)


def test_token_not_yet_valid_is_1003(sim: SimHandle, http: requests.Session) -> None:
    assert sim.access_key and sim.secret_key
    token = make_jwt(sim.access_key, sim.secret_key, nbf_offset=120)
    r = http.get(sim.base_url + CREATE_PATH, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert error_of(r) == (401, 1003)


def test_expired_token_is_1004(sim: SimHandle, http: requests.Session) -> None:
    assert sim.access_key and sim.secret_key
    token = make_jwt(sim.access_key, sim.secret_key, now=time.time() - 3600)
    r = http.get(sim.base_url + CREATE_PATH, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert error_of(r) == (401, 1004)
    assert sim.stats()["error_codes"] == {"1004": 1}


def test_api_key_mode(sim_logs: Path, http: requests.Session) -> None:
    with running_simulator(sim_logs, api_key="reseller-key-123", prefix="/kling") as sim:
        assert sim.base_url.endswith("/kling")
        ok = create(sim, http)
        assert ok.status_code == 200 and ok.json()["code"] == 0
        wrong = http.get(sim.base_url + CREATE_PATH, headers={"Authorization": "Bearer reseller-key-124"},
                         timeout=10)
        assert error_of(wrong) == (401, 1002)
        jwt = make_jwt("test-access-key", "reseller-key-123")
        assert error_of(http.get(sim.base_url + CREATE_PATH, headers={"Authorization": f"Bearer {jwt}"},
                                 timeout=10)) == (401, 1002)
        assert error_of(http.get(sim.base_url + CREATE_PATH, timeout=10)) == (401, 1001)


def test_prefix_mode_serves_only_under_the_prefix(sim_logs: Path, http: requests.Session) -> None:
    with running_simulator(sim_logs, "--submitted-seconds", "0.05", "--processing-seconds", "0.05",
                           prefix="/kling") as sim:
        r = create(sim, http, external_task_id="pfx-1")
        assert r.status_code == 200
        task = wait_task(sim, "pfx-1")
        assert task["task_status"] == "succeed"
        bare = http.post(sim.root_url + CREATE_PATH, json=create_body(), headers=sim.auth_header(), timeout=10)
        assert error_of(bare) == (404, 1202)
        video_url = task["task_result"]["videos"][0]["url"]
        assert video_url.startswith(sim.root_url + "/_sim/videos/")
        assert http.get(video_url, timeout=10).status_code == 200


# -- envelopes and validation ----------------------------------------------------------------------
def test_request_ids_are_unique(sim: SimHandle, http: requests.Session) -> None:
    ids = {http.get(sim.base_url + CREATE_PATH, headers=sim.auth_header(), timeout=10).json()["request_id"]
           for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("overrides", [
    {"prompt": None},
    {"prompt": "x" * 2501},
    {"negative_prompt": "x" * 2501},
    {"image_list": []},
    {"image_list": [{"image": png_base64()}] * 5},
    {"image_list": [{"image": "data:image/png;base64," + png_base64()}]},
    {"image_list": [{"url": "http://example.com/a.png"}]},
    {"image_list": [{"image": "ftp://example.com/a.png"}]},
    {"model_name": 16},
    {"mode": "turbo"},
    {"duration": "7"},
    {"duration": 7},
    {"aspect_ratio": "4:3"},
    {"callback_url": "not a url"},
    {"external_task_id": 12},
    {"image": png_base64()},
    {"cfg_scale": 0.5},
    {"model": "kling-v1-6"},
    {"surprise": True},
])
def test_invalid_body_is_1201(sim: SimHandle, http: requests.Session, overrides: dict[str, Any]) -> None:
    body = create_body()
    body.update(overrides)
    body = {k: v for k, v in body.items() if v is not None}
    r = http.post(sim.base_url + CREATE_PATH, json=body, headers=sim.auth_header(), timeout=10)
    assert error_of(r) == (400, 1201)
    assert sim.stats()["tasks_created"] == 0


def test_single_image_fields_get_a_clear_error(sim: SimHandle, http: requests.Session) -> None:
    r = create(sim, http, image_tail=png_base64())
    assert "multi-image2video" in r.json()["message"]


@pytest.mark.parametrize("field", ["image_tail", "image", "cfg_scale"])
def test_single_image_fields_are_refused_even_empty(sim: SimHandle, http: requests.Session, field: str) -> None:
    """The simulator stays strict, so a relay that forwarded a copied `"image_tail": ""` would be caught."""
    assert error_of(create(sim, http, **{field: ""})) == (400, 1201)


def test_an_unknown_model_is_1203(sim: SimHandle, http: requests.Session) -> None:
    """As Kling's table says: "the requested resource does not exist, such as the model"."""
    r = create(sim, http, model_name="kling-v9")
    assert error_of(r) == (404, 1203)
    assert "kling-v9" in r.json()["message"]
    assert sim.stats()["tasks_created"] == 0


def test_watermark_info_gives_a_watermark_url_beside_url(sim: SimHandle, http: requests.Session) -> None:
    marked = create(sim, http, watermark_info={"enabled": True}, external_task_id="wm-1")
    assert marked.status_code == 200, marked.text
    assert marked.json()["data"]["watermark_info"] == {"enabled": True}
    plain = create(sim, http, watermark_info={"enabled": False}, external_task_id="wm-2")
    absent = create(sim, http, external_task_id="wm-3")
    video = wait_task(sim, "wm-1")["task_result"]["videos"][0]
    assert video["watermark_url"] != video["url"] and "/_sim/videos/" in video["watermark_url"]
    original, watermarked = (http.get(video[k], timeout=10) for k in ("url", "watermark_url"))
    assert original.status_code == watermarked.status_code == 200
    assert watermarked.headers["Content-Type"] == "video/mp4" and watermarked.content == original.content
    for r, ext in ((plain, "wm-2"), (absent, "wm-3")):
        assert r.status_code == 200
        task = wait_task(sim, ext)
        assert task["watermark_info"] == {"enabled": False}
        assert "watermark_url" not in task["task_result"]["videos"][0]
        forged = task["task_result"]["videos"][0]["url"].replace(".mp4", "-watermarked.mp4")
        assert http.get(forged, timeout=10).status_code == 403  # not signed for it


@pytest.mark.parametrize("value", [True, {}, {"enabled": "yes"}, {"enabled": True, "x": 1}])
def test_a_bad_watermark_info_is_1201(sim: SimHandle, http: requests.Session, value: object) -> None:
    assert error_of(create(sim, http, watermark_info=value)) == (400, 1201)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_body_that_is_not_a_json_object_is_1200(sim: SimHandle, http: requests.Session, raw: bytes) -> None:
    headers = {**sim.auth_header(), "Content-Type": "application/json"}
    r = http.post(sim.base_url + CREATE_PATH, data=raw, headers=headers, timeout=10)
    assert error_of(r) == (400, 1200)


def test_accepted_spellings(sim: SimHandle, http: requests.Session) -> None:
    variants: list[dict[str, Any]] = [  # None = field left out
        {"duration": 10}, {"duration": 5, "model_name": None, "mode": "pro"},
        {"negative_prompt": None, "callback_url": None, "aspect_ratio": "1:1"}, {"prompt": "y" * 2500}]
    for i, overrides in enumerate(variants):
        r = create(sim, http, external_task_id=f"spell-{i}", **overrides)
        assert r.status_code == 200, r.text


def test_prompt_limit_knob(sim: SimHandle, http: requests.Session) -> None:
    sim.control(prompt_max_chars=5000)
    assert create(sim, http, prompt="z" * 5000).status_code == 200
    assert error_of(create(sim, http, prompt="z" * 5001)) == (400, 1201)


def test_duplicate_external_task_id_is_1201(sim: SimHandle, http: requests.Session) -> None:
    first = create(sim, http, external_task_id="dup-1")
    assert first.status_code == 200
    second = create(sim, http, external_task_id="dup-1")
    assert error_of(second) == (400, 1201)
    assert "already exists" in second.json()["message"]
    stats = sim.stats()
    assert stats["tasks_by_external_id"] == {"dup-1": [first.json()["data"]["task_id"]]}
    assert stats["duplicate_creates"] == {"dup-1": 1}


# -- lookups, listing, methods ---------------------------------------------------------------------
def test_lookup_by_task_id_and_external_id_in_the_path(sim: SimHandle, http: requests.Session) -> None:
    ext = f"ext/{uuid.uuid4()}"  # a slash must survive percent-encoding in the path slot
    task_id = create(sim, http, external_task_id=ext).json()["data"]["task_id"]
    by_id = http.get(f"{sim.base_url}{CREATE_PATH}/{task_id}", headers=sim.auth_header(), timeout=10).json()
    by_ext = http.get(f"{sim.base_url}{CREATE_PATH}/{quote(ext, safe='')}",
                      headers=sim.auth_header(), timeout=10).json()
    for answer in (by_id, by_ext):
        assert answer["code"] == 0
        assert answer["data"]["task_id"] == task_id
        assert answer["data"]["task_info"]["external_task_id"] == ext
    sim.control(path_external_id=False)  # the other reading of Kling's docs: the path slot takes a task_id only
    r = http.get(f"{sim.base_url}{CREATE_PATH}/{quote(ext, safe='')}", headers=sim.auth_header(), timeout=10)
    assert error_of(r) == (404, 1203)
    assert sim.task(task_id)["task_id"] == task_id


def test_no_external_task_id_query_parameter(sim: SimHandle, http: requests.Session) -> None:
    """Kling documents no `?external_task_id=` lookup: the simulator does not offer one either (the relay must not
    depend on it). The parameter is ignored and the list is answered."""
    mine = create(sim, http, external_task_id="mine").json()["data"]["task_id"]
    other = create(sim, http, external_task_id="other").json()["data"]["task_id"]
    answer = http.get(sim.base_url + CREATE_PATH, params={"external_task_id": "mine"}, headers=sim.auth_header(),
                      timeout=10).json()
    assert answer["code"] == 0 and [t["task_id"] for t in answer["data"]] == [other, mine]
    answer = http.get(sim.base_url + CREATE_PATH, params={"external_task_id": "nope"}, headers=sim.auth_header(),
                      timeout=10).json()
    assert answer["code"] == 0 and isinstance(answer["data"], list)


def test_list_pages_newest_first(sim: SimHandle, http: requests.Session) -> None:
    ids = [create(sim, http, external_task_id=f"list-{i}").json()["data"]["task_id"] for i in range(5)]
    newest_first = list(reversed(ids))

    def page(**params: Any) -> requests.Response:
        return http.get(sim.base_url + CREATE_PATH, params=params, headers=sim.auth_header(), timeout=10)

    assert [t["task_id"] for t in page(pageNum=1, pageSize=2).json()["data"]] == newest_first[:2]
    assert [t["task_id"] for t in page(pageNum=2, pageSize=2).json()["data"]] == newest_first[2:4]
    assert [t["task_id"] for t in page(pageNum=3, pageSize=2).json()["data"]] == newest_first[4:]
    assert page(pageNum=4, pageSize=2).json()["data"] == []
    assert [t["task_id"] for t in page().json()["data"]] == newest_first
    for bad in ({"pageNum": 0}, {"pageNum": 1001}, {"pageSize": 0}, {"pageSize": 501}, {"pageSize": "x"}):
        assert error_of(page(**bad)) == (400, 1201)
    assert page(pageNum=1000, pageSize=500).json()["code"] == 0
    sim.control(list_order="oldest")
    assert [t["task_id"] for t in page(pageNum=1, pageSize=2).json()["data"]] == ids[:2]
    assert [t["task_id"] for t in page(pageNum=3, pageSize=2).json()["data"]] == ids[4:]


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", CREATE_PATH), ("PUT", CREATE_PATH), ("POST", CREATE_PATH + "/abc"),
    ("GET", "/v1/videos/image2video"), ("GET", "/v2/anything"), ("GET", "/"),
])
def test_wrong_method_or_path_is_1202(sim: SimHandle, http: requests.Session, method: str, path: str) -> None:
    r = http.request(method, sim.base_url + path, headers=sim.auth_header(), timeout=10)
    assert error_of(r) == (404, 1202)


def test_requests_are_counted_per_route(sim: SimHandle, http: requests.Session) -> None:
    task_id = create(sim, http).json()["data"]["task_id"]
    sim.task(task_id)
    sim.task(task_id)
    http.get(sim.base_url + CREATE_PATH, headers=sim.auth_header(), timeout=10)
    requests_seen = sim.stats()["requests"]
    assert requests_seen["POST /v1/videos/multi-image2video"] == 1
    assert requests_seen["GET /v1/videos/multi-image2video/{id}"] == 2
    assert requests_seen["GET /v1/videos/multi-image2video"] == 1


def test_task_objects_follow_the_documented_shape(sim: SimHandle, http: requests.Session) -> None:
    task_id = create(sim, http).json()["data"]["task_id"]
    submitted = sim.task(task_id)
    assert set(submitted) == {"task_id", "task_status", "task_status_msg", "task_info", "created_at",
                              "updated_at", "watermark_info"}
    done = wait_task(sim, task_id)
    assert done["task_status"] == "succeed"
    assert set(done) == set(submitted) | {"task_result"}
    assert isinstance(done["created_at"], int) and done["updated_at"] >= done["created_at"]
    [video] = done["task_result"]["videos"]
    assert set(video) == {"id", "url", "duration"} and isinstance(video["duration"], str)


# -- a reseller's gateway: no read routes, its own answer shape; billing units ----------------------
def test_no_query_serves_only_the_create(sim: SimHandle, http: requests.Session) -> None:
    sim.control(no_query=True)
    task_id = create(sim, http).json()["data"]["task_id"]
    for url in (f"{sim.base_url}{CREATE_PATH}/{task_id}", sim.base_url + CREATE_PATH):
        r = http.get(url, headers=sim.auth_header(), timeout=10)
        assert r.status_code == 404
        assert "code" not in r.json() and "Invalid URL" in r.json()["error"]["message"]  # not Kling's envelope
    r = http.get(sim.base_url + CREATE_PATH, timeout=10)  # no auth: the route is missing before any auth check
    assert r.status_code == 404 and "code" not in r.json()
    assert sim.stats()["requests"]["GET /v1/videos/multi-image2video"] == 2


@pytest.mark.parametrize("scope", ["query", "all"])
def test_foreign_answers_are_not_klings_envelope(sim: SimHandle, http: requests.Session, scope: str) -> None:
    sim.control(foreign_answers=scope)
    created = create(sim, http).json()
    if scope == "all":
        assert created["success"] is True and "code" not in created
        task_id = created["result"]["task_id"]
    else:
        task_id = created["data"]["task_id"]
    one = http.get(f"{sim.base_url}{CREATE_PATH}/{task_id}", headers=sim.auth_header(), timeout=10)
    assert one.status_code == 200 and one.json()["result"]["task_id"] == task_id and "code" not in one.json()
    missing = http.get(f"{sim.base_url}{CREATE_PATH}/nope", headers=sim.auth_header(), timeout=10)
    assert missing.status_code == 404
    assert missing.json() == {"success": False, "error": {"message": "task not found", "kling_code": 1203}}


def test_final_units_are_reported_once_finished(sim: SimHandle, http: requests.Session,
                                                listener: CallbackListener) -> None:
    sim.control(final_units=1.5)
    task_id = create(sim, http, callback_url=listener.url).json()["data"]["task_id"]
    assert "final_unit_deduction" not in sim.task(task_id)
    done = wait_task(sim, task_id)
    assert done["final_unit_deduction"] == "1.5"
    by_status = {r.body["task_status"]: r.body for r in listener.wait_count(3)}
    assert by_status["succeed"]["final_unit_deduction"] == "1.5"
    assert "final_unit_deduction" not in by_status["processing"]
    sim.control(final_units=2)
    later = wait_task(sim, create(sim, http).json()["data"]["task_id"])
    assert later["final_unit_deduction"] == "2"
