// lockguard's web page: polls the JSON API and draws the wait-for graph, the clients and the
// guard's events. The API token lives in this script's memory only (never in storage or
// cookies): a reload forgets it, and without it the page is read-only.
"use strict";

(function () {
  const REFRESH_MS = 1500;
  const CONFIRM_MS = 4000;
  const SVG = "http://www.w3.org/2000/svg";

  const NODE_W = 300;
  const NODE_H = 124;
  const COL_GAP = 150;
  const ROW_GAP = 22;
  const PAD = 16;

  let token = null;
  // The kill button waiting for its second click: {id, until}.
  let armed = null;
  let sort = { key: "state_age_s", dir: -1 };
  let clients = [];
  const rows = new Map();

  const $ = (id) => document.getElementById(id);

  // ---- formatting -------------------------------------------------------------------------

  function duration(s) {
    if (s === null || s === undefined) return "";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }

  function cut(text, n) {
    text = text === null || text === undefined ? "" : String(text);
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- the API ----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, Object.assign({ headers, cache: "no-store" }, options || {}));
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok && response.status !== 404 && response.status !== 409) {
      const message = body && body.error ? body.error : response.status + " " + response.statusText;
      throw new ApiError(response.status, message);
    }
    return body;
  }

  function setStatus(text, error) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", !!error);
  }

  function setMode() {
    const mode = $("mode");
    if (token) {
      mode.textContent = "token entered: kill buttons enabled";
      mode.className = "mode armed";
    } else {
      mode.textContent = "read-only: no token entered, kill buttons disabled";
      mode.className = "mode read-only";
    }
    renderClients();
  }

  // ---- the wait-for graph -----------------------------------------------------------------

  // Column of each node: a holder nobody waits for is in column 0, a waiter one column right
  // of the furthest holder it waits for. Nodes with no edge go in a band below.
  function layout(graph) {
    const waitsFor = new Map();
    const involved = new Set();
    for (const e of graph.edges) {
      involved.add(e.waiter);
      involved.add(e.holder);
      if (!waitsFor.has(e.waiter)) waitsFor.set(e.waiter, []);
      waitsFor.get(e.waiter).push(e.holder);
    }
    const column = new Map();
    const depth = (id, seen) => {
      if (column.has(id)) return column.get(id);
      if (seen.has(id)) return 0; // a cycle (PostgreSQL breaks deadlocks soon)
      seen.add(id);
      let c = 0;
      for (const h of waitsFor.get(id) || []) c = Math.max(c, depth(h, seen) + 1);
      column.set(id, c);
      return c;
    };
    const columns = [];
    const others = [];
    for (const n of graph.nodes) {
      if (!involved.has(n.id)) {
        others.push(n);
        continue;
      }
      const c = depth(n.id, new Set());
      (columns[c] = columns[c] || []).push(n);
    }
    const pos = new Map();
    let height = 0;
    columns.forEach((list, c) => {
      list.forEach((n, r) => {
        pos.set(n.id, { x: PAD + c * (NODE_W + COL_GAP), y: PAD + r * (NODE_H + ROW_GAP) });
      });
      height = Math.max(height, PAD + list.length * (NODE_H + ROW_GAP));
    });
    const width = Math.max(1, columns.length) * (NODE_W + COL_GAP);
    const perRow = Math.max(1, Math.floor((Math.max(width, 900) - PAD) / (NODE_W + ROW_GAP)));
    const bandTop = height + (columns.length ? 30 : 10);
    others.forEach((n, i) => {
      pos.set(n.id, {
        x: PAD + (i % perRow) * (NODE_W + ROW_GAP),
        y: bandTop + 10 + Math.floor(i / perRow) * (NODE_H + ROW_GAP),
      });
    });
    const rowsBelow = Math.ceil(others.length / perRow);
    return {
      pos,
      bandTop: others.length ? bandTop : null,
      width: Math.max(width, perRow * (NODE_W + ROW_GAP)) + PAD,
      height: (others.length ? bandTop + 10 + rowsBelow * (NODE_H + ROW_GAP) : height) + PAD,
    };
  }

  function nodeLines(n) {
    const waiting = n.waited_s !== null && n.waited_s !== undefined ? "waiting " + duration(n.waited_s) + " for a lock" : null;
    if (n.kind === "outside") {
      return [
        ["title", "not proxied · pid " + n.backend_pid],
        ["muted", cut((n.user || "?") + "@" + (n.database || "?") + (n.application_name ? " · " + n.application_name : ""), 40)],
        ["", cut(n.state || "", 40)],
        ["", waiting || ""],
      ];
    }
    const lines = [
      ["title", "#" + n.client_id + " " + cut(n.application_name || "(no application)", 26)],
      ["", "pid " + (n.backend_pid ?? "–") + " · " + n.client_addr],
      ["muted", cut(n.user + "@" + n.database, 44)],
      ["", cut(n.state + " " + duration(n.state_age_s) + (n.xact_age_s !== null ? " · xact " + duration(n.xact_age_s) : ""), 44)],
    ];
    if (waiting) lines.push(["", waiting]);
    if (n.locks.length) {
      lines.push(["muted", cut(n.locks.map((l) => l.table + " " + l.mode).join(", "), 44)]);
    }
    if (n.due) {
      const verb = n.due.action === "dry_run" ? "would terminate (dry run)" : n.due.action;
      lines.push(["due", cut("due: " + verb + " in " + duration(n.due.in_s) + " · rule " + n.due.rule, 44)]);
    }
    return lines;
  }

  function renderGraph(graph) {
    const { pos, bandTop, width, height } = layout(graph);
    const root = $("graph");
    root.setAttribute("width", width);
    root.setAttribute("height", height);
    root.setAttribute("viewBox", "0 0 " + width + " " + height);
    const holders = new Set(graph.edges.map((e) => e.holder));
    const waiters = new Set(graph.edges.map((e) => e.waiter));

    const nodes = svg("g", { id: "graph-nodes" });
    // Each box as tall as its lines; the arrows meet it halfway down.
    const heights = new Map();
    if (bandTop !== null) {
      nodes.appendChild(svg("text", { class: "band-label", x: PAD, y: bandTop }, "not waiting, nobody waiting for them"));
    }
    for (const n of graph.nodes) {
      const p = pos.get(n.id);
      const kind = [
        "node",
        n.kind,
        holders.has(n.id) ? "holder" : "",
        waiters.has(n.id) ? "waiter" : "",
        !holders.has(n.id) && !waiters.has(n.id) ? "idle" : "",
        n.due ? "due" : "",
      ].filter(Boolean).join(" ");
      const g = svg("g", { class: kind, "data-node": n.id, transform: "translate(" + p.x + "," + p.y + ")" });
      const lines = nodeLines(n).filter(([, text]) => text);
      const h = Math.min(NODE_H, 12 + lines.length * 16);
      heights.set(n.id, h);
      g.appendChild(svg("rect", { width: NODE_W, height: h, rx: 5 }));
      lines.forEach(([cls, text], i) => {
        g.appendChild(svg("text", { class: cls, x: 10, y: 18 + i * 16 }, text));
      });
      const title = svg("title", {}, n.kind === "outside" ? "backend " + n.backend_pid : "client " + n.client_id + ", backend " + n.backend_pid);
      g.appendChild(title);
      nodes.appendChild(g);
    }

    const edges = svg("g", { id: "graph-edges" });
    for (const e of graph.edges) {
      const a = pos.get(e.waiter);
      const b = pos.get(e.holder);
      if (!a || !b) continue;
      // From the waiter's left side to the holder's right side.
      const x1 = a.x;
      const y1 = a.y + heights.get(e.waiter) / 2;
      const x2 = b.x + NODE_W;
      const y2 = b.y + heights.get(e.holder) / 2;
      const mid = (x1 + x2) / 2;
      const g = svg("g", { class: "edge", "data-waiter": e.waiter, "data-holder": e.holder });
      g.appendChild(svg("path", {
        d: "M " + x1 + " " + y1 + " C " + mid + " " + y1 + ", " + mid + " " + y2 + ", " + x2 + " " + y2,
        "marker-end": "url(#arrow-head)",
      }));
      const lx = mid;
      const ly = (y1 + y2) / 2 - 6;
      g.appendChild(svg("text", { x: lx, y: ly - 20, "text-anchor": "middle" }, cut(e.table, 34)));
      g.appendChild(svg("text", { x: lx, y: ly - 6, "text-anchor": "middle" }, cut(e.mode, 34)));
      edges.appendChild(g);
    }
    root.replaceChild(edges, $("graph-edges"));
    root.replaceChild(nodes, $("graph-nodes"));

    let note = graph.edges.length
      ? graph.edges.length + (graph.edges.length === 1 ? " wait" : " waits") + " on protected tables"
      : "nobody waits for a lock on a protected table";
    if (!graph.guard_enabled) note = "the guard is disabled (no guard.dsn): no locks are probed";
    else if (graph.dry_run) note += " · dry-run is on: the guard only records";
    $("graph-note").textContent = note;
  }

  // ---- clients ----------------------------------------------------------------------------

  const COLUMNS = [
    ["id", (c) => String(c.id), "num"],
    ["client", (c) => c.client_addr + ":" + c.client_port, ""],
    ["user", (c) => c.user, ""],
    ["database", (c) => c.database, ""],
    ["application_name", (c) => c.application_name, ""],
    ["backend_pid", (c) => (c.backend_pid === null ? "" : String(c.backend_pid)), "num"],
    ["state", (c) => c.state, ""],
    ["state_age_s", (c) => duration(c.state_age_s), "num"],
    ["xact_age_s", (c) => duration(c.xact_age_s), "num"],
    ["protected_locks", (c) => (c.protected_locks === null ? "" : String(c.protected_locks)), "num"],
    ["waiters", (c) => (c.waiters === null ? "" : String(c.waiters)), "num"],
    ["last_statement", (c) => cut(c.last_statement, 60), "statement"],
  ];

  function sortValue(c, key) {
    if (key === "client") return c.client_addr + ":" + String(c.client_port).padStart(5, "0");
    const v = c[key];
    return v === null || v === undefined ? -Infinity : v;
  }

  function visible(c) {
    const match = (id, value) => {
      const want = $(id).value.trim().toLowerCase();
      return !want || String(value).toLowerCase().includes(want);
    };
    return match("filter-application", c.application_name) && match("filter-user", c.user) && match("filter-database", c.database);
  }

  // Rows are kept and updated in place, so a button stays the same element across refreshes.
  function row(id) {
    let tr = rows.get(id);
    if (tr) return tr;
    tr = el("tr", { "data-client": String(id) });
    // The button first: the statement column may run past the window's edge.
    const td = el("td");
    const button = el("button", { type: "button", class: "kill", "data-client": String(id) }, "Kill");
    button.addEventListener("click", () => kill(id, button));
    td.appendChild(button);
    tr.appendChild(td);
    for (const [, , cls] of COLUMNS) tr.appendChild(el("td", cls ? { class: cls } : {}));
    rows.set(id, tr);
    return tr;
  }

  function renderClients() {
    const body = $("clients-body");
    const live = new Set();
    const shown = clients.filter(visible).sort((a, b) => {
      const x = sortValue(a, sort.key);
      const y = sortValue(b, sort.key);
      return (x < y ? -1 : x > y ? 1 : a.id - b.id) * sort.dir;
    });
    if (armed && Date.now() > armed.until) armed = null;
    for (const c of shown) {
      live.add(c.id);
      const tr = row(c.id);
      tr.classList.toggle("holder", (c.waiters || 0) > 0 && (c.protected_locks || 0) > 0);
      COLUMNS.forEach(([, render], i) => {
        const cell = tr.cells[i + 1];
        const text = render(c) ?? "";
        if (cell.textContent !== text) cell.textContent = text;
        if (i === COLUMNS.length - 1) cell.title = c.last_statement || "";
      });
      const button = tr.querySelector("button.kill");
      const confirming = armed && armed.id === c.id;
      button.disabled = !token || c.backend_pid === null;
      button.title = token ? "terminate this client's backend (asks once more)" : "read-only: enter the API token to kill";
      button.textContent = confirming ? "Confirm kill" : "Kill";
      button.classList.toggle("confirm", !!confirming);
      body.appendChild(tr);
    }
    for (const [id, tr] of rows) {
      if (!live.has(id)) {
        tr.remove();
        if (!clients.some((c) => c.id === id)) rows.delete(id);
      }
    }
    for (const b of document.querySelectorAll("th button.sort")) {
      b.classList.toggle("asc", b.dataset.key === sort.key && sort.dir === 1);
      b.classList.toggle("desc", b.dataset.key === sort.key && sort.dir === -1);
    }
    $("clients-note").textContent = shown.length === clients.length
      ? clients.length + (clients.length === 1 ? " client" : " clients")
      : shown.length + " of " + clients.length + " clients shown";
  }

  async function kill(id, button) {
    if (!token) return;
    if (!armed || armed.id !== id || Date.now() > armed.until) {
      armed = { id, until: Date.now() + CONFIRM_MS };
      renderClients();
      return;
    }
    armed = null;
    button.disabled = true;
    button.textContent = "Killing…";
    try {
      const answer = await api("/api/clients/" + encodeURIComponent(id) + "/kill", { method: "POST" });
      setStatus("kill of client " + id + ": " + (answer ? answer.outcome + " — " + answer.detail : "no answer"), !answer || answer.outcome !== "terminated");
    } catch (e) {
      setStatus("kill of client " + id + " failed: " + e.message, true);
    }
    refreshSoon();
  }

  // ---- events -----------------------------------------------------------------------------

  function renderEvents(events) {
    const list = el("ol", { id: "events" });
    for (const e of events) {
      const li = el("li", { class: e.outcome, "data-client": String(e.client_id), "data-trigger": e.trigger, "data-outcome": e.outcome });
      const head = el("div");
      head.appendChild(el("span", { class: "when" }, e.time));
      head.appendChild(el("span", { class: "badge trigger" }, e.trigger + (e.cause ? " (" + e.cause + ")" : "")));
      head.appendChild(el("span", { class: "badge outcome" }, e.outcome));
      li.appendChild(head);
      li.appendChild(el("p", { class: "summary" }, e.summary));
      const evidence = [
        "client " + e.client_id + " " + e.user + "@" + e.database + " from " + e.client_addr + (e.application_name ? " (" + e.application_name + ")" : ""),
        "pid " + e.backend_pid,
        e.locks ? "locks " + e.locks : "no protected locks",
        e.waiters + (e.waiters === 1 ? " waiter" : " waiters"),
        e.state + " for " + duration(e.idle_ms / 1000),
        e.xact_ms !== null ? "transaction open " + duration(e.xact_ms / 1000) : "",
        e.last_statement ? "last statement: " + cut(e.last_statement, 120) : "",
        e.error ? "error: " + e.error : "",
      ].filter(Boolean).join(" · ");
      li.appendChild(el("p", { class: "evidence" }, evidence));
      list.appendChild(li);
    }
    $("events").replaceWith(list);
    $("events-note").textContent = events.length ? "" : "no events yet: the guard has not acted";
  }

  // ---- the refresh loop -------------------------------------------------------------------

  let timer = null;

  async function refresh() {
    clearTimeout(timer);
    try {
      const [graph, clientRows, events] = await Promise.all([
        api("/api/locks"),
        api("/api/clients"),
        api("/api/events"),
      ]);
      clients = clientRows || [];
      renderGraph(graph);
      renderClients();
      renderEvents(events || []);
      setStatus("updated " + new Date().toLocaleTimeString(), false);
    } catch (e) {
      if (e.status === 401) {
        setStatus("this endpoint needs the API token for reading too: type it above", true);
      } else if (e.status === 403) {
        setStatus("the token was refused (it is not admin.api_token)", true);
      } else {
        setStatus("cannot reach lockguard: " + e.message, true);
      }
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function refreshSoon() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 100);
  }

  function start() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const typed = $("token").value.trim();
      token = typed || null;
      $("token").value = "";
      setMode();
      refreshSoon();
    });
    $("token-forget").addEventListener("click", () => {
      token = null;
      armed = null;
      setMode();
      refreshSoon();
    });
    for (const id of ["filter-application", "filter-user", "filter-database"]) {
      $(id).addEventListener("input", renderClients);
    }
    for (const b of document.querySelectorAll("th button.sort")) {
      b.addEventListener("click", () => {
        sort = sort.key === b.dataset.key ? { key: sort.key, dir: -sort.dir } : { key: b.dataset.key, dir: b.dataset.key.endsWith("_s") ? -1 : 1 };
        renderClients();
      });
    }
    setMode();
    refresh();
  }

  start();
})();
