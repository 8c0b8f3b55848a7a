# SPDX-License-Identifier: Apache-2.0
# ci: needs tidal serve (.ci/test.sh starts one on tidal-mini)
"""A coding-agent loop against an OpenAI-compatible endpoint, written as agents write it: the official
`openai` client, streamed chat completions with tools, reasoning kept across turns
(`chat_template_kwargs.preserve_thinking`), tool results fed back. Nothing in it is tidal-specific.

    tidal serve models/tidal-mini &                      # pip install 'tidal[serve]' openai
    python examples/agent_client.py [--base-url http://127.0.0.1:8000/v1] [--model tidal-mini]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from openai import OpenAI

TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a text file of the project.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def read_file(path: str) -> str:
    p = pathlib.Path(path)
    return p.read_text()[:2000] if p.is_file() else f"error: no file {path}"


def turn(client: OpenAI, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed assistant turn; returns the assistant message (reasoning and tool calls kept)."""
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, stream=True, max_tokens=max_tokens, temperature=0.6,
        top_p=0.95, extra_body={"top_k": 20, "chat_template_kwargs": {"preserve_thinking": True}})
    reasoning, content, calls = "", "", {}
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        r = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get("reasoning_content")
        if r:
            reasoning += r
        if delta.content:
            content += delta.content
            print(delta.content, end="", flush=True)
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": tc.id, "type": "function", "function": {"name": "", "arguments": ""}})
            if tc.function.name:
                c["function"]["name"] += tc.function.name
            if tc.function.arguments:
                c["function"]["arguments"] += tc.function.arguments
    print()
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--model", default=os.environ.get("MODEL", "tidal-mini"))
    ap.add_argument("--max-tokens", type=int, default=256)
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    messages: list = [{"role": "system", "content": "You are a coding agent. Use read_file to look at files."},
                      {"role": "user", "content": "Read README.md and tell me how to run the tests."}]
    for _ in range(3):  # model turn, tool results, again
        msg = turn(client, a.model, messages, a.max_tokens)
        messages.append(msg)
        if "tool_calls" not in msg:
            break
        for call in msg["tool_calls"]:
            try:
                args = json.loads(call["function"]["arguments"] or "{}")
            except json.JSONDecodeError:
                args = {}
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": read_file(str(args.get("path", "")))})
    messages.append({"role": "user", "content": "Thanks. Now in one sentence."})
    messages.append(turn(client, a.model, messages, a.max_tokens))
    print(json.dumps({"turns": sum(m["role"] == "assistant" for m in messages), "messages": len(messages)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
