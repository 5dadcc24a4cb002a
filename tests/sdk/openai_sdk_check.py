"""Drive the gateway with the official `openai` Python SDK, as a user would.

Run by tests/sdk.rs with GATEWAY_URL set. Exits non-zero on the first failed check.
"""
import os

import openai
from openai import AzureOpenAI, OpenAI

BASE = os.environ["GATEWAY_URL"]
KEY = os.environ["GATEWAY_KEY"]  # an API key the gateway issued
JWT = os.environ["GATEWAY_JWT"]  # an access token from the test's issuer
EXPECTED = "Portcullis is relaying this simulated answer from a local Azure OpenAI backend."
# The simulator counts completion tokens with the o200k tokenizer: EXPECTED is 18 tokens.
ANSWER_TOKENS = 18


def check_client(client, label):
    r = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert r.choices[0].message.content == EXPECTED, (label, r)
    assert r.usage.completion_tokens == ANSWER_TOKENS, (label, r.usage)

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
    assert usage is not None and usage.completion_tokens == ANSWER_TOKENS, (label, usage)

    # The SDK asks for base64 embeddings by default and decodes them.
    e = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8, (label, e)
    assert abs(sum(x * x for x in e.data[0].embedding) - 1.0) < 1e-3, (label, e)

    try:
        client.chat.completions.create(model="images-only", messages=[])
        raise AssertionError(f"{label}: forbidden deployment accepted")
    except openai.PermissionDeniedError as err:
        assert err.body["code"] == "client_not_allowed", (label, err.body)

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

# Entra-style: the Azure client sends the token as a bearer.
aad = AzureOpenAI(
    azure_endpoint=BASE, azure_ad_token=JWT, api_version="2024-10-21", max_retries=0
)
check_client(aad, "AzureOpenAI+token")

for bad in (
    OpenAI(base_url=BASE + "/v1", api_key=KEY[:-4] + "aaaa", max_retries=0),
    AzureOpenAI(azure_endpoint=BASE, api_key="0123456789abcdef0123456789abcdef",
                api_version="2024-10-21", max_retries=0),
):
    try:
        bad.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as err:
        assert err.body["code"] == "invalid_token", err.body

print("openai-sdk: all checks passed")
