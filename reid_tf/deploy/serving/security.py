"""What reid-serve lets a request reach: allowed Host names, no cross-site callers, JSON-only
writes, an optional API key on the writes, and the page's browser protections.

Why each rule (issue 39's probe found the attacks they stop):
- A page on another site, open in the operator's browser, could send `:remove` as a "simple"
  `text/plain` POST (no CORS preflight) and empty the gallery. Writes now take only
  `application/json` (415 otherwise), which a cross-site page can send only after a preflight
  this server never grants; and any request that says it comes from another origin (`Origin`)
  or another site (`Sec-Fetch-Site: cross-site|same-site`, which also covers `<img>` and form
  posts) is refused with 403.
- DNS rebinding (an attacker's name resolving to 127.0.0.1 makes the browser call it
  same-origin) is stopped by the Host check: only loopback names, plus `--allowed_hosts`.
- `--api_key_file` (or the `REID_SERVE_API_KEY` environment variable) makes every write carry
  `Authorization: Bearer <key>` (or `X-API-Key`), compared in constant time and never logged.
  Listening beyond loopback without a key is refused at start unless `--allow_unauthenticated`.
"""

import dataclasses
import hmac
import ipaddress
import json
import os
from urllib.parse import urlsplit

from aiohttp import web

API_KEY_ENV = "REID_SERVE_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WRITE_VERBS = ("add", "remove")
CROSS_SITE = ("cross-site", "same-site")  # Sec-Fetch-Site values of a caller on another origin
# The page loads only its own files; pictures may also be the user's own files (blob:, data:).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                           "style-src 'self'; connect-src 'self'; object-src 'none'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer"}


@dataclasses.dataclass(frozen=True)
class Policy:
    """`allowed_hosts`: names (or addresses) the Host header may carry besides loopback
    ("*": any); `allowed_origins`: other origins allowed to call (e.g. a dashboard of
    yours, `https://ops.example.org`); `api_key`: required on writes when set."""

    allowed_hosts: tuple = ()
    allowed_origins: tuple = ()
    api_key: str = dataclasses.field(default=None, repr=False)  # never in a log line

    def host_allowed(self, host):
        if "*" in self.allowed_hosts:
            return True
        name = hostname(host)
        return name is not None and (name in LOOPBACK_NAMES or name in self.allowed_hosts
                                     or is_loopback(name))

    def key_matches(self, request):
        presented = request.headers.get("X-API-Key")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if presented is None and scheme.lower() == "bearer":
            presented = token.strip()
        return presented is not None and hmac.compare_digest(presented.encode(),
                                                             self.api_key.encode())


def hostname(host):
    """The name of a Host header (`name`, `name:port`, `[v6]:port`), lower case; None if it
    cannot be parsed."""
    if not host:
        return None
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return None
    return name.lower() if name else None


def is_loopback(address):
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def load_api_key(path=None, environ=os.environ):
    """The key from `path` (its first line) or the environment, or None. ValueError (one line,
    never the key) for an unreadable or empty file."""
    if path:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as problem:
            raise ValueError(f"--api_key_file={path}: cannot read it "
                             f"({getattr(problem, 'strerror', None) or problem}).") from None
        if not key:
            raise ValueError(f"--api_key_file={path}: empty; put the key on its first line.")
        return key
    return environ.get(API_KEY_ENV) or None


def bind_refusal(host, api_key, allow_unauthenticated):
    """The one-line reason to refuse listening on `host`, or None."""
    if is_loopback(host) or api_key or allow_unauthenticated:
        return None
    return (f"--host={host} listens beyond this machine without a key: anyone who can reach it "
            f"could change the gallery. Set --api_key_file (or {API_KEY_ENV}), and "
            "--allowed_hosts with the names clients use; or pass --allow_unauthenticated.")


def _refuse(status, message, field, headers=None):
    return web.Response(status=status, content_type="application/json", headers=headers,
                        text=json.dumps({"error": message, "field": field}))


def refusal(policy, request):
    """The answer refusing `request`, or None when it may go on."""
    host = request.headers.get("Host")  # absent: not a browser (they always send it)
    if host is not None and not policy.host_allowed(host):
        return _refuse(403, f"Host {host!r} is not served here (loopback names, and "
                       "--allowed_hosts)", "host")
    origin = request.headers.get("Origin")
    # The origin's host:port against the Host header (already checked): a TLS proxy in front
    # changes the scheme, never the name.
    foreign = origin is not None and urlsplit(origin).netloc.lower() != request.host.lower()
    if foreign and origin not in policy.allowed_origins:
        return _refuse(403, f"requests from another origin ({origin}) are refused", "origin")
    if origin is None and request.headers.get("Sec-Fetch-Site") in CROSS_SITE:
        return _refuse(403, "requests from another site are refused", "origin")
    if request.method == "POST" and request.match_info.get("method") in WRITE_VERBS:
        if request.content_type != "application/json":
            return _refuse(415, f"a gallery change must be sent as application/json, not "
                           f"{request.content_type}", "Content-Type")
        if policy.api_key and not policy.key_matches(request):
            return _refuse(401, "this server needs its API key for gallery changes "
                           "(Authorization: Bearer <key>, or X-API-Key)", "Authorization",
                           {"WWW-Authenticate": 'Bearer realm="reid-serve"'})
    return None


def middleware(policy):
    """Refuses what `policy` does not allow and adds the browser protections to every
    answer."""

    @web.middleware
    async def security(request, handler):
        response = refusal(policy, request)
        if response is None:
            try:
                response = await handler(request)
            except web.HTTPException as problem:
                problem.headers.update(HEADERS)
                raise
        response.headers.update(HEADERS)
        return response

    return security
