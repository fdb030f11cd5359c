"""A minimal OpenAI-compatible upstream for benchmarks: answers at once, streams three
chunks. Run: python bench/fake_upstream.py PORT"""

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


async def chat(request: Request):
    body = await request.json()
    if not body.get("stream"):
        return JSONResponse(COMPLETION)

    async def chunks():
        for word in ("one ", "two ", "three"):
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]})
            yield "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


if __name__ == "__main__":
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
