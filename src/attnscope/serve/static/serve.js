// attnscope serve: the page. Plain JavaScript, no network beyond this server's /api.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVGNS = "http://www.w3.org/2000/svg";
const S = { info: null, neurons: [], byIndex: new Map(), neuron: null, analysis: null, text: null,
            evidence: null, contrast: null, neuronCard: null };

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function sv(tag, attrs = {}, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const nname = (k) => `L0N${k}`;  // TransformerLens-style neuron name: layer 0, neuron k
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(d);
const showTok = (t) => t.replace(/\n/g, "↵").replace(/\t/g, "⇥");

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let d = null;
  try { d = await r.json(); } catch (_e) { d = { error: `the server answered ${r.status} without JSON` }; }
  if (!r.ok) throw new Error(d.error || `the server answered ${r.status}`);
  return d;
}

function message(sel, text) {
  const m = $(sel);
  m.hidden = !text;
  m.textContent = text || "";
}

// ---------------------------------------------------------------- colours
function colour(v, scale) {
  if (!scale || v === null) return "transparent";
  const a = Math.max(-1, Math.min(1, v / scale));
  const [r, g, b] = a >= 0 ? [214, 39, 40] : [31, 119, 180];
  return `rgba(${r},${g},${b},${Math.abs(a) * 0.85})`;
}

// ---------------------------------------------------------------- neuron table
function renderTable() {
  const q = $("#neuron-search").value.trim().toLowerCase();
  const tb = $("#neuron-table tbody");
  tb.replaceChildren();
  let shown = 0;
  for (const n of S.neurons) {
    const hay = [String(n.index), n.label || "", n.label_negative || "", ...n.top_positive, ...n.top_negative]
      .join("\u0001").toLowerCase();
    if (q && !(String(n.index) === q || hay.includes(q))) continue;
    if (++shown > 400) continue;
    const tr = el("tr", { "data-neuron": n.index, tabindex: "0", "aria-label": `choose ${nname(n.index)}` });
    if (n.index === S.neuron) tr.classList.add("selected");
    tr.append(el("td", { class: "num" }, n.rank), el("td", {}, nname(n.index)),
              el("td", { class: "num" }, fmt(n.score, 2)), el("td", {}, (n.selected ? "✓ " : "") + (n.label || "")),
              el("td", { class: "tok-list" }, n.top_positive.slice(0, 6).map(showTok).join(" | ")),
              el("td", { class: "tok-list" }, n.top_negative.slice(0, 6).map(showTok).join(" | ")),
              el("td", { class: "num" }, n.r === null ? "" : fmt(n.r, 2)));
    tr.addEventListener("click", () => chooseNeuron(n.index, true));
    tr.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); chooseNeuron(n.index, true); }
    });
    tb.append(tr);
  }
  $("#neuron-count").textContent = `${shown} of ${S.neurons.length} neurons` + (shown > 400 ? " (first 400 shown)" : "");
}

async function chooseNeuron(k, reanalyse) {
  if (!S.byIndex.has(k)) {
    message("#message", `neuron ${k} does not exist: this model's layer-0 MLP has ${S.neurons.length} neurons, ` +
            `numbered 0..${S.neurons.length - 1}; pick one from the table`);
    return false;
  }
  const changed = S.neuron !== null && S.neuron !== k;
  S.neuron = k;
  $("#neuron-input").value = k;
  for (const tr of document.querySelectorAll("#neuron-table tbody tr"))
    tr.classList.toggle("selected", Number(tr.dataset.neuron) === k);
  try {
    S.neuronCard = await api(`/api/neuron/${k}`);
    renderNeuronCard();
  } catch (e) { message("#message", e.message); }
  if (reanalyse && S.text) await analyse();
  if (changed && S.contrast) await runContrast();  // every panel follows the chosen neuron
  updateShare();
  return true;
}

function renderNeuronCard() {
  const n = S.neuronCard;
  const card = $("#neuron-card");
  card.replaceChildren();
  card.append(el("p", {}, `${nname(n.index)} (layer 0, neuron ${n.index}): rank ${n.rank}, ${S.info.score} ${fmt(n.score, 2)}` +
    (n.selected ? `, label “${n.label || "none"}”, held-out r = ${fmt(n.r, 2)}, FVU = ${fmt(n.fvu, 2)}` : ", not selected")));
  const cols = el("div", { class: "cols" });
  card.append(el("p", { class: "note", id: "score-definition" }, n.score_definition + " (the same numbers as the " +
                  "report's card)."));
  for (const [title, list] of [["highest token scores", n.top_positive_scores],
                               ["lowest token scores", n.top_negative_scores]]) {
    const d = el("div");
    d.append(el("strong", {}, title), el("div", { class: "tok-list" },
      list.slice(0, 12).map(([t, v]) => `${showTok(t).padEnd(14)} ${fmt(v, 3)}`).join("\n")));
    cols.append(d);
  }
  card.append(cols);
}

// ---------------------------------------------------------------- kernels
function renderKernels() {
  const c = S.info.circuit, svg = $("#kernel-svg");
  const W = 640, H = 220, L = 50, R = 110, T = 14, B = 34;
  const names = Object.keys(c.kernels_by_offset);
  const n = c.kernels_by_offset.shared.length;
  const ymax = Math.max(...names.map((k) => Math.max(...c.kernels_by_offset[k]))) || 1;
  const x = (i) => L + (i / Math.max(1, n - 1)) * (W - L - R), y = (v) => T + (1 - v / ymax) * (H - T - B);
  svg.replaceChildren(sv("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }));
  const pal = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
  names.forEach((k, j) => {
    const pts = c.kernels_by_offset[k].map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const shared = k === "shared";
    svg.append(sv("polyline", { points: pts, fill: "none", stroke: shared ? "#000" : pal[j % pal.length],
                                "stroke-width": shared ? 2.2 : 1.2, "stroke-dasharray": shared ? "5 3" : "" }));
    svg.append(sv("text", { x: W - R + 8, y: T + 12 + 14 * j, "font-size": 11, fill: shared ? "#000" : pal[j % pal.length] },
                  shared ? "shared K" : k));
  });
  svg.append(sv("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#555" }),
             sv("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#555" }),
             sv("text", { x: L, y: H - 8, "font-size": 11 }, `offset n − i (query n = ${c.kernel_query_position})`),
             sv("text", { x: L - 4, y: T + 8, "font-size": 10, "text-anchor": "end" }, fmt(ymax, 3)),
             sv("text", { x: L - 4, y: H - B, "font-size": 10, "text-anchor": "end" }, "0"));
  $("#heads-note").textContent = `Layer-0 heads ${c.heads.map((h) => "H" + h).join(", ")} form the contextual circuit ` +
    `(calibration ${c.calibration}, context ${c.context} tokens, positions n < ${c.min_position} are the kernel's warm-up). ` +
    c.decisions.map((d) => `H${d.head}: N_eff ${fmt(d.n_eff, 1)}, CV(Z) ${fmt(d.denominator_cv, 3)}`).join("; ") + ".";
  const tb = $("#circuit-conditions tbody");
  for (const k of c.conditions)
    tb.append(rowOf([k.name, fmt(k.measured), fmt(k.threshold, 3), k.ok ? "yes" : "no"], [0, 1, 1, 0], k.ok));
}

function rowOf(cells, numeric, ok) {
  const tr = el("tr");
  cells.forEach((c, i) => {
    const td = el("td", numeric[i] ? { class: "num" } : {}, c);
    if (c === "yes" || c === "no") td.className = ok ? "yes" : "no";
    tr.append(td);
  });
  return tr;
}

// ---------------------------------------------------------------- analysis
async function analyse() {
  const text = $("#text-input").value;
  message("#message", "");
  if (!text.trim()) { message("#message", "The text is empty: type, paste or upload some text."); return; }
  if (text.length > S.info.max_chars) {
    message("#message", `The text has ${text.length} characters, more than ${S.info.max_chars}; analyse a shorter excerpt.`);
    return;
  }
  const k = Number($("#neuron-input").value);
  if (!Number.isInteger(k) || !S.byIndex.has(k)) {
    message("#message", `Neuron ${$("#neuron-input").value || "(none)"} does not exist: this model's layer-0 MLP has ` +
            `${S.neurons.length} neurons, numbered 0..${S.neurons.length - 1}.`);
    return;
  }
  if (k !== S.neuron) await chooseNeuron(k, false);
  $("#busy").hidden = false;
  try {
    S.analysis = await api("/api/analyse", { text, neuron: k });
    S.text = text;
    S.evidence = null;
    renderAnalysis();
    const p = S.analysis.early.findIndex((e) => !e);
    await showEvidence(p >= 0 ? peakPosition() : S.analysis.n_tokens - 1);
  } catch (e) { message("#message", e.message); } finally { $("#busy").hidden = true; }
  updateShare();
}

function peakPosition() {
  const a = S.analysis;
  let best = a.n_tokens - 1, bv = -Infinity;
  a.true.forEach((v, i) => { if (!a.early[i] && v > bv) { bv = v; best = i; } });
  return best;
}

function renderAnalysis() {
  const a = S.analysis;
  $("#result").hidden = false;
  $("#conditions-section").hidden = false;
  $("#evidence-section").hidden = false;
  const wn = $("#window-note");
  wn.hidden = !a.window_note;
  wn.textContent = a.window_note || "";
  $("#predicted-note").textContent = `${nname(a.neuron)}. True = the model's own layer-0 MLP pre-activation. ` +
    `Predicted (${S.info.explanation.kind}): ${S.info.explanation.description}. Shaded: early positions ` +
    `(n < ${a.min_position}), outside the explanation's scope.`;
  const f = a.fit;
  $("#fit-line").textContent = `Over the ${f.n} positions n ≥ ${a.min_position}: r = ${fmt(f.r)}, FVU = ${fmt(f.fvu)}, ` +
    `mean |true − predicted| = ${fmt(f.mae)}; mean true ${fmt(mean(a.true))}, mean predicted ${fmt(mean(a.pred))}.`;
  renderVerdictVsFit();
  $("#attention-section").hidden = false;
  if (S.attention && S.attention.text !== S.text) { S.attention = null; $("#attn-result").hidden = true; }
  renderPlot();
  renderTokens();
  renderConditions();
}
const mean = (xs) => xs.reduce((s, v) => s + v, 0) / Math.max(1, xs.length);

function renderPlot() {
  const a = S.analysis, svg = $("#plot-svg");
  const W = 900, H = 280, L = 56, R = 14, T = 24, B = 36, n = a.n_tokens;
  let lo = Math.min(0, ...a.true, ...a.pred), hi = Math.max(0, ...a.true, ...a.pred);
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const pad = 0.05 * (hi - lo); lo -= pad; hi += pad;
  const x = (i) => L + (n === 1 ? 0.5 : i / (n - 1)) * (W - L - R), y = (v) => T + (hi - v) / (hi - lo) * (H - T - B);
  svg.replaceChildren(sv("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }));
  Object.assign(svg.dataset, { ymin: lo, ymax: hi, top: T, bottom: H - B, left: L, right: W - R, n });
  const nEarly = a.early.filter(Boolean).length;
  if (nEarly) svg.append(sv("rect", { x: L, y: T, width: Math.max(2, x(nEarly - 1) - L), height: H - T - B, fill: "#eee" }));
  for (const w of a.windows.slice(1))
    svg.append(sv("line", { x1: x(w.report_from), x2: x(w.report_from), y1: T, y2: H - B, stroke: "#999", "stroke-dasharray": "3 3" }));
  svg.append(sv("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#bbb" }));
  const line = (vals, id, stroke, dash) => sv("polyline", { id, fill: "none", stroke, "stroke-width": 1.6,
    "stroke-dasharray": dash, points: vals.map((v, i) => `${x(i).toFixed(2)},${y(v).toFixed(2)}`).join(" ") });
  svg.append(line(a.true, "plot-true", "#111", ""), line(a.pred, "plot-pred", "#d62728", "5 3"));
  svg.append(sv("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#555" }),
             sv("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#555" }));
  let lastY = -100;
  for (const v of [hi - pad, 0, lo + pad]) {  // axis labels, skipping any that would overlap
    if (Math.abs(y(v) - lastY) < 14) continue;
    lastY = y(v);
    svg.append(sv("text", { x: L - 5, y: y(v) + 4, "font-size": 10, "text-anchor": "end" }, fmt(v, 2)));
  }
  svg.append(sv("text", { x: L, y: H - 10, "font-size": 11 }, `token position (0..${n - 1})`),
             sv("text", { x: L, y: 14, "font-size": 12, "font-weight": 600 }, `${nname(a.neuron)}: pre-activation per token`),
             sv("line", { x1: W - 250, x2: W - 225, y1: 10, y2: 10, stroke: "#111", "stroke-width": 1.6 }),
             sv("text", { x: W - 220, y: 14, "font-size": 11 }, "true"),
             sv("line", { x1: W - 170, x2: W - 145, y1: 10, y2: 10, stroke: "#d62728", "stroke-width": 1.6, "stroke-dasharray": "5 3" }),
             sv("text", { x: W - 140, y: 14, "font-size": 11 }, "predicted"));
  svg.append(sv("text", { x: 14, y: (T + H - B) / 2, "font-size": 10, "text-anchor": "middle",
                          transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "pre-activation"));
  svg.append(sv("line", { id: "plot-evidence", x1: -10, x2: -10, y1: T, y2: H - B, stroke: "#0b5cad",
                          "stroke-width": 2, "stroke-dasharray": "2 2", visibility: "hidden" }),
             sv("text", { id: "plot-evidence-label", x: -10, y: H - B - 4, "font-size": 10, fill: "#0b5cad" }, ""));
  S.plotX = x;
  const cursor = sv("line", { id: "plot-cursor", x1: -10, x2: -10, y1: T, y2: H - B, stroke: "#0b5cad" });
  const label = sv("text", { id: "plot-label", x: L + 8, y: T + 12, "font-size": 11, fill: "#0b5cad" });
  svg.append(cursor, label);
  const at = (ev) => {
    const r = svg.getBoundingClientRect();
    return Math.max(0, Math.min(n - 1, Math.round(((ev.clientX - r.left) * W / r.width - L) / (W - L - R) * (n - 1))));
  };
  svg.onmousemove = (ev) => {
    const i = at(ev);
    cursor.setAttribute("x1", x(i)); cursor.setAttribute("x2", x(i));
    label.textContent = `${i} “${showTok(a.tokens[i])}”: true ${fmt(a.true[i])}, predicted ${fmt(a.pred[i])}`;
  };
  svg.onclick = (ev) => showEvidence(at(ev));
}

function renderTokens() {
  const a = S.analysis, box = $("#coloured-text");
  const mode = document.querySelector("input[name=colour]:checked").value;
  box.replaceChildren();
  let vals = mode === "pred" ? a.pred : a.true;
  let scale = Math.max(...a.true.map(Math.abs), ...a.pred.map(Math.abs));
  const ev = S.evidence;
  if (mode === "evidence" && ev) {
    vals = a.tokens.map((_, i) => (i >= ev.first_token && i - ev.first_token < ev.contributions.length)
      ? ev.contributions[i - ev.first_token] : null);
    scale = Math.max(1e-12, ...ev.contributions.map(Math.abs));
  }
  renderColourLegend(mode, scale);
  a.tokens.forEach((t, i) => {
    const s = el("span", { class: "tok", "data-i": i, tabindex: ev && i === ev.position ? "0" : "-1" }, t);
    if (a.early[i]) s.classList.add("early");
    if (mode === "evidence" && vals[i] === null) s.classList.add("outside");
    if (ev && i === ev.position) s.classList.add("chosen");
    s.style.background = colour(vals[i], scale);
    s.title = `#${i} ${JSON.stringify(t)}  true ${fmt(a.true[i])}  predicted ${fmt(a.pred[i])} (pre-activation)` +
      (mode === "evidence" && vals[i] !== null ? `  contribution ${fmt(vals[i], 4)}` : "");
    box.append(s);
  });
  if (!ev && box.firstChild) box.firstChild.tabIndex = 0;
}

function renderColourLegend(mode, scale) {
  const what = mode === "evidence" ? "contribution K_n(i) × S[x_i, k] at the chosen position"
    : `${mode === "pred" ? "predicted" : "true"} pre-activation of ${nname(S.analysis.neuron)}`;
  const box = $("#colour-legend");
  box.replaceChildren(el("span", { class: "num" }, fmt(-scale, 2)),
    el("span", { class: "bar", style: `background: linear-gradient(90deg, ${colour(-scale, scale)}, transparent, ` +
                                      `${colour(scale, scale)})` }),
    el("span", { class: "num" }, "+" + fmt(scale, 2)),
    el("span", { class: "note" }, ` colour = ${what}; blue below 0, red above; ` +
                                   "dotted underline = early position (outside scope)"));
  box.dataset.scale = scale;
}

function renderVerdictVsFit() {
  const a = S.analysis, f = a.fit, v = $("#verdict-fit");
  const good = f.r !== null && f.r >= 0.9;
  v.hidden = a.in_scope || !good;
  v.textContent = v.hidden ? "" : `The verdict and the fit disagree on this text: the conditions put it outside the ` +
    `explanation's scope, yet the prediction fits (r = ${fmt(f.r)} over ${f.n} positions). The verdict is the ` +
    `claim: outside its conditions the explanation makes no promise, and a good fit here is measured, not explained.`;
}

async function showEvidence(pos) {
  const a = S.analysis;
  if (!a || !S.text) return;
  if (!Number.isInteger(pos) || pos < 0 || pos >= a.n_tokens) {
    message("#message", `Position ${pos} is outside the text: choose 0..${a.n_tokens - 1}.`);
    return;
  }
  try {
    S.evidence = await api("/api/evidence", { text: S.text, neuron: a.neuron, position: pos });
  } catch (e) { message("#message", e.message); return; }
  const ev = S.evidence;
  markEvidence(pos);
  $("#evidence-pos").value = pos;
  $("#evidence-token").textContent = `token “${showTok(a.tokens[pos])}”` + (a.early[pos] ? " (early position: outside scope)" : "");
  const sumC = ev.contributions.reduce((s, v) => s + v, 0) + (ev.bos_contribution || 0);
  $("#evidence-sum").textContent = `predicted ${fmt(ev.prediction)} = Σ kernel weight × token score ${fmt(sumC)}` +
    (ev.has_bos ? ` (BOS ${fmt(ev.bos_contribution)})` : "") +
    ev.terms.map(([name, v]) => ` + ${name} ${fmt(v)}`).join("") + `;  true ${fmt(a.true[pos])}.`;
  const rows = ev.contributions.map((c, j) => [j + ev.first_token, c, ev.kernel[j], ev.scores[j]])
    .sort((p, q) => Math.abs(q[1]) - Math.abs(p[1])).slice(0, 15);
  const tb = $("#evidence-table tbody");
  tb.replaceChildren();
  for (const [i, c, k, s] of rows)
    tb.append(rowOf([String(i), showTok(a.tokens[i]), fmt(k, 4), fmt(s, 3), fmt(c, 4)], [1, 0, 1, 1, 1]));
  renderTokens();
}

function markEvidence(pos) {
  const line = $("#plot-evidence"), lab = $("#plot-evidence-label");
  if (!line || !S.plotX) return;
  const xp = S.plotX(pos);
  for (const k of ["x1", "x2"]) line.setAttribute(k, xp);
  line.setAttribute("visibility", "visible");
  line.dataset.position = pos;
  lab.setAttribute("x", xp + 3);
  lab.textContent = `evidence at ${pos}`;
}

function renderConditions() {
  const a = S.analysis, b = $("#scope-banner");
  b.textContent = a.scope_message;
  b.className = a.in_scope ? "inside" : "outside";
  const tb = $("#conditions-table tbody");
  tb.replaceChildren();
  for (const c of a.conditions)
    tb.append(rowOf([c.name, c.holds_when, fmt(c.measured), fmt(c.threshold, 3), c.ok ? "yes" : "no", c.detail],
                    [0, 0, 1, 1, 0, 0], c.ok));
}

// ---------------------------------------------------------------- attention on the user's text
function attnColour(v, vmax) {
  const a = Math.max(0, Math.min(1, v / vmax));
  return [Math.round(255 - a * 244), Math.round(255 - a * 163), Math.round(255 - a * 82)];
}
function drawMatrix(canvas, rows, n, vmax) {
  canvas.width = n; canvas.height = n;
  const g = canvas.getContext("2d"), img = g.createImageData(n, n);
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
    const [r, gg, b] = k <= q ? attnColour(rows[q][k], vmax) : [245, 245, 245];
    const o = 4 * (q * n + k);
    img.data[o] = r; img.data[o + 1] = gg; img.data[o + 2] = b; img.data[o + 3] = 255;
  }
  g.putImageData(img, 0, 0);
}
async function showAttention() {
  message("#attn-message", "");
  if (!S.text) { message("#attn-message", "Analyse a text first."); return; }
  const head = Number($("#attn-head").value);
  try {
    S.attention = { ...(await api("/api/attention", { text: S.text, head })), text: S.text };
  } catch (e) { message("#attn-message", e.message); return; }
  const d = S.attention, n = d.n;
  let vmax = 1e-9;
  for (const m of [d.true, d.reconstruction]) for (const row of m) for (const v of row) vmax = Math.max(vmax, v);
  drawMatrix($("#attn-true"), d.true, n, vmax);
  drawMatrix($("#attn-recon"), d.reconstruction, n, vmax);
  $("#attn-result").hidden = false;
  $("#attn-result").dataset.head = d.head;
  const lg = $("#attn-legend");
  lg.replaceChildren(el("span", { class: "num" }, "0"),
    el("span", { class: "bar", style: `background: linear-gradient(90deg, rgb(255,255,255), rgb(${attnColour(1, 1)}))` }),
    el("span", { class: "num" }, fmt(vmax, 3)),
    el("span", { class: "note" }, " colour = attention weight of query n (row) on key i (column), same scale in both; " +
                                   "grey: future keys (causal mask)"));
  lg.dataset.vmax = vmax;
  let worst = d.min_position < n ? d.min_position : 0;
  for (let q = worst; q < n; q++) if (d.tv[q] > d.tv[worst]) worst = q;
  $("#attn-tv").textContent = `L0H${d.head} on the first ${n} tokens` + (d.truncated ? ` (of ${d.n_text_tokens})` : "") +
    `: TV(true, reconstruction) median ${fmt(d.tv_median)} over queries n ≥ ${d.min_position}, worst ` +
    `${fmt(d.tv[worst])} at query ${worst} “${showTok(d.tokens[worst])}” (0 = identical patterns, 1 = disjoint).`;
}
function attnHover(ev) {
  const d = S.attention;
  if (!d) return;
  const r = ev.target.getBoundingClientRect();
  const k = Math.floor((ev.clientX - r.left) / r.width * d.n), q = Math.floor((ev.clientY - r.top) / r.height * d.n);
  if (q < 0 || q >= d.n || k < 0 || k > q) { $("#attn-hover").textContent = ""; return; }
  $("#attn-hover").textContent = `query ${q} “${showTok(d.tokens[q])}”, key ${k} “${showTok(d.tokens[k])}”: true ` +
    `${fmt(d.true[q][k], 4)}, reconstruction ${fmt(d.reconstruction[q][k], 4)}; TV at this query ${fmt(d.tv[q])}`;
}

// ---------------------------------------------------------------- contrast
async function runContrast() {
  const A = $("#text-a").value, B = $("#text-b").value;
  message("#contrast-message", "");
  if (!A.trim() || !B.trim()) { message("#contrast-message", "Both texts are needed: fill text A and text B."); return; }
  try {
    S.contrast = await api("/api/contrast", { text_a: A, text_b: B, neuron: S.neuron, top: 10, verify: true });
  } catch (e) { message("#contrast-message", e.message); return; }
  const c = S.contrast;
  $("#contrast-result").hidden = false;
  const tb = $("#contrast-table tbody");
  tb.replaceChildren();
  for (const [name, s] of [["A", c.a], ["B", c.b]])
    tb.append(rowOf([name, String(s.n_tokens), fmt(s.mean_true), fmt(s.mean_pred),
                     s.in_scope ? "yes" : "no"], [0, 1, 1, 1, 0], s.in_scope));
  $("#contrast-result").dataset.neuron = c.neuron;
  $("#contrast-effect").textContent = `${nname(c.neuron)}: effect size d (A vs B, over positions n ≥ ` +
    `${S.info.circuit.min_position}) true ${fmt(c.d_true, 2)}, predicted ${fmt(c.d_pred, 2)}. Of the top ${c.top.length} ` +
    `separating neurons, the prediction has the true sign for ${c.top_same_sign}.`;
  const v = c.verification, nc = v && v.noise_ceiling;
  $("#contrast-verify").textContent = v ? `Every neuron, like for like (prediction from the token counts of the ` +
    `${v.n_windows_a} + ${v.n_windows_b} windows the truth is measured on): Spearman ${fmt(v.like_for_like.spearman)}; ` +
    `noise ceiling ${nc ? fmt(nc.spearman_brown) : "– (fewer than two windows a side)"}; token-mean predictor ` +
    `${fmt(v.token_mean.spearman)}; token-shuffled null ${fmt(v.shuffled_null.spearman)}; R-precision ` +
    `${v.like_for_like.r_precision === null ? "–" : fmt(v.like_for_like.r_precision, 2)} (${v.n_true} neurons ` +
    `with true |d| ≥ 1).` : "";
  $("#contrast-scope").textContent = (c.out_of_scope ? "Contrast OUT OF SCOPE" : "Contrast in scope") +
    " (token counts and weights only; any failing condition of the flag puts it out): " +
    (c.scope || []).map((k) => `${k.name} ${fmt(k.measured, 3)} (${k.holds_when} ${fmt(k.threshold, 3)}: ` +
                              `${k.ok ? "holds" : "fails"}${k.in_flag ? "" : ", measured only"})`).join("; ") + ".";
  const top = $("#contrast-top tbody");
  top.replaceChildren();
  for (const r of c.top) {
    const tr = rowOf([nname(r.neuron), S.byIndex.get(r.neuron).label || "", fmt(r.d_true, 2), fmt(r.d_pred, 2),
                      fmt(r.mean_true_a), fmt(r.mean_true_b)], [1, 0, 1, 1, 1, 1]);
    tr.style.cursor = "pointer";
    tr.tabIndex = 0;
    tr.addEventListener("click", () => chooseNeuron(r.neuron, true));
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") chooseNeuron(r.neuron, true); });
    top.append(tr);
  }
  updateShare();
}

// ---------------------------------------------------------------- export
function shareURL() {
  const p = new URLSearchParams({ model: S.info.model.name, neuron: String(S.neuron) });
  if (S.text) p.set("text", S.text);
  if ($("#text-a").value) p.set("a", $("#text-a").value);
  if ($("#text-b").value) p.set("b", $("#text-b").value);
  return `${location.origin}${location.pathname}#${p.toString()}`;
}
function updateShare() {
  if (!S.info) return;
  const u = shareURL();
  $("#share-url").value = u;
  history.replaceState(null, "", u);
}
function download(name, blob) {
  const u = URL.createObjectURL(blob), a = el("a", { href: u, download: name });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(u), 1000);
}
function exportJSON() {
  const d = { model: S.info.model, explanation: S.info.explanation, neuron: S.neuronCard, analysis: S.analysis,
              evidence: S.evidence, contrast: S.contrast, url: shareURL() };
  download(`attnscope-${nname(S.neuron)}.json`, new Blob([JSON.stringify(d, null, 1)], { type: "application/json" }));
}
function wrapLines(g, text, width, maxLines) {
  const out = [];
  for (const para of text.split("\n")) {
    let line = "";
    for (const word of para.split(/(\s+)/)) {
      if (g.measureText(line + word).width > width && line) { out.push(line); line = word.trimStart(); } else line += word;
      if (out.length >= maxLines) break;
    }
    out.push(line);
    if (out.length >= maxLines) break;
  }
  if (out.length > maxLines) out.length = maxLines;
  return out;
}

function pngCaption() {
  const a = S.analysis, f = a.fit;
  return { title: `${S.info.model.name} · ${nname(a.neuron)} · predicted = ${S.info.explanation.kind}`,
           fit: `Fit over the ${f.n} positions n ≥ ${a.min_position}: r = ${fmt(f.r)}, FVU = ${fmt(f.fvu)}, ` +
                `mean |true − predicted| = ${fmt(f.mae)}`,
           verdict: a.scope_message, text: S.text };
}

function exportPNG() {
  if (!S.analysis) { message("#message", "Nothing to export yet: analyse a text first."); return; }
  const svg = $("#plot-svg"), W = 900, H = 280, k = 2, cap = pngCaption();
  const clone = svg.cloneNode(true);
  clone.setAttribute("xmlns", SVGNS);
  clone.setAttribute("width", W); clone.setAttribute("height", H);
  for (const id of ["plot-cursor", "plot-label"]) clone.querySelector("#" + id)?.remove();
  const img = new Image();
  const url = URL.createObjectURL(new Blob([new XMLSerializer().serializeToString(clone)], { type: "image/svg+xml" }));
  img.onload = () => {
    const probe = el("canvas").getContext("2d");
    probe.font = "12px sans-serif";
    const verdict = wrapLines(probe, cap.verdict, W - 24, 3), text = wrapLines(probe, cap.text, W - 24, 12);
    const top = 58 + 16 * verdict.length, Htot = top + H + 24 + 16 * text.length;
    const c = el("canvas", { width: W * k, height: Htot * k }), g = c.getContext("2d");
    g.scale(k, k); g.fillStyle = "#fff"; g.fillRect(0, 0, W, Htot);
    g.fillStyle = "#111"; g.font = "bold 14px sans-serif"; g.fillText(cap.title, 12, 20);
    g.font = "12px sans-serif"; g.fillText(cap.fit, 12, 40);
    g.fillStyle = S.analysis.in_scope ? "#1a7f37" : "#b42318";
    verdict.forEach((l, i) => g.fillText(l, 12, 58 + 16 * i));
    g.drawImage(img, 0, top, W, H);
    g.fillStyle = "#333"; g.font = "12px sans-serif";
    g.fillText("Text:", 12, top + H + 14);
    text.forEach((l, i) => g.fillText(l, 12, top + H + 30 + 16 * i));
    URL.revokeObjectURL(url);
    window.__pngCaption = { ...cap, lines: { verdict, text }, height: Htot };
    c.toBlob((b) => download(`attnscope-${nname(S.neuron)}.png`, b), "image/png");
  };
  img.src = url;
}
async function copyLink() {
  const u = $("#share-url");
  u.select();
  try { await navigator.clipboard.writeText(u.value); } catch (_e) { document.execCommand("copy"); }
}

// ---------------------------------------------------------------- start
async function start() {
  try {
    [S.info, { neurons: S.neurons }] = await Promise.all([api("/api/info"), api("/api/neurons")]);
  } catch (e) { message("#message", `Could not load the model's data: ${e.message}`); return; }
  S.neurons.forEach((n) => S.byIndex.set(n.index, n));
  const m = S.info.model;
  $("#model-line").textContent = `model ${m.name} (${m.architecture}, ${m.n_layers} layers, ${m.d_mlp} layer-0 MLP ` +
    `neurons, context ${m.context_length}); circuit and neurons ${S.info.source}.`;
  $("#explanation-line").textContent = `Predicted = ${S.info.explanation.kind}: ${S.info.explanation.description}.`;
  $("#neuron-input").max = S.neurons.length - 1;
  renderKernels();
  $("#attn-limit").textContent = S.info.max_attention_tokens;
  for (const h of S.info.circuit.heads) $("#attn-head").append(el("option", { value: h }, `L0H${h}`));
  $("#score-th").textContent = S.info.score;
  $("#ranking-note").textContent = `Ranked by ${S.info.score_name}. ✓ = reported (explained and verified on held-out ` +
    "texts; r = the explanation's held-out fit). Click a row to choose the neuron.";
  const h = new URLSearchParams(location.hash.slice(1));
  const k = h.has("neuron") ? Number(h.get("neuron")) : S.neurons[0].index;
  const linkNotes = [];
  if (h.has("neuron") && !S.byIndex.has(k))
    linkNotes.push(`This link asks for neuron ${h.get("neuron")}, which this model does not have (its layer-0 MLP ` +
                   `has neurons 0..${S.neurons.length - 1}); showing ${nname(S.neurons[0].index)}, the first in ` +
                   "the ranking, instead.");
  if (h.has("model") && h.get("model") !== m.name)
    linkNotes.push(`This link was made for model ${h.get("model")}; this server runs ${m.name}, so its numbers ` +
                   "differ from the link's.");
  const ln = $("#link-message");  // stays until the page is reloaded: nothing the user does clears it
  ln.hidden = !linkNotes.length;
  ln.textContent = linkNotes.join(" ");
  if (h.get("a")) $("#text-a").value = h.get("a");
  if (h.get("b")) $("#text-b").value = h.get("b");
  renderTable();
  const ok = await chooseNeuron(S.byIndex.has(k) ? k : S.neurons[0].index, false);
  if (ok && h.get("text")) { $("#text-input").value = h.get("text"); await analyse(); }
  if (h.get("a") && h.get("b")) await runContrast();
}

$("#neuron-search").addEventListener("input", renderTable);
$("#neuron-input").addEventListener("change", () => {
  const k = Number($("#neuron-input").value);
  if (Number.isInteger(k)) chooseNeuron(k, true);
});
$("#analyse-btn").addEventListener("click", analyse);
$("#file-input").addEventListener("change", (ev) => {
  const f = ev.target.files[0];
  if (!f) return;
  const r = new FileReader();
  r.onload = () => { $("#text-input").value = r.result; analyse(); };
  r.onerror = () => message("#message", `Could not read ${f.name}; upload a plain-text file.`);
  r.readAsText(f);
});
for (const r of document.querySelectorAll("input[name=colour]")) r.addEventListener("change", renderTokens);
$("#coloured-text").addEventListener("click", (ev) => {
  const t = ev.target.closest(".tok");
  if (t) showEvidence(Number(t.dataset.i));
});
$("#coloured-text").addEventListener("keydown", (ev) => {
  const t = ev.target.closest(".tok");
  if (!t || !S.analysis) return;
  const i = Number(t.dataset.i);
  const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Enter: i, " ": i }[ev.key];
  if (to === undefined || to < 0 || to >= S.analysis.n_tokens) return;
  ev.preventDefault();
  showEvidence(to).then(() => $(`#coloured-text .tok[data-i="${to}"]`)?.focus());
});
$("#evidence-pos").addEventListener("change", () => showEvidence(Number($("#evidence-pos").value)));
$("#contrast-btn").addEventListener("click", runContrast);
$("#attn-btn").addEventListener("click", showAttention);
$("#attn-head").addEventListener("change", () => { if (S.attention) showAttention(); });
for (const c of ["#attn-true", "#attn-recon"]) $(c).addEventListener("mousemove", attnHover);
$("#copy-link").addEventListener("click", copyLink);
$("#download-json").addEventListener("click", exportJSON);
$("#download-png").addEventListener("click", exportPNG);
start();
