"""Drives a Sluice network with the official `openai` Python SDK.

Usage: openai_sdk.py BASE_URL API_KEY MODEL
"""
import sys

import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)

resp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
)
assert resp.choices[0].message.content, resp
assert resp.usage.completion_tokens >= 1, resp.usage
print("non-stream:", repr(resp.choices[0].message.content), resp.usage)

chunks = list(
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == resp.choices[0].message.content, (text, resp.choices[0].message.content)
assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
print("stream:", repr(text))

try:
    openai.OpenAI(base_url=base, api_key="cpk_bad", max_retries=0).models.list()
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401

try:
    client.chat.completions.create(model="no-such/model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.code

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=5)
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.param == "temperature", e.param

try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}],
        tool_choice="required",
    )
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.param == "tool_choice", e.param

print("openai sdk: ok")
