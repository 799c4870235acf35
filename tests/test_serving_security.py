"""reid-serve's request security (issue 39): JSON-only writes, no foreign origins or sites,
allowed Host names, the API key on writes (constant time, never logged), the refusal to listen
beyond loopback without a key, the page's browser headers, and bounded entry metadata. The
browser's side (a page on another origin) is in tests/test_ui.py."""

import subprocess
import sys

import numpy as np
import pytest

from reid_tf import testing
from reid_tf.deploy.serving import security

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def keyed(trained, tmp_path_factory):
    """reid-serve with a gallery, an API key and one extra allowed host name."""
    root = tmp_path_factory.mktemp("keyed")
    key_file = root / "key.txt"
    key_file.write_text(KEY + "\n")
    log = open(root / "serve.log", "w+")
    try:
        with testing.serve(trained["export"], f"--gallery_db={root / 'gallery.sqlite'}",
                           f"--api_key_file={key_file}", "--allowed_hosts=reid.lan",
                           "--max_metadata_bytes=2048", "--max_metadata_depth=4",
                           log=log) as client:
            yield client, log
    except RuntimeError as error:
        log.seek(0)
        pytest.fail(f"{error}: {log.read()[-3000:]}")


DIMENSION = 64  # the tiny export's descriptor: (K=3 parts + 1) x 16


def embedding(seed):
    vector = np.random.default_rng(seed).normal(size=DIMENSION)
    return (vector / np.linalg.norm(vector)).tolist()


AUTH = {"Authorization": f"Bearer {KEY}"}


def add(client, entry_id, headers=AUTH, **fields):
    return client.request("POST", "/v1/models/reid:add", {"entries": [
        {"id": entry_id, "embedding": embedding(len(entry_id)), **fields}]}, headers=headers)


def count(client):
    status, stats = client.request("GET", "/v1/models/reid/gallery")
    assert status == 200
    return stats["size"]


def test_writes_need_json_and_the_key_and_the_key_is_never_logged(keyed):
    client, log = keyed
    assert client.request("GET", "/v1/models/reid/gallery")[1]["dimension"] == DIMENSION
    assert add(client, "a")[0] == 200 and add(client, "b")[0] == 200
    before = count(client)
    remove = {"ids": ["a"]}
    # A "simple" cross-site request: text/plain needs no preflight. Refused before any work.
    status, answer = client.request("POST", "/v1/models/reid:remove", remove,
                                    headers={**AUTH, "Content-Type": "text/plain"})
    assert status == 415 and answer["field"] == "Content-Type"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]},
                    {"Authorization": KEY}):
        status, answer = client.request("POST", "/v1/models/reid:remove", remove,
                                        headers=headers)
        assert status == 401 and answer["field"] == "Authorization", headers
        assert add(client, "c", headers=headers)[0] == 401
    assert count(client) == before
    assert client.request("POST", "/v1/models/reid:remove", remove,
                          headers={"X-API-Key": KEY}) == (200, {"removed": 1})
    assert client.request("POST", "/v1/models/reid:remove", {"ids": ["b"]},
                          headers=AUTH) == (200, {"removed": 1})
    # Reads need no key.
    status, answer = client.request("POST", "/v1/models/reid:search",
                                    {"embeddings": [embedding(1)]})
    assert status == 200
    log.flush()
    log.seek(0)
    text = log.read()
    assert KEY not in text and "gallery changes need the API key" in text


@pytest.mark.parametrize("headers, field", [
    ({"Origin": "http://evil.example"}, "origin"),
    ({"Origin": "http://127.0.0.1:1"}, "origin"),  # another port is another origin
    ({"Origin": "null"}, "origin"),  # a sandboxed frame or a file
    ({"Sec-Fetch-Site": "cross-site"}, "origin"),  # <img>, a form post: no Origin sent
    ({"Sec-Fetch-Site": "same-site"}, "origin"),
    ({"Host": "evil.example"}, "host"),  # DNS rebinding: an attacker's name for 127.0.0.1
    ({"Host": "127.0.0.1.evil.example:8501"}, "host"),
])
def test_foreign_origins_sites_and_hosts_are_refused_on_every_route(keyed, headers, field):
    client, _ = keyed
    before = count(client)
    for method, path, body in (("POST", "/v1/models/reid:remove", {"ids": ["x"]}),
                               ("POST", "/v1/models/reid:search", {"embeddings": [embedding(2)]}),
                               ("GET", "/v1/models/reid/gallery/entries", None),
                               ("GET", "/v1/models/reid/gallery/thumbnails/x", None),
                               ("GET", "/", None)):
        status, answer = client.request(method, path, body, headers={**AUTH, **headers})
        assert status == 403 and answer["field"] == field, (method, path, answer)
    assert count(client) == before


def test_own_origin_loopback_names_and_allowed_hosts_pass(keyed):
    client, _ = keyed
    port = client.port
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Sec-Fetch-Site": "same-origin"},
                    {"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}"},
                    {"Host": "reid.lan", "Origin": "http://reid.lan"},
                    {"Sec-Fetch-Site": "none"}):
        status, _ = client.request("GET", "/v1/models/reid/gallery/entries", headers=headers)
        assert status == 200, headers
    status, _ = add(client, "from-the-page", headers={**AUTH, "Origin": f"http://127.0.0.1:{port}"})
    assert status == 200


def test_every_answer_carries_the_browser_protections(keyed):
    client, _ = keyed
    import http.client

    for path in ("/", "/ui/app.js", "/v1/models/reid", "/nope"):
        connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        policy = response.getheader("Content-Security-Policy")
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, path
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("X-Frame-Options") == "DENY"
        connection.close()


def nested(depth):
    value = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"child": value}
    return value


def test_metadata_is_bounded_in_depth_and_size_at_add(keyed):
    client, _ = keyed
    before = count(client)
    for metadata, limit in ((nested(5), "--max_metadata_depth"),
                            ({"list": [[[[[1]]]]]}, "--max_metadata_depth"),
                            (nested(256), "--max_metadata_depth"),
                            ({"text": "x" * 3000}, "--max_metadata_bytes")):
        status, answer = add(client, "deep", metadata=metadata)
        assert status == 400 and answer["field"] == "entries[0].metadata", answer
        assert limit in answer["error"]
    assert count(client) == before
    assert add(client, "ok", metadata=nested(4))[0] == 200
    assert add(client, "ok2", metadata={"text": "ü" * 900})[0] == 200  # 1,800 bytes
    status, answer = client.request("GET", "/v1/models/reid/gallery/entries")
    assert status == 200 and {"ok", "ok2"} <= {e["id"] for e in answer["entries"]}


def test_check_metadata_against_a_direct_count():
    from reid_tf.deploy.gallery import contract

    limits = contract.EntryLimits(max_metadata_bytes=30, max_metadata_depth=3)
    contract.check_metadata({"a": [1, {"b": 2}]}, "m", limits)  # depth 3
    with pytest.raises(contract.GalleryError, match="deeper than 3"):
        contract.check_metadata({"a": [1, {"b": [2]}]}, "m", limits)
    contract.check_metadata({"k": "x" * 22}, "m", limits)  # {"k":"xx..."} is 30 bytes
    with pytest.raises(contract.GalleryError, match="31 bytes"):
        contract.check_metadata({"k": "x" * 23}, "m", limits)
    contract.check_metadata(nested(3), "m", limits)
    with pytest.raises(contract.GalleryError):
        contract.check_metadata(nested(100000), "m", limits)  # no recursion error


@pytest.mark.slow  # trains, or runs a tool in a process
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_listening_beyond_loopback_without_a_key_is_refused_in_one_line(trained, host):
    result = subprocess.run(
        [sys.executable, "-m", "reid_tf.cli.serve", f"--export={trained['export']}",
         f"--host={host}", "--port=1"], capture_output=True, text=True, timeout=120,
        env={**testing.os.environ, security.API_KEY_ENV: ""})
    line = one_line_error(result)
    assert line.startswith("reid-serve: error: --host=")
    assert "--api_key_file" in line and "--allow_unauthenticated" in line


def one_line_error(result):
    """Exit 1 with exactly one `reid-serve: error:` line and no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("reid-serve: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_policy_unit_rules():
    policy = security.Policy(allowed_hosts=("reid.lan",), api_key="k")
    for host in ("127.0.0.1:8501", "localhost", "[::1]:80", "127.0.0.2", "REID.LAN:443"):
        assert policy.host_allowed(host.lower()), host
    for host in ("evil.example", "", "reid.lan.evil.example", "10.0.0.1", "[::2]:1"):
        assert not policy.host_allowed(host), host
    assert security.Policy(allowed_hosts=("*",)).host_allowed("anything")
    assert security.bind_refusal("127.0.0.1", None, False) is None
    assert security.bind_refusal("0.0.0.0", "k", False) is None
    assert security.bind_refusal("0.0.0.0", None, True) is None
    assert "--allow_unauthenticated" in security.bind_refusal("0.0.0.0", None, False)
    assert security.load_api_key(None, {security.API_KEY_ENV: "env-key"}) == "env-key"
    assert security.load_api_key(None, {}) is None
    assert "zzz" not in repr(security.Policy(api_key="zzz"))  # never in a log line


@pytest.mark.slow  # trains, or runs a tool in a process
def test_an_empty_or_missing_key_file_is_refused_in_one_line(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for path, reason in ((empty, "empty"), (tmp_path / "missing.txt", "cannot read")):
        result = subprocess.run(
            [sys.executable, "-m", "reid_tf.cli.serve", f"--export={trained['export']}",
             f"--api_key_file={path}"], capture_output=True, text=True, timeout=120)
        assert reason in one_line_error(result)


def test_an_all_zero_embedding_is_refused_by_search_and_verify_as_by_add(keyed):
    client, _ = keyed
    zero = [0.0] * DIMENSION
    for verb, body in (("search", {"embeddings": [embedding(3), zero]}),
                       ("verify", {"embeddings": [zero, embedding(4)]})):
        status, answer = client.request("POST", f"/v1/models/reid:{verb}", body)
        assert status == 400 and "no direction" in answer["error"], answer
    assert add(client, "zero", embedding=zero)[0] == 400
