#!/usr/bin/env python3
"""A proxy in front of an OpenAI-compatible server that drops llama.cpp's `timings` from every
answer, so the server looks like one that does not report its own time (vLLM, Ollama,
llama-cpp-python's server, or a proxy that passes only the standard fields).

    strip-timings-proxy.py LISTEN_PORT UPSTREAM_URL      # e.g. 18082 http://127.0.0.1:18081
    strip-timings-proxy.py LISTEN_PORT UPSTREAM_URL --tgi-header
    strip-timings-proxy.py LISTEN_PORT UPSTREAM_URL --vllm-metrics
    strip-timings-proxy.py LISTEN_PORT UPSTREAM_URL --gauges
    strip-timings-proxy.py LISTEN_PORT UPSTREAM_URL --buffer

With `--tgi-header` the server's time moves from the body to where Hugging Face's
text-generation-inference (TGI) puts it: `prompt_ms + predicted_ms`, in whole milliseconds, in
an `x-inference-time` response header. With `--vllm-metrics` it moves to where vLLM puts it when
run with `--enable-per-request-metrics`: a `metrics` object in the body, `prompt_ms` as
`time_to_first_token_ms` (from the moment the scheduler took the request up) and `predicted_ms`
as `generation_time_ms`.

Each request is forwarded as it came (method, path, body, content type and authorization) on
its own thread; the server keeps computing a request the client gave up on, as behind any
proxy. Answers that are not JSON objects pass unchanged. llama.cpp's own endpoints that tell
its slots (`/props`, `/slots`) answer 404, as on those other servers, and so does its gauges'
endpoint (`/metrics`, as on Ollama), unless `--gauges` passes it through: then the server shows
only what vLLM and TGI show of their load, the requests running and waiting.

A streamed answer (`"stream": true`) passes event by event as the server sends it, each event
without `timings`; with `--buffer` it is held until it is whole and then sent at once, as a
proxy that buffers answers does (its first event then comes with its last).
"""
import json
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

UPSTREAM = sys.argv[2].rstrip("/")
TGI_HEADER = "--tgi-header" in sys.argv[3:]
VLLM_METRICS = "--vllm-metrics" in sys.argv[3:]
GAUGES = "--gauges" in sys.argv[3:]
BUFFER = "--buffer" in sys.argv[3:]
HIDDEN = ("/props", "/slots") + (() if GAUGES else ("/metrics",))


def strip_event(line):
    """One line of a streamed answer, its `data:` object without `timings`."""
    if line.startswith(b"data:"):
        try:
            parsed = json.loads(line[5:])
        except ValueError:
            return line
        if isinstance(parsed, dict) and "timings" in parsed:
            parsed.pop("timings")
            return b"data: " + json.dumps(parsed).encode() + b"\n"
    return line


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path.split("?")[0].rstrip("/") in HIDDEN:
            data = b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() in ("content-type", "authorization", "accept")
        }
        request = urllib.request.Request(
            UPSTREAM + self.path, data=body, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(request, timeout=3600) as answer:
                status, content_type = answer.status, answer.headers.get("Content-Type")
                if (content_type or "").startswith("text/event-stream") and not BUFFER:
                    self.stream(answer, status, content_type)
                    return
                data = answer.read()
                if (content_type or "").startswith("text/event-stream"):
                    data = b"".join(strip_event(line) for line in data.splitlines(keepends=True))
        except urllib.error.HTTPError as error:
            status, content_type, data = error.code, error.headers.get("Content-Type"), error.read()
        inference_ms = None
        try:
            parsed = json.loads(data)
            if isinstance(parsed, dict) and "timings" in parsed:
                timings = parsed.pop("timings")
                if isinstance(timings, dict):
                    inference_ms = (timings.get("prompt_ms") or 0) + (timings.get("predicted_ms") or 0)
                    if VLLM_METRICS:
                        predicted_n = timings.get("predicted_n") or 0
                        predicted_ms = timings.get("predicted_ms") or 0
                        parsed["metrics"] = {
                            "time_to_first_token_ms": timings.get("prompt_ms"),
                            "generation_time_ms": timings.get("predicted_ms"),
                            "queue_time_ms": None,
                            "mean_itl_ms": predicted_ms / predicted_n if predicted_n > 1 else None,
                            "tokens_per_second": 1000 * predicted_n / inference_ms if inference_ms else None,
                        }
                data = json.dumps(parsed).encode()
        except (ValueError, TypeError):
            pass
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type or "application/json")
            if TGI_HEADER and inference_ms is not None:
                self.send_header("x-inference-time", str(int(inference_ms)))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request

    def stream(self, answer, status, content_type):
        """Passes a streamed answer on event by event, as it comes, each `data:` object without
        its `timings`; the connection closes at its end."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for line in iter(answer.readline, b""):
                line = strip_event(line)
                self.wfile.write(line)
                if line.strip() == b"":
                    self.wfile.flush()
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request

    do_GET = forward
    do_POST = forward

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Proxy).serve_forever()
