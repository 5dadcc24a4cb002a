"""Applications as they run beside a sidecar: the official `openai` SDK's AzureOpenAI client
and the LiteLLM SDK (`azure/<deployment>`), each pointed at the sidecar with a placeholder
key, non-streamed and streamed. Prints one JSON line per call; tests/sidecar.rs checks them.

Environment: SIDECAR_URL, DEPLOYMENT, API_VERSION."""

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from openai import AzureOpenAI  # noqa: E402

URL = os.environ["SIDECAR_URL"]
DEPLOYMENT = os.environ["DEPLOYMENT"]
VERSION = os.environ["API_VERSION"]
PLACEHOLDER = "placeholder-key-the-sidecar-removes"
MESSAGES = [{"role": "user", "content": "Say hello from the sidecar test"}]


def emit(**fields):
    print(json.dumps(fields), flush=True)


client = AzureOpenAI(azure_endpoint=URL, api_key=PLACEHOLDER, api_version=VERSION, max_retries=0)
r = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
emit(sdk="openai", stream=False, text=r.choices[0].message.content,
     total_tokens=r.usage.total_tokens)

text = ""
for chunk in client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
emit(sdk="openai", stream=True, text=text)

e = client.embeddings.create(model=DEPLOYMENT, input="embed me")
emit(sdk="openai", stream=False, embedding_len=len(e.data[0].embedding))

litellm.telemetry = False
r = litellm.completion(model=f"azure/{DEPLOYMENT}", api_base=URL, api_key=PLACEHOLDER,
                       api_version=VERSION, messages=MESSAGES, num_retries=0)
emit(sdk="litellm", stream=False, text=r.choices[0].message.content,
     total_tokens=r.usage.total_tokens)

text = ""
for chunk in litellm.completion(model=f"azure/{DEPLOYMENT}", api_base=URL, api_key=PLACEHOLDER,
                                api_version=VERSION, messages=MESSAGES, stream=True,
                                num_retries=0):
    delta = chunk.choices[0].delta.content if chunk.choices else None
    if delta:
        text += delta
emit(sdk="litellm", stream=True, text=text)
sys.exit(0)
