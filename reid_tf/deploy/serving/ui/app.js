// reid-serve's search page: plain JavaScript over the server's own JSON API, nothing fetched
// from anywhere else.
"use strict";

// reid_tf.evaluate.visualize.PART_COLOURS, in part order.
const PART_COLOURS = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
  [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
  [250, 190, 212]];
const PAGE = 24;
const $ = (id) => document.getElementById(id);
let api = "";            // /v1/models/<name>
let entriesOffset = 0;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
  if (message) box.focus?.();
}

// A server started with an API key asks for it on gallery changes (401): the page asks the
// operator once, keeps it for this tab only (sessionStorage), and sends it with every call.
const KEY_ITEM = "reid-serve-api-key";

async function send(method, path, body) {
  const headers = body ? {"Content-Type": "application/json"} : {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers["Authorization"] = `Bearer ${key}`;
  try {
    return await fetch(api + path, {
      method, headers, body: body ? JSON.stringify(body) : undefined});
  } catch (problem) {
    throw new Error(`The server did not answer (${problem.message}).`);
  }
}

// One readable line for any failed call: the server's {"error", "field"}, or what went wrong.
async function call(method, path, body) {
  let response = await send(method, path, body);
  if (response.status === 401) {
    const key = window.prompt("This server needs its API key to change the gallery:");
    if (key) {
      sessionStorage.setItem(KEY_ITEM, key.trim());
      response = await send(method, path, body);
    }
  }
  if (response.status === 401) sessionStorage.removeItem(KEY_ITEM);  // ask again next time
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const what = data && data.error ? data.error : `${response.status} ${response.statusText}`;
    const field = data && data.field ? ` (in ${data.field})` : "";
    throw new Error(`The server refused this: ${what}${field}`);
  }
  return data;
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function formatTime(seconds) {
  if (seconds === null || seconds === undefined) return "no time";
  const date = new Date(seconds * 1000);
  return isNaN(date) ? `${seconds} s` : `${date.toISOString().replace(".000Z", "Z")}`;
}

function thumbnailOf(entry) {
  const img = document.createElement("img");
  img.alt = entry.thumbnail ? `thumbnail of ${entry.id}` : `no thumbnail for ${entry.id}`;
  img.src = entry.thumbnail
    ? `${api}/gallery/thumbnails/${encodeURIComponent(entry.id)}` : "/ui/placeholder.svg";
  img.className = entry.thumbnail ? "thumbnail" : "placeholder";
  return img;
}

function describe(entry, card) {
  const lines = [["id", entry.id],
    ["person", entry.person_id === null ? "unknown" : entry.person_id],
    ["camera", entry.camera_id === null ? "unknown" : entry.camera_id],
    ["time", formatTime(entry.timestamp)]];
  for (const [name, value] of lines) {
    const line = document.createElement("div");
    line.className = name;
    line.textContent = `${name}: ${value}`;
    card.append(line);
  }
}

function searchWithButton(entry) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Search with this";
  button.setAttribute("aria-label", `Search with ${entry.id}`);
  button.addEventListener("click", () => search({entry_ids: [entry.id]}, null));
  return button;
}

function drawQuery(image, masks) {
  const canvas = $("query-canvas");
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (!masks) return;
  const rows = masks.length, columns = masks[0].length;
  const cellW = canvas.width / columns, cellH = canvas.height / rows;
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < columns; x++) {
      const part = masks[y][x].indexOf(Math.max(...masks[y][x]));
      const [r, g, b] = PART_COLOURS[part % PART_COLOURS.length];
      context.fillStyle = `rgba(${r}, ${g}, ${b}, 0.45)`;
      context.fillRect(x * cellW, y * cellH, cellW, cellH);
    }
  }
}

function showResults(answer, queryImage, caption) {
  const list = $("result-list");
  list.replaceChildren();
  const hits = answer.results[0] || [];
  $("results-empty").hidden = hits.length > 0;
  $("results-empty").textContent = hits.length ? "" : "No gallery entry passes these filters.";
  const view = $("query-view");
  view.hidden = false;
  $("query-caption").textContent = caption;
  if (queryImage) drawQuery(queryImage, answer.part_masks ? answer.part_masks[0] : null);
  const verdict = $("verdict");
  if (answer.in_gallery) {
    const inGallery = answer.in_gallery[0];
    verdict.className = "verdict " + (inGallery ? "match" : "no-match");
    verdict.textContent = (inGallery ? "In the gallery: the nearest entry is accepted"
      : "Not in the gallery: no entry is accepted") +
      ` at a false-accept rate of ${answer.operating_point.far}` +
      (answer.operating_point.far_interval ?
        ` (measured on validation: ${answer.operating_point.measured_far.toFixed(3)}, 95 % ` +
        `interval ${answer.operating_point.far_interval.map(v => v.toFixed(3)).join("–")}).`
        : ".");
  } else {
    verdict.className = "verdict";
    verdict.textContent = "This model has no calibration: ranked by distance, no decisions.";
  }
  hits.forEach((hit, rank) => {
    const card = document.createElement("li");
    const decided = hit.match !== undefined;
    card.className = "card result " + (decided ? (hit.match ? "match" : "no-match") : "");
    card.append(thumbnailOf(hit));
    const decision = document.createElement("div");
    decision.className = "decision";
    decision.textContent = decided ? (hit.match ? "Match" : "No match") : `#${rank + 1}`;
    card.append(decision);
    const distance = document.createElement("div");
    distance.className = "distance";
    // The probability only where it agrees with the decision: a card never reads "No match"
    // beside p(same) 0.97 (the decision holds the FAR; p_same answers at the ranked hits' odds).
    const agrees = hit.p_same !== undefined && (!decided || (hit.p_same >= 0.5) === hit.match);
    distance.textContent = `distance ${hit.distance.toFixed(4)}` +
      (agrees ? `, p(same) ${hit.p_same.toFixed(2)}` : "");
    card.append(distance);
    describe(hit, card);
    card.append(searchWithButton(hit));
    list.append(card);
  });
  $("results-heading").focus();
}

function searchOptions() {
  const body = {k: Number($("k").value) || 10};
  const camera = optionalNumber("exclude-camera");
  if (camera !== null) body.exclude_camera = camera;
  const start = optionalNumber("time-start"), end = optionalNumber("time-end");
  if (start !== null || end !== null) body.time_range = [start, end];
  if ($("far").value) body.far = Number($("far").value);
  return body;
}

async function search(query, queryImage, caption) {
  showError("");
  try {
    const answer = await call("POST", ":search", {...searchOptions(), ...query});
    if (query.entry_ids && !queryImage) {
      queryImage = await loadImage(`${api}/gallery/thumbnails/` +
        encodeURIComponent(query.entry_ids[0])).catch(() => loadImage("/ui/placeholder.svg"));
    }
    showResults(answer, queryImage, caption || `Query: ${query.entry_ids[0]}`);
  } catch (problem) {
    showError(problem.message);
  }
}

function loadImage(source) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("not an image"));
    image.src = source;
  });
}

async function searchWithFile(file) {
  if (!file) { showError("Choose a query image first."); return; }
  const b64 = await readBase64(file);
  const image = await loadImage(URL.createObjectURL(file)).catch(() => null);
  await search({instances: [{b64}], return_masks: true}, image, `Query: ${file.name}`);
}

// The gallery's figures and its list of entries are fetched together and drawn in one go, so the
// page never shows a count that its list does not match yet.
async function refreshGallery() {
  try {
    const [stats, page] = await Promise.all([call("GET", "/gallery"), fetchEntries()]);
    showStats(stats);
    showEntries(page);
  } catch (problem) {
    showError(problem.message);
  }
}

function showStats(stats) {
  const cameras = stats.cameras.map(
    (c) => `${c.camera_id === null ? "unknown" : c.camera_id} (${c.entries})`).join(", ");
  const span = stats.time_span
    ? `${formatTime(stats.time_span[0])} to ${formatTime(stats.time_span[1])}` : "none";
  const index = stats.index;
  const rows = [["Entries", stats.size], ["Cameras", cameras || "none"], ["Time span", span],
    ["Thumbnails", stats.thumbnails],
    ["Index", `${index.spec} (${index.kind}), ${index.entries} entries` +
      (index.stale ? ", being rebuilt" : "") +
      `, ${index.changes_not_persisted} changes not yet in its file`],
    ["Decisions", stats.decisions ? `calibrated on ${stats.decisions.measured_on?.split ||
      "labelled data"}, FAR ${stats.decisions.fars.join(" / ")}` : "no calibration"]];
  const list = $("gallery-stats");
  list.replaceChildren();
  for (const [name, value] of rows) {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    detail.id = "stat-" + name.toLowerCase().replace(" ", "-");
    list.append(term, detail);
  }
  const far = $("far");
  if (!far.options.length && stats.decisions) {
    for (const rate of stats.decisions.fars) {
      const option = new Option(`${rate}`, `${rate}`, false, rate === stats.decisions.far);
      far.append(option);
    }
  } else if (!stats.decisions) {
    far.disabled = true;
  }
}

function fetchEntries() {
  return call("GET", `/gallery/entries?offset=${entriesOffset}&limit=${PAGE}`);
}

async function refreshEntries() {
  showEntries(await fetchEntries());
}

function showEntries(page) {
  const list = $("entry-list");
  list.replaceChildren();
  for (const entry of page.entries) {
    const card = document.createElement("li");
    card.className = "card entry";
    card.append(thumbnailOf(entry));
    describe(entry, card);
    card.append(searchWithButton(entry));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${entry.id}`);
    remove.addEventListener("click", () => removeEntry(entry.id));
    card.append(remove);
    list.append(card);
  }
  const last = Math.min(page.total, entriesOffset + page.entries.length);
  $("entries-range").textContent = page.total
    ? `${entriesOffset + 1}-${last} of ${page.total}` : "The gallery is empty.";
  $("entries-previous").disabled = entriesOffset === 0;
  $("entries-next").disabled = last >= page.total;
}

async function removeEntry(id) {
  showError("");
  try {
    const answer = await call("POST", ":remove", {ids: [id]});
    $("add-status").textContent = answer.removed ? `Removed ${id}.` : `${id} was already gone.`;
    await refreshGallery();
  } catch (problem) {
    showError(problem.message);
  }
}

async function addImages(event) {
  event.preventDefault();
  showError("");
  const files = [...$("add-files").files];
  const status = $("add-status");
  if (!files.length) { showError("Choose one or more images to add."); return; }
  let metadata = null;
  if ($("add-metadata").value.trim()) {
    try { metadata = JSON.parse($("add-metadata").value); } catch (_) {
      showError("Metadata must be a JSON object, e.g. {\"site\": \"north\"}."); return;
    }
  }
  const camera = optionalNumber("add-camera"), time = optionalNumber("add-time");
  const entries = [];
  for (const file of files) {
    const entry = {id: $("add-prefix").value + file.name, b64: await readBase64(file)};
    if (camera !== null) entry.camera_id = camera;
    if (time !== null) entry.timestamp = time;
    if (metadata !== null) entry.metadata = metadata;
    entries.push(entry);
  }
  status.textContent = `Adding ${entries.length} image(s)…`;
  try {
    const answer = await call("POST", ":add", {entries});
    status.textContent = `Added ${answer.added} image(s): ${entries.map((e) => e.id).join(", ")}.`;
    $("add-form").reset();
    entriesOffset = 0;
    await refreshGallery();
  } catch (problem) {
    status.textContent = "Nothing was added.";
    showError(problem.message);
  }
}

async function start() {
  $("error").tabIndex = -1;
  const config = await (await fetch("/ui/config.json")).json();
  api = `/v1/models/${encodeURIComponent(config.model_name)}`;
  $("model").textContent = `Model ${config.model_name}, version ${config.version}` +
    (config.gallery ? "" : " (no gallery: start reid-serve with --gallery_db)");
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchWithFile($("query-file").files[0]);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchWithFile(event.dataTransfer.files[0]);
  });
  $("add-form").addEventListener("submit", addImages);
  $("entries-previous").addEventListener("click", () => {
    entriesOffset = Math.max(0, entriesOffset - PAGE); refreshEntries().catch((p) => showError(p.message));
  });
  $("entries-next").addEventListener("click", () => {
    entriesOffset += PAGE; refreshEntries().catch((p) => showError(p.message));
  });
  if (config.gallery) await refreshGallery();
  document.body.dataset.ready = "true";
}

start().catch((problem) => showError(`The page could not start: ${problem.message}`));
