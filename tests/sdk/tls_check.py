"""Drive a TLS gateway with the official `openai` Python SDK over HTTP/2, with and without a
client certificate, and report what each attempt saw.

Run by tests/tls.rs with GATEWAY_URL (https://...), GATEWAY_CA (the server CA's PEM) and
CASES, a JSON list of {"name", "cert"?, "key"?, "api_key"?, "stream"?}. Prints one JSON line
per case: {"name", "outcome", "http_versions", "detail"} where outcome is "200", "<status>:<code>"
or "connection_error". The Rust test decides what each outcome should have been.
"""
import json
import os
import ssl

import openai
from openai import OpenAI

BASE = os.environ["GATEWAY_URL"]
CA = os.environ["GATEWAY_CA"]
MESSAGES = [{"role": "user", "content": "Say hello"}]


def attempt(case):
    ctx = ssl.create_default_context(cafile=CA)
    if case.get("cert"):
        ctx.load_cert_chain(case["cert"], case["key"])
    versions = []
    http = openai.DefaultHttpxClient(
        http2=True,
        verify=ctx,
        trust_env=False,
        event_hooks={"response": [lambda r: versions.append(r.http_version)]},
    )
    key = case.get("api_key")
    client = OpenAI(base_url=BASE + "/v1", api_key=key or "unused", max_retries=0, http_client=http)
    # Without an API key the request carries no Authorization header at all: the
    # certificate (or nothing) is the credential.
    headers = {} if key else {"Authorization": openai.Omit()}
    detail = ""
    try:
        r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        assert r.choices[0].message.content, r
        outcome = "200"
        if case.get("stream"):
            parts = []
            for chunk in client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers
            ):
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
            if "".join(parts) != r.choices[0].message.content:
                outcome = "stream_mismatch"
                detail = repr(parts)
    except openai.APIStatusError as err:
        code = err.body.get("code") if isinstance(err.body, dict) else None
        outcome = f"{err.status_code}:{code}"
    except openai.APIConnectionError as err:
        outcome = "connection_error"
        detail = repr(err.__cause__ or err)
    finally:
        http.close()
    return {"name": case["name"], "outcome": outcome, "http_versions": versions, "detail": detail}


for case in json.loads(os.environ["CASES"]):
    print(json.dumps(attempt(case)), flush=True)
