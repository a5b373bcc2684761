"""GET /metrics: Prometheus text that prometheus_client's parser reads, counters that move with requests,
and one registry per app."""
import asyncio

from prometheus_client.parser import text_string_to_metric_families

from common import server
from test_server import KEY, FakeClassifier, client_for
from test_server_openai import CountingVectorService

FAMILIES = {"toolkit_requests": "counter", "toolkit_request_errors": "counter",
            "toolkit_request_duration_seconds": "histogram", "toolkit_queue_duration_seconds": "histogram",
            "toolkit_inference_duration_seconds": "histogram", "toolkit_batch_size": "histogram",
            "toolkit_batch_tokens": "histogram", "toolkit_tokens": "counter", "toolkit_texts": "counter",
            "toolkit_queue_size": "gauge", "toolkit_queue_limit": "gauge"}


def parse(text):
    """{(sample name, sorted labels): value} and {family name: type} of a Prometheus text page."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, types


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_count_requests_statuses_batches_and_tokens():
    app = server.create_app(CountingVectorService(), max_texts=4)

    async def calls():
        async with client_for(app) as client:
            before, types = parse((await client.get("/metrics")).text)
            assert {name: types.get(name) for name in FAMILIES} == FAMILIES
            assert value(before, "toolkit_queue_limit") == server.MAX_QUEUE
            assert (await client.post("/encode", json={"texts": ["ab", "c"]})).status_code == 200
            assert (await client.post("/v1/embeddings", json={"input": "abcd", "model": "m"})).status_code == 200
            assert (await client.post("/encode", json={"texts": []})).status_code == 422
            assert (await client.post("/encode", json={"texts": ["a"] * 5})).status_code == 413
            assert (await client.get("/no/such/path")).status_code == 404
            response = await client.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain")
            return before, parse(response.text)[0]
    before, after = asyncio.run(calls())
    assert value(before, "toolkit_requests_total", route="/encode", status="200") == 0
    assert value(after, "toolkit_requests_total", route="/encode", status="200") == 1
    assert value(after, "toolkit_requests_total", route="/v1/embeddings", status="200") == 1
    assert value(after, "toolkit_requests_total", route="/encode", status="422") == 1
    assert value(after, "toolkit_request_errors_total", route="/encode", status="413") == 1
    assert value(after, "toolkit_request_errors_total", route="other", status="404") == 1  # not one label per path
    assert value(after, "toolkit_request_errors_total", route="/encode", status="200") == 0
    assert value(after, "toolkit_requests_total", route="/metrics", status="200") == 1
    assert value(after, "toolkit_request_duration_seconds_count", route="/encode") == 3
    assert value(after, "toolkit_texts_total") == 3
    assert value(after, "toolkit_tokens_total") == (4 + 3) + 6  # the fake counts characters + 2
    assert value(after, "toolkit_batch_size_count") == 2 and value(after, "toolkit_batch_size_sum") == 3
    assert value(after, "toolkit_batch_tokens_sum") == 13
    assert value(after, "toolkit_queue_duration_seconds_count") == 2
    assert value(after, "toolkit_inference_duration_seconds_count") == 2
    assert value(after, "toolkit_queue_size") == 0


def test_each_app_has_its_own_registry_and_metrics_need_the_key():
    vector = server.create_app(CountingVectorService(), api_key=KEY)
    classifier = server.create_app(FakeClassifier())
    auth = {"Authorization": f"Bearer {KEY}"}

    async def calls():
        async with client_for(vector) as vector_client, client_for(classifier) as classifier_client:
            assert (await vector_client.get("/metrics")).status_code == 401
            assert (await classifier_client.post("/predict", json={"texts": ["good", "bad"]})).status_code == 200
            assert (await classifier_client.post("/predict", json={"texts": ["boom"]})).status_code == 422
            vector_page = parse((await vector_client.get("/metrics", headers=auth)).text)[0]
            classifier_page = parse((await classifier_client.get("/metrics")).text)[0]
            return vector_page, classifier_page
    vector_page, classifier_page = asyncio.run(calls())
    assert value(vector_page, "toolkit_requests_total", route="/metrics", status="401") == 1
    assert value(vector_page, "toolkit_requests_total", route="/predict", status="200") == 0
    assert value(classifier_page, "toolkit_requests_total", route="/predict", status="200") == 1
    assert value(classifier_page, "toolkit_request_errors_total", route="/predict", status="422") == 1
    assert value(classifier_page, "toolkit_texts_total") == 3
    assert value(classifier_page, "toolkit_tokens_total") == 0  # the fake classifier cannot count tokens
