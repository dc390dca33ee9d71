"""The judge client drives the real ``openai`` async client over real HTTP against a local fake server."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from sae_pipeline.judges.client import (
    JudgeClient,
    JudgeError,
    JudgeUnavailable,
    ResponseCache,
    TokenBudgetExceeded,
    request_hash,
)
from sae_pipeline.settings import JudgeSettings
from tests.fake_openai_server import FakeOpenAIServer, Scripted


def echo(request: dict) -> str:
    """Reply with the last message's content reversed word by word (so each reply is checkable)."""
    return " ".join(reversed(request["messages"][-1]["content"].split()))


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


@pytest.fixture
def server():
    with FakeOpenAIServer(responder=echo) as running:
        yield running


def make_client(server: FakeOpenAIServer, cache_dir, **overrides) -> JudgeClient:
    values = dict(
        base_url=server.base_url,
        model="fake-judge",
        api_key_env=None,
        cache_dir=str(cache_dir),
        max_concurrency=4,
        max_retries=3,
        timeout_s=2.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        price_per_1k_prompt_tokens=2.0,
        price_per_1k_completion_tokens=10.0,
    )
    values.update(overrides)
    return JudgeClient(JudgeSettings(**values))


def test_normal_answers_tokens_and_cost(server, tmp_path):
    client = make_client(server, tmp_path / "cache")
    texts = ["one two three", "alpha beta", "x y z w"]
    replies = client.complete_many([conversation(t) for t in texts], max_tokens=20)
    assert [r.text for r in replies] == ["three two one", "beta alpha", "w z y x"]
    assert all(r.ok and not r.cached and r.attempts == 1 for r in replies)
    # The fake server counts words: prompt = "be brief" (2) + the user text; completion = the reply.
    assert [r.prompt_tokens for r in replies] == [5, 4, 6]
    assert [r.completion_tokens for r in replies] == [3, 2, 4]
    assert client.usage.prompt_tokens == 15 and client.usage.completion_tokens == 9
    assert client.usage.cost_usd == pytest.approx(15 / 1000 * 2.0 + 9 / 1000 * 10.0)
    assert server.completion_requests == 3 and server.model_requests == 1
    sent = server.bodies[0]
    assert sent["model"] == "fake-judge" and sent["max_tokens"] == 20 and sent["temperature"] == 0.0


def test_429_then_success_is_retried(server, tmp_path):
    client = make_client(server, tmp_path / "cache")
    server.script([Scripted(status=429, headers={"Retry-After": "0"}), Scripted(status=503)])
    (reply,) = client.complete_many([conversation("hello there")])
    assert reply.text == "there hello"
    assert reply.attempts == 3
    assert server.completion_requests == 3
    assert client.usage.retries == 2 and client.usage.requests_sent == 3


def test_malformed_answer_is_a_recorded_failure_and_not_cached(server, tmp_path):
    client = make_client(server, tmp_path / "cache")
    server.script([Scripted(raw_body=b"{this is not json"), Scripted(raw_body=json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}).encode())])
    replies = client.complete_many([conversation("first"), conversation("second")], description="malformed")
    assert [r.text for r in replies] == [None, None]
    assert all("malformed response" in r.error for r in replies)
    assert client.usage.failures == 2
    assert len(client.cache) == 0
    again = make_client(server, tmp_path / "cache").complete_many([conversation("first"), conversation("second")])
    assert [r.text for r in again] == ["first", "second"] and not any(r.cached for r in again)
    assert server.completion_requests == 4


def test_timeout_is_retried(server, tmp_path):
    client = make_client(server, tmp_path / "cache", timeout_s=0.3)
    server.script([Scripted(delay_s=1.0)])
    (reply,) = client.complete_many([conversation("slow answer")])
    assert reply.text == "answer slow" and reply.attempts == 2
    assert client.usage.retries == 1


def test_persistent_timeout_fails_clearly(server, tmp_path):
    client = make_client(server, tmp_path / "cache", timeout_s=0.2, max_retries=1)
    server.script([Scripted(delay_s=0.6), Scripted(delay_s=0.6)])
    with pytest.raises(JudgeUnavailable, match="after 1 retries"):
        client.complete_many([conversation("never")])


def test_rerun_is_served_wholly_from_the_cache(server, tmp_path):
    conversations = [conversation(f"question number {i}") for i in range(6)]
    first = make_client(server, tmp_path / "cache").complete_many(conversations)
    requests_before, probes_before = server.completion_requests, server.model_requests
    rerun_client = make_client(server, tmp_path / "cache")
    second = rerun_client.complete_many(conversations)
    assert server.completion_requests == requests_before and server.model_requests == probes_before
    assert [r.text for r in second] == [r.text for r in first]
    assert [r.total_tokens for r in second] == [r.total_tokens for r in first]
    assert all(r.cached for r in second)
    assert rerun_client.usage.cache_hits == 6 and rerun_client.usage.total_tokens == 0
    # A changed request (other max_tokens) is a different cache entry.
    make_client(server, tmp_path / "cache").complete_many(conversations[:1], max_tokens=7)
    assert server.completion_requests == requests_before + 1


def test_cache_key_covers_the_whole_request(server, tmp_path):
    client = make_client(server, tmp_path / "cache")
    base = client.request_payload(conversation("q"))
    variants = [
        client.request_payload(conversation("q"), max_tokens=1),
        client.request_payload(conversation("q"), temperature=0.7),
        make_client(server, tmp_path / "cache", model="other").request_payload(conversation("q")),
        client.request_payload([{"role": "user", "content": "q"}]),
    ]
    assert len({request_hash(base)} | {request_hash(v) for v in variants}) == 5
    assert "api_key" not in json.dumps(base)


def test_missing_key_fails_at_construction(server, tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="SAE_TEST_JUDGE_KEY"):
        make_client(server, tmp_path / "cache", api_key_env="SAE_TEST_JUDGE_KEY")


def test_rejected_key_fails_without_leaking_it(server, tmp_path, monkeypatch):
    secret = "sk-test-secret-value-123"
    monkeypatch.setenv("SAE_TEST_JUDGE_KEY", secret)
    client = make_client(server, tmp_path / "cache", api_key_env="SAE_TEST_JUDGE_KEY")
    server.script([Scripted(status=401, echo_auth=True)])
    with pytest.raises(JudgeUnavailable) as raised:
        client.complete_many([conversation("hi")])
    assert "401" in str(raised.value) and "SAE_TEST_JUDGE_KEY" in str(raised.value)
    assert secret not in str(raised.value)
    assert server.completion_requests == 1  # no retries on a rejected key


def test_unreachable_endpoint_fails_early(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = JudgeClient(JudgeSettings(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None, cache_dir=str(tmp_path), max_retries=5, timeout_s=2.0))
    with pytest.raises(JudgeUnavailable, match="unreachable"):
        client.complete_many([conversation("hi")])
    assert client.usage.requests_sent == 0


def test_token_budget_stops_before_overspending(server, tmp_path):
    # Each request: prompt about 4 words (estimate: chars/4 + max_tokens = about 13); budget fits a few.
    client = make_client(server, tmp_path / "cache", token_budget=40, max_concurrency=1)
    with pytest.raises(TokenBudgetExceeded, match="token budget"):
        client.complete_many([conversation(f"item {i} of many") for i in range(20)], max_tokens=5)
    sent_first = server.completion_requests
    assert 0 < sent_first < 20
    assert client.usage.total_tokens <= 40
    # What was received is cached: the rerun resumes, and the cached part costs nothing.
    resumed = make_client(server, tmp_path / "cache", token_budget=1000)
    replies = resumed.complete_many([conversation(f"item {i} of many") for i in range(20)], max_tokens=5)
    assert all(r.ok for r in replies)
    assert resumed.usage.cache_hits == sent_first
    assert server.completion_requests == 20


def test_concurrency_is_bounded(tmp_path):
    with FakeOpenAIServer(responder=echo, latency_s=0.15) as server:
        client = make_client(server, tmp_path / "cache", max_concurrency=3)
        replies = client.complete_many([conversation(f"q {i}") for i in range(9)])
    assert all(r.ok for r in replies)
    assert server.max_in_flight == 3


def test_concurrent_cache_writers_leave_complete_entries(tmp_path):
    cache = ResponseCache(tmp_path)
    key = "ab" + "0" * 62
    reply = {"text": "x" * 20000, "prompt_tokens": 1, "completion_tokens": 2}

    def write() -> None:
        for _ in range(20):
            cache.put(key, {"model": "m"}, reply)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.get(key)["text"] == reply["text"]
    assert [p.name for p in (tmp_path / "ab").iterdir()] == [f"{key}.json"]


def test_works_from_inside_a_running_event_loop(server, tmp_path):
    import asyncio

    client = make_client(server, tmp_path / "cache")

    async def caller():
        client.check_endpoint()
        return client.complete_many([conversation("inside a loop")])

    (reply,) = asyncio.run(caller())
    assert reply.text == "loop a inside" and server.model_requests == 1
