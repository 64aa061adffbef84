// Pixel-exact layout editing on a label-id grid (Uint8Array, row-major, 255 = void).
// No canvas paths: arc/stroke anti-alias, and every layout pixel must be exactly one palette colour.

export const VOID_ID = 255;

// ids -> RGBA as one Uint32 per pixel (ImageData is RGBA bytes; little-endian: A<<24 | B<<16 | G<<8 | R).
export function colorLut(classes, voidColor) {
  const pack = ([r, g, b]) => ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
  const lut = new Uint32Array(256).fill(pack(voidColor));
  classes.forEach((c) => { lut[c.id] = pack(c.color); });
  return lut;
}

export function renderIds(ids, lut, imageData) {
  const out = new Uint32Array(imageData.data.buffer);
  for (let i = 0; i < ids.length; i++) out[i] = lut[ids[i]];
}

// Offsets of a brush of `size` pixels across: pixels whose centres lie within size/2 of the brush centre
// (a pixel centre for odd sizes, a pixel corner for even ones). 1 -> one pixel, 2 -> 2x2, 3 -> 3x3, 5 -> a disc.
const discCache = new Map();
export function discOffsets(size) {
  if (!discCache.has(size)) {
    const offsets = [];
    const c = size % 2 ? 0 : 0.5;
    const r2 = (size / 2) * (size / 2);
    for (let dy = -Math.floor(size / 2); dy <= Math.floor((size - 1) / 2); dy++) {
      for (let dx = -Math.floor(size / 2); dx <= Math.floor((size - 1) / 2); dx++) {
        if ((dx + c) * (dx + c) + (dy + c) * (dy + c) <= r2) offsets.push([dx, dy]);
      }
    }
    discCache.set(size, offsets);
  }
  return discCache.get(size);
}

export function stamp(ids, width, height, x, y, size, id) {
  for (const [dx, dy] of discOffsets(size)) {
    const px = x + dx, py = y + dy;
    if (px >= 0 && px < width && py >= 0 && py < height) ids[py * width + px] = id;
  }
}

// Stamps the brush on every pixel of the Bresenham line from (x0, y0) to (x1, y1), both included.
export function strokeLine(ids, width, height, x0, y0, x1, y1, size, id) {
  const dx = Math.abs(x1 - x0), dy = -Math.abs(y1 - y0);
  const sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  let err = dx + dy;
  for (;;) {
    stamp(ids, width, height, x0, y0, size, id);
    if (x0 === x1 && y0 === y1) return;
    const e2 = 2 * err;
    if (e2 >= dy) { err += dy; x0 += sx; }
    if (e2 <= dx) { err += dx; y0 += sy; }
  }
}

// 4-connected flood fill of the region of (x, y)'s id with `id`; returns the number of pixels changed.
export function floodFill(ids, width, height, x, y, id) {
  const target = ids[y * width + x];
  if (target === id) return 0;
  const stack = [y * width + x];
  let changed = 0;
  while (stack.length) {
    const i = stack.pop();
    if (ids[i] !== target) continue;
    ids[i] = id;
    changed++;
    const px = i % width;
    if (px > 0 && ids[i - 1] === target) stack.push(i - 1);
    if (px < width - 1 && ids[i + 1] === target) stack.push(i + 1);
    if (i >= width && ids[i - width] === target) stack.push(i - width);
    if (i + width < ids.length && ids[i + width] === target) stack.push(i + width);
  }
  return changed;
}

// RGBA pixels -> ids: exact palette colours, anything else (black, transparent, off-palette) is void.
// Returns {ids, unknown}: unknown = pixels neither a class colour nor the void colour.
export function colorsToIds(rgba, classes, voidColor) {
  const key = (r, g, b) => (r << 16) | (g << 8) | b;
  const table = new Map(classes.map((c) => [key(...c.color), c.id]));
  const voidKey = key(...voidColor);
  const ids = new Uint8Array(rgba.length / 4).fill(VOID_ID);
  let unknown = 0;
  for (let i = 0; i < ids.length; i++) {
    if (rgba[4 * i + 3] === 0) continue;
    const k = key(rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]);
    const id = table.get(k);
    if (id !== undefined) ids[i] = id;
    else if (k !== voidKey) unknown++;
  }
  return { ids, unknown };
}

// Nearest-neighbour resampling of an id grid (pixel centres), as crn-synthesize --resize does.
export function resampleNearest(src, srcWidth, srcHeight, width, height) {
  const out = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    const sy = Math.min(srcHeight - 1, Math.floor(((y + 0.5) * srcHeight) / height));
    for (let x = 0; x < width; x++) {
      const sx = Math.min(srcWidth - 1, Math.floor(((x + 0.5) * srcWidth) / width));
      out[y * width + x] = src[sy * srcWidth + sx];
    }
  }
  return out;
}
