"""reid-serve's routes are declared once (issue 40): `routes.ROUTES` and `server.VERBS` give the
aiohttp router, the metrics labels and the error text naming the verbs."""

import types

from aiohttp import web

from reid_tf.deploy.serving import routes
from reid_tf.deploy.serving import server


def test_every_route_is_registered_from_the_one_table():
    handlers = routes.Handlers(types.SimpleNamespace(), timeout_s=1.0)
    app = web.Application()
    handlers.add_routes(app.router)
    registered = {(route.method, route.resource.canonical) for route in app.router.routes()
                  if route.method != "HEAD"}
    expected = {("GET", "/metrics"), ("GET", "/"), ("GET", "/ui/{file}")}
    for prefix in routes.MODEL_PREFIXES:
        expected |= {("GET", prefix), ("GET", prefix + "/metadata"),
                     ("POST", prefix + ":{method}"), ("GET", prefix + "/gallery"),
                     ("GET", prefix + "/gallery/entries"),
                     ("GET", prefix + "/gallery/thumbnails/{entry_id}")}
    assert registered == expected
    # Every handler but the POST dispatcher has its metrics label; the verbs label themselves.
    assert set(handlers.labels.values()) == {"status", "metadata", "gallery", "entries",
                                             "thumbnail", "metrics", "ui"}
    no_page = web.Application()
    handlers.add_routes(no_page.router, ui=False)
    assert not any(route.resource.canonical in ("/", "/ui/{file}")
                   for route in no_page.router.routes())


def test_the_verbs_are_the_servers_methods():
    assert list(server.VERBS) == ["predict", "search", "verify", "add", "remove"]
    assert all(callable(method) and method.__qualname__.startswith("Server.")
               for method in server.VERBS.values())
