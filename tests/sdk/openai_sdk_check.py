"""Drive the gateway with the official `openai` Python SDK, as a user would.

Run by tests/sdk.rs with GATEWAY_URL set. Exits non-zero on the first failed check.
"""
import os

import openai
from openai import AzureOpenAI, OpenAI

BASE = os.environ["GATEWAY_URL"]
KEY = "pcl_test_client_key"
EXPECTED = "Portcullis is relaying this simulated answer from a local Azure OpenAI backend."


def check_client(client, label):
    r = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert r.choices[0].message.content == EXPECTED, (label, r)
    assert r.usage.completion_tokens == 12, (label, r.usage)

    parts, usage, chunks = [], None, 0
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == EXPECTED, (label, parts)
    assert chunks >= 14, (label, chunks)
    assert usage is not None and usage.completion_tokens == 12, (label, usage)

    # The SDK asks for base64 embeddings by default and decodes them.
    e = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8, (label, e)
    assert abs(sum(x * x for x in e.data[0].embedding) - 1.0) < 1e-3, (label, e)

    try:
        client.chat.completions.create(model="no-such-model", messages=[])
        raise AssertionError(f"{label}: unknown model accepted")
    except openai.NotFoundError as err:
        assert err.body["code"] == "unknown_deployment", (label, err.body)


oai = OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0)
check_client(oai, "OpenAI")
ids = [m.id for m in oai.models.list()]
assert ids == ["gpt-4o", "text-embedding-3-small"], ids

az = AzureOpenAI(azure_endpoint=BASE, api_key=KEY, api_version="2024-10-21", max_retries=0)
check_client(az, "AzureOpenAI")

print("openai-sdk: all checks passed")
