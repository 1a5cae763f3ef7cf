// The review page of cxr-interpret: open an image, see findings, heatmaps, the audit's verdict and the top
// units, draw boxes (mouse, touch or keyboard) or judge the map, and send it to the service's /feedback.
// Plain browser JavaScript, no library, no build step. It calls only its own origin: /predict, /explain,
// /feedback, with "Authorization: Bearer <key>" when a key was given (kept in sessionStorage).
"use strict";

(() => {
  const KEY_STORE = "cxr-review-api-key";
  const $ = (id) => document.getElementById(id);
  const el = {
    keyForm: $("key-form"), key: $("api-key"), modelLine: $("model-line"), error: $("error"), status: $("status"),
    drop: $("drop"), file: $("file"), method: $("method"), opacity: $("opacity"), opacityValue: $("opacity-value"),
    stage: $("stage"), base: $("base"), overlay: $("overlay"), canvas: $("boxes"), caption: $("caption"),
    ood: $("ood"), findings: $("findings"), verdict: $("verdict"), units: $("units"),
    feedbackTarget: $("feedback-target"), addBox: $("add-box"), clearBoxes: $("clear-boxes"), boxList: $("box-list"),
    author: $("author"), sendBoxes: $("send-boxes"), mapOn: $("map-on"), mapOff: $("map-off"), sent: $("sent"),
  };
  const state = {
    file: null, image: null, finding: null, method: null, methods: [], boxes: [], selected: -1, drag: null,
    busy: false, request: 0,
  };

  // ---- service calls ------------------------------------------------------------------------------
  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function call(path, form) {
    let response;
    try {
      response = await fetch(path, { method: "POST", body: form, headers: authHeaders() });
    } catch (err) {
      throw new Error(`the service cannot be reached (${err.message})`);
    }
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (_) { body = null; }
    if (!response.ok) {
      const message = body && body.error ? body.error : (text || response.statusText);
      const error = new Error(`${path} answered ${response.status}: ${message}`);
      error.status = response.status;
      throw error;
    }
    if (body === null) throw new Error(`${path} answered something that is not JSON`);
    return body;
  }

  // ---- messages -----------------------------------------------------------------------------------
  function showError(err) {
    el.error.textContent = err.message || String(err);
    el.error.hidden = false;
    if (err.status === 401) el.key.focus();
  }
  function clearError() { el.error.hidden = true; el.error.textContent = ""; }
  function say(text) { el.status.textContent = text; }

  function setBusy(busy) {
    state.busy = busy;
    const ready = !busy && state.image !== null && state.finding !== null;
    el.method.disabled = busy || state.methods.length === 0;
    el.addBox.disabled = !ready;
    el.clearBoxes.disabled = !ready || state.boxes.length === 0;
    el.sendBoxes.disabled = !ready || state.boxes.length === 0;
    el.mapOn.disabled = !ready || !state.method;
    el.mapOff.disabled = !ready || !state.method;
    el.findings.querySelectorAll("input").forEach((input) => { input.disabled = busy; });
  }

  function node(tag, text, className) {
    const n = document.createElement(tag);
    if (text !== undefined && text !== null) n.textContent = text;
    if (className) n.className = className;
    return n;
  }
  const pct = (p) => `${(100 * p).toFixed(1)}%`;

  // ---- analysis -----------------------------------------------------------------------------------
  async function analyse(file) {
    clearError();
    state.file = file;
    state.image = null;
    state.finding = null;
    state.boxes = [];
    state.selected = -1;
    el.stage.hidden = true;  // nothing of the previous image stays under this one's name
    el.findings.hidden = true;
    el.ood.hidden = true;
    el.verdict.replaceChildren(node("p", "Waiting for the explanation ...", "muted"));
    el.units.replaceChildren();
    renderBoxes();
    const ticket = ++state.request;
    setBusy(true);
    say(`Analysing ${file.name} ...`);
    try {
      const form = new FormData();
      form.append("image", file, file.name);
      const prediction = await call("/predict", form);
      if (ticket !== state.request) return;
      state.image = prediction.image;
      renderModel(prediction);
      renderFindings(prediction.findings);
      renderOod(prediction);
      await explain(ticket);
    } catch (err) {
      if (ticket === state.request) { showError(err); say(""); }
    } finally {
      if (ticket === state.request) setBusy(false);
    }
  }

  async function explain(ticket = ++state.request) {
    clearError();
    setBusy(true);
    say(`Computing the ${state.method || "default"} map${state.finding ? ` of ${state.finding}` : ""} ...`);
    try {
      const form = new FormData();
      form.append("image", state.file, state.file.name);
      if (state.method) form.append("method", state.method);
      if (state.finding) form.append("targets", JSON.stringify([state.finding]));
      const result = await call("/explain", form);
      if (ticket !== state.request) return;
      renderExplanation(result);
      say(`${result.method} map of ${state.finding} shown (${result.cached ? "cached" : `${Math.round(result.explain_ms)} ms`}).`);
    } catch (err) {
      if (ticket === state.request) { showError(err); say(""); }
    } finally {
      if (ticket === state.request) setBusy(false);
    }
  }

  function renderModel(body) {
    const m = body.model || {};
    const alias = m.alias ? ` @${m.alias}` : "";
    const audit = body.audit_run_id ? `audit run ${body.audit_run_id}` : "no audit on record";
    el.modelLine.textContent = `Model ${m.name} version ${m.version}${alias}, ${audit}`;
  }

  function renderOod(body) {
    const ood = body.ood;
    if (ood && ood.flagged) {
      el.ood.textContent = ood.warning || `Unusual image for this model (OOD score ${ood.score.toFixed(1)} above ${ood.threshold.toFixed(1)})`;
      el.ood.hidden = false;
    } else {
      el.ood.hidden = true;
    }
  }

  function renderFindings(findings) {
    const body = el.findings.tBodies[0];
    body.replaceChildren();
    for (const f of findings) {
      const row = document.createElement("tr");
      const pick = node("td");
      const radio = document.createElement("input");
      radio.type = "radio";
      radio.name = "finding";
      radio.value = f.name;
      radio.id = `finding-${f.name}`;
      radio.setAttribute("aria-label", `Explain ${f.name}`);
      radio.addEventListener("change", () => {
        state.finding = f.name;
        state.boxes = [];
        state.selected = -1;
        renderBoxes();
        explain();
      });
      pick.append(radio);
      const name = node("td");
      const label = node("label", f.name);
      label.htmlFor = radio.id;
      name.append(label);
      const threshold = f.threshold === null || f.threshold === undefined
        ? node("td", f.threshold_reason || "no reliable threshold", "muted")
        : node("td", f.threshold.toFixed(2), "num");
      const callText = f.positive === null || f.positive === undefined ? "no call" : (f.positive ? "positive" : "negative");
      const callCell = node("td", callText, f.positive ? "pos" : (f.positive === false ? "neg" : "muted"));
      row.append(pick, name, node("td", pct(f.probability), "num"), threshold, callCell);
      body.append(row);
    }
    el.findings.hidden = false;
  }

  function renderMethods(methods, current) {
    if (methods.join() !== state.methods.join()) {
      state.methods = methods.slice();
      el.method.replaceChildren(...methods.map((m) => { const o = node("option", m); o.value = m; return o; }));
    }
    el.method.value = current;
    state.method = current;
  }

  function renderExplanation(result) {
    renderModel(result);
    renderOod(result);
    renderMethods(result.methods || [result.method], result.method);
    state.finding = result.targets[0];
    const radio = document.getElementById(`finding-${state.finding}`);
    if (radio) radio.checked = true;
    const heat = result.heatmaps[0];
    el.base.src = `data:image/png;base64,${result.image_png}`;
    el.overlay.src = `data:image/png;base64,${heat.overlay_png}`;
    el.overlay.alt = `${result.method} heatmap of ${heat.target} over the image`;
    el.canvas.width = heat.overlay_size[0];
    el.canvas.height = heat.overlay_size[1];
    el.stage.hidden = false;
    el.caption.textContent = `${heat.target}: ${result.method} map, probability ${pct(heat.probability)}; `
      + `image ${state.image.width} x ${state.image.height} px`;
    applyOpacity();
    renderVerdict(heat);
    renderUnits(heat.top_units || []);
    el.feedbackTarget.textContent = `Feedback on ${state.finding}: draw boxes where it is, or judge the ${result.method} map.`;
    renderBoxes();
  }

  function renderVerdict(heat) {
    const v = heat.verdict;
    el.verdict.replaceChildren();
    if (!v) {
      el.verdict.append(node("p", `No verdict: ${heat.verdict_reason || "the audit has none for this class"}`, "muted"));
      return;
    }
    const head = node("p");
    head.append(node("span", v.status === "fit" ? "Fit" : "Unfit", `verdict-${v.status}`),
      document.createTextNode(` for ${heat.target} (audited with ${v.audited_method || "?"}, audit ${v.audit_status || "?"})`));
    el.verdict.append(head);
    if (v.reasons && v.reasons.length) {
      const list = node("ul");
      v.reasons.forEach((r) => list.append(node("li", r)));
      el.verdict.append(list);
    }
    const crit = Object.entries(v.criteria || {});
    if (crit.length) el.verdict.append(node("p", crit.map(([k, s]) => `${k}: ${s}`).join("; "), "muted"));
  }

  function renderUnits(units) {
    el.units.replaceChildren();
    if (!units.length) {
      el.units.append(node("li", "No unit contributions for this model or finding.", "muted"));
      return;
    }
    for (const u of units) {
      const concepts = u.concepts && u.concepts.length
        ? `${u.concepts.join(", ")} (evidence: ${u.evidence ?? "?"} images)` : "no served concept";
      el.units.append(node("li", `unit ${u.unit} (contribution ${Number(u.contribution).toFixed(3)}): ${concepts}`));
    }
  }

  function applyOpacity() {
    const v = Number(el.opacity.value);
    el.overlay.style.opacity = String(v / 100);
    el.opacityValue.textContent = `${v}%`;
    el.opacity.setAttribute("aria-valuetext", `${v} percent`);
  }

  // ---- boxes (stored in pixels of the original image) ---------------------------------------------
  function scale() { return state.image ? state.image.width / el.canvas.width : 1; }
  function scaleY() { return state.image ? state.image.height / el.canvas.height : 1; }

  function toImage(event) {
    const r = el.canvas.getBoundingClientRect();
    const x = (event.clientX - r.left) / r.width * state.image.width;
    const y = (event.clientY - r.top) / r.height * state.image.height;
    return { x: Math.min(Math.max(x, 0), state.image.width), y: Math.min(Math.max(y, 0), state.image.height) };
  }

  function clampBox(b) {
    const W = state.image.width, H = state.image.height;
    const w = Math.min(Math.max(b.w, 1), W), h = Math.min(Math.max(b.h, 1), H);
    return { x: Math.min(Math.max(b.x, 0), W - w), y: Math.min(Math.max(b.y, 0), H - h), w, h };
  }

  function hit(p) {
    for (let i = state.boxes.length - 1; i >= 0; i--) {
      const b = state.boxes[i];
      if (p.x >= b.x && p.x <= b.x + b.w && p.y >= b.y && p.y <= b.y + b.h) return i;
    }
    return -1;
  }

  function draw() {
    const ctx = el.canvas.getContext("2d");
    ctx.clearRect(0, 0, el.canvas.width, el.canvas.height);
    const sx = scale(), sy = scaleY();
    const line = Math.max(2, Math.round(el.canvas.width / 300));
    state.boxes.forEach((b, i) => {
      ctx.lineWidth = i === state.selected ? line * 2 : line;
      ctx.strokeStyle = i === state.selected ? "#ffd400" : "#00e5ff";
      ctx.setLineDash(i === state.selected ? [] : [line * 3, line * 2]);
      ctx.strokeRect(b.x / sx, b.y / sy, b.w / sx, b.h / sy);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.font = `${Math.max(12, Math.round(el.canvas.width / 40))}px sans-serif`;
      ctx.fillText(String(i + 1), b.x / sx + line * 2, b.y / sy + Math.max(12, el.canvas.width / 40));
    });
  }

  function renderBoxes() {
    el.boxList.replaceChildren();
    state.boxes.forEach((b, i) => {
      const item = node("li", `Box ${i + 1}: x ${Math.round(b.x)}, y ${Math.round(b.y)}, ${Math.round(b.w)} x ${Math.round(b.h)} px `);
      if (i === state.selected) item.classList.add("selected");
      const select = node("button", "Select");
      select.type = "button";
      select.setAttribute("aria-label", `Select box ${i + 1} (then move it with the arrow keys on the drawing area)`);
      select.addEventListener("click", () => { state.selected = i; renderBoxes(); el.canvas.focus(); });
      const remove = node("button", "Remove");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove box ${i + 1}`);
      remove.addEventListener("click", () => { removeBox(i); });
      item.append(select, remove);
      el.boxList.append(item);
    });
    draw();
    setBusy(state.busy);
  }

  function removeBox(i) {
    state.boxes.splice(i, 1);
    state.selected = state.boxes.length ? Math.min(i, state.boxes.length - 1) : -1;
    renderBoxes();
  }

  el.canvas.addEventListener("pointerdown", (event) => {
    if (!state.image || state.finding === null || state.busy) return;
    event.preventDefault();
    el.canvas.setPointerCapture(event.pointerId);
    const p = toImage(event);
    const i = hit(p);
    if (i >= 0) {
      state.selected = i;
      state.drag = { mode: "move", start: p, box: { ...state.boxes[i] } };
    } else {
      state.boxes.push({ x: p.x, y: p.y, w: 0, h: 0 });
      state.selected = state.boxes.length - 1;
      state.drag = { mode: "draw", start: p };
    }
    renderBoxes();
  });

  el.canvas.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    const p = toImage(event);
    const d = state.drag;
    if (d.mode === "draw") {
      state.boxes[state.selected] = { x: Math.min(p.x, d.start.x), y: Math.min(p.y, d.start.y),
        w: Math.abs(p.x - d.start.x), h: Math.abs(p.y - d.start.y) };
    } else {
      state.boxes[state.selected] = clampBox({ ...d.box, x: d.box.x + p.x - d.start.x, y: d.box.y + p.y - d.start.y });
    }
    draw();
  });

  function endDrag() {
    if (!state.drag) return;
    const b = state.boxes[state.selected];
    const tiny = 3 * scale();  // a click, not a box: under 3 displayed pixels
    if (state.drag.mode === "draw" && (b.w < tiny || b.h < tiny)) {
      state.boxes.splice(state.selected, 1);
      state.selected = -1;
    } else {
      state.boxes[state.selected] = clampBox(b);
    }
    state.drag = null;
    renderBoxes();
  }
  el.canvas.addEventListener("pointerup", endDrag);
  el.canvas.addEventListener("pointercancel", endDrag);

  el.canvas.addEventListener("keydown", (event) => {
    if (state.selected < 0 || !state.image) return;
    const step = Math.max(1, Math.round(state.image.width / 100)) * (event.altKey ? 5 : 1);
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    const b = { ...state.boxes[state.selected] };
    if (event.key in moves) {
      const [dx, dy] = moves[event.key];
      if (event.shiftKey) { b.w += dx; b.h += dy; } else { b.x += dx; b.y += dy; }
      state.boxes[state.selected] = clampBox(b);
      renderBoxes();
      event.preventDefault();
    } else if (event.key === "Delete" || event.key === "Backspace") {
      removeBox(state.selected);
      event.preventDefault();
    }
  });

  el.addBox.addEventListener("click", () => {
    const W = state.image.width, H = state.image.height;
    state.boxes.push(clampBox({ x: W * 0.375, y: H * 0.375, w: W / 4, h: H / 4 }));
    state.selected = state.boxes.length - 1;
    renderBoxes();
    el.canvas.focus();
    say("Box added in the middle: move it with the arrow keys, resize it with Shift+arrows.");
  });
  el.clearBoxes.addEventListener("click", () => { state.boxes = []; state.selected = -1; renderBoxes(); });

  // ---- feedback -----------------------------------------------------------------------------------
  async function send(fields, describe) {
    clearError();
    setBusy(true);
    say(`Sending ${describe} ...`);
    try {
      const form = new FormData();
      form.append("image", state.file, state.file.name);
      form.append("finding", state.finding);
      for (const [k, v] of Object.entries(fields)) form.append(k, v);
      const author = el.author.value.trim();
      if (author) form.append("author", author);
      const record = await call("/feedback", form);
      const item = node("li");
      item.append(document.createTextNode(`${record.finding}: ${describe} (${state.file.name}), record `),
        node("code", record.id));
      item.dataset.recordId = record.id;
      el.sent.append(item);
      say(`Stored as record ${record.id}.`);
      return record;
    } catch (err) {
      showError(err);
      say("");
      return null;
    } finally {
      setBusy(false);
    }
  }

  el.sendBoxes.addEventListener("click", async () => {
    const boxes = state.boxes.map((b) => [b.x, b.y, b.w, b.h].map((v) => Math.round(v * 10) / 10));
    const n = boxes.length;
    const record = await send({ boxes: JSON.stringify(boxes) }, `${n} box${n === 1 ? "" : "es"}`);
    if (record) { state.boxes = []; state.selected = -1; renderBoxes(); }
  });
  el.mapOn.addEventListener("click", () => send({ judgement: "on", method: state.method }, `${state.method} map on the finding`));
  el.mapOff.addEventListener("click", () => send({ judgement: "off", method: state.method }, `${state.method} map off the finding`));

  // ---- inputs -------------------------------------------------------------------------------------
  el.file.addEventListener("change", () => { if (el.file.files.length) analyse(el.file.files[0]); });
  el.drop.addEventListener("dragover", (event) => { event.preventDefault(); el.drop.classList.add("over"); });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    el.drop.classList.remove("over");
    if (event.dataTransfer.files.length) analyse(event.dataTransfer.files[0]);
  });
  el.method.addEventListener("change", () => { state.method = el.method.value; explain(); });
  el.opacity.addEventListener("input", applyOpacity);
  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.key.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    say(key ? "API key set for this browser tab." : "API key cleared.");
    if (state.file) analyse(state.file);
  });
  el.key.value = sessionStorage.getItem(KEY_STORE) || "";
  setBusy(false);
})();
