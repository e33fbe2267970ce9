"use strict";
// Shared by every dashboard page: fetching with the token, polling, formatting, DOM
// building, and uPlot charts that record their series and point counts on their
// container (data-series, data-points), for people reading the page and for tests.

const clr = (() => {
  const TOKEN_KEY = "clrsearch.token";
  const TOKEN_COOKIE = "clrsearch_token";
  const query = new URLSearchParams(location.search);
  // ?poll_ms= shortens the polling interval (tests; a dashboard on a wall screen).
  const pollMs = Math.max(200, Number(query.get("poll_ms")) || 2000);
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf",
    "#bcbd22", "#e377c2", "#7f7f7f", "#d62728"];
  const stateColours = {
    complete: "rgba(31, 119, 180, 0.55)", pruned: "rgba(140, 140, 140, 0.22)",
    failed: "rgba(214, 39, 40, 0.45)", running: "rgba(242, 142, 43, 0.95)",
    stopped: "rgba(107, 114, 128, 0.35)", queued: "rgba(140, 107, 177, 0.5)",
  };
  const bestColour = "#c2185b";
  const charts = {};

  function initial() {
    const node = document.getElementById("initial-data");
    return node ? JSON.parse(node.textContent) : null;
  }

  // -- the token ------------------------------------------------------------------------

  function token() {
    return localStorage.getItem(TOKEN_KEY) || "";
  }

  function saveToken(value) {
    // The cookie lets page loads through when a read token is set; the header carries
    // it on every fetch, which is all the admin routes accept.
    if (value) {
      localStorage.setItem(TOKEN_KEY, value);
      document.cookie = `${TOKEN_COOKIE}=${encodeURIComponent(value)}; path=/; SameSite=Strict`;
    } else {
      localStorage.removeItem(TOKEN_KEY);
      document.cookie = `${TOKEN_COOKIE}=; path=/; max-age=0; SameSite=Strict`;
    }
  }

  function wireTokenForm() {
    const form = document.getElementById("token-form");
    if (!form) return;
    const input = document.getElementById("token-input");
    input.value = token();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      saveToken(input.value.trim());
      location.reload();
    });
    document.getElementById("token-clear").addEventListener("click", () => {
      saveToken("");
      location.reload();
    });
  }

  async function api(path, options = {}) {
    const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) {
        // not JSON: keep the status text
      }
      const error = new Error(detail);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  // Calls `step` every pollMs until the returned function is called. A failed step marks
  // the header's live indicator and is tried again at the next tick.
  function poll(step) {
    const status = document.getElementById("live-status");
    let stopped = false;
    async function tick() {
      if (stopped) return;
      try {
        await step();
        if (!stopped) {
          status.classList.remove("stale");
          status.textContent = "live";
        }
      } catch (error) {
        status.classList.add("stale");
        status.textContent = `offline (${error.message}); retrying`;
      }
      if (!stopped) setTimeout(tick, pollMs);
    }
    setTimeout(tick, pollMs);
    return () => {
      stopped = true;
      status.classList.remove("stale");
      status.textContent = "final";
    };
  }

  // -- formatting -----------------------------------------------------------------------

  function num(value, digits = 4) {
    if (value === null || value === undefined) return "—";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    const size = Math.abs(value);
    if (size !== 0 && (size < 1e-3 || size >= 1e6)) return value.toExponential(digits - 1);
    return String(Number(value.toPrecision(digits)));
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  // The server's times are naive UTC (the database clock).
  function time(iso) {
    if (!iso) return "—";
    const when = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
    return when.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }

  function pct(part, whole) {
    return whole > 0 ? Math.min(100, (100 * part) / whole) : 0;
  }

  // -- DOM ------------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function badge(text, kind = text) {
    return el("span", { class: `badge ${kind}`, text });
  }

  function message(text, isError = false) {
    const node = document.getElementById("message");
    if (!node) return;
    node.hidden = !text;
    node.textContent = text || "";
    node.classList.toggle("error", isError);
  }

  function keyValues(table, entries) {
    table.replaceChildren(
      ...entries.map(([key, value]) => el("tr", {}, el("th", { text: key }), el("td", {}, value))),
    );
  }

  const enc = encodeURIComponent;
  const studyUrl = (name) => `/dashboard/studies/${enc(name)}`;
  const trialUrl = (name, number) => `${studyUrl(name)}/trials/${number}`;
  const studyApi = (name) => `/dashboard/api/studies/${enc(name)}`;

  // A stop button that asks for a second click, and says when a token is needed.
  function stopButton(name, after, button) {
    button = button || el("button", { class: "danger", type: "button" });
    const label = button.textContent || "stop";
    let armed = false;
    let timer = null;
    const disarm = () => {
      armed = false;
      button.classList.remove("armed");
      button.textContent = label;
    };
    button.textContent = label;
    button.addEventListener("click", async () => {
      if (!armed) {
        armed = true;
        button.classList.add("armed");
        button.textContent = "click again to stop";
        timer = setTimeout(disarm, 4000);
        return;
      }
      clearTimeout(timer);
      button.disabled = true;
      try {
        await api(`/api/v1/studies/${enc(name)}/stop`, { method: "POST" });
        message(`study ${name} stopped: queued trials end now, running ones at their next call`);
        await after();
      } catch (error) {
        const needsToken = error.status === 401 || error.status === 403;
        message(needsToken
          ? `stopping needs the admin token (${error.message}): enter it under "API token"`
          : `could not stop ${name}: ${error.message}`, true);
        button.disabled = false;
        disarm();
      }
    });
    return button;
  }

  // -- charts ---------------------------------------------------------------------------

  function countPoints(data) {
    let points = 0;
    for (const ys of data.slice(1)) {
      for (const y of ys) if (y !== null && y !== undefined) points += 1;
    }
    return points;
  }

  // Draw `data` in `box` as chart `name`. The chart is rebuilt only when `shape` (the
  // series it holds) changes; new data alone goes through setData.
  function chart(name, box, options, data, shape) {
    box.dataset.series = String(data.length - 1);
    box.dataset.points = String(countPoints(data));
    const existing = charts[name];
    if (existing && existing.shape === shape) {
      existing.plot.setData(data);
      return existing.plot;
    }
    if (existing) existing.plot.destroy();
    box.replaceChildren();
    const plot = new uPlot(
      Object.assign({ width: box.clientWidth || 600, height: 260 }, options), data, box,
    );
    charts[name] = { plot, shape, box };
    return plot;
  }

  function emptyChart(name, box, text) {
    if (charts[name]) charts[name].plot.destroy();
    delete charts[name];
    box.dataset.series = "0";
    box.dataset.points = "0";
    box.replaceChildren(el("div", { class: "empty", text }));
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const { plot, box } of Object.values(charts)) {
        plot.setSize({ width: box.clientWidth, height: plot.height });
      }
    }, 150);
  });

  wireTokenForm();

  return {
    initial, api, poll, pollMs, num, duration, time, pct, el, badge, message, keyValues,
    stopButton, studyUrl, trialUrl, studyApi, chart, emptyChart, charts, palette,
    stateColours, bestColour, enc,
  };
})();
