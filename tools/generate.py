"""`specserve generate "prompt"`: stream a completion from a running server to stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="specserve generate")
    p.add_argument("prompt")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    p.add_argument("--api-key", default=os.environ.get("SPECSERVE_API_KEY"),
                   help="API key (default: $SPECSERVE_API_KEY; none when the server needs no key)")
    args = p.parse_args(argv)
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(timeout=httpx.Timeout(300.0, connect=5.0), headers=headers) as client:
            model = args.model or client.get(f"{base}/v1/models").json()["data"][0]["id"]
            body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "stream": True, "seed": args.seed}
            if args.raw:
                body["prompt"], path = args.prompt, "/v1/completions"
            else:
                body["messages"], path = [{"role": "user", "content": args.prompt}], "/v1/chat/completions"
            with client.stream("POST", base + path, json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    print(f"error: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
                    return 1
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        print(f"\nerror: {event['error']['message']}", file=sys.stderr)
                        return 1
                    for choice in event.get("choices", []):
                        text = choice.get("text") if args.raw else choice.get("delta", {}).get("content")
                        if text:
                            sys.stdout.write(text)
                            sys.stdout.flush()
            print()
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    return 0
