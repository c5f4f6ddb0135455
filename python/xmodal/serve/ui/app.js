// The search page of `xmodal serve --ui`: plain JavaScript, no build step. It only talks to the service's REST
// API (with the API key, when one is set) and builds every element with textContent, never HTML from data.
"use strict";

// the payload keys the page gives a meaning to: the item's picture (a path under the collection's media, or an
// http(s) URL) and the text shown under it
const IMAGE_KEY = "image";
const CAPTION_KEY = "caption";
const THUMBNAIL_SIZE = 256;
const THUMBNAILS_KEPT = 1000;  // object URLs of fetched thumbnails kept for reuse, the least recently used go

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("xmodal-key") || "",
  model: false,
  image: null,      // the query image (a File), if any
  like: null,       // the id of the result whose vector is the query ("more like this"), if any
  last: null,       // {query, results} of the last answer, for the JSON export
  thumbnails: new Map(),  // media URL -> Promise of an object URL, least recently used first
  searches: 0,      // searches started: an answer to any but the latest is dropped
  timings: [],      // per search, ms from Enter to: the answer parsed, the grid on screen, the last thumbnail drawn
};
window.xmodal = { timings: state.timings };  // read by the browser tests and the benchmark (never the key)

class ServiceError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

// -- talking to the service
function inWords(status, body) {
  const detail = body && body.detail;
  if (status === 401) return "This service needs an API key: enter it above.";
  if (status === 503) {
    return "The service is busy or still loading its collections; try again in a moment"
      + (typeof detail === "string" ? ` (${detail}).` : ".");
  }
  if (Array.isArray(detail)) {
    return detail.map((d) => `${d.field ? d.field + ": " : ""}${d.message}`
      + (d.value !== undefined && d.value !== null ? ` (given: ${JSON.stringify(d.value)})` : "")).join("; ");
  }
  if (typeof detail === "string") return detail.charAt(0).toUpperCase() + detail.slice(1) + ".";
  return `The service answered HTTP ${status}.`;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (e) {
    throw new ServiceError(0, `Cannot reach the service (${e.message}).`);
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON: the status says enough */ }
    if (response.status === 401) askForKey();
    throw new ServiceError(response.status, inWords(response.status, body));
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();
const collectionPath = (collection, rest) => `/collections/${encodeURIComponent(collection)}${rest}`;

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

// -- start-up: collections, whether there is a model, and the filters of the chosen collection
async function loadCollections(wanted) {
  try {
    state.model = Boolean((await json("/ready")).model);
    const { collections } = await json("/collections");
    const picker = $("collection");
    picker.replaceChildren(...collections.map((c) => {
      const option = element("option", "", `${c.name} (${c.size} items)`);
      option.value = c.name;
      return option;
    }));
    if (wanted && collections.some((c) => c.name === wanted)) picker.value = wanted;
    if (!collections.length) say("This service holds no collections yet.", true);
    else if (!state.model) say("Text and image queries need a model: start the service with --model. "
      + "\"More like this\" works without one.");
    else say("");
    $("text").disabled = !state.model;
    await loadFilters();
    return true;
  } catch (e) {
    say(e.message, true);
    return false;
  }
}

// the filters are built apart and put in place only if the collection is still the one chosen
async function loadFilters() {
  const collection = $("collection").value;
  if (!collection) return $("filters").replaceChildren();
  const { keys } = await json(collectionPath(collection, "/payload_keys"));
  if ($("collection").value !== collection) return;
  const labels = [];
  for (const { key, types, values } of keys) {
    if (key === IMAGE_KEY || (key === CAPTION_KEY && values === null)) continue;
    const label = element("label", "", `${key} `);
    let input;
    if (values === null) {  // too many values to list: a text box
      input = element("input");
      input.placeholder = "any";
      input.dataset.types = types.join(" ");
    } else {
      input = element("select");
      const any = element("option", "", "any");
      any.value = "";
      input.append(any, ...values.map((v) => {
        const option = element("option", "", String(v));
        option.value = JSON.stringify(v);
        return option;
      }));
    }
    input.dataset.key = key;
    label.append(input);
    labels.push(label);
  }
  $("filters").replaceChildren(...labels);
}

// what a typed filter value means: a number or true / false where the key holds those, else the text itself
function typedValue(text, types) {
  const held = types.split(" ");
  if (held.includes("number") && text.trim() !== "" && Number.isFinite(Number(text))) return Number(text);
  if (held.includes("boolean") && (text === "true" || text === "false")) return text === "true";
  return text;
}

function currentFilter() {
  const filter = {};
  for (const input of $("filters").querySelectorAll("[data-key]")) {
    if (!input.value) continue;
    filter[input.dataset.key] = input.tagName === "SELECT" ? JSON.parse(input.value)
      : typedValue(input.value, input.dataset.types);
  }
  return Object.keys(filter).length ? filter : null;
}

function setFilter(filter) {
  for (const input of $("filters").querySelectorAll("[data-key]")) {
    const v = filter ? filter[input.dataset.key] : undefined;
    input.value = v === undefined ? "" : (input.tagName === "SELECT" ? JSON.stringify(v) : String(v));
  }
}

// -- the query: text, an image, both (composed), or a stored item's vector ("more like this")
function setImage(file) {
  state.image = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  $("clear-image").hidden = !file;
  $("drop-text").textContent = file ? file.name || "image" : "Image: drop one here or choose";
  if (file) {
    preview.src = URL.createObjectURL(file);
    setLike(null);
  } else {
    preview.removeAttribute("src");
    $("image").value = "";
  }
}

function setLike(id) {
  state.like = id;
  const chip = $("like");
  chip.hidden = id === null;
  chip.replaceChildren();
  if (id !== null) {
    const clear = element("button", "", "×");
    clear.type = "button";
    clear.title = "search by text or image again";
    clear.addEventListener("click", () => setLike(null));
    chip.append(element("span", "", `more like #${id}`), clear);
  }
}

function currentQuery() {
  const k = Number($("k").value);
  return { collection: $("collection").value, text: $("text").value.trim(), k,
           filter: currentFilter(), like: state.like, image: state.image ? state.image.name || "image" : null };
}

async function answer(query, image) {
  const path = (rest) => collectionPath(query.collection, rest);
  const options = { k: query.k, with_payload: true };
  if (query.filter) options.filter = query.filter;
  if (query.like !== null) {
    const { vector } = await json(path(`/vectors/${query.like}`));
    return json(path("/search"), jsonBody(Object.assign({ vectors: [vector] }, options)));
  }
  if (image) {
    const form = new FormData();
    form.append("image", image);
    form.append("k", String(query.k));
    form.append("with_payload", "true");
    if (query.filter) form.append("filter", JSON.stringify(query.filter));
    if (query.text) form.append("text", query.text);
    return json(path(query.text ? "/search/composed" : "/search/image"), { method: "POST", body: form });
  }
  return json(path("/search/text"), jsonBody(Object.assign({ text: query.text }, options)));
}

const jsonBody = (body) => ({ method: "POST", headers: { "Content-Type": "application/json" },
                              body: JSON.stringify(body) });

async function search() {
  const started = performance.now();
  const query = currentQuery();
  if (!query.collection) return say("Choose a collection first.", true);
  if (!query.text && !state.image && query.like === null) return say("Type a sentence or choose an image.", true);
  if (!Number.isInteger(query.k) || query.k < 1) return say("k must be a whole number of 1 or more.", true);
  say("Searching…");
  const mine = ++state.searches;
  let body;
  try {
    body = await answer(query, state.image);
  } catch (e) {
    if (mine === state.searches) say(e.message, true);
    return;
  }
  if (mine !== state.searches) return;  // a newer search was started meanwhile: its answer is the one shown
  const answered = performance.now() - started;
  const hits = body.results[0];
  state.last = { query, results: hits };
  share(query);
  const images = render(hits, query.collection);
  await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));  // the frame that shows it
  const grid = performance.now() - started;
  if (mine !== state.searches) return;
  say(`${hits.length} result${hits.length === 1 ? "" : "s"} in ${grid.toFixed(0)} ms`);
  await Promise.allSettled(images);
  state.timings.push({ answered, grid, thumbnails: performance.now() - started });
}

// -- results
function render(hits, collection) {
  const images = [];
  const cards = hits.map((hit, rank) => {
    const card = element("article", "card");
    card.dataset.id = String(hit.id);
    const payload = hit.payload || {};
    if (typeof payload[IMAGE_KEY] === "string") {
      const img = element("img");
      img.alt = typeof payload[CAPTION_KEY] === "string" ? payload[CAPTION_KEY] : `item ${hit.id}`;
      card.append(img);
      images.push(show(img, collection, payload[IMAGE_KEY]));
    } else {
      card.append(element("div", "no-image", "no image"));
    }
    const score = hit.score === null ? "n/a" : hit.score.toFixed(4);
    card.append(element("div", "meta", `#${rank + 1} · score ${score} · id ${hit.id}`));
    if (payload[CAPTION_KEY] !== undefined) card.append(element("p", "caption", String(payload[CAPTION_KEY])));
    const details = element("dl");
    for (const [key, value] of Object.entries(payload)) {
      if (key === IMAGE_KEY || key === CAPTION_KEY) continue;
      details.append(element("dt", "", key), element("dd", "", typeof value === "string" ? value : JSON.stringify(value)));
    }
    if (details.childElementCount) card.append(details);
    const more = element("button", "more", "More like this");
    more.type = "button";
    more.addEventListener("click", () => {
      $("text").value = "";
      setImage(null);
      setLike(hit.id);
      search();
    });
    card.append(more);
    return card;
  });
  $("results").replaceChildren(...cards);
  $("actions").hidden = false;
  return images;
}

async function show(img, collection, path) {
  if (/^https?:\/\//i.test(path)) {
    img.src = path;
  } else {  // under the collection's media, fetched with the API key (an <img src> cannot send it)
    const segments = path.split("/");
    if (segments.some((s) => s === "" || s === "." || s === "..")) {  // the browser would resolve them into
      img.alt = "(image not available: its path is not inside the media folder)";  // another API path
      return;
    }
    const url = collectionPath(collection, `/media/${segments.map(encodeURIComponent).join("/")}?size=${THUMBNAIL_SIZE}`);
    let made = state.thumbnails.get(url);
    if (made) {
      state.thumbnails.delete(url);  // to the end: used most recently
    } else {
      made = api(url).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
      made.catch(() => state.thumbnails.delete(url));
      forgetOldThumbnails();
    }
    state.thumbnails.set(url, made);
    try {
      img.src = await made;
    } catch (e) {
      img.alt = `(image not available: ${e.message})`;
      return;
    }
  }
  try { await img.decode(); } catch (e) { /* a broken image shows its alt text */ }
}

function forgetOldThumbnails() {
  for (const [url, made] of state.thumbnails) {
    if (state.thumbnails.size < THUMBNAILS_KEPT) break;
    state.thumbnails.delete(url);
    made.then((objectUrl) => URL.revokeObjectURL(objectUrl), () => {});
  }
}

// -- sharing and export
function share(query) {
  const params = new URLSearchParams({ collection: query.collection, k: String(query.k) });
  if (query.text) params.set("text", query.text);
  if (query.filter) params.set("filter", JSON.stringify(query.filter));
  if (query.like !== null) params.set("like", String(query.like));
  const link = `${location.pathname}#${params}`;
  history.replaceState(null, "", link);
  $("share").href = link;
  $("share").textContent = query.image ? "Link to this search (without the uploaded image)" : "Link to this search";
}

function fromLink() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("collection")) return null;
  let filter = null;
  try { filter = params.has("filter") ? JSON.parse(params.get("filter")) : null; } catch (e) { filter = null; }
  const like = params.has("like") ? Number(params.get("like")) : null;
  return { collection: params.get("collection"), text: params.get("text") || "", k: Number(params.get("k")) || 12,
           filter, like: Number.isInteger(like) ? like : null };
}

async function applyLink(query) {
  if (!query) return;
  if ($("collection").value !== query.collection) {
    $("collection").value = query.collection;
    await loadFilters();
  }
  $("text").value = query.text;
  $("k").value = String(query.k);
  setFilter(query.filter);
  setImage(null);
  setLike(query.like);
  if (query.text || query.like !== null) await search();
}

function exportJson() {
  if (!state.last) return;
  const blob = new Blob([JSON.stringify(state.last, null, 2)], { type: "application/json" });
  const link = element("a");
  link.href = URL.createObjectURL(blob);
  link.download = "xmodal-results.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// -- wiring
function start() {
  $("query").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("image").addEventListener("change", () => setImage($("image").files[0] || null));
  $("clear-image").addEventListener("click", () => setImage(null));
  $("text").addEventListener("input", () => setLike(null));  // typing starts a search of its own
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file && file.type.startsWith("image/")) setImage(file);
    else say("Drop an image file (PNG, JPEG, ...).", true);
  });
  $("collection").addEventListener("change", async () => {
    state.searches += 1;  // an answer still on its way is for the collection left behind
    $("results").replaceChildren();
    $("actions").hidden = true;
    setLike(null);
    try { await loadFilters(); } catch (e) { say(e.message, true); }
  });
  $("key-button").addEventListener("click", () => { $("key-form").hidden = !$("key-form").hidden; });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem("xmodal-key", state.key);
    if (await loadCollections($("collection").value)) {
      $("key-form").hidden = true;
      await applyLink(fromLink());
    }
  });
  $("export").addEventListener("click", exportJson);
  window.addEventListener("hashchange", () => applyLink(fromLink()).catch((e) => say(e.message, true)));
  const linked = fromLink();
  loadCollections(linked && linked.collection).then((ok) => ok && applyLink(linked))
    .catch((e) => say(e.message, true));
}

start();
