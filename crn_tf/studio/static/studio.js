// crn-studio page: paint a label layout at the model's native size, send it to the TF-Serving-style
// predict endpoint, show the photo(s). The layout's truth is `ids` (one label id per pixel); the canvas
// only displays it, in exact palette colours.
import { VOID_ID, colorLut, colorsToIds, floodFill, renderIds, resampleNearest, strokeLine } from "./raster.js";

const $ = (id) => document.getElementById(id);
const MAX_UNDO_BYTES = 64 * 2 ** 20;

let config, width, height, ids, lut, imageData, maxUndo;
let classId = 0;
let tool = "brush";
let stroke = null; // {x, y} of the last pointer sample while drawing
const undoStack = [];

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function render() {
  renderIds(ids, lut, imageData);
  $("layout").getContext("2d").putImageData(imageData, 0, 0);
}

function pushUndo() {
  undoStack.push(ids.slice());
  if (undoStack.length > maxUndo) undoStack.shift();
  $("undo").disabled = false;
}

function undo() {
  if (!undoStack.length) return;
  ids = undoStack.pop();
  $("undo").disabled = !undoStack.length;
  render();
}

function className(id) {
  return id === VOID_ID ? "void" : config.label_space.classes[id].name;
}

// ---- controls ------------------------------------------------------------------------------------

function selectClass(id) {
  classId = id;
  for (const b of $("palette").children) b.setAttribute("aria-pressed", String(Number(b.dataset.classId) === id));
}

function selectTool(name) {
  tool = name;
  $("tool-brush").setAttribute("aria-pressed", String(name === "brush"));
  $("tool-fill").setAttribute("aria-pressed", String(name === "fill"));
}

function buildPalette() {
  const entries = [...config.label_space.classes, { id: VOID_ID, name: "void (eraser)", color: config.label_space.void.color }];
  for (const c of entries) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.classId = c.id;
    button.title = `${c.name} (id ${c.id}, rgb ${c.color.join(", ")})`;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${c.color.join(",")})`;
    button.append(swatch, c.name);
    button.addEventListener("click", () => selectClass(c.id));
    $("palette").append(button);
  }
  selectClass(0);
}

// ---- painting ------------------------------------------------------------------------------------

function pixelAt(event) {
  const canvas = $("layout");
  const rect = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * width);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * height);
  return { x: Math.min(width - 1, Math.max(0, x)), y: Math.min(height - 1, Math.max(0, y)) };
}

function brushSize() {
  return Number($("brush-size").value);
}

function onPointerDown(event) {
  if (event.button !== 0) return;
  const p = pixelAt(event);
  pushUndo();
  if (tool === "fill") {
    if (!floodFill(ids, width, height, p.x, p.y, classId)) undoStack.pop();
    $("undo").disabled = !undoStack.length;
    render();
    return;
  }
  $("layout").setPointerCapture(event.pointerId);
  stroke = p;
  strokeLine(ids, width, height, p.x, p.y, p.x, p.y, brushSize(), classId);
  render();
}

function onPointerMove(event) {
  const p = pixelAt(event);
  $("cursor").textContent = `x ${p.x}, y ${p.y}: ${className(ids[p.y * width + p.x])}`;
  if (!stroke) return;
  // Coalesced events: every sample the browser saw, so fast strokes stay continuous and exact.
  const samples = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of samples.length ? samples : [event]) {
    const q = pixelAt(e);
    strokeLine(ids, width, height, stroke.x, stroke.y, q.x, q.y, brushSize(), classId);
    stroke = q;
  }
  render();
}

function onPointerUp() {
  stroke = null;
}

// ---- layouts in and out --------------------------------------------------------------------------

// PNG colour type (IHDR byte 25): 0 = grey, 4 = grey + alpha: such layouts hold label ids, not colours.
function pngHeader(bytes) {
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (bytes.length < 26 || signature.some((v, i) => bytes[i] !== v)) return null;
  return { bitDepth: bytes[24], colorType: bytes[25] };
}

async function loadLayout(blob, name) {
  const header = pngHeader(new Uint8Array(await blob.slice(0, 26).arrayBuffer()));
  if (!header) throw new Error(`${name} is not a PNG; layouts are PNGs of palette colours or label ids`);
  if (header.bitDepth === 16) throw new Error(`${name} is a 16-bit PNG; layouts are 8-bit (ids or colours)`);
  // No colour management: layout colours must arrive exactly as stored.
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const scratch = document.createElement("canvas");
  scratch.width = bitmap.width;
  scratch.height = bitmap.height;
  const context = scratch.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  let loaded, unknown = 0;
  if (header.colorType === 0 || header.colorType === 4) {
    loaded = new Uint8Array(bitmap.width * bitmap.height);
    for (let i = 0; i < loaded.length; i++) loaded[i] = rgba[4 * i] < config.label_space.classes.length ? rgba[4 * i] : VOID_ID;
  } else {
    ({ ids: loaded, unknown } = colorsToIds(rgba, config.label_space.classes, config.label_space.void.color));
  }
  let note = `${bitmap.width}x${bitmap.height}`;
  if (bitmap.width !== width || bitmap.height !== height) {
    loaded = resampleNearest(loaded, bitmap.width, bitmap.height, width, height);
    note += `, resized nearest-neighbour to ${width}x${height}`;
  }
  pushUndo();
  ids = loaded;
  render();
  const warning = unknown ? `; ${unknown} pixels had colours outside the palette and became void` : "";
  setStatus(`Loaded ${name} (${note})${warning}.`);
}

async function loadSample() {
  const sample = config.samples[Number($("samples").value)];
  if (!sample) return;
  try {
    const response = await fetch(sample.url);
    if (!response.ok) throw new Error(`could not fetch ${sample.url} (HTTP ${response.status})`);
    await loadLayout(await response.blob(), sample.name);
  } catch (e) {
    setStatus(`Could not load the sample: ${e.message}`, true);
  }
}

async function onUpload(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  try {
    await loadLayout(file, file.name);
  } catch (e) {
    setStatus(`Could not load ${file.name}: ${e.message}`, true);
  }
}

function layoutPng() {
  return new Promise((resolve, reject) =>
    $("layout").toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the browser could not encode the layout"))), "image/png"),
  );
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function download(href, filename) {
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
}

// ---- synthesis -----------------------------------------------------------------------------------

// uint8 [H][W][3] nested lists (serving_default's JSON) -> PNG data URL.
function rgbToDataUrl(rows) {
  const canvas = document.createElement("canvas");
  canvas.width = rows[0].length;
  canvas.height = rows.length;
  const image = new ImageData(canvas.width, canvas.height);
  let i = 0;
  for (const row of rows) for (const [r, g, b] of row) image.data.set([r, g, b, 255], 4 * i++);
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

function describeError(status, payload) {
  const message = payload && payload.error ? payload.error : `HTTP ${status} without an error message`;
  if (status === 413) return `The layout is too large for this server: ${message}`;
  if (status === 502) return `TF Serving did not answer: ${message}`;
  if (status >= 500) return `The model failed on this layout: ${message}`;
  return `The server refused the layout: ${message}`;
}

function showPhotos(urls) {
  const scale = urls.length > 1 ? displayScale() / 2 : displayScale(); // a diverse collection: smaller tiles
  $("photos").replaceChildren(
    ...urls.map((url, u) => {
      const img = document.createElement("img");
      img.id = `photo-${u}`;
      img.alt = urls.length > 1 ? `synthesized photo ${u + 1} of ${urls.length}` : "synthesized photo";
      img.src = url;
      img.style.width = `${width * scale}px`;
      img.style.height = `${height * scale}px`;
      return img;
    }),
  );
  $("photo-downloads").replaceChildren(
    ...urls.map((url, u) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = urls.length > 1 ? `Download photo ${u + 1}` : "Download photo";
      button.addEventListener("click", () => download(url, urls.length > 1 ? `photo_${u}.png` : "photo.png"));
      return button;
    }),
  );
}

async function synthesize() {
  const button = $("synthesize");
  button.disabled = true;
  setStatus("Synthesizing…");
  const started = performance.now();
  try {
    const k = config.model.num_outputs;
    let body;
    if (k > 1) {
      // serving_default returns all k images of a diverse model (synthesize_png only the first).
      const rows = [];
      for (let y = 0; y < height; y++) rows.push(Array.from(ids.subarray(y * width, (y + 1) * width)));
      body = { signature_name: "serving_default", inputs: { label_ids: [rows] } };
    } else {
      const b64 = await blobToBase64(await layoutPng());
      body = { signature_name: "synthesize_png", instances: [{ label_png_bytes: { b64 } }] };
    }
    let response;
    try {
      response = await fetch(config.predict_url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (e) {
      throw new Error(`Could not reach crn-studio (is it still running?): ${e.message}`);
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      // not JSON: described by the status below
    }
    if (!response.ok) throw new Error(describeError(response.status, payload));
    const urls = k > 1
      ? payload.outputs.images[0].map(rgbToDataUrl)
      : [`data:image/png;base64,${payload.predictions[0].b64}`];
    showPhotos(urls);
    setStatus(`Synthesized ${urls.length > 1 ? `${urls.length} photos` : "the photo"} in ${((performance.now() - started) / 1000).toFixed(2)} s.`);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---- start ---------------------------------------------------------------------------------------

// Integer zoom for small models (crisp pixels), shrink-to-fit for large ones; about 512 CSS px wide.
function displayScale() {
  return width < 512 ? Math.floor(512 / width) : 512 / width;
}

async function start() {
  try {
    const response = await fetch("/studio/config");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = await response.json();
  } catch (e) {
    setStatus(`Could not read the model's configuration from crn-studio: ${e.message}`, true);
    return;
  }
  const m = config.model;
  [height, width] = m.native_size;
  $("model-info").textContent =
    `${m.name} v${m.version} · ${m.preset} · ${height}x${width} · ${config.label_space.name} ` +
    `(${config.label_space.classes.length} classes)${m.num_outputs > 1 ? ` · ${m.num_outputs} photos per layout` : ""} · ` +
    (config.backend === "tf_serving" ? "via TF Serving" : "SavedModel");
  ids = new Uint8Array(width * height).fill(VOID_ID);
  maxUndo = Math.max(5, Math.floor(MAX_UNDO_BYTES / (width * height)));
  lut = colorLut(config.label_space.classes, config.label_space.void.color);
  imageData = new ImageData(width, height);

  const canvas = $("layout");
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = `${width * displayScale()}px`;
  canvas.style.height = `${height * displayScale()}px`;
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  canvas.addEventListener("pointerleave", () => { $("cursor").textContent = ""; });
  render();

  buildPalette();
  const size = $("brush-size");
  size.max = String(Math.max(8, Math.round(width / 4)));
  size.value = String(Math.max(1, Math.round(width / 40)));
  $("brush-size-value").textContent = size.value;
  size.addEventListener("input", () => { $("brush-size-value").textContent = size.value; });
  $("tool-brush").addEventListener("click", () => selectTool("brush"));
  $("tool-fill").addEventListener("click", () => selectTool("fill"));
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", () => {
    pushUndo();
    ids.fill(VOID_ID);
    render();
  });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z") {
      e.preventDefault();
      undo();
    }
  });

  if (config.samples.length) {
    config.samples.forEach((s, i) => $("samples").add(new Option(s.name, String(i))));
  } else {
    $("samples").add(new Option("no samples for this label space", ""));
    $("samples").disabled = $("load-sample").disabled = true;
  }
  $("load-sample").addEventListener("click", loadSample);
  $("upload").addEventListener("change", onUpload);
  $("download-layout").addEventListener("click", async (e) => {
    e.preventDefault();
    const url = URL.createObjectURL(await layoutPng());
    download(url, "layout.png");
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
  $("synthesize").addEventListener("click", synthesize);
  $("synthesize").disabled = false;
  setStatus("Pick a class and paint; Synthesize sends the layout to the model.");
  document.body.dataset.ready = "true";
}

start();
