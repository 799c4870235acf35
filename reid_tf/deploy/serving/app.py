"""reid-serve over HTTP: the aiohttp application (its handlers, limits and errors are in
`routes`), the search page (`ui/`, served at `/`) and the listener with its connection cap."""

import asyncio

DEFAULT_MAX_CONNECTIONS = 256


def make_app(server, max_body_bytes=32 << 20, timeout_s=30.0, ui=True, policy=None):
    """The aiohttp application of `server` (`ui`: the search page at `/`; `policy`: a
    `security.Policy`, default loopback names only and no key)."""
    from aiohttp import web

    from reid_tf.deploy.serving import routes
    from reid_tf.deploy.serving import security

    handlers = routes.Handlers(server, timeout_s)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[
        routes.metrics_middleware(handlers), security.middleware(policy or security.Policy()),
        routes.errors_middleware(max_body_bytes, timeout_s)])
    handlers.add_routes(app.router, ui)
    app.on_startup.append(handlers.start)
    app.on_cleanup.append(handlers.stop)
    return app


def _json_error_handler():
    """aiohttp's connection handler, answering the errors of its own HTTP parser (a bad
    Content-Length, an oversize URL or header) in reid-serve's JSON shape, not text/plain."""
    from aiohttp import web
    from aiohttp import web_protocol

    class JsonErrors(web_protocol.RequestHandler):
        __slots__ = ()

        def handle_error(self, request, status=500, exc=None, message=None):
            plain = super().handle_error(request, status, exc, message)  # logs, as aiohttp does
            text = (message or plain.text or plain.reason or "").strip().splitlines()
            response = web.json_response(
                {"error": f"{plain.reason}: {text[0]}" if text else plain.reason,
                 "field": "request"}, status=plain.status)
            response.force_close()
            return response

    return JsonErrors


class _Refused(asyncio.Protocol):
    """Answers a connection over the cap with 503 and closes it."""

    def connection_made(self, transport):
        body = b'{"error": "too many connections", "field": null}'
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()


async def serve_forever(app, host, port, timeout_s=30.0, max_connections=DEFAULT_MAX_CONNECTIONS,
                        started=None):
    """Serves `app` until SIGINT/SIGTERM.

    A connection that has not sent a whole request head within `timeout_s` (aiohttp's keep-alive
    timer runs from the connection's start and while it waits for a request) is closed; a body
    that has not arrived by then gets 408 (`make_app`). Over `max_connections` open connections,
    a new one gets 503 and is closed at once, so slow clients cannot pile up without bound.
    """
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, keepalive_timeout=timeout_s)
    await runner.setup()
    handler = runner.server
    json_errors = _json_error_handler()

    def protocol():
        if len(handler.connections) >= max_connections:
            return _Refused()
        return json_errors(handler, loop=asyncio.get_running_loop(), **handler._kwargs)

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(protocol, host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started()
    try:
        await stop.wait()
    finally:
        listener.close()
        await runner.cleanup()
