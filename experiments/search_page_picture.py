"""The README's picture of reid-serve's search page: the demo export (`make demo`) serving a
gallery of synthetic_persons test images, one query searched (the first whose person the model
finds at the page's operating point), the page photographed in headless Chromium (Playwright
driving the OS's `chromium`).

    .venv/bin/python experiments/search_page_picture.py   # -> experiments/figures/search_page.png

Only synthetic images appear in it (never the research-use data of ../shared).
"""

import argparse
import base64
import glob
import io
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from reid_tf import testing  # noqa: E402
from reid_tf.data import splits as splits_lib  # noqa: E402

DEMO_EXPORTS = os.path.join(os.path.dirname(HERE), "runs", "synthetic_persons_plnet_tiny_128x64",
                            "export")


def newest_export():
    versions = [p for p in glob.glob(os.path.join(DEMO_EXPORTS, "*")) if
                os.path.basename(p).isdigit()]
    if not versions:
        raise SystemExit(f"no export under {DEMO_EXPORTS}: run `make demo` first.")
    return max(versions, key=lambda p: int(os.path.basename(p)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default=None, help="default: the demo's newest export")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir of synthetic_persons")
    parser.add_argument("--gallery_images", type=int, default=300)
    parser.add_argument("--far", default="0.1", help="the page's operating point")
    parser.add_argument("--output", default=os.path.join(HERE, "figures", "search_page.png"))
    args = parser.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright

    export = args.export or newest_export()
    splits = splits_lib.load_splits("synthetic_persons", data_dir=args.data_dir,
                                    splits=("query", "gallery"))
    root = tempfile.mkdtemp()
    try:
        folder = os.path.join(root, "bounding_box_test")
        os.makedirs(folder)
        gallery, query = splits["gallery"], splits["query"]
        for name, data in list(zip(gallery.file_names, gallery.images))[:args.gallery_images]:
            Image.open(io.BytesIO(data)).convert("RGB").save(os.path.join(folder, name))
        people = set(gallery.person_ids[:args.gallery_images].tolist())
        candidates = [i for i, p in enumerate(query.person_ids) if p in people]
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with testing.serve(export, f"--gallery_images={root}",
                           f"--gallery_db={os.path.join(root, 'gallery.sqlite')}") as client, \
                sync_playwright() as playwright:
            # The first query (in the split's order) whose person the model finds: its nearest
            # entry is that person, accepted at --far. Said so under the README's picture.
            chosen = None
            for i in candidates:
                _, answer = client.request("POST", "/v1/models/reid:search", {
                    "k": 1, "far": float(args.far), "instances": [
                        {"b64": base64.b64encode(query.images[i]).decode()}]})
                top = answer["results"][0][0]
                if answer["in_gallery"][0] and top["person_id"] == query.person_ids[i]:
                    chosen = i
                    break
            if chosen is None:
                raise SystemExit(f"no query of these {len(candidates)} is found at FAR {args.far}")
            print(f"query {chosen}: the first of {len(candidates)} whose person is found "
                  f"({candidates.index(chosen)} before it are not)")
            query_path = os.path.join(root, query.file_names[chosen])
            Image.open(io.BytesIO(query.images[chosen])).convert("RGB").save(query_path)
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{client.port}/")
            page.wait_for_selector("body[data-ready=true]")
            page.set_input_files("#query-file", query_path)
            page.fill("#k", "8")
            page.select_option("#far", args.far)
            page.click("#search-button")
            page.wait_for_function("document.querySelectorAll('#result-list > li').length == 8 "
                                   "&& [...document.querySelectorAll('#result-list img')]"
                                   ".every(i => i.complete && i.naturalHeight)")
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
            page.screenshot(path=args.output, clip={"x": 0, "y": 0, "width": 1280,
                                                    "height": 900})
            browser.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.output} ({export}, query {query.file_names[chosen]})")


if __name__ == "__main__":
    main()
