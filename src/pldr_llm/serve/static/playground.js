// PLDR-LLM playground: streamed completions and the deductive outputs of a prompt.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let controller = null;
let lastDeductive = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error && body.error.message ? body.error.message : resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModel() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) {
    setStatus("status", await errorText(resp), true);
    return null;
  }
  const body = await resp.json();
  modelId = body.data[0].id;
  $("model-name").textContent = modelId + " (context " + body.data[0].max_model_len + " tokens)";
  return modelId;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function generate() {
  if (!modelId && !(await loadModel())) return;
  const prompt = $("prompt").value;
  const stop = $("stop").value.replace(/\\n/g, "\n");
  const body = {
    model: modelId,
    prompt: prompt,
    max_tokens: numberOrNull("max-tokens"),
    temperature: numberOrNull("temperature"),
    top_p: numberOrNull("top-p"),
    top_k: numberOrNull("top-k"),
    seed: numberOrNull("seed"),
    stream: true,
  };
  if (stop) body.stop = stop;
  $("output-prompt").textContent = prompt;
  $("output-text").textContent = "";
  setStatus("status", "generating…");
  $("generate").disabled = true;
  $("stop-generation").disabled = false;
  controller = new AbortController();
  const started = performance.now();
  let tokens = 0;
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      setStatus("status", await errorText(resp), true);
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          setStatus("status", chunk.error.message, true);
          return;
        }
        for (const choice of chunk.choices) {
          $("output-text").textContent += choice.text;
          tokens += 1;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const secs = (performance.now() - started) / 1000;
    setStatus("status", "done (" + finish + ") in " + secs.toFixed(2) + " s");
  } catch (e) {
    setStatus("status", e.name === "AbortError" ? "stopped" : String(e), e.name !== "AbortError");
  } finally {
    $("generate").disabled = false;
    $("stop-generation").disabled = true;
    controller = null;
  }
}

// ------------------------------------------------------------------ deductive panel

function colour(v, lo, hi, symmetric) {
  // Diverging blue-white-red for a symmetric scale, else a light-to-dark sequential ramp.
  if (symmetric) {
    const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    const t = Math.max(-1, Math.min(1, v / m));
    if (t >= 0) return [255, Math.round(255 * (1 - t)), Math.round(255 * (1 - t))];
    return [Math.round(255 * (1 + t)), Math.round(255 * (1 + t)), 255];
  }
  const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
  return [Math.round(255 - 220 * t), Math.round(255 - 180 * t), Math.round(255 - 90 * t)];
}

function drawHeatmap(canvas, matrix, symmetric) {
  const n = matrix.length;
  const scale = Math.max(1, Math.floor(96 / n));
  canvas.width = n * scale;
  canvas.height = n * scale;
  const ctx = canvas.getContext("2d");
  let lo = Infinity, hi = -Infinity;
  for (const row of matrix) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const image = ctx.createImageData(n * scale, n * scale);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const v = matrix[i][j];
      const [r, g, b] = v === null ? [0, 0, 0] : colour(v, lo, hi, symmetric);
      for (let di = 0; di < scale; di++) {
        for (let dj = 0; dj < scale; dj++) {
          const p = ((i * scale + di) * n * scale + (j * scale + dj)) * 4;
          image.data[p] = r; image.data[p + 1] = g; image.data[p + 2] = b; image.data[p + 3] = 255;
        }
      }
    }
  }
  ctx.putImageData(image, 0, 0);
  canvas.title = "min " + lo.toPrecision(4) + ", max " + hi.toPrecision(4);
}

function drawSpectrum(canvas, values) {
  canvas.width = 120;
  canvas.height = 70;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const logs = values.map((s) => (s > 0 ? Math.log10(s) : null)).filter((x) => x !== null);
  if (!logs.length) return;
  const lo = Math.min(...logs), hi = Math.max(...logs);
  ctx.strokeStyle = "#1d4ed8";
  ctx.beginPath();
  values.forEach((s, k) => {
    const x = 4 + (k / Math.max(1, values.length - 1)) * (canvas.width - 8);
    const l = s > 0 ? Math.log10(s) : lo;
    const y = canvas.height - 4 - (hi > lo ? (l - lo) / (hi - lo) : 0.5) * (canvas.height - 8);
    if (k === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  canvas.title = "s_max " + values[0].toPrecision(4) + ", s_min " + values[values.length - 1].toPrecision(4);
}

function statsOf(report, name, layer, head) {
  const h = report.layers[layer].heads[head];
  return name === report.tensor ? h : h[name];
}

// One head's cell of a grid: a canvas (returned, to draw on) above its label.
function headCell(grid, id, text) {
  const cell = document.createElement("div");
  cell.className = "cell";
  const canvas = document.createElement("canvas");
  canvas.id = id;
  cell.appendChild(canvas);
  const label = document.createElement("span");
  label.textContent = text;
  cell.appendChild(label);
  grid.appendChild(cell);
  return canvas;
}

function renderDeductive() {
  const data = lastDeductive;
  if (!data) return;
  const name = $("tensor").value;
  const symmetric = $("symmetric").checked;
  const heat = $("heatmaps");
  const spectra = $("spectra");
  heat.innerHTML = "";
  spectra.innerHTML = "";
  heat.className = spectra.className = "grid";
  heat.style.gridTemplateColumns = spectra.style.gridTemplateColumns = "repeat(" + data.num_heads + ", max-content)";
  for (let l = 0; l < data.num_layers; l++) {
    for (let h = 0; h < data.num_heads; h++) {
      const stats = statsOf(data.report, name, l, h);
      const where = "L" + l + " H" + h;
      const map = headCell(heat, "heatmap-" + l + "-" + h, where + " rank " + stats.rank);
      drawHeatmap(map, data.tensors[name][l][h], symmetric);
      drawSpectrum(headCell(spectra, "spectrum-" + l + "-" + h, where), stats.singular_values);
    }
  }
  $("deductive-panel").dataset.drawn = name;
}

async function loadDeductive() {
  if (!modelId && !(await loadModel())) return;
  $("deductive-panel").hidden = false;
  delete $("deductive-panel").dataset.drawn;
  const name = $("tensor").value;
  const tensors = name === "G_LM" ? ["G_LM"] : ["G_LM", name];
  setStatus("deductive-status", "computing…");
  const resp = await fetch("/v1/deductive", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: modelId, prompt: $("prompt").value, tensors: tensors }),
  });
  if (!resp.ok) {
    setStatus("deductive-status", await errorText(resp), true);
    return;
  }
  lastDeductive = await resp.json();
  setStatus("deductive-status", lastDeductive.num_layers + " layers x " + lastDeductive.num_heads +
    " heads, dk = " + lastDeductive.dk + ", " + lastDeductive.prompt_ids.length + " prompt tokens");
  renderDeductive();
}

$("generate").addEventListener("click", generate);
$("stop-generation").addEventListener("click", () => controller && controller.abort());
$("deductive-button").addEventListener("click", loadDeductive);
$("tensor").addEventListener("change", () => {
  const name = $("tensor").value;
  if (lastDeductive && lastDeductive.tensors[name]) renderDeductive(); else loadDeductive();
});
$("symmetric").addEventListener("change", renderDeductive);
loadModel();
