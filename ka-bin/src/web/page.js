// ka's session page: one EventSource, state kept in plain objects, and a
// throttled redraw that touches only what changed, so a thousand nodes
// updating every second cost the browser little.
"use strict";
(function () {
  const MAX_EVENTS = 200;          // timeline rows kept
  const REDRAW_EVERY_MS = 250;     // at most four redraws a second
  const COMPACT_FROM = 64;         // nodes from which boxes shrink

  const token = new URLSearchParams(location.search).get("token");
  const withToken = (path) => token ? path + "?token=" + encodeURIComponent(token) : path;
  const $ = (id) => document.getElementById(id);
  const body = document.body;

  let status = null;               // the latest session snapshot
  let report = null;               // the final report, once there is one
  const pendingEvents = [];        // events not yet in the timeline
  const movedToTail = new Set();   // nodes the slow policy moved
  const boxes = new Map();         // name -> {el, parts, last}
  const lastUpstream = new Map();  // name -> its feeder while it had one
  let order = "";                  // the chain order drawn last
  let applied = 0, redraws = 0, maxRender = 0;
  let redrawDue = false, lastRedraw = 0, rebuilt = false;

  function human(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
  }
  function seconds(s) {
    if (s == null || !isFinite(s)) return "";
    s = Math.round(s);
    return s >= 60 ? Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s" : s + "s";
  }
  const STATE_WORD = {
    joined: "joining", receiving: "receiving", verifying: "verifying", ok: "OK",
    ko: "KO", dead: "dead", released: "released",
  };

  function schedule() {
    if (redrawDue) return;
    redrawDue = true;
    const wait = Math.max(0, REDRAW_EVERY_MS - (performance.now() - lastRedraw));
    setTimeout(redraw, wait);
  }

  // Chain order: depth first from the source, so a chain reads
  // source -> n1 -> n2 … and a branch follows its parent; nodes with no
  // feeder (dead, not placed yet) come last.
  function chainOrder(nodes) {
    const children = new Map();
    const byName = new Map(nodes.map((n) => [n.name, n]));
    for (const n of nodes) {
      const up = n.upstream && (n.upstream === "source" || byName.has(n.upstream)) ? n.upstream : null;
      if (up === null) continue;
      if (!children.has(up)) children.set(up, []);
      children.get(up).push(n);
    }
    const out = [], seen = new Set();
    const stack = [["source", 0]];
    while (stack.length) {
      const [name, depth] = stack.pop();
      const kids = children.get(name) || [];
      for (let i = kids.length - 1; i >= 0; i--) {
        if (!seen.has(kids[i].name)) { seen.add(kids[i].name); stack.push([kids[i].name, depth + 1]); }
      }
      if (name !== "source") out.push(byName.get(name));
    }
    for (const n of nodes) if (!seen.has(n.name)) out.push(n);
    return out;
  }

  function makeBox(name) {
    const el = document.createElement("div");
    el.className = "box";
    el.dataset.node = name;
    const parts = {};
    for (const [key, cls] of [["nm", "nm"], ["st", "st"], ["by", "by"], ["rt", "rt"], ["up", "up"], ["rs", "rs"], ["bar", "bar"]]) {
      const p = document.createElement("div");
      p.className = cls;
      el.appendChild(p);
      parts[key] = p;
    }
    parts.nm.textContent = name;
    parts.nm.title = name;
    return { el, parts, last: {} };
  }

  // Sets a box's text or attribute only when it changed.
  function put(box, key, value, apply) {
    if (box.last[key] === value) return;
    box.last[key] = value;
    apply(value);
  }

  // A node let go keeps its place in the picture: the source forgets the
  // chain once nodes are released, the page draws where they were.
  // A dead or failed node does not: its place went to the next one.
  function withPlaces(nodes) {
    return nodes.map((n) => {
      if (n.upstream) { lastUpstream.set(n.name, n.upstream); return n; }
      const kept = ["ok", "released", "verifying"].includes(n.state) && lastUpstream.get(n.name);
      return kept ? Object.assign({}, n, { upstream: kept }) : n;
    });
  }

  function drawNodes() {
    const nodes = withPlaces(status ? status.nodes : []);
    const size = status && status.image_size;
    const ordered = chainOrder(nodes);
    const chain = $("chain");
    chain.classList.toggle("compact", nodes.length >= COMPACT_FROM);
    const key = ordered.map((n) => n.name).join("\u0000");
    if (key !== order) {
      // The chain changed shape: put the boxes in their new order in one go.
      const frag = document.createDocumentFragment();
      frag.appendChild($("source-box"));
      const keep = new Set();
      for (const n of ordered) {
        let box = boxes.get(n.name);
        if (!box) { box = makeBox(n.name); boxes.set(n.name, box); }
        keep.add(n.name);
        frag.appendChild(box.el);
      }
      for (const [name, box] of boxes) if (!keep.has(name)) { box.el.remove(); boxes.delete(name); }
      chain.replaceChildren(frag);
      order = key;
      rebuilt = true;
    }
    let previous = "source";
    for (const n of ordered) {
      const box = boxes.get(n.name);
      const state = n.state;
      const tail = movedToTail.has(n.name);
      put(box, "class", "box s-" + state + (n.upstream === previous ? " arrow" : "") + (tail ? " tail" : ""),
        (v) => { box.el.className = v; });
      put(box, "state", state, (v) => { box.el.dataset.state = v; });
      put(box, "upstream", n.upstream || "", (v) => { box.el.dataset.upstream = v; });
      put(box, "bytes", n.bytes, (v) => { box.el.dataset.bytes = String(v); });
      const word = (STATE_WORD[state] || state) + (tail ? " (tail)" : "");
      put(box, "st", word, (v) => { box.parts.st.textContent = v; });
      put(box, "by", human(n.bytes) + (size ? " " + Math.floor((100 * n.bytes) / size) + "%" : ""),
        (v) => { box.parts.by.textContent = v; });
      const rate = state === "receiving" ? human(n.rate) + "/s" + (n.eta != null ? " ETA " + seconds(n.eta) : "") : "";
      put(box, "rt", rate, (v) => { box.parts.rt.textContent = v; });
      put(box, "up", n.upstream ? "← " + n.upstream : "unlinked", (v) => { box.parts.up.textContent = v; });
      put(box, "rs", n.reason || "", (v) => { box.parts.rs.textContent = v; box.parts.rs.title = v; });
      put(box, "bar", size ? Math.min(100, (100 * n.bytes) / size).toFixed(1) + "%" : "0%",
        (v) => { box.parts.bar.style.width = v; });
      previous = n.name;
    }
    body.dataset.nodes = String(boxes.size);
  }

  function drawSummary() {
    if (!status) return;
    $("session").textContent = status.session;
    $("state").textContent = status.state;
    body.dataset.state = status.state;
    $("image").textContent = (status.image || "") + (status.image_size != null ? " (" + human(status.image_size) + ")" : "");
    $("elapsed").textContent = seconds(status.seconds);
    const count = {};
    for (const n of status.nodes) count[n.state] = (count[n.state] || 0) + 1;
    $("counts").textContent = status.nodes.length + " nodes: " +
      Object.keys(count).sort().map((k) => count[k] + " " + (STATE_WORD[k] || k)).join(", ");
  }

  function describe(e) {
    switch (e.event) {
      case "joined": return e.node + (e.rejoin ? " rejoined" : " joined");
      case "refused": return "refused (" + e.code + "): " + e.reason;
      case "started": return "streaming to " + e.nodes + " node(s) (" + e.trigger + ")";
      case "relinked": return e.node + " now fed by " + (e.upstream || "the source");
      case "dead": return e.node + " dead: " + e.reason;
      case "stranded": return e.node + " stranded by " + e.upstream + " at " + e.from;
      case "slow": return e.node + " too slow: " + e.policy.replace(/_/g, " ");
      case "verified": return e.node + (e.ok ? " verified OK" : " copy does not match: " + e.reason);
      case "failed": return e.node + " failed: " + e.reason;
      case "released": return e.node + " released";
      case "image_done": return "image read: " + human(e.size);
      case "finished": return "finished: " + e.ok + " OK, " + e.ko + " KO";
      case "aborted": return "aborted: " + e.reason;
      default: return JSON.stringify(e);
    }
  }

  function drawEvents() {
    if (!pendingEvents.length) return;
    const list = $("events");
    const frag = document.createDocumentFragment();
    // Newest first: the last received goes on top.
    for (let i = pendingEvents.length - 1; i >= 0 && i >= pendingEvents.length - MAX_EVENTS; i--) {
      const e = pendingEvents[i];
      const li = document.createElement("li");
      li.dataset.event = e.event;
      if (["dead", "failed", "aborted", "stranded"].includes(e.event) || (e.event === "verified" && !e.ok)) li.className = "bad";
      if (e.event === "verified" && e.ok) li.className = "good";
      li.textContent = (e.t != null ? e.t.toFixed(1) + "s " : "") + describe(e);
      frag.appendChild(li);
    }
    pendingEvents.length = 0;
    list.insertBefore(frag, list.firstChild);
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
  }

  function drawReport() {
    if (!report || body.dataset.report === "shown") return;
    const r = report.report || report;
    const nodes = r.nodes || [];
    const ok = nodes.filter((n) => n.ok).length;
    const table = document.createElement("table");
    table.innerHTML = "<tr><th>node</th><th></th><th>bytes</th><th>s</th><th>reason</th></tr>";
    for (const n of nodes) {
      const tr = table.insertRow();
      tr.className = n.ok ? "okrow" : "korow";
      tr.dataset.node = n.name;
      for (const v of [n.name, n.ok ? "OK" : "KO", human(n.bytes), n.seconds.toFixed(1), n.reason]) {
        tr.insertCell().textContent = v;
      }
    }
    const line = document.createElement("p");
    line.id = "report-line";
    line.textContent = ok + "/" + nodes.length + " nodes OK; " + human(r.size) + " in " + r.seconds.toFixed(1) + " s" +
      (r.aborted ? "; aborted: " + r.aborted : "");
    $("report").replaceChildren(line, table);
    $("report-section").hidden = false;
    body.dataset.report = "shown";
    body.dataset.reportOk = String(ok);
    body.dataset.reportKo = String(nodes.length - ok);
  }

  function redraw() {
    redrawDue = false;
    rebuilt = false;
    const t0 = performance.now();
    drawSummary();
    drawNodes();
    drawEvents();
    drawReport();
    const ms = performance.now() - t0;
    lastRedraw = performance.now();
    redraws++;
    maxRender = Math.max(maxRender, ms);
    body.dataset.redraws = String(redraws);
    body.dataset.renderMs = ms.toFixed(2);
    body.dataset.maxRenderMs = maxRender.toFixed(2);
    // A redraw that rebuilt the chain's order: the most a redraw costs.
    if (rebuilt) body.dataset.fullRenderMs = ms.toFixed(2);
  }

  // Events change the picture before the next snapshot does.
  function applyEvent(e) {
    pendingEvents.push(e);
    if (pendingEvents.length > MAX_EVENTS) pendingEvents.splice(0, pendingEvents.length - MAX_EVENTS);
    if (e.event === "slow" && e.policy === "move_to_tail") movedToTail.add(e.node);
    if (!status) return;
    const n = status.nodes.find((x) => x.name === e.node);
    if (!n) return;
    if (e.event === "relinked") n.upstream = e.upstream || "source";
    if (e.event === "dead") { n.state = "dead"; n.reason = e.reason; n.upstream = null; }
  }

  function applied1() {
    applied++;
    body.dataset.applied = String(applied);
    schedule();
  }

  const source = new EventSource(withToken("/api/events"));
  source.addEventListener("open", () => {
    $("conn").textContent = "live"; $("conn").className = "pill on"; body.dataset.connected = "yes";
  });
  source.addEventListener("error", () => {
    $("conn").textContent = "offline"; $("conn").className = "pill off"; body.dataset.connected = "no";
  });
  source.addEventListener("session", (m) => { status = JSON.parse(m.data); applied1(); });
  source.addEventListener("event", (m) => { applyEvent(JSON.parse(m.data)); applied1(); });
  source.addEventListener("report", (m) => { report = JSON.parse(m.data); applied1(); });
})();
