// Kelpie dashboard: local times, confirmations, live updates over
// server-sent events, the overview's chart (Chart.js, when present).
// The pages work without this file; it only adds to them.
"use strict";
(function () {
  document.documentElement.classList.add("js");

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (isNaN(d)) return;
      t.title = d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
      t.textContent = d.toLocaleString();
    });
  }

  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });

  function get(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? o : o[k]; }, obj);
  }

  // The overview's job queue table, rebuilt from each update (DOM nodes
  // and textContent only: names come from the broker).
  var RATES = ["submitted", "succeeded", "failed", "dead"];
  function queueTable(queues, rates) {
    var box = document.getElementById("live-queues");
    var names = Object.keys(queues || {}).sort();
    if (!box || !names.length) return;
    var cols = ["workers", "running", "held", "capacity"];
    var table = document.createElement("table"), head = table.createTHead().insertRow();
    ["queue"].concat(cols, RATES.map(function (r) { return r + "/s"; })).forEach(function (c) {
      var th = document.createElement("th");
      th.scope = "col";
      th.textContent = c;
      head.appendChild(th);
    });
    var body = table.createTBody();
    names.forEach(function (n) {
      var row = body.insertRow(), a = document.createElement("a");
      a.href = "/jobs?queue=" + encodeURIComponent(n);
      a.textContent = n;
      row.insertCell().appendChild(a);
      cols.forEach(function (c) { row.insertCell().textContent = queues[n][c]; });
      RATES.forEach(function (r) {
        row.insertCell().textContent = (((rates || {})[n] || {})[r] || 0).toFixed(1);
      });
    });
    var wrap = document.createElement("div");
    wrap.className = "scroll";
    wrap.appendChild(table);
    box.replaceChildren(wrap);
  }

  // Chart.js 3 (Debian's) has no default palette; these stay apart for
  // the common colour-vision deficiencies, and each line has its own dash.
  var SERIES = [["submitted", "#0b5cad", []], ["succeeded", "#1a7f37", [6, 3]],
                ["failed", "#d4a017", [2, 2]], ["dead", "#b00020", [8, 3, 2, 3]]];
  // A queue's small chart (title: its name) has no legend of its own: its
  // lines look as in the all-queues chart above it.
  function rateChart(canvas, title) {
    var c = new window.Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: SERIES.map(function (s) {
        return { label: s[0], data: [], borderColor: s[1], backgroundColor: s[1],
                 borderDash: s[2], pointRadius: 1 };
      }) },
      options: { animation: false, maintainAspectRatio: false,
                 plugins: { title: { display: !!title, text: title },
                            legend: { display: !title } },
                 scales: { x: { ticks: { maxTicksLimit: title ? 3 : 6, maxRotation: 0 } },
                           y: { beginAtZero: true, title: { display: true, text: "per second" } } } }
    });
    canvas.dataset.drawn = "1";
    return c;
  }
  function pushPoint(chart, label, values) {
    chart.data.labels.push(label);
    SERIES.forEach(function (s, i) { chart.data.datasets[i].data.push(values ? values[s[0]] || 0 : 0); });
    if (chart.data.labels.length > 60) {
      chart.data.labels.shift();
      chart.data.datasets.forEach(function (d) { d.data.shift(); });
    }
  }

  var MAX_QUEUE_CHARTS = 24;
  function overview(url) {
    var total = null, perQueue = {}, lastT = 0, box = document.getElementById("queue-charts");
    var canvas = document.getElementById("rates");
    if (canvas && window.Chart) total = rateChart(canvas, "");
    // One small chart per queue, made when the queue first shows activity
    // (up to MAX_QUEUE_CHARTS; the table has every queue's rates); a
    // queue's points before that are zeros, so every chart shares one axis.
    function queueChart(name, labels) {
      if (perQueue[name] || !box || !window.Chart) return perQueue[name];
      if (Object.keys(perQueue).length >= MAX_QUEUE_CHARTS) return null;
      var fig = document.createElement("figure"), c = document.createElement("canvas");
      fig.className = "chart small";
      c.setAttribute("role", "img");
      c.setAttribute("aria-label", "Jobs per second of queue " + name);
      c.dataset.queue = name;
      fig.appendChild(c);
      var names = Object.keys(perQueue).concat([name]).sort();
      var before = names.indexOf(name) + 1 < names.length ? perQueue[names[names.indexOf(name) + 1]] : null;
      box.insertBefore(fig, before ? before.canvas.parentNode : null);
      var chart = rateChart(c, name);
      labels.forEach(function (l) { pushPoint(chart, l, null); });
      perQueue[name] = chart;
      return chart;
    }
    var es = new EventSource(url);
    es.addEventListener("overview", function (e) {
      var view = JSON.parse(e.data);
      document.querySelectorAll("[data-stat]").forEach(function (el) {
        var v = get(view, el.getAttribute("data-stat"));
        if (v !== undefined) el.textContent = v;
      });
      queueTable(view.queues, view.rates.queues);
      (view.history || []).forEach(function (h) {
        if (h.t <= lastT) return;
        lastT = h.t;
        var label = new Date(h.t).toLocaleTimeString();
        if (total) pushPoint(total, label, h.total);
        Object.keys(h.queues).forEach(function (n) { queueChart(n, total ? total.data.labels.slice(0, -1) : []); });
        Object.keys(perQueue).forEach(function (n) { pushPoint(perQueue[n], label, h.queues[n]); });
      });
      if (total) total.update();
      Object.keys(perQueue).forEach(function (n) { perQueue[n].update(); });
    });
  }

  function job(url) {
    var out = document.getElementById("output"), bar = document.getElementById("progress");
    var text = document.getElementById("progress-text");
    var state = document.querySelector("[data-job-state]");
    var streamed = false;
    var es = new EventSource(url);
    function setState(s) { if (state && s) { state.textContent = s; state.className = "state state-" + s; } }
    es.addEventListener("record", function (e) {
      setState(JSON.parse(e.data).state);
      // Each (re)connection replays the job's kept output from its start.
      streamed = false;
    });
    es.addEventListener("broker", function (e) {
      var b = JSON.parse(e.data);
      text.textContent = b.reachable ? "broker " + b.frontend + " answers again"
        : "broker " + b.frontend + " unreachable: " + (b.error || "no answer");
    });
    es.addEventListener("job", function (e) {
      var ev = JSON.parse(e.data);
      if (ev.kind === "output") {
        if (!streamed) { out.textContent = ""; streamed = true; }
        out.textContent += ev.data;
        out.scrollTop = out.scrollHeight;
      } else if (ev.kind === "progress") {
        bar.value = ev.progress;
        text.textContent = Math.round(ev.progress * 100) + "% " + (ev.message || "");
      } else if (ev.kind === "status") {
        setState(ev.message === "running" ? "leased" : ev.message);
        text.textContent = "attempt " + ev.attempt + ": " + ev.message +
          (ev.outcome ? " (" + ev.outcome + (ev.reason ? ": " + ev.reason : "") + ")" : "");
      }
    });
    es.addEventListener("end", function () {
      es.close();
      // The finished job's page has its history, result and output tail.
      window.location.reload();
    });
    es.addEventListener("broker-error", function () { es.close(); });
  }

  // Filters typed in the viewer's zone: tell the server which one.
  function timeZone() {
    var off = new Date().getTimezoneOffset();
    document.querySelectorAll("[data-tz]").forEach(function (el) {
      if (!el.value) el.value = String(off);
    });
    var mins = -off, sign = mins < 0 ? "-" : "+";
    mins = Math.abs(mins);
    var name = "UTC" + sign + String(Math.floor(mins / 60)).padStart(2, "0") + ":" +
      String(mins % 60).padStart(2, "0");
    document.querySelectorAll("[data-tz-hint]").forEach(function (el) {
      el.textContent = "times in your zone (" + name + ")";
    });
  }

  document.addEventListener("DOMContentLoaded", function () { localTimes(document); timeZone(); });
  // Streams start after "load": an EventSource opened before it keeps the
  // page loading (spinner, load event) for as long as the stream lasts.
  window.addEventListener("load", function () {
    setTimeout(function () {
      var live = document.body.getAttribute("data-live");
      if (!live) return;
      if (live === "/api/overview/events") overview(live); else job(live);
    }, 0);
  });
})();
