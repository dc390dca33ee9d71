"""A client for LLM judges behind any OpenAI-compatible chat-completions endpoint.

Used by the autointerp stage (explainer and scorers) and by the steering stage (its 1-5 judge).
One call, :meth:`JudgeClient.complete_many`, sends a list of conversations and returns one
:class:`JudgeReply` per conversation, in order. Around the ``openai`` package's async client it adds:

- an on-disk response cache keyed by the sha256 of the full request (base URL, model, messages,
  sampling settings), one JSON file per entry written atomically (temporary sibling + rename), so
  concurrent writers on a shared filesystem are safe and a rerun sends nothing;
- bounded concurrency (an ``asyncio.Semaphore``);
- retries with exponential backoff and jitter on 429, 5xx, timeouts and dropped connections
  (honouring a ``Retry-After`` header); the ``openai`` package's own retries are turned off;
- a per-run token budget (new tokens only: cached replies are free), checked before each request
  with the request's size estimated, so the run stops before it overspends;
- token and cost accounting (:class:`JudgeUsage`);
- early, clear failures: a missing API-key environment variable fails when the client is built; an
  unreachable endpoint or a rejected key fails on the first request that is not in the cache (one
  ``GET /models`` probe), before any retries are spent, or earlier through :meth:`JudgeClient.check_endpoint`.
  A rerun served wholly from the cache needs no endpoint at all.

The API key is read from the environment variable named in the settings and is never written to
logs, cache entries or error messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sae_pipeline.data.atomic import write_json
from sae_pipeline.settings import JudgeSettings

logger = logging.getLogger(__name__)
# The HTTP libraries under ``openai`` log every request at INFO; a run sends thousands.
for _noisy in ("httpx", "httpx2", "openai"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

Message = Mapping[str, str]
Conversation = Sequence[Message]

# A key for servers that do not check one (vLLM, llama.cpp started without --api-key).
NO_KEY_PLACEHOLDER = "no-key"
# Rough size of a token in characters, used only to estimate a request before it is sent.
CHARS_PER_TOKEN_ESTIMATE = 4


class JudgeError(RuntimeError):
    """The judge cannot be used (configuration, endpoint, key, budget); the stage should stop."""


class JudgeUnavailable(JudgeError):
    """The endpoint is unreachable, rejects the key or the model, or keeps failing after all retries."""


class TokenBudgetExceeded(JudgeError):
    """Sending the next request would exceed the run's token budget."""


@dataclass
class JudgeReply:
    """The judge's answer to one conversation.

    Attributes:
        text: the reply's content, or ``None`` when the request failed (then ``error`` says why).
        error: why there is no usable text (a rejected or malformed response), else ``None``.
        prompt_tokens, completion_tokens: as reported by the server (estimated when it reported none).
        cached: True when the reply came from the on-disk cache (nothing was sent).
        request_hash: the cache key (sha256 hex of the canonical request).
        attempts: HTTP requests made for it in this run (0 when cached).
        usage_estimated: True when the server reported no usage and the counts are estimates.
    """

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    request_hash: str = ""
    attempts: int = 0
    usage_estimated: bool = False

    @property
    def ok(self) -> bool:
        return self.text is not None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class JudgeUsage:
    """What a client has spent so far (new requests only, except ``cache_hits``).

    Attributes:
        requests_sent: HTTP requests made (retries included).
        replies_received: requests answered with a usable reply.
        cache_hits: replies served from the cache.
        failures: conversations that ended without usable text.
        retries: requests repeated after a transient error.
        prompt_tokens, completion_tokens: new tokens spent.
        cost_usd: ``prompt_tokens/1000 * price_prompt + completion_tokens/1000 * price_completion``.
    """

    requests_sent: int = 0
    replies_received: int = 0
    cache_hits: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


def request_hash(payload: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of a request payload (sorted keys, no whitespace)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Judge replies on disk: ``<root>/<hash[:2]>/<hash>.json`` holding the request and the reply.

    Each entry is written to a temporary sibling and renamed into place, so a reader (another
    process, another machine on a shared filesystem) sees a complete entry or none; two writers of
    the same entry write the same content and the last rename wins.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored reply dict for ``key``, or ``None`` (missing or unreadable entries are misses)."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable judge cache entry %s (%s)", path, error)
            return None
        reply = entry.get("reply")
        return reply if isinstance(reply, dict) and isinstance(reply.get("text"), str) else None

    def put(self, key: str, request: Mapping[str, Any], reply: Mapping[str, Any]) -> None:
        write_json(self.path(key), {"request": dict(request), "reply": dict(reply)})

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0

    def is_empty(self) -> bool:
        """True when no entry is stored yet (stops at the first one found)."""
        return not self.root.exists() or next(self.root.glob("*/*.json"), None) is None


def _retry_after_seconds(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _estimate_tokens(messages: Conversation, max_tokens: int) -> int:
    """Upper-end size of a request before sending: prompt characters / 4 plus the completion limit."""
    characters = sum(len(str(message.get("content", ""))) for message in messages)
    return characters // CHARS_PER_TOKEN_ESTIMATE + max_tokens


def _run_blocking(coroutine_factory: Any) -> Any:
    """Run ``coroutine_factory()`` to completion: in a fresh event loop, or in a helper thread when one is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine_factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coroutine_factory())).result()


class JudgeClient:
    """Sends conversations to an OpenAI-compatible chat endpoint, with cache, retries and accounting.

    Example::

        client = JudgeClient(JudgeSettings(base_url="http://localhost:8000/v1", model="qwen",
                                           api_key_env=None, cache_dir="results/.judge_cache"))
        replies = client.complete_many([[{"role": "user", "content": "Say hi"}]], max_tokens=10)
        replies[0].text, client.usage.total_tokens

    Raises (from the constructor): :class:`JudgeError` when ``api_key_env`` names an unset variable.
    """

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.cache = ResponseCache(settings.cache_dir)
        self.usage = JudgeUsage()
        self._api_key = self._read_api_key(settings.api_key_env)
        self._reserved_tokens = 0
        self._endpoint_checked = False

    @staticmethod
    def _read_api_key(variable: str | None) -> str:
        if variable is None:
            return NO_KEY_PLACEHOLDER
        value = os.environ.get(variable, "")
        if not value:
            raise JudgeError(
                f"the judge's API key is read from the environment variable {variable!r}, which is not set "
                f"(export {variable}=...; for a server without auth, set autointerp.llm.api_key_env: null)"
            )
        return value

    def _scrub(self, text: str) -> str:
        """``text`` with the API key (if one is set) replaced, for error messages and logs."""
        if self._api_key != NO_KEY_PLACEHOLDER and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    def request_payload(self, messages: Conversation, max_tokens: int | None = None, temperature: float | None = None) -> dict[str, Any]:
        """The full request as sent (and as hashed for the cache); the key is not part of it."""
        return {
            "base_url": self.settings.base_url.rstrip("/"),
            "model": self.settings.model,
            "messages": [{"role": str(message["role"]), "content": str(message["content"])} for message in messages],
            "temperature": float(self.settings.temperature if temperature is None else temperature),
            "max_tokens": int(self.settings.max_tokens if max_tokens is None else max_tokens),
        }

    def cost_of(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD cost of the given token counts at the configured prices."""
        return (
            prompt_tokens / 1000.0 * self.settings.price_per_1k_prompt_tokens
            + completion_tokens / 1000.0 * self.settings.price_per_1k_completion_tokens
        )

    def complete_many(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int | None = None,
        temperature: float | None = None,
        description: str = "judge",
    ) -> list[JudgeReply]:
        """Answer every conversation (a list of ``{"role", "content"}`` messages); replies keep the input order.

        A reply whose request was rejected (4xx other than 429) or whose response was malformed has
        ``text=None`` and ``error`` set; it is not cached. Blocking: runs its own event loop (in a
        helper thread when called from inside a running loop).

        Raises:
            JudgeUnavailable: endpoint unreachable, key or model rejected, or a request still failing
                after ``max_retries`` retries.
            TokenBudgetExceeded: the next request would exceed ``token_budget``. Replies received
                before that are already cached, so a rerun resumes where this one stopped.
        """
        return _run_blocking(lambda: self.complete_many_async(conversations, max_tokens, temperature, description))

    async def complete_many_async(
        self,
        conversations: Sequence[Conversation],
        max_tokens: int | None = None,
        temperature: float | None = None,
        description: str = "judge",
    ) -> list[JudgeReply]:
        """Async form of :meth:`complete_many`."""
        from tqdm.auto import tqdm

        payloads = [self.request_payload(messages, max_tokens, temperature) for messages in conversations]
        replies: list[JudgeReply | None] = [None] * len(payloads)
        keys = [request_hash(payload) for payload in payloads]
        pending: list[int] = []
        for index, key in enumerate(keys):
            stored = self.cache.get(key)
            if stored is None:
                pending.append(index)
                continue
            replies[index] = JudgeReply(
                text=stored["text"],
                prompt_tokens=int(stored.get("prompt_tokens", 0)),
                completion_tokens=int(stored.get("completion_tokens", 0)),
                cached=True,
                request_hash=key,
                usage_estimated=bool(stored.get("usage_estimated", False)),
            )
            self.usage.cache_hits += 1
        logger.info("%s: %d requests, %d from the cache, %d to send", description, len(payloads), len(payloads) - len(pending), len(pending))
        if not pending:
            return [reply for reply in replies if reply is not None]

        semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        probe_lock = asyncio.Lock()
        progress = tqdm(total=len(pending), desc=description, unit="req", mininterval=2.0)
        async with self._client() as client:

            async def one(index: int) -> None:
                async with semaphore:
                    async with probe_lock:
                        if not self._endpoint_checked:
                            await self._probe_endpoint(client)
                    replies[index] = await self._send(client, payloads[index], keys[index])
                progress.update(1)

            tasks = [asyncio.ensure_future(one(index)) for index in pending]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                progress.close()
        return [reply for reply in replies if reply is not None]

    def check_endpoint(self) -> None:
        """Probe the endpoint now (one ``GET /models``) instead of at the first uncached request.

        Raises :class:`JudgeUnavailable` when it is unreachable or rejects the key. A stage calls this
        before long preparatory work when nothing can come from the cache anyway.
        """
        async def probe() -> None:
            async with self._client() as client:
                await self._probe_endpoint(client)

        _run_blocking(probe)

    def _client(self) -> Any:
        """An ``AsyncOpenAI`` client for the endpoint (retries are ours, so the client's are off)."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.settings.base_url, api_key=self._api_key, timeout=self.settings.timeout_s, max_retries=0)

    async def _probe_endpoint(self, client: Any) -> None:
        """One ``GET /models``: fails clearly on an unreachable endpoint or a rejected key."""
        import openai

        where = f"judge endpoint {self.settings.base_url!r}"
        try:
            page = await client.models.list()
            names = [model.id for model in getattr(page, "data", [])]
            if names and self.settings.model not in names:
                logger.warning("%s does not list model %r (it lists %s); requests may be rejected", where, self.settings.model, names[:10])
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise JudgeUnavailable(f"{where} is unreachable: {self._scrub(str(error))}. Is the server running and base_url right?") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise JudgeUnavailable(
                f"{where} rejected the API key from ${self.settings.api_key_env} (HTTP {error.status_code}): {self._scrub(str(error))}"
            ) from None
        except openai.APIStatusError as error:
            # Some servers have no /models route; a reachable server that answers at all is enough here.
            logger.info("%s answered GET /models with HTTP %s; continuing", where, error.status_code)
        self._endpoint_checked = True

    def _reserve(self, estimate: int) -> None:
        budget = self.settings.token_budget
        if budget is not None and self.usage.total_tokens + self._reserved_tokens + estimate > budget:
            raise TokenBudgetExceeded(
                f"the judge's token budget ({budget} new tokens this run) would be exceeded: "
                f"{self.usage.total_tokens} spent, {self._reserved_tokens} in flight, next request about {estimate}. "
                "Replies so far are cached; rerun to continue, or raise autointerp.llm.token_budget."
            )
        self._reserved_tokens += estimate

    async def _send(self, client: Any, payload: dict[str, Any], key: str) -> JudgeReply:
        """Send one request (``key``: its :func:`request_hash`) with retries; returns a reply (possibly a
        recorded failure) or raises JudgeError."""
        import openai

        estimate = _estimate_tokens(payload["messages"], payload["max_tokens"])
        self._reserve(estimate)
        attempts = 0
        try:
            while True:
                attempts += 1
                self.usage.requests_sent += 1
                try:
                    completion = await client.chat.completions.create(
                        model=payload["model"],
                        messages=payload["messages"],
                        temperature=payload["temperature"],
                        max_tokens=payload["max_tokens"],
                    )
                except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError) as error:
                    if attempts > self.settings.max_retries:
                        raise JudgeUnavailable(
                            f"judge request still failing after {self.settings.max_retries} retries "
                            f"({type(error).__name__}: {self._scrub(str(error))})"
                        ) from None
                    self.usage.retries += 1
                    delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)
                    retry_after = _retry_after_seconds(error)
                    if retry_after is not None:
                        delay = max(delay, min(retry_after, self.settings.backoff_max_s))
                    logger.info("judge: %s, retry %d in %.2fs", type(error).__name__, attempts, delay)
                    await asyncio.sleep(delay)
                    continue
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
                    raise JudgeUnavailable(
                        f"judge endpoint {self.settings.base_url!r} rejected the request (HTTP {error.status_code}; "
                        f"model {self.settings.model!r}, key from ${self.settings.api_key_env}): {self._scrub(str(error))}"
                    ) from None
                except openai.APIStatusError as error:
                    self.usage.failures += 1
                    return JudgeReply(text=None, error=f"HTTP {error.status_code}: {self._scrub(str(error))}", request_hash=key, attempts=attempts)
                except (openai.APIResponseValidationError, ValueError) as error:
                    self.usage.failures += 1
                    return JudgeReply(text=None, error=f"malformed response: {self._scrub(str(error))}", request_hash=key, attempts=attempts)
                return self._accept(completion, payload, key, attempts)
        finally:
            self._reserved_tokens -= estimate

    def _accept(self, completion: Any, payload: dict[str, Any], key: str, attempts: int) -> JudgeReply:
        """Turn a parsed completion into a reply, account for it, and cache it when it has text."""
        usage = getattr(completion, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion_tokens = getattr(usage, "completion_tokens", None)
        choices = getattr(completion, "choices", None) or []
        text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
        usage_estimated = prompt_tokens is None or completion_tokens is None
        if usage_estimated:
            prompt_tokens = _estimate_tokens(payload["messages"], 0)
            completion_tokens = len(text or "") // CHARS_PER_TOKEN_ESTIMATE
        self.usage.prompt_tokens += int(prompt_tokens)
        self.usage.completion_tokens += int(completion_tokens)
        self.usage.cost_usd = self.cost_of(self.usage.prompt_tokens, self.usage.completion_tokens)
        if not isinstance(text, str):
            self.usage.failures += 1
            return JudgeReply(
                text=None,
                error=f"malformed response: no message content in {str(completion)[:500]!r}",
                prompt_tokens=int(prompt_tokens),
                completion_tokens=int(completion_tokens),
                request_hash=key,
                attempts=attempts,
                usage_estimated=usage_estimated,
            )
        self.usage.replies_received += 1
        record = {
            "text": text,
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens),
            "usage_estimated": usage_estimated,
            "served_model": getattr(completion, "model", None),
        }
        self.cache.put(key, payload, record)
        return JudgeReply(
            text=text,
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            request_hash=key,
            attempts=attempts,
            usage_estimated=usage_estimated,
        )
