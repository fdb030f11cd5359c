"""The gateway's HTTP/1.1 protocol: uvicorn's, with its answer to a request it cannot
parse (a control character in a header, a broken request line) in the OpenAI error shape
every other refusal has, instead of plain text. The connection still closes after it: a
parser that failed mid-request cannot tell where the next request would start."""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

UNPARSEABLE = json.dumps({"error": {
    "message": "malformed HTTP request (a header or the request line is not valid HTTP)",
    "type": "invalid_request_error", "code": "invalid_http"}}).encode()


class GatewayHttp(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(UNPARSEABLE)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            UNPARSEABLE,
        ])
        self.transport.write(b"".join(content))
        self.transport.close()
