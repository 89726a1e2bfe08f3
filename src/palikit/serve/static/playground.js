// palikit playground: plain JS, no build step, no CDN. Talks only to this server.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
  const TEXT_HINT = {
    answer: "question, e.g. what is on the table", detect: "labels, e.g. cat ; dog",
    segment: "labels, e.g. cat", predict: "any prompt, e.g. caption en",
  };
  let file = null, image = null, scale = 1;

  $("api-key").value = localStorage.getItem("palikit-api-key") || "";

  function setStatus(msg, isError) {
    $("status").textContent = msg;
    $("status").className = isError ? "error" : "";
  }

  function updateTask() {
    const task = $("task").value;
    $("text-row").hidden = !(task in TEXT_HINT);
    $("text").placeholder = TEXT_HINT[task] || "";
    $("lang-row").hidden = !["caption", "describe", "answer"].includes(task);
  }

  // The picture's on-screen size: a small image (shorter side under MIN_SIDE) is shown a whole number of
  // times larger with crisp (nearest) pixels, so a 112 px image shows at 448 px and its labels are legible;
  // a large one is shrunk to fit MAX_SIDE. The canvas holds devicePixelRatio pixels per CSS pixel.
  const MIN_SIDE = 448, MAX_SIDE = 1024, MAX_UP_SIDE = 2048;
  let view = { scale: 1, cssWidth: canvas.width, cssHeight: canvas.height, dpr: 1 };

  function viewScale(w, h) {
    const short = Math.min(w, h), long = Math.max(w, h);
    if (short < MIN_SIDE) return Math.max(1, Math.min(Math.ceil(MIN_SIDE / short), Math.floor(MAX_UP_SIDE / long)));
    return Math.min(1, MAX_SIDE / long);
  }

  function drawImage() {
    if (!image) return;
    const w = image.naturalWidth, h = image.naturalHeight, css = viewScale(w, h), dpr = window.devicePixelRatio || 1;
    const cssWidth = Math.max(1, Math.round(w * css)), cssHeight = Math.max(1, Math.round(h * css));
    canvas.width = Math.max(1, Math.round(cssWidth * dpr));
    canvas.height = Math.max(1, Math.round(cssHeight * dpr));
    canvas.style.width = cssWidth + "px";
    scale = canvas.width / w;  // image pixels -> canvas pixels
    view = { scale, cssWidth, cssHeight, dpr };
    ctx.imageSmoothingEnabled = scale < 1;  // upscaled: nearest, like the annotated PNGs
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  }

  function setFile(f) {
    if (!f) return;
    file = f;
    const img = new Image();
    img.onload = () => { image = img; drawImage(); $("run").disabled = false; setStatus("Image loaded: " + img.naturalWidth + "x" + img.naturalHeight); };
    img.onerror = () => { setStatus("This browser cannot display that file; the server may still read it.", true); $("run").disabled = false; };
    img.src = URL.createObjectURL(f);
  }

  // COCO RLE (uncompressed counts, column-major) -> Uint8Array of h*w in row-major order.
  function decodeRle(rle) {
    const h = rle.size[0], w = rle.size[1], out = new Uint8Array(h * w);
    let counts = rle.counts;
    if (typeof counts === "string") counts = decompress(counts);
    let idx = 0, val = 0;
    for (const c of counts) {
      for (let k = 0; k < c; k++, idx++) if (val) { const x = Math.floor(idx / h), y = idx % h; out[y * w + x] = 1; }
      val = 1 - val;
    }
    return out;
  }

  // COCO's compressed string counts (maskApi.c rleFrString).
  function decompress(s) {
    const counts = [];
    let p = 0;
    while (p < s.length) {
      let x = 0, k = 0, more = 1;
      while (more) {
        const c = s.charCodeAt(p) - 48;
        x |= (c & 0x1f) << (5 * k);
        more = c & 0x20; p++; k++;
        if (!more && (c & 0x10)) x |= -1 << (5 * k);
      }
      if (counts.length > 2) x += counts[counts.length - 2];
      counts.push(x);
    }
    return counts;
  }

  function hexToRgb(hex) { const n = parseInt(hex.slice(1), 16); return [(n >> 16) & 255, (n >> 8) & 255, n & 255]; }

  // A box outline and a filled label patch (above the box, else just inside it); line width and font
  // grow with the canvas so labels stay legible on small images shown enlarged.
  function drawBox(d, color) {
    const short = Math.min(canvas.width, canvas.height);
    const line = Math.max(2, Math.round(short / 224)), fontPx = Math.max(14, Math.round(short / 28));
    const [x0, y0, x1, y1] = d.box.map((v) => v * scale);
    ctx.strokeStyle = color; ctx.lineWidth = line;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const label = (d.label || "?") + (d.score == null ? "" : " " + d.score.toFixed(2));
    ctx.font = fontPx + "px sans-serif";
    const tw = Math.ceil(ctx.measureText(label).width) + 6, th = fontPx + 6;
    const lx = Math.min(Math.max(x0, 0), Math.max(canvas.width - tw, 0));
    const ly = y0 - th >= 0 ? y0 - th : Math.min(y0 + line, Math.max(canvas.height - th, 0));
    ctx.fillStyle = color;
    ctx.fillRect(lx, ly, tw, th);
    const [r, g, b] = hexToRgb(color);
    ctx.fillStyle = 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff";
    ctx.textBaseline = "middle";
    ctx.fillText(label, lx + 3, ly + th / 2);
  }

  function render(result) {
    drawImage();
    const dets = result.detections || [];
    const list = $("detections");
    list.textContent = "";
    dets.forEach((d, i) => {
      const color = COLORS[i % COLORS.length];
      if (d.mask && d.mask.size) {
        const h = d.mask.size[0], w = d.mask.size[1], bits = decodeRle(d.mask);
        const off = document.createElement("canvas");
        off.width = w; off.height = h;
        const octx = off.getContext("2d"), data = octx.createImageData(w, h), [r, g, b] = hexToRgb(color);
        for (let p = 0; p < bits.length; p++) if (bits[p]) { data.data.set([r, g, b, 120], p * 4); }
        octx.putImageData(data, 0, 0);
        ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
      }
      if (d.box) drawBox(d, color);
      const li = document.createElement("li");
      li.textContent = (d.label || "?") + "  box " + (d.box || []).map((v) => Math.round(v)).join(", ") +
        (d.score == null ? "" : "  score " + d.score.toFixed(3)) + (d.mask ? "  (mask)" : "");
      li.style.color = color;
      list.appendChild(li);
    });
    $("det-count").textContent = "(" + dets.length + ")";
    $("raw-text").textContent = result.text == null ? "" : result.text;
    $("json").textContent = JSON.stringify(result, null, 2);
    window.palikit.lastResult = result;
  }

  async function run() {
    if (!file) { setStatus("Choose an image first.", true); return; }
    const task = $("task").value, form = new FormData();
    form.append("image", file);
    const text = $("text").value.trim();
    if (task === "answer") form.append("question", text);
    if (task === "detect" || task === "segment") form.append("labels", text);
    if (task === "predict") form.append("prompt", text);
    if (["caption", "describe", "answer"].includes(task)) form.append("lang", $("lang").value.trim() || "en");
    if ($("max-new-tokens").value) form.append("max_new_tokens", $("max-new-tokens").value);
    const key = $("api-key").value.trim();
    localStorage.setItem("palikit-api-key", key);
    const headers = key ? { Authorization: "Bearer " + key } : {};
    $("run").disabled = true;
    setStatus("Running " + task + "...");
    const t0 = performance.now();
    try {
      const resp = await fetch("/v1/" + task, { method: "POST", body: form, headers });
      const body = await resp.json().catch(() => ({ error: { message: "the server sent a non-JSON answer (" + resp.status + ")" } }));
      if (!resp.ok) { setStatus("Error " + resp.status + ": " + ((body.error && body.error.message) || "request failed"), true); return; }
      render(body);
      setStatus("Done in " + Math.round(performance.now() - t0) + " ms.");
    } catch (e) {
      setStatus("Network error: " + e.message, true);
    } finally {
      $("run").disabled = false;
    }
  }

  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { setFile(e.target.files[0]); e.target.value = ""; });
  $("task").addEventListener("change", updateTask);
  $("run").addEventListener("click", run);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter") run(); });
  updateTask();
  fetch("/readyz").then((r) => r.json()).then((b) => { $("model").textContent = b.model ? "model: " + b.model : "(starting)"; }).catch(() => {});

  window.palikit = { render, decodeRle, lastResult: null, view: () => view };
})();
