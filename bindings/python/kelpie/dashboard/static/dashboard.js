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
  function queueTable(queues) {
    var box = document.getElementById("live-queues");
    var names = Object.keys(queues || {}).sort();
    if (!box || !names.length) return;
    var cols = ["workers", "running", "held", "capacity"];
    var table = document.createElement("table"), head = table.createTHead().insertRow();
    ["queue"].concat(cols).forEach(function (c) {
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
    });
    var wrap = document.createElement("div");
    wrap.className = "scroll";
    wrap.appendChild(table);
    box.replaceChildren(wrap);
  }

  function overview(url) {
    var chart = null, last = null, canvas = document.getElementById("rates");
    // Chart.js 3 (Debian's) has no default palette; these stay apart for
    // the common colour-vision deficiencies, and each line has its own dash.
    var series = [["submitted", "jobs_submitted", "#0b5cad", []],
                  ["succeeded", "jobs_succeeded", "#1a7f37", [6, 3]],
                  ["failed", "jobs_failed", "#d4a017", [2, 2]],
                  ["dead", "jobs_dead", "#b00020", [8, 3, 2, 3]]];
    if (canvas && window.Chart) {
      chart = new window.Chart(canvas, {
        type: "line",
        data: { labels: [], datasets: series.map(function (s) {
          return { label: s[0], data: [], borderColor: s[2], backgroundColor: s[2],
                   borderDash: s[3], pointRadius: 2 };
        }) },
        options: { animation: false, maintainAspectRatio: false,
                   scales: { y: { beginAtZero: true, title: { display: true, text: "per second" } } } }
      });
      canvas.dataset.drawn = "1";
    }
    var es = new EventSource(url);
    es.addEventListener("overview", function (e) {
      var view = JSON.parse(e.data), now = Date.now();
      document.querySelectorAll("[data-stat]").forEach(function (el) {
        var v = get(view, el.getAttribute("data-stat"));
        if (v !== undefined) el.textContent = v;
      });
      queueTable(view.queues);
      if (chart && last) {
        var dt = (now - last.t) / 1000;
        chart.data.labels.push(new Date(now).toLocaleTimeString());
        series.forEach(function (s, i) {
          var a = view.counters[s[1]] || 0, b = last.counters[s[1]] || 0;
          chart.data.datasets[i].data.push(Math.max(0, (a - b) / dt));
        });
        if (chart.data.labels.length > 60) {
          chart.data.labels.shift();
          chart.data.datasets.forEach(function (d) { d.data.shift(); });
        }
        chart.update();
      }
      last = { t: now, counters: view.counters };
    });
  }

  function job(url) {
    var out = document.getElementById("output"), bar = document.getElementById("progress");
    var text = document.getElementById("progress-text");
    var state = document.querySelector("[data-job-state]");
    var streamed = false;
    var es = new EventSource(url);
    function setState(s) { if (state && s) { state.textContent = s; state.className = "state state-" + s; } }
    es.addEventListener("record", function (e) { setState(JSON.parse(e.data).state); });
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

  document.addEventListener("DOMContentLoaded", function () { localTimes(document); });
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
