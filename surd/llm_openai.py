"""The OpenAI-compatible backend of the pair stage: any `/v1/chat/completions` endpoint (vLLM, llama.cpp
server, Ollama, TGI) with a concurrency limit, timeouts and retries. The API key comes from an env var and goes
only to the host it is bound to, never over plain http off the machine (`surd.secrets`); every server message
kept in a drop detail or an error is redacted."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from surd.errors import StageError
from surd.llm import Conversation, LLMError, Sampling
from surd.secrets import REDACTED, api_key_for, known_secrets, redact


class OpenAILLM:
    """An OpenAI-compatible chat-completions endpoint: one request per candidate, `concurrency` in flight."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, model: str, base_url: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 0.5) -> None:
        self.label = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        api_key_for(self.url, api_key_env)  # refuse a key bound for plain http off the machine before any work
        self.where = redact(self.url)  # the URL as messages name it: without credentials
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.calls = 0  # HTTP requests sent, retries included
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock: threading.Lock | None = None
        self._key_note = ""
        self._secrets: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_pool": None, "_lock": None, "_secrets": []}

    def setup(self) -> None:
        if self._client is not None:
            return

        import httpx

        headers = {}
        key, self._key_note = api_key_for(self.url, self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # every key we know of, sent or not: a server (or a proxy) may echo any of them
        self._secrets = known_secrets(os.environ.get(self.api_key_env) if self.api_key_env else None)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._client = httpx.Client(headers=headers, timeout=self.timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="surd-llm")
        self._lock = threading.Lock()

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling) -> list[list[str] | LLMError]:
        self.setup()
        assert self._pool is not None
        futures = [[self._pool.submit(self._complete, c, sampling, sampling.seed + j) for j in range(n)]
                   for c in conversations]
        out: list[list[str] | LLMError] = []
        for row in futures:
            try:
                out.append([f.result() for f in row])
            except LLMError as e:
                out.append(e)
        return out

    def _complete(self, conversation: Conversation, sampling: Sampling, seed: int) -> str:
        import httpx

        body = {"model": self.label, "messages": conversation, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens, "seed": seed, "n": 1}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, problem))
            with self._lock:  # type: ignore[union-attr]
                self.calls += 1
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"timeout after {self.timeout_s}s"
                continue
            except httpx.TransportError as e:
                problem = self._redact(f"{type(e).__name__}: {e}")
                continue
            if response.status_code in (401, 403, 404):
                # configuration errors: every row would fail the same way, so stop the stage with a clear message
                key = f"the key in ${self.api_key_env}" if self.api_key_env else "the key"
                note = f"; {self._key_note}" if self._key_note else ""
                raise StageError(f"pair: {self.where} answered HTTP {response.status_code} "
                                 f"(check base_url, model {self.label!r} and {key}{note})")
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    problem += f" retry-after={retry_after}"
                continue
            if response.status_code >= 400:
                # redact before cutting, so that no key is cut in two and half of it kept
                raise LLMError(f"HTTP {response.status_code}: {self._redact(response.text[:2000])[:200]}")
            try:
                content = response.json()["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                for secret in self._secrets:  # a reply is text to keep: only known keys go, not words like them
                    content = content.replace(secret, REDACTED)
                return content
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = self._redact(f"malformed reply ({type(e).__name__}: {e})")
        raise LLMError(f"{self.retries + 1} attempts failed; last: {problem}")

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _delay(self, attempt: int, problem: str) -> float:
        if "retry-after=" in problem:
            return min(float(problem.rsplit("=", 1)[1]), 60.0)
        # exponential backoff with jitter, so many workers hitting one server do not retry in lockstep
        return min(self.backoff_s * 2 ** (attempt - 1), 30.0) * (0.5 + random.random() / 2)


# ---------------------------------------------------------------- tiny model for tests and the demo
