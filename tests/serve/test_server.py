"""The server in this process (uvicorn in a thread, 127.0.0.1, a free port), driven by the real `openai`
client and by httpx: embeddings equal `Instructor.encode` and the sentence-transformers reference; errors,
limits, disconnects, compile counts."""

import asyncio
import base64
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from instructor_jax.evaluation.instructions import instruction_for, load_instructions
from instructor_jax.reference import reference_embeddings
from instructor_jax.serve.app import create_app
from instructor_jax.serve.server import bind, url_of
from instructor_jax.serve.service import EmbeddingService, Limits
from tests.test_instructor import INSTRUCTIONS, PAIRS, TEXTS

KEY = "test-key"
LIMITS = Limits(max_batch_tokens=256, max_wait_ms=2, max_concurrent_requests=40, max_client_batch_size=24,
                max_body_bytes=16 * 1024)


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(relu_instructor):
    service = EmbeddingService(relu_instructor, "relu", LIMITS)
    service.warm_up()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service, KEY), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    yield service, url_of(sock)
    server.should_exit = True
    thread.join(30)
    service.close()
    sock.close()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[1], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_openai_client_gets_encode_and_the_reference(served, relu_instructor, relu_reference):
    service, url = served
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    instructions, texts = [i for i, _ in PAIRS], [t for _, t in PAIRS]  # empty instructions, over-long texts
    batches = service.batcher.batches
    got = api.embeddings.create(model="relu", input=texts, extra_body={"instructions": instructions})  # base64
    assert service.batcher.batches - batches > 1  # 20 inputs of up to 64 tokens: split over 256-token batches
    assert [d.index for d in got.data] == list(range(len(PAIRS)))
    assert got.usage.prompt_tokens == int(relu_instructor.tokenizer.tokenize(PAIRS).lengths.sum())
    expected = relu_instructor.encode(PAIRS)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, atol=1e-6, rtol=0)
    assert np.abs(np.array([d.embedding for d in got.data]) - reference_embeddings(relu_reference[1], PAIRS)).max() < 1e-5

    one = api.embeddings.create(model="relu", input=TEXTS, encoding_format="float",
                                extra_body={"instruction": INSTRUCTIONS[0]})
    np.testing.assert_allclose([d.embedding for d in one.data], relu_instructor.encode(TEXTS, instruction=INSTRUCTIONS[0]),
                               atol=1e-6, rtol=0)
    nfcorpus = instruction_for(load_instructions("hkunlp/instructor-large"), "NFCorpus", "document")
    named = api.embeddings.create(model="relu", input=TEXTS[:2],
                                  extra_body={"prompt_name": "NFCorpus", "prompt_type": "document"})
    np.testing.assert_allclose([d.embedding for d in named.data], relu_instructor.encode(TEXTS[:2], instruction=nfcorpus),
                               atol=1e-6, rtol=0)
    single = api.embeddings.create(model="relu", input=TEXTS[0])  # no instruction: ""
    np.testing.assert_allclose(single.data[0].embedding, relu_instructor.encode([["", TEXTS[0]]])[0], atol=1e-6, rtol=0)


def test_embed_route_pairs_strings_and_unnormalized(client, relu_instructor):
    response = client.post("/embed", json={"inputs": [PAIRS[0], TEXTS[2]], "instruction": INSTRUCTIONS[2]})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json(), relu_instructor.encode([PAIRS[0], [INSTRUCTIONS[2], TEXTS[2]]]),
                               atol=1e-6, rtol=0)
    raw = client.post("/embed", json={"inputs": TEXTS[0], "normalize": False})
    np.testing.assert_allclose(raw.json(), relu_instructor.encode([["", TEXTS[0]]], normalize=False), atol=1e-6, rtol=0)
    assert abs(np.linalg.norm(raw.json()[0]) - 1) > 1e-3
    floats = client.post("/v1/embeddings", json={"input": ["a", "b"], "instruction": "Represent: "}).json()
    b64 = client.post("/v1/embeddings", json={"input": ["a", "b"], "instruction": "Represent: ",
                                              "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), "<f4"), np.float32(f["embedding"]))


def test_truncate_false_refuses_an_over_long_input_by_index(client):
    response = client.post("/embed", json={"inputs": [TEXTS[0], TEXTS[3]], "truncate": False})
    assert response.status_code == 413
    body = response.json()
    assert body["error_type"] == "Validation" and body["error"].startswith("inputs[1] is ")
    assert "over the model's max_seq_length of 64" in body["error"]
    assert client.post("/embed", json={"inputs": [TEXTS[0]], "truncate": False}).status_code == 200


def _openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error["message"]


def test_errors_name_the_field_in_each_routes_format(served, client):
    url = served[1]
    assert "Authorization: Bearer" in _openai_error(httpx.post(f"{url}/v1/embeddings", json={"input": "x"}), 401)
    wrong = httpx.post(f"{url}/embed", json={"inputs": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "Unauthorized"
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.get(f"{url}/info").status_code == 401
    assert "token ids" in _openai_error(client.post("/v1/embeddings", json={"input": [[1, 2]]}), 422, "input")
    assert "not valid JSON" in _openai_error(client.post("/v1/embeddings", content=b"{",
                                                         headers={"Content-Type": "application/json"}), 422)
    _openai_error(client.post("/v1/embeddings", json={"input": ["a", 3]}), 422, "input")
    _openai_error(client.post("/v1/embeddings", json={"input": "a", "encoding_format": "int8"}), 422, "encoding_format")
    assert "misspelt" in _openai_error(client.post("/v1/embeddings", json={"input": "a", "instrucion": "b"}), 422,
                                       "instrucion")
    _openai_error(client.post("/v1/embeddings", json={"input": "a", "instruction": "b", "prompt_name": "NFCorpus"}),
                  422, "prompt_name")
    _openai_error(client.post("/v1/embeddings", json={"input": ["a"], "instructions": ["b", "c"]}), 422, "instructions")
    _openai_error(client.post("/v1/embeddings", json={"input": "a", "prompt_name": "NoSuchTask"}), 422, "prompt_name")
    assert "truncated" in _openai_error(client.post("/v1/embeddings", json={"input": "a", "dimensions": 8}), 422,
                                        "dimensions")
    assert "serves `relu`" in _openai_error(client.post("/v1/embeddings", json={"input": "a", "model": "gpt"}), 404,
                                            "model", "model_not_found")
    assert "at most 24" in _openai_error(client.post("/v1/embeddings", json={"input": ["a"] * 25}), 413, "input")
    big = client.post("/embed", json={"inputs": "word " * 5000})
    assert big.status_code == 413 and "16384 bytes" in big.json()["error"]
    missing = client.post("/embed", json={"input": "a"})
    assert missing.status_code == 422 and missing.json()["error_type"] == "Validation"
    assert client.get("/nowhere").json()["error_type"] == "NotFound"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).embeddings.create(model="gpt", input="a")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).embeddings.create(model="relu", input="a")


def test_overload_is_429_with_retry_after_and_accepted_requests_are_answered(served, relu_instructor):
    service, url = served

    async def scenario():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            with service.batcher.hold():
                accepted = [asyncio.create_task(c.post("/embed", json={"inputs": [f"text {k}"] * 20})) for k in range(2)]
                while service.in_flight < 40:
                    await asyncio.sleep(0.01)
                refused = await c.post("/v1/embeddings", json={"input": "one more"})
                refused_tei = await c.post("/embed", json={"inputs": "one more"})
            return [await task for task in accepted], refused, refused_tei

    accepted, refused, refused_tei = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert _openai_error(refused, 429, code="overloaded") and int(refused.headers["Retry-After"]) >= 1
    assert refused_tei.status_code == 429 and refused_tei.json()["error_type"] == "Overloaded"
    for k, response in enumerate(accepted):
        assert response.status_code == 200
        np.testing.assert_allclose(response.json(), relu_instructor.encode([f"text {k}"] * 20, instruction=""),
                                   atol=1e-6, rtol=0)
    assert service.in_flight == 0


def test_a_client_that_disconnects_has_its_inputs_dropped(served, client):
    service, url = served
    with service.batcher.hold():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/embed", json={"inputs": ["left behind"] * 5}, timeout=0.5,
                       headers={"Authorization": f"Bearer {KEY}"})
        wait_until(lambda: service.in_flight == 0 and service.batcher.queued_inputs == 0)
    assert client.get("/health").status_code == 200
    assert client.post("/embed", json={"inputs": "still serving"}).status_code == 200


def test_nothing_compiles_after_warm_up_and_metrics_say_so(served, client):
    service, _ = served
    assert service.compiles_at_ready == len(service.shapes)  # one program per shape, all at warm-up
    assert service.compiles_after_warm_up == 0
    info = client.get("/info").json()
    assert info["compiles_after_warm_up"] == 0 and info["dim"] == 16 and info["max_input_length"] == 64
    metrics = client.get("/metrics").text
    assert 'instructor_jax_requests_total{route="/v1/embeddings",status="200"}' in metrics
    assert "instructor_jax_compiles_after_warmup_total 0.0" in metrics
    assert "instructor_jax_batch_padding_fraction_bucket" in metrics and "instructor_jax_queue_inputs 0.0" in metrics


def test_not_ready_and_draining_are_503(relu_instructor):
    service = EmbeddingService(relu_instructor, "relu", LIMITS)  # never warmed up: nothing compiles

    async def scenario():
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            loading = [await c.get("/health"), await c.post("/v1/embeddings", json={"input": "a"})]
            service.state = "ready"
            ready = await c.get("/health")
            service.begin_drain()
            return loading, ready, [await c.get("/health"), await c.post("/embed", json={"inputs": "a"})]

    loading, ready, draining = asyncio.run(scenario())
    assert [r.status_code for r in loading] == [503, 503] and "compiling" in loading[1].json()["error"]["message"]
    assert ready.status_code == 200
    assert [r.status_code for r in draining] == [503, 503] and draining[1].json()["error_type"] == "Unhealthy"
    assert service.encoder.compile_count == 0
