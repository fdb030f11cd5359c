"""A minimal OpenAI-compatible upstream for benchmarks: streams three chunks, after a
latency the benchmark sets with ``POST /control {"latency_ms": N}`` (0 at start: answer at
once). Run: python bench/fake_upstream.py PORT [HOST] (HOST 127.0.0.1 unless given; compose
gives 0.0.0.0 to reach it from the other containers)."""

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

COMPLETION = {
    "id": "c", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
latency_s = 0.0


async def control(request: Request):
    global latency_s
    latency_s = (await request.json())["latency_ms"] / 1000
    return JSONResponse({"latency_ms": latency_s * 1000})


async def chat(request: Request):
    body = await request.json()
    if latency_s:
        # The model's time to its first token: both the whole answer and the stream wait.
        await asyncio.sleep(latency_s)
    if not body.get("stream"):
        return JSONResponse(COMPLETION)

    async def chunks():
        for word in ("one ", "two ", "three"):
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]})
            yield "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


if __name__ == "__main__":
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/control", control, methods=["POST"])])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    uvicorn.run(app, host=host, port=int(sys.argv[1]), log_level="warning", access_log=False)
