"""The search page in a real browser: headless Chromium (the OS's package) driven by Playwright,
acting as an operator would on reid-serve with a tiny export and a gallery seeded from images.

Each run saves screenshots of the results view under $REID_TF_ARTEFACTS (default
test-artefacts/, not committed)."""

import io
import json
import os
import shutil

import pytest
from PIL import Image

from reid_tf import testing

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

ARTEFACTS = os.environ.get("REID_TF_ARTEFACTS", "test-artefacts")
API_KEY = "page-test-key"  # the page server's: gallery changes need it


def chromium_path():
    for name in (os.environ.get("REID_TF_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make test installs it)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium; .ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox"])
        yield browser
        browser.close()


def write_image(path, data):
    """The split's encoded image as a real file of its extension's kind."""
    Image.open(io.BytesIO(data)).convert("RGB").save(path)


@pytest.fixture(scope="module")
def page_server(trained, tmp_path_factory):
    """reid-serve with a gallery seeded from 30 of the test gallery's images (with thumbnails),
    and a query image, a new image and a text file on disk."""
    root = tmp_path_factory.mktemp("site")
    folder = root / "bounding_box_test"
    folder.mkdir()
    gallery = trained["splits"]["gallery"]
    for name, data in list(zip(gallery.file_names, gallery.images))[:30]:
        write_image(folder / name, data)
    query = trained["splits"]["query"]
    files = {"query": root / query.file_names[0], "new": root / "0999_c7s1_000001_00.jpg",
             "text": root / "notes.txt"}
    write_image(files["query"], query.images[0])
    write_image(files["new"], gallery.images[40])
    files["text"].write_text("not an image\n")
    key_file = root / "key.txt"
    key_file.write_text(API_KEY + "\n")
    # The export's calibration with a p_same near 1 at every distance: cards that the FAR's
    # threshold calls "No match" would disagree with it.
    with open(os.path.join(trained["export"], "assets", "calibration.json")) as f:
        fitted = json.load(f)
    fitted.pop("p_same_refused", None)
    fitted["p_same"] = {"kind": "logistic", "intercept": 50.0, "coef": -1.0, "prior": 0.2}
    decisions = root / "calibration.json"
    decisions.write_text(json.dumps(fitted))
    log = open(root / "serve.log", "w+")
    try:
        with testing.serve(trained["export"], f"--gallery_images={root}",
                           f"--gallery_db={root / 'gallery.sqlite'}",
                           f"--api_key_file={key_file}", f"--calibration={decisions}",
                           log=log) as client:
            yield client, files
    except RuntimeError as error:
        log.seek(0)
        pytest.fail(f"{error}: {log.read()[-3000:]}")


def result_cards(page):
    return page.locator("#result-list > li")


def camera_of(card):
    return card.locator(".camera").inner_text().split(": ")[1]


def test_an_operator_searches_filters_adds_removes_and_reads_errors(browser, page_server):
    client, files = page_server
    os.makedirs(ARTEFACTS, exist_ok=True)
    # Playwright's waiting on page functions evaluates strings, which the page's
    # Content-Security-Policy forbids: this test bypasses it, and the next one runs the page
    # under it.
    page = browser.new_page(viewport={"width": 1280, "height": 1100}, bypass_csp=True)
    page.goto(f"http://127.0.0.1:{client.port}/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#stat-entries").inner_text() == "30"
    assert page.locator("#stat-thumbnails").inner_text() == "30"
    assert "calibrated on validation identities" in page.locator("#stat-decisions").inner_text()
    # Every control has a label (screen readers name it).
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select')]"
                               ".filter(e => !e.labels.length).map(e => e.id)")
    assert unlabelled == []

    # Upload a query: ranked results with thumbnails and decisions; focus moves to them.
    page.set_input_files("#query-file", str(files["query"]))
    page.click("#search-button")
    page.wait_for_function("document.querySelectorAll('#result-list > li').length == 10")
    assert page.evaluate("document.activeElement.id") == "results-heading"
    cards = result_cards(page)
    for i in range(10):
        card = cards.nth(i)
        thumbnail = card.locator("img.thumbnail")
        assert thumbnail.count() == 1
        assert thumbnail.evaluate("img => img.complete && img.naturalHeight") > 0
        decision = card.locator(".decision").inner_text()
        assert decision in ("Match", "No match")
        assert ("no-match" if decision == "No match" else "match") in card.get_attribute("class")
        assert card.locator(".distance").inner_text().startswith("distance ")
        # p(same) is near 1 for every hit here (page_server's calibration): shown on "Match"
        # cards only, never beside "No match" (issue 39).
        assert ("p(same) 1.00" in card.locator(".distance").inner_text()) == (
            decision == "Match")
    distances = [float(cards.nth(i).locator(".distance").inner_text().split()[1].rstrip(","))
                 for i in range(10)]
    assert distances == sorted(distances)
    verdict = page.locator("#verdict").inner_text()
    assert verdict.startswith(("In the gallery", "Not in the gallery"))
    assert "measured on validation" in verdict and "95 % interval" in verdict  # how sure
    # The query is drawn with its part masks over it (coloured, not the bare image).
    tinted = page.evaluate("""() => {
        const c = document.getElementById('query-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] + d[i+1] + d[i+2] > 0;
        return n; }""")
    assert tinted > 0
    page.locator("#results").screenshot(path=os.path.join(ARTEFACTS, "results.png"))

    # A camera filter: the top hit's camera leaves the results.
    camera = camera_of(cards.nth(0))
    page.fill("#exclude-camera", camera)
    page.click("#search-button")
    page.wait_for_function(f"![...document.querySelectorAll('#result-list .camera')]"
                           f".some(e => e.textContent == 'camera: {camera}')")
    assert result_cards(page).count() == 10
    assert all(camera_of(result_cards(page).nth(i)) != camera for i in range(10))
    page.fill("#exclude-camera", "")

    # Add an image, then find it by searching with it. The server has an API key: the page
    # asks for it once (this tab keeps it) and sends it with every change.
    prompts = []

    def answer_prompt(dialog):
        prompts.append(dialog.message)
        dialog.accept(API_KEY)

    page.on("dialog", answer_prompt)
    page.set_input_files("#add-files", str(files["new"]))
    page.fill("#add-prefix", "added/")
    page.fill("#add-camera", "7")
    # The count and the list change together: with the list's page held back by the test (so
    # this cannot pass by luck of timing), the count still says 30; released, both move.
    held = []
    page.route("**/gallery/entries*", lambda route: held.append(route))
    page.click("#add-button")
    for _ in range(500):
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the page did not ask for its list of entries after adding"
    assert page.locator("#stat-entries").inner_text() == "30"
    for route in held:
        route.continue_()
    page.unroute("**/gallery/entries*")
    added_id = "added/" + files["new"].name
    page.wait_for_function("document.getElementById('add-status').textContent"
                           ".startsWith('Added 1')")
    page.wait_for_function("document.getElementById('stat-entries').textContent == '31'")
    first_entry = page.locator("#entry-list > li").first
    assert first_entry.locator(".id").inner_text() == f"id: {added_id}"
    page.click(f"button[aria-label='Search with {added_id}']")
    page.wait_for_function(f"document.querySelector('#result-list > li .id')?.textContent"
                           f" == 'id: {added_id}'")
    top = result_cards(page).nth(0)
    assert top.locator(".decision").inner_text() == "Match"
    assert float(top.locator(".distance").inner_text().split()[1].rstrip(",")) < 1e-3
    assert top.locator("img.thumbnail").evaluate("img => img.naturalHeight") > 0
    page.locator("#results").screenshot(path=os.path.join(ARTEFACTS, "results_added.png"))

    # Remove it: gone from the gallery and its list.
    page.click(f"#entry-list button[aria-label='Remove {added_id}']")
    page.wait_for_function(f"document.getElementById('add-status').textContent"
                           f" == 'Removed {added_id}.'")
    page.wait_for_function("document.getElementById('stat-entries').textContent == '30'")
    assert added_id not in page.locator("#entry-list").inner_text()
    assert len(prompts) == 1 and "API key" in prompts[0]  # asked once for the add and remove

    # A file that is not an image: one readable line, not raw JSON.
    page.set_input_files("#query-file", str(files["text"]))
    page.click("#search-button")
    error = page.locator("#error")
    error.wait_for(state="visible")
    message = error.inner_text()
    assert message.startswith("The server refused this:")
    assert "not a decodable JPEG/PNG/BMP/GIF image" in message and "{" not in message
    page.screenshot(path=os.path.join(ARTEFACTS, "page.png"), full_page=True)
    page.close()


def test_the_page_works_under_its_content_security_policy(browser, page_server):
    """Every file the page needs is its own: loaded and searching under the server's CSP,
    with no violation reported."""
    client, files = page_server
    page = browser.new_page()
    messages = []
    page.on("console", lambda message: messages.append(message.text))
    response = page.goto(f"http://127.0.0.1:{client.port}/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.wait_for_selector("body[data-ready=true]")
    page.set_input_files("#query-file", str(files["query"]))
    page.click("#search-button")
    page.wait_for_selector("#result-list > li:nth-child(10) img.thumbnail")
    assert result_cards(page).count() == 10
    page.close()
    violations = [m for m in messages if "Content Security Policy" in m]
    assert not violations, violations


ATTACKER_PAGE = """<!doctype html><html><body><script>
const target = "TARGET";
const results = {};
async function attempt(name, run) {
  try { const r = await run(); results[name] = r && r.type === "opaque" ? "sent" : r.status; }
  catch (e) { results[name] = "blocked: " + e.message; }
}
(async () => {
  const remove = JSON.stringify({ids: ["VICTIM"]});
  const add = JSON.stringify({entries: [{id: "planted", embedding: Array(DIM).fill(0.1)}]});
  // "Simple" requests need no preflight: the browser sends them, only the answer is hidden.
  await attempt("remove_text_plain", () => fetch(target + ":remove", {method: "POST",
    mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: remove}));
  await attempt("add_text_plain", () => fetch(target + ":add", {method: "POST",
    mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: add}));
  // JSON needs a preflight, which this server never grants.
  await attempt("remove_json", () => fetch(target + ":remove", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: remove}));
  // Reading the gallery's entries.
  await attempt("read_entries", async () => {
    const r = await fetch(target + "/gallery/entries"); return {status: await r.text()}; });
  // A form post (text/plain encoding) in a hidden frame.
  const frame = document.createElement("iframe"); frame.name = "sink";
  document.body.appendChild(frame);
  const form = document.createElement("form");
  form.method = "POST"; form.action = target + ":remove"; form.enctype = "text/plain";
  form.target = "sink";
  const field = document.createElement("input");
  field.name = '{"ids": ["VICTIM"], "x": "'; field.value = '"}';
  form.appendChild(field); document.body.appendChild(form); form.submit();
  await new Promise(resolve => setTimeout(resolve, 1500));
  // A thumbnail drawn on a canvas and read back.
  await attempt("read_thumbnail", () => new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => { const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height; const g = c.getContext("2d");
      g.drawImage(img, 0, 0); g.getImageData(0, 0, 1, 1); resolve({status: "read"}); };
    img.onerror = () => reject(new Error("image refused"));
    img.src = target + "/gallery/thumbnails/" + encodeURIComponent("VICTIM"); }));
  document.body.dataset.results = JSON.stringify(results);
})();
</script></body></html>"""


def test_a_page_on_another_origin_can_neither_change_nor_read_the_gallery(browser, page_server):
    """The attack of issue 39 in a real browser: a page served from a second local port,
    opened by the operator, tries every way a web page has to call reid-serve."""
    import http.server
    import threading

    client, _ = page_server
    status, listing = client.request("GET", "/v1/models/reid/gallery/entries?limit=500")
    ids_before = sorted(entry["id"] for entry in listing["entries"])
    victim = ids_before[0]
    dimension = client.request("GET", "/v1/models/reid/gallery")[1]["dimension"]
    html = (ATTACKER_PAGE.replace("TARGET", f"http://127.0.0.1:{client.port}/v1/models/reid")
            .replace("VICTIM", victim).replace("DIM", str(dimension))).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    with testing.free_port() as port:
        pass
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", port), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.body.dataset.results !== undefined", timeout=30000)
        results = page.evaluate("JSON.parse(document.body.dataset.results)")
        page.close()
    finally:
        attacker.shutdown()
    status, listing = client.request("GET", "/v1/models/reid/gallery/entries?limit=500")
    assert sorted(entry["id"] for entry in listing["entries"]) == ids_before, results
    assert results["remove_json"].startswith("blocked")  # the preflight failed
    assert results["read_entries"].startswith("blocked")
    assert results["read_thumbnail"].startswith("blocked")
    # The simple requests left the browser (opaque answers): the server refused them.
    assert results["remove_text_plain"] == "sent" and results["add_text_plain"] == "sent"
    metrics = client.raw("/metrics")
    refused = [line for line in metrics.splitlines()
               if line.startswith("reid_requests_total") and 'status="403"' in line]
    assert refused, metrics[-2000:]


def test_no_ui_turns_the_page_off(trained):
    with testing.serve(trained["export"], "--no_ui") as client:
        status, answer = client.request("GET", "/")
        assert status == 404 and "error" in answer
    with testing.serve(trained["export"]) as client:
        status, body = client.request("GET", "/", parse=False)
        assert status == 200 and b"<h1>Person search</h1>" in body
        status, config = client.request("GET", "/ui/config.json")
        assert config == {"model_name": "reid", "version": "20", "gallery": False}
        status, _ = client.request("GET", "/ui/../server.py", parse=False)
        assert status == 404


def test_the_page_uses_the_match_colours_of_the_ranked_pictures():
    from reid_tf.evaluate import visualize

    css = open(os.path.join(os.path.dirname(testing.__file__), "deploy", "serving", "ui",
                            "style.css")).read()
    for name, variable in (("match", "--match"), ("no_match", "--no-match")):
        hex_colour = "#%02x%02x%02x" % visualize.MATCH_COLOURS[name]
        assert f"{variable}: {hex_colour};" in css
    script = open(os.path.join(os.path.dirname(testing.__file__), "deploy", "serving", "ui",
                               "app.js")).read()
    first = visualize.PART_COLOURS[:4].astype(int).tolist()
    assert str(first)[1:-1].replace(" ", "") in script.replace(" ", "").replace("\n", "")
