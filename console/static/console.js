// agent-libos console: the live event stream (SSE) and refreshes of server-rendered fragments.
// Event bodies may carry agent-supplied text: they are only ever assigned with textContent.
(function () {
  "use strict";

  var MAX_ROWS = 1000;
  var INVISIBLE = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]/g;

  function visible(v) {
    var s = typeof v === "string" ? v : (v === null || v === undefined ? "" : JSON.stringify(v));
    return s.replace(INVISIBLE, function (c) {
      var o = c.charCodeAt(0);
      return o < 0x100 ? "\\x" + o.toString(16).padStart(2, "0") : "\\u" + o.toString(16).padStart(4, "0");
    });
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = visible(text);
    if (cls) { td.className = cls; }
    tr.appendChild(td);
  }

  function clock(ts) {
    var d = new Date(ts * 1000);
    return d.toTimeString().slice(0, 8);
  }

  // --- filters -------------------------------------------------------------------------------
  function filterValues() {
    var get = function (id) { var el = document.getElementById(id); return el ? el.value.trim() : ""; };
    return { pid: get("f-pid"), kind: get("f-kind"), decision: get("f-decision"), sys: get("f-sys").toLowerCase() };
  }

  function matches(tr, f) {
    if (f.pid && tr.dataset.pid !== f.pid) { return false; }
    if (f.kind && tr.dataset.kind !== f.kind) { return false; }
    if (f.decision && tr.dataset.decision !== f.decision) { return false; }
    if (f.sys && (tr.dataset.sys || "").toLowerCase().indexOf(f.sys) < 0) { return false; }
    return true;
  }

  function applyFilters() {
    var body = document.querySelector("#audit tbody");
    if (!body) { return; }
    var f = filterValues();
    var shown = 0;
    Array.prototype.forEach.call(body.rows, function (tr) {
      tr.hidden = !matches(tr, f);
      if (!tr.hidden) { shown += 1; }
    });
    var counter = document.getElementById("shown");
    if (counter) { counter.textContent = shown + " of " + body.rows.length + " shown"; }
  }

  // --- rows ----------------------------------------------------------------------------------
  function describe(topic, b) {
    if (topic === "audit") { return b.sys; }
    if (topic === "proc") { return "state " + b.state + (b.status ? " (" + b.status + ")" : ""); }
    if (topic === "approval") { return "approval #" + b.id + " " + b.event + (b.sys ? " " + b.sys : "") + (b.author ? " by " + b.author : ""); }
    if (topic === "llm") { return "model turn " + (b.model || "") + ", " + (b.input_tokens || 0) + "+" + (b.output_tokens || 0) + " tokens"; }
    return "";
  }

  function addAuditRow(id, ev) {
    var body = document.querySelector("#audit tbody");
    if (!body) { return; }
    var b = ev.body || {};
    var tr = document.createElement("tr");
    tr.dataset.id = String(id);
    tr.dataset.kind = ev.topic;
    tr.dataset.pid = b.pid === undefined || b.pid === null ? "" : String(b.pid);
    tr.dataset.decision = b.decision || "";
    tr.dataset.sys = b.sys || "";
    if (b.decision) { tr.className = b.decision; }
    cell(tr, b.seq === undefined ? "" : b.seq);
    cell(tr, clock(ev.ts));
    cell(tr, ev.topic);
    cell(tr, tr.dataset.pid);
    cell(tr, describe(ev.topic, b));
    cell(tr, b.decision || "", "decision");
    cell(tr, b.code || "", "code");
    cell(tr, b.cap === undefined || b.cap === null ? "" : b.cap, "cap");
    tr.hidden = !matches(tr, filterValues());
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > MAX_ROWS) { body.deleteRow(body.rows.length - 1); }
  }

  function addLlmRow(ev) {
    var body = document.querySelector("#llm tbody");
    if (!body) { return; }
    var b = ev.body || {};
    var tr = document.createElement("tr");
    tr.dataset.pid = String(b.pid);
    cell(tr, clock(ev.ts));
    cell(tr, b.pid);
    cell(tr, b.seq);
    cell(tr, b.model || "");
    cell(tr, b.input_tokens);
    cell(tr, b.output_tokens);
    cell(tr, typeof b.latency_s === "number" ? (b.latency_s * 1000).toFixed(1) + " ms" : "");
    cell(tr, b.stop_reason || "");
    cell(tr, b.error || "");
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > MAX_ROWS) { body.deleteRow(body.rows.length - 1); }
  }

  // --- fragments: server-rendered (and server-escaped) HTML, parsed inertly -------------------
  var pending = null;
  function refreshSoon() {
    if (pending !== null) { return; }
    pending = setTimeout(function () { pending = null; refresh(); }, 250);
  }

  function refresh() {
    var nodes = document.querySelectorAll("[data-fragment]");
    Array.prototype.forEach.call(nodes, function (el) {
      if (el.contains(document.activeElement) && document.activeElement.tagName === "INPUT") {
        refreshSoon();  // do not pull a form away from someone typing in it
        return;
      }
      fetch("/fragments/" + encodeURIComponent(el.dataset.fragment), { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) { return; }
          var doc = new DOMParser().parseFromString(html, "text/html");
          el.replaceChildren.apply(el, Array.prototype.slice.call(doc.body.childNodes));
          document.body.dataset.refreshed = String(Date.now());
        })
        .catch(function () { /* the next event retries */ });
    });
  }

  // --- the stream ----------------------------------------------------------------------------
  function connect() {
    if (!window.EventSource) { return; }
    var live = document.getElementById("live");
    var es = new EventSource("/events");
    es.onopen = function () {
      if (live) { live.textContent = "events: live"; live.className = "live on"; }
      document.body.dataset.stream = "open";
    };
    es.onerror = function () {
      if (live) { live.textContent = "events: reconnecting"; live.className = "live off"; }
    };
    ["audit", "proc", "approval", "llm"].forEach(function (topic) {
      es.addEventListener(topic, function (e) {
        var ev;
        try { ev = JSON.parse(e.data); } catch (err) { return; }
        addAuditRow(e.lastEventId, ev);
        if (topic === "llm") { addLlmRow(ev); }
        applyFilters();
        refreshSoon();
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("filters");
    if (form) {
      form.addEventListener("input", applyFilters);
      form.addEventListener("change", applyFilters);
      form.addEventListener("submit", function (e) { e.preventDefault(); });
    }
    connect();
  });
})();
