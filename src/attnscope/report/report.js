
(function () {
  "use strict";
  // ---- sortable tables: click a column header (its button) to sort, again to reverse ----
  function cellValue(row, i, type) {
    var c = row.cells[i]; if (!c) return null;
    var v = c.getAttribute("data-value"); if (v === null) v = c.textContent;
    if (type === "num") { if (v === "") return null; var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v.toLowerCase();
  }
  function sortTable(table, th) {
    var ths = Array.prototype.slice.call(th.parentNode.children);
    var i = ths.indexOf(th), type = th.getAttribute("data-type") || "text";
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    ths.forEach(function (h) { if (h.hasAttribute("aria-sort")) h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.forEach(function (r, k) { r._k = k; });
    rows.sort(function (a, b) {
      var x = cellValue(a, i, type), y = cellValue(b, i, type);
      if (x === null && y === null) return a._k - b._k;
      if (x === null) return 1; if (y === null) return -1;  // missing values last
      if (x < y) return -sign; if (x > y) return sign; return a._k - b._k;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.querySelectorAll("thead th"), function (th) {
      th.addEventListener("click", function () { sortTable(table, th); });
    });
  });

  // printing shows everything folded away
  window.addEventListener("beforeprint", function () {
    Array.prototype.forEach.call(document.querySelectorAll("details"), function (d) { d.open = true; });
  });

  // ---- figures: click (or Enter) to enlarge, Esc or click to close ----
  Array.prototype.forEach.call(document.querySelectorAll("figure.fig img"), function (img) {
    function toggle() { img.closest("figure").classList.toggle("zoomed"); }
    img.addEventListener("click", toggle);
    img.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === "Escape") toggle(); });
  });
  document.addEventListener("keydown", function (e) {
    if (e.key !== "Escape") return;
    Array.prototype.forEach.call(document.querySelectorAll("figure.zoomed"), function (f) { f.classList.remove("zoomed"); });
  });

  // ---- the full ranking: a filter box over every row ----
  function filterRows(input, rows, counter) {
    var q = input.value.trim().toLowerCase(), shown = 0;
    rows.forEach(function (r) {
      var hay = r._hay || (r._hay = ((r.getAttribute("data-search") || "") + " " + r.textContent).toLowerCase());
      var hit = !q || hay.indexOf(q) >= 0;
      r.hidden = !hit; if (hit) shown++;
    });
    if (counter) counter.textContent = shown + " of " + rows.length + " shown";
  }
  var rs = document.getElementById("ranking-search");
  if (rs) {
    var rrows = Array.prototype.slice.call(document.querySelectorAll("#neuron-ranking tbody tr"));
    rs.addEventListener("input", function () { filterRows(rs, rrows, document.getElementById("ranking-count")); });
  }
  // ---- neuron cards: filter, only outside scope, open/close all, links open the card ----
  var cs = document.getElementById("card-search"), co = document.getElementById("card-out-only");
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.neuron-card"));
  function filterCards() {
    var q = cs ? cs.value.trim().toLowerCase() : "", out = co && co.checked, shown = 0;
    cards.forEach(function (c) {
      var hit = (!q || (c.getAttribute("data-search") || "").indexOf(q) >= 0) &&
                (!out || c.getAttribute("data-scope") === "out");
      c.hidden = !hit; if (hit) shown++;
    });
    var n = document.getElementById("card-count"); if (n) n.textContent = shown + " of " + cards.length + " shown";
  }
  if (cs) cs.addEventListener("input", filterCards);
  if (co) co.addEventListener("change", filterCards);
  function setOpen(v) { cards.forEach(function (c) { var d = c.querySelector("details"); if (d) d.open = v; }); }
  var ob = document.getElementById("cards-open"), cb = document.getElementById("cards-close");
  if (ob) ob.addEventListener("click", function () { setOpen(true); });
  if (cb) cb.addEventListener("click", function () { setOpen(false); });
  function openTarget() {
    var id = decodeURIComponent(location.hash.slice(1)), t = id && document.getElementById(id);
    if (!t) return;
    var d = t.matches && t.matches("article.neuron-card") ? t.querySelector("details") : null;
    if (d) { d.open = true; t.hidden = false; t.scrollIntoView(); }
  }
  window.addEventListener("hashchange", openTarget);
  openTarget();

  // ---- activation examples: hover text of each highlighted token, from its --v ----
  document.addEventListener("mouseover", function (e) {
    var b = e.target && e.target.closest ? e.target.closest("table.ex b") : null;
    if (!b || b.title) return;
    var td = b.closest("td"), v = b.style.getPropertyValue("--v");
    b.title = (td && td.classList.contains("ex-p") ? "predicted" : "true") + " pre-activation " + v +
      " (pre-activation units)" + (b.classList.contains("pk") ? "; the peak of the true pre-activation" : "");
  });

  // ---- head explorer ----
  var dataEl = document.getElementById("kernel-data");
  if (!dataEl) return;
  var D = JSON.parse(dataEl.textContent);
  var selL = document.getElementById("sel-layer"), selH = document.getElementById("sel-head");
  var svg = document.getElementById("kernel-svg"), recT = document.getElementById("head-record");
  var NS = "http://www.w3.org/2000/svg";
  var W = 560, H = 330, ML = 58, MR = 16, MT = 30, MB = 44;
  function el(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5 || a < 1e-3) return v.toPrecision(3);
    return a >= 1000 ? v.toFixed(0) : a >= 100 ? v.toFixed(1) : a >= 10 ? v.toFixed(2) : v.toFixed(3);
  }
  D.layers.forEach(function (l, j) { selL.appendChild(new Option(String(l), String(j))); });
  function heads(j) { return D.offset_kernel[j].length; }
  function fillHeads(j, keep) {
    var old = keep ? selH.value : "0";
    selH.innerHTML = "";
    for (var h = 0; h < heads(j); h++) selH.appendChild(new Option(String(h), String(h)));
    selH.value = (+old < heads(j)) ? old : "0";
  }
  function draw() {
    var j = +selL.value, h = +selH.value, layer = D.layers[j];
    var rec = D.records[layer + "-" + h] || {};
    var color = D.colors[rec.category] || "#1f77b4";
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var all = D.offset_kernel[j], n = all[h].length;
    var lo = 1;
    all.forEach(function (p) { p.forEach(function (v) { if (v > 0 && v < lo) lo = v; }); });
    var yMinExp = Math.max(-6, Math.floor(Math.log10(lo))), yMin = Math.pow(10, yMinExp), yMax = 1;
    var xMax = Math.max(2, n);  // x = d + 1, from 1 to n
    function X(x) { return ML + (W - ML - MR) * Math.log10(x) / Math.log10(xMax); }
    function Y(y) { y = Math.max(y, yMin); return MT + (H - MT - MB) * (Math.log10(yMax) - Math.log10(y)) / (Math.log10(yMax) - Math.log10(yMin)); }
    var g = el("g", {"class": "grid"});
    for (var e = yMinExp; e <= 0; e++) {
      g.appendChild(el("line", {x1: ML, x2: W - MR, y1: Y(Math.pow(10, e)), y2: Y(Math.pow(10, e)), stroke: "#e6e9ec"}));
      var t = el("text", {x: ML - 6, y: Y(Math.pow(10, e)) + 4, "text-anchor": "end", "font-size": 11, fill: "#5f6b76"}, "10");
      var s = el("tspan", {dy: -5, "font-size": 8}, String(e)); t.appendChild(s); g.appendChild(t);
    }
    for (var ex = 0; Math.pow(10, ex) <= xMax; ex++) {
      var xv = Math.pow(10, ex);
      g.appendChild(el("line", {x1: X(xv), x2: X(xv), y1: MT, y2: H - MB, stroke: "#e6e9ec"}));
      g.appendChild(el("text", {x: X(xv), y: H - MB + 15, "text-anchor": "middle", "font-size": 11, fill: "#5f6b76"}, String(xv)));
    }
    svg.appendChild(g);
    svg.appendChild(el("rect", {x: ML, y: MT, width: W - ML - MR, height: H - MT - MB, fill: "none", stroke: "#9aa4ad"}));
    function poly(p, attrs) {
      var pts = [];
      // zero mass (the sink split off before the kernel) ends the line instead of dropping it to the 1e-6 floor
      for (var d = 0; d < p.length; d++) if (p[d] !== null && p[d] > 0) pts.push(X(d + 1).toFixed(1) + "," + Y(p[d]).toFixed(1));
      attrs.points = pts.join(" "); attrs.fill = "none";
      return el("polyline", attrs);
    }
    all.forEach(function (p, k) { if (k !== h) svg.appendChild(poly(p, {stroke: "#c9ced3", "stroke-width": 1})); });
    svg.appendChild(poly(all[h], {stroke: color, "stroke-width": 2.4, id: "kernel-line", "data-layer": layer, "data-head": h}));
    svg.appendChild(el("text", {x: ML, y: 19, "font-size": 13, "font-weight": 600, fill: "#1d232a"},
      "L" + layer + "H" + h + " \u2014 " + (rec.category || "") + ", N_eff = " + fmt(rec.n_eff)));
    svg.appendChild(el("text", {x: (ML + W - MR) / 2, y: H - 8, "text-anchor": "middle", "font-size": 12, fill: "#1d232a"},
      "offset d + 1 = |n \u2212 i| + 1   (query n = " + D.n_ref + ")"));
    var yl = el("text", {x: 14, y: (MT + H - MB) / 2, "text-anchor": "middle", "font-size": 12, fill: "#1d232a",
      transform: "rotate(-90 14 " + (MT + H - MB) / 2 + ")"}, "kernel mass \u03ba(d)");
    svg.appendChild(yl);
    svg.setAttribute("data-layer", layer); svg.setAttribute("data-head", h);
    // the record
    var tb = recT.tBodies[0]; tb.innerHTML = "";
    Object.keys(rec).forEach(function (k) {
      var v = rec[k], tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
      th.textContent = k;
      if (v && typeof v === "object") td.textContent = Object.keys(v).map(function (q) { return q + " " + fmt(v[q]); }).join(", ");
      else td.textContent = fmt(v);
      tr.appendChild(th); tr.appendChild(td); tb.appendChild(tr);
    });
    Array.prototype.forEach.call(document.querySelectorAll("#head-table tbody tr"), function (r) {
      r.classList.toggle("selected", +r.getAttribute("data-layer") === layer && +r.getAttribute("data-head") === h);
    });
  }
  selL.addEventListener("change", function () { fillHeads(+selL.value, true); draw(); });
  selH.addEventListener("change", draw);
  Array.prototype.forEach.call(document.querySelectorAll("#head-table tbody tr"), function (r) {
    r.addEventListener("click", function () {
      var j = D.layers.indexOf(+r.getAttribute("data-layer"));
      if (j < 0) return;
      selL.value = String(j); fillHeads(j, false); selH.value = r.getAttribute("data-head"); draw();
    });
  });
  selL.value = "0"; fillHeads(0, false); draw();
})();
