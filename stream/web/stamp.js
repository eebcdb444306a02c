// The frame-ID stamp, the same layout as stream/stamp.py (encode and decode), and the percentile the
// page's latency numbers use.

export const STAMP_GRID = 4; // cells per side
export const STAMP_CELL = 16; // px per cell side
export const STAMP_PATCH = STAMP_GRID * STAMP_CELL; // px per patch side
const STAMP_ID_BITS = 12;
export const STAMP_ID_MODULO = 1 << STAMP_ID_BITS;
const STAMP_INSET = STAMP_CELL / 4; // a read averages the cell's central (CELL - 2 * INSET)^2 px

function checkNibble(id) {
  return ~((id & 0xf) ^ ((id >> 4) & 0xf) ^ ((id >> 8) & 0xf)) & 0xf;
}

export function encodeWord(id) {
  const n = ((id % STAMP_ID_MODULO) + STAMP_ID_MODULO) % STAMP_ID_MODULO;
  return n | (checkNibble(n) << STAMP_ID_BITS);
}

export function decodeWord(word) {
  const id = word & (STAMP_ID_MODULO - 1);
  return word >> STAMP_ID_BITS === checkNibble(id) ? id : null;
}

// Draws `id` (mod 4096) into the top-left STAMP_PATCH px of a 2D context: bit k in cell k = row * 4 + col, white = 1.
export function drawStamp(ctx, id) {
  const word = encodeWord(id);
  for (let k = 0; k < STAMP_GRID * STAMP_GRID; k++) {
    const row = Math.floor(k / STAMP_GRID), col = k % STAMP_GRID;
    ctx.fillStyle = (word >> k) & 1 ? "#fff" : "#000";
    ctx.fillRect(col * STAMP_CELL, row * STAMP_CELL, STAMP_CELL, STAMP_CELL);
  }
}

// The ID stamped in an ImageData (or any {data: RGBA bytes, width, height}), or null when there is none.
// A cell is white when the mean over its central 8x8 px of (R + G + B) / 3 is above 127.5.
export function readStamp(image) {
  const { data, width, height } = image;
  if (!(width >= STAMP_PATCH && height >= STAMP_PATCH)) return null;
  const side = STAMP_CELL - 2 * STAMP_INSET;
  const threshold = 127.5 * 3 * side * side; // on the sum of R + G + B over the cell's centre
  let word = 0;
  for (let k = 0; k < STAMP_GRID * STAMP_GRID; k++) {
    const row = Math.floor(k / STAMP_GRID), col = k % STAMP_GRID;
    let sum = 0;
    for (let y = row * STAMP_CELL + STAMP_INSET; y < (row + 1) * STAMP_CELL - STAMP_INSET; y++) {
      let i = (y * width + col * STAMP_CELL + STAMP_INSET) * 4;
      for (let x = 0; x < side; x++, i += 4) sum += data[i] + data[i + 1] + data[i + 2];
    }
    if (sum > threshold) word |= 1 << k;
  }
  return decodeWord(word);
}

// Linear-interpolated percentile of ascending `sorted` (numpy's default), q in [0, 1].
export function percentile(sorted, q) {
  if (!sorted.length) return null;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}
