"""Drives a running ai4free gateway with the official OpenAI Python SDK, unchanged.

Usage: python openai_sdk.py BASE_URL API_KEY
Exits non-zero (with the reason) if anything a client relies on breaks.
"""
import sys

from openai import AuthenticationError, NotFoundError, OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)

r = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}], max_tokens=5
)
assert r.choices[0].message.content, r
assert r.usage.completion_tokens == 5, r.usage

text = "".join(
    (c.choices[0].delta.content or "")
    for c in client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hello!"}],
        stream=True,
        max_tokens=5,
    )
    if c.choices
)
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)

chunks = list(
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hello!"}],
        stream=True,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5, chunks[-1]

models = [m.id for m in client.models.list()]
assert "gpt-4o-mini" in models, models

emb = client.embeddings.create(model="gpt-4o-mini", input="hi")
assert len(emb.data[0].embedding) > 0

comp = client.completions.create(model="gpt-3.5-turbo", prompt="Once upon", max_tokens=3)
assert comp.choices[0].text, comp

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("unknown model was accepted")
except NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

try:
    OpenAI(base_url=base_url, api_key="a4f_wrong", max_retries=0).models.list()
    raise SystemExit("bad key was accepted")
except AuthenticationError as e:
    assert e.status_code == 401

print("openai sdk: ok")
