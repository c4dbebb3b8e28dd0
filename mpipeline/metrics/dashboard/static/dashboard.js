// mpipeline's web dashboard: renders the JSON updates of /dashboard/events.
// Every number is computed by the supervisor (mpipeline/metrics/dashboard/_document.py);
// this file only formats it. Text goes in with textContent, never as HTML, so a stage
// name or an error message can never become markup.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const query = new URLSearchParams();
  // EventSource cannot send an Authorization header: the token travels as ?token=.
  for (const key of ["token", "interval"]) {
    if (params.get(key)) query.set(key, params.get(key));
  }
  const suffix = query.toString() ? "?" + query.toString() : "";
  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "data") Object.assign(node.dataset, v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  const int = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
  const rate = (n) => (n == null ? "–" : n < 10 ? n.toFixed(1) : int(n));
  const ms = (n) => (n == null ? "–" : n < 10 ? n.toFixed(2) : n.toFixed(0));
  const pct = (n) => (n == null ? "–" : (100 * n).toFixed(1) + "%");
  const bytes = (n) => {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  };
  const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB");
  const duration = (s) => {
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
    return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
  };

  function bar(fill, high, cls) {
    const b = el("div", { class: "bar " + (cls || "") });
    const f = el("div", { class: "fill" });
    f.style.width = Math.min(100, 100 * fill).toFixed(1) + "%";
    b.append(f);
    if (high != null) {
      const h = el("div", { class: "high" });
      h.style.left = Math.min(100, 100 * high).toFixed(1) + "%";
      b.append(h);
    }
    return b;
  }

  function rows(tableId, list, row, empty) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren(...(list.length ? list.map(row) : [el("tr", {}, el("td", { class: "dim" }, empty))]));
  }

  function renderFlow(stages) {
    const flow = $("flow");
    const cards = [];
    stages.forEach((s, i) => {
      if (i) cards.push(el("div", { class: "arrow" }, "→"));
      const replicas = el("ul", { class: "replicas" }, ...s.replicas.map((r) =>
        el("li", { class: r.state === "READY" ? "" : "bad" },
          el("span", { class: "name" }, r.name), " ", r.state, " · ", rate(r.per_s), "/s",
          r.cpu_percent == null ? "" : ` · ${r.cpu_percent.toFixed(0)}% cpu`,
          r.restarts ? ` · ${r.restarts} restarts` : "")));
      cards.push(el("div", { class: "stage" + (s.ready < s.replicas.length ? " degraded" : ""), data: { stage: s.stage } },
        el("h3", {}, s.stage),
        el("div", { class: "rate" }, el("b", {}, rate(s.per_s)), " /s"),
        el("div", { class: "latency" }, "p50 ", ms(s.p50_ms), " · p95 ", ms(s.p95_ms), " ms"),
        el("div", { class: "dim" }, `${s.ready}/${s.replicas.length} ready · `, el("span", { class: "processed" }, int(s.processed)), " done"),
        replicas));
    });
    flow.replaceChildren(...cards);
  }

  function render(d) {
    $("problem").hidden = !d.problem;
    $("problem").textContent = d.problem || "";
    if (!d.run) return;
    $("run-id").textContent = d.run.run_id;
    $("run-state").textContent = d.run.state;
    $("run-state").className = "state " + d.run.state.toLowerCase();
    $("uptime").textContent = duration(d.run.uptime_s);
    $("config").textContent = d.run.config;
    $("requests-per-s").textContent = rate(d.requests_per_s);
    $("requests-completed").textContent = int(d.requests.completed);
    $("requests-failed").textContent = int(d.requests.failed);
    $("requests-in-flight").textContent = int(d.requests.in_flight);
    $("tokens-per-s").textContent = d.tokens_per_s ? `${rate(d.tokens_per_s.in)} · ${rate(d.tokens_per_s.out)}` : "–";
    $("dedup-savings").textContent = d.dedup ? pct(d.dedup.total_savings) : "–";

    const hist = d.history;
    const top = Math.max(1, ...hist);
    $("history-len").textContent = hist.length;
    $("spark-line").setAttribute("points", hist.map((v, i) =>
      `${(600 * i / Math.max(1, hist.length - 1)).toFixed(1)},${(58 - 56 * v / top).toFixed(1)}`).join(" "));

    renderFlow(d.stages);
    rows("rings", d.rings, (r) => el("tr", { class: (r.failures ? "dim" : "") + (r.poisoned || r.error ? " bad" : "") },
      el("td", {}, r.name), el("td", { class: "barcell" }, bar(r.fill, r.high_fill)),
      el("td", { class: "num" }, r.error ? r.error : `${bytes(r.used)} / ${bytes(r.capacity)}`)), "no rings");
    rows("shards", d.shards, (s) => el("tr", {},
      el("td", {}, s.name), el("td", { class: "barcell" }, bar(s.share || 0, null, "share")),
      el("td", { class: "num" }, pct(s.share)), el("td", { class: "num" }, rate(s.per_s), "/s"),
      el("td", { class: "num" }, int(s.in_flight), " in flight")), "no inference stage");
    rows("circuits", d.circuits, (c) => el("tr", { class: c.state === "closed" ? "" : "bad" },
      el("td", {}, c.upstream), el("td", {}, c.state),
      el("td", { class: "num" }, `${c.window_failures}/${c.window_calls} failed`),
      el("td", { class: "num" }, `${c.opens} opens`),
      el("td", { class: "num" }, c.retry_in_s > 0 ? `probe in ${c.retry_in_s.toFixed(1)}s` : "")), "no remote upstreams");
    $("dedup").textContent = d.dedup
      ? `${rate(d.dedup.hits_per_s)} hits/s · ${rate(d.dedup.calls_per_s)} upstream calls/s · ` +
        `saved ${pct(d.dedup.savings)} now, ${pct(d.dedup.total_savings)} since start`
      : "–";
    rows("errors", d.errors.slice(0, 12), (e) => el("tr", {},
      el("td", { class: "dim" }, clock(e.at)), el("td", {}, e.stage), el("td", { class: "bad" }, e.code),
      el("td", { class: "num" }, "×", int(e.count))), "none");
    rows("dlq", d.dlq, (x) => el("tr", {},
      el("td", { class: "dim" }, clock(x.at)), el("td", {}, x.stage), el("td", { class: "bad" }, x.reason),
      el("td", { class: "msg", title: x.id }, x.message)), "empty");
  }

  function setConn(text, ok) {
    $("conn").textContent = text;
    $("conn").className = "conn " + (ok ? "ok" : "bad");
  }

  const source = new EventSource("dashboard/events" + suffix);
  source.onopen = () => setConn("live", true);
  source.onmessage = (e) => {
    setConn("live", true);
    render(JSON.parse(e.data));
  };
  source.onerror = () => {
    // EventSource reconnects by itself unless the server refused (401, 503): then it is CLOSED.
    if (source.readyState === EventSource.CLOSED) setConn("disconnected (token? too many viewers?) — reload", false);
    else setConn("reconnecting…", false);
  };
})();
