#!/usr/bin/env python3
"""Drive a running `kiln serve` with the official `openai` Python client.

    pip install openai
    kiln serve &                       # the project's small model on 127.0.0.1:8080
    python3 scripts/openai_client.py   # --base-url, --api-key, --model to change

Runs a completion and a chat completion, each whole and streamed, greedy (so the
whole and streamed texts must be equal), checks what the API promises (finish
reasons, usage counts, the streamed chunks' shape) and prints what came back.
Exits non-zero on the first failed check.
"""

import argparse
import sys

from openai import OpenAI


def check(condition, message):
    if not condition:
        sys.exit(f"FAILED: {message}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none", help="kiln serve --api-key, if set")
    parser.add_argument("--model", help="default: the first of GET /v1/models")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")
    settings = dict(model=model, max_tokens=args.max_tokens, temperature=0, seed=1)

    # Completions, whole.
    done = client.completions.create(prompt="ROMEO:", **settings)
    text = done.choices[0].text
    print(f"\ncompletion ({done.choices[0].finish_reason}, {done.usage}):\n{text!r}")
    check(done.object == "text_completion", "object")
    check(done.choices[0].finish_reason in ("stop", "length"), "finish reason")
    check(done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens,
          "usage adds up")

    # Completions, streamed, with the usage chunk.
    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(
            prompt="ROMEO:", stream=True, stream_options={"include_usage": True}, **settings):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    print(f"streamed completion: {len(pieces)} chunks, {finish}, {usage}")
    check("".join(pieces) == text, "streamed text equals the whole text")
    check(usage == done.usage, "streamed usage equals the whole usage")
    check(finish == done.choices[0].finish_reason, "streamed finish reason")

    # Chat, whole.
    messages = [{"role": "user", "content": "Who art thou?"}]
    chat = client.chat.completions.create(messages=messages, **settings)
    reply = chat.choices[0].message
    print(f"\nchat ({chat.choices[0].finish_reason}, {chat.usage}):\n{reply.content!r}")
    check(chat.object == "chat.completion", "object")
    check(reply.role == "assistant", "role")

    # Chat, streamed.
    roles, deltas = [], []
    for chunk in client.chat.completions.create(messages=messages, stream=True, **settings):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                deltas.append(choice.delta.content)
    print(f"streamed chat: {len(deltas)} chunks with content, roles {roles}")
    check(roles == ["assistant"], "the first chunk, and only it, names the role")
    check("".join(deltas) == reply.content, "streamed chat equals the whole reply")

    print("\nall checks passed")


if __name__ == "__main__":
    main()
