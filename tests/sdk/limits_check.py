"""The official `openai` Python SDK against a gateway whose client has requests_per_minute = 1.

Run by tests/limits.rs with GATEWAY_URL set. Checks that the SDK sees the gateway's 429 as a
RateLimitError (with the gateway's code), honours its retry-after, and succeeds on its retry.
Exits non-zero on the first failed check.
"""
import os
import time

import openai
from openai import OpenAI

BASE = os.environ["GATEWAY_URL"] + "/v1"
KEY = os.environ["GATEWAY_KEY"]  # an API key the gateway issued
ASK = dict(model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], max_tokens=20)

first = OpenAI(base_url=BASE, api_key=KEY, max_retries=0)
r = first.chat.completions.with_raw_response.create(**ASK)
assert r.headers["x-ratelimit-limit-requests"] == "1", r.headers
assert r.headers["x-ratelimit-remaining-requests"] == "0", r.headers
# Past the first second of the window, so the wait is under the SDK's 60 s ceiling.
time.sleep(2.0)

try:
    first.chat.completions.create(**ASK)
    raise AssertionError("a second request inside the minute was admitted")
except openai.RateLimitError as err:
    assert err.status_code == 429, err
    assert err.body["code"] == "rate_limit_exceeded", err.body
    wait_ms = float(err.response.headers["retry-after-ms"])
    assert 1000 < wait_ms <= 60000, wait_ms
    assert int(err.response.headers["retry-after"]) == -(-int(wait_ms) // 1000), err.response.headers

# With retries on, the SDK waits what retry-after-ms says (not its own backoff of at most a
# few seconds) and its retry is admitted.
refused_at = time.monotonic()
retrying = OpenAI(base_url=BASE, api_key=KEY, max_retries=2)
ok = retrying.chat.completions.with_raw_response.create(**ASK)
waited = time.monotonic() - refused_at
assert ok.parse().choices[0].message.content, ok
assert ok.retries_taken == 1, ok.retries_taken
told = wait_ms / 1000
# Its first attempt was refused with about the same wait (the window has not moved since).
assert waited >= told - 1.0, (waited, told)
print(f"limits-sdk: all checks passed (told {told:.1f}s, retried after {waited:.1f}s)")
