"""The HTTP server, through FastAPI's TestClient: tasks, predictions, errors, limits, the API
key, batching across requests, and a bounded property-based run of its OpenAPI schema."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from conftest import tiny_bert
from diffprune.base import load_base
from diffprune.serving.app import Limits, create_app
from diffprune.serving.bank import TaskBank
from diffprune.serving.synthetic import random_patch

LIMITS = Limits(max_inputs=4, max_text_chars=200, max_body_bytes=4000)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base(str(tiny_bert(tmp_path_factory.mktemp("http-bert") / "m", dropout=0.0)), 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, base):
    folder = tmp_path_factory.mktemp("http-patches")
    random_patch(base, 0.05, 2, seed=0, task="MRPC", labels=["no", "yes"]).save(folder / "mrpc.safetensors")
    random_patch(base, 0.05, 3, seed=1, task="MNLI").save(folder / "mnli.safetensors")
    random_patch(base, 0.05, 1, seed=2, task="STS-B", regression=True).save(folder / "stsb.safetensors")
    random_patch(base, 0.05, 2, seed=3, task="m", kind="mask").save(folder / "mask.safetensors")
    return folder


def client_for(base, folder, **options) -> TestClient:
    return TestClient(create_app(TaskBank(base, folder), limits=LIMITS, **options))


@pytest.fixture(scope="module")
def client(base, folder):
    with client_for(base, folder) as c:
        yield c


def test_tasks_health_and_one_task(client):
    listed = client.get("/tasks").json()
    assert [t["name"] for t in listed["tasks"]] == ["mask", "mnli", "mrpc", "stsb"] and listed["refused"] == {}
    assert client.get("/tasks/mrpc").json()["labels"] == ["no", "yes"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["tasks"] == 4


def test_predict_texts_pairs_labels_scores_and_values(client):
    got = client.post("/tasks/mrpc/predict", json={"inputs": ["one text", ["a first", "a second"]]}).json()
    assert got["task"] == "mrpc" and len(got["predictions"]) == 2
    for p in got["predictions"]:
        assert p["label"] in ("no", "yes") and set(p["scores"]) == {"no", "yes"}
        assert abs(sum(p["scores"].values()) - 1) < 1e-5
    three = client.post("/tasks/mnli/predict", json={"inputs": [["premise", "hypothesis"]]}).json()
    assert len(three["predictions"][0]["scores"]) == 3
    value = client.post("/tasks/stsb/predict", json={"inputs": [["a", "b"]]}).json()["predictions"][0]
    assert set(value) == {"value"} and isinstance(value["value"], float)
    assert client.post("/tasks/mask/predict", json={"inputs": ["switched"]}).status_code == 200


@pytest.mark.parametrize("body", [{}, {"inputs": []}, {"inputs": "text"}, {"inputs": [["one"]]},
                                  {"inputs": [["a", "b", "c"]]}, {"inputs": [3]}, {"inputs": ["x"], "extra": 1}])
def test_a_malformed_body_is_422(client, body):
    assert client.post("/tasks/mrpc/predict", json=body).status_code == 422


def test_unknown_tasks_are_404_and_never_reach_the_file_system(client):
    for name in ("nope", "..%2F..%2Fetc%2Fpasswd", "mrpc.safetensors", "%2Ftmp%2Fx"):
        assert client.post(f"/tasks/{name}/predict", json={"inputs": ["x"]}).status_code == 404, name
        assert client.get(f"/tasks/{name}").status_code == 404


def test_limits_are_413(client):
    assert client.post("/tasks/mrpc/predict", json={"inputs": ["x"] * 5}).status_code == 413
    assert client.post("/tasks/mrpc/predict", json={"inputs": ["x" * 201]}).status_code == 413
    assert client.post("/tasks/mrpc/predict", json={"inputs": [["a", "x" * 201]]}).status_code == 413
    too_big = client.post("/tasks/mrpc/predict", content=b'{"inputs": ["' + b"y" * 5000 + b'"]}',
                          headers={"content-type": "application/json"})
    assert too_big.status_code == 413


def test_metrics_in_the_prometheus_text_format(client):
    client.post("/tasks/mrpc/predict", json={"inputs": ["x", "y"]})
    text = client.get("/metrics").text
    assert 'diffprune_predictions_total{task="mrpc"}' in text
    assert 'diffprune_http_requests_total{method="POST",path="/tasks/{name}/predict",status="200"}' in text
    assert "diffprune_batch_rows_bucket" in text


def test_the_openapi_schema_names_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/tasks", "/tasks/{name}", "/tasks/{name}/predict", "/health", "/metrics"} <= set(paths)


def test_an_api_key_guards_every_request_and_rescanning(base, folder):
    with client_for(base, folder, api_key="s3cret") as c:
        for method, path in (("get", "/health"), ("get", "/tasks"), ("get", "/openapi.json"), ("get", "/metrics"),
                             ("post", "/tasks/rescan")):
            assert getattr(c, method)(path).status_code == 401, path
        assert c.post("/tasks/mrpc/predict", json={"inputs": ["x"]}).status_code == 401
        assert c.get("/tasks", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/tasks", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/tasks", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/tasks/rescan", headers={"X-API-Key": "s3cret"}).json()["added"] == []
    with client_for(base, folder) as c:  # without a key, the set of patches cannot change over HTTP
        assert c.post("/tasks/rescan").status_code in (404, 405)


def test_concurrent_requests_for_several_tasks_run_in_shared_batches(base, folder):
    app = create_app(TaskBank(base, folder), limits=LIMITS, max_wait=0.2)
    with TestClient(app) as c:
        results, barrier = {}, threading.Barrier(6)

        def ask(i: int) -> None:
            task = ("mrpc", "mnli", "stsb")[i % 3]
            barrier.wait()
            results[i] = c.post(f"/tasks/{task}/predict", json={"inputs": [f"text {i}"]}).status_code

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(results.values()) == {200}
        engine = app.state.engine
        assert engine.mixed_batches >= 1 and engine.mixed_batches + engine.switches < 6


def test_shutdown_answers_every_queued_request(base, folder):
    app = create_app(TaskBank(base, folder), limits=LIMITS, max_wait=0.3)
    statuses = []
    with TestClient(app) as c:
        t = threading.Thread(target=lambda: statuses.append(
            c.post("/tasks/mrpc/predict", json={"inputs": ["late"]}).status_code))
        t.start()
        t.join()
    assert statuses == [200] and not app.state.batcher._thread.is_alive()


def test_no_input_the_schema_allows_makes_a_server_error(base, folder):
    """schemathesis draws requests from the OpenAPI schema (a bounded number per route)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = create_app(TaskBank(base, folder), limits=LIMITS)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def no_server_error(case):
            names = [None] + (["mrpc", "stsb", "mask"] if "name" in (case.path_parameters or {}) else [])
            for name in names:  # drawn names are almost never served ones: try those too
                if name:
                    case.path_parameters = {**case.path_parameters, "name": name}
                response = case.call()
                assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)

        no_server_error()
