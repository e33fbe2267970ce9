"use strict";
// The study page. Its first response embeds the header's facts and the first page of the
// trial table; the charts are fetched next. It then polls a stamp that changes whenever
// the study's data may have changed, and only then refetches what it shows.

(() => {
  const { el, num, time, duration, pct, api } = clr;
  const byId = (id) => document.getElementById(id);
  const initial = clr.initial();
  let live = initial.live;
  const name = live.study.name;
  const base = clr.studyApi(name);
  const table = { data: initial.table, offset: 0, limit: initial.table.limit, state: "",
    sort: initial.table.sort, order: initial.table.descending ? "desc" : "asc" };

  // -- header -----------------------------------------------------------------------------

  const stop = clr.stopButton(name, () => refresh(true), byId("stop"));

  function renderHeader() {
    const study = live.study;
    const counts = study.counts;
    const done = counts.complete + counts.pruned + counts.failed + counts.stopped;
    const state = byId("study-state");
    state.className = `badge ${study.state}`;
    state.textContent = study.state;
    stop.hidden = study.state !== "running";
    byId("progress-done").style.width = `${pct(done, study.n_trials)}%`;
    byId("progress-running").style.width = `${pct(counts.running, study.n_trials)}%`;
    byId("progress-text").textContent =
      `${done} / ${study.n_trials} done, ${counts.running} running now`;
    const facts = [
      ["objective", `${study.objective} (${study.direction})`],
      ["best value", num(study.best_value)],
      ["trials", `${counts.complete} complete, ${counts.pruned} pruned, ${counts.failed} ` +
        `failed, ${counts.stopped} stopped, ${counts.queued} queued`],
      ["sampler", study.sampler],
      ["pruner", study.pruner],
      ["parallelism", study.parallelism],
      ["task", `${study.spec.task.model} on ${study.spec.task.dataset}, ` +
        `${study.spec.task.epochs} epochs, batch ${study.spec.task.batch_size}`],
      ["created", time(study.created_at)],
      ["updated", time(study.updated_at)],
    ];
    if (study.stop_reason) facts.push(["stopped because", study.stop_reason]);
    byId("facts").replaceChildren(
      ...facts.flatMap(([key, value]) => [el("dt", { text: key }), el("dd", { text: value })]));

    const best = study.best_trial;
    const link = byId("best-link");
    if (best) {
      link.textContent = `#${best.number}`;
      link.href = clr.trialUrl(name, best.number);
      clr.keyValues(byId("best-params"), [[study.objective, num(best.value)],
        ...live.param_columns.map((key) => [key, num(best.params[key])])]);
    } else {
      link.textContent = "";
      clr.keyValues(byId("best-params"), [["", "no complete trial yet"]]);
    }
    clr.keyValues(byId("fixed-params"),
      Object.entries(live.fixed_params).map(([key, value]) => [key, fixedText(value)]));
  }

  function fixedText(value) {
    if (value !== null && typeof value === "object") {
      return Object.entries(value).map(([key, item]) => `${key} ${item}`).join(", ");
    }
    return num(value);
  }

  // -- trial table ------------------------------------------------------------------------

  function columns() {
    return [
      { key: "number", label: "#", cell: (t) => [el("a", { href: clr.trialUrl(name, t.number),
        text: t.number }), t.kind === "cyclic" ? null : [" ", clr.badge(t.kind)]] },
      { key: "state", label: "state", cell: (t) => clr.badge(t.state) },
      // A range test's value is the max_lr it suggests, not an objective.
      { key: "value", label: live.study.objective, num: true, cell: (t) =>
        (t.kind === "range_test" && t.value !== null ? `max_lr ${num(t.value)}` : num(t.value)) },
      ...live.param_columns.map((param) => ({
        key: `params.${param}`, label: param, num: true, cell: (t) => num(t.params[param]),
      })),
      { key: "epochs_run", label: "epochs", num: true, cell: (t) => t.epochs_run },
      { key: "duration", label: "duration", num: true, cell: (t) => duration(t.duration_s) },
      { key: "worker", label: "worker", cell: (t) => t.worker_id || "—" },
      { key: "attempts", label: "attempts", num: true, cell: (t) => t.attempts },
      { key: null, label: "error", cell: (t) => t.error || "" },
    ];
  }

  function renderTable() {
    const node = byId("trials");
    const data = table.data;
    const cols = columns();
    const arrow = table.order === "desc" ? " ▼" : " ▲";
    node.tHead.replaceChildren(el("tr", {}, cols.map((col) => el("th", {
      class: [col.key ? "sortable" : "", col.key === table.sort ? "sorted" : ""].join(" "),
      dataset: col.key ? { sort: col.key } : {},
      text: col.label + (col.key === table.sort ? arrow : ""),
      onclick: col.key ? () => sortBy(col.key) : null,
    }))));
    const bestNumber = live.study.best_trial ? live.study.best_trial.number : null;
    node.tBodies[0].replaceChildren(...data.trials.map((trial) => el("tr", {
      class: trial.number === bestNumber ? "best-row" : "",
      dataset: { number: trial.number, state: trial.state },
    }, cols.map((col) => el("td", {
      class: col.key === null ? "error" : col.num ? "num" : "",
      title: col.key === null ? trial.error || "" : null,
    }, col.cell(trial))))));
    node.dataset.total = String(data.total);
    node.dataset.rows = String(data.trials.length);
    const first = data.total ? data.offset + 1 : 0;
    byId("page-text").textContent =
      `${first}–${data.offset + data.trials.length} of ${data.total}`;
    byId("page-prev").disabled = data.offset === 0;
    byId("page-next").disabled = data.offset + data.limit >= data.total;
  }

  async function loadTable() {
    const params = new URLSearchParams({ offset: table.offset, limit: table.limit,
      sort: table.sort, order: table.order });
    if (table.state) params.set("state", table.state);
    table.data = await api(`${base}/trials?${params}`);
    renderTable();
  }

  function sortBy(key) {
    table.order = key === table.sort && table.order === "asc" ? "desc" : "asc";
    if (key !== table.sort && key === "number") table.order = "desc";
    table.sort = key;
    table.offset = 0;
    loadTable().catch(showError);
  }

  byId("page-prev").addEventListener("click", () => {
    table.offset = Math.max(0, table.offset - table.limit);
    loadTable().catch(showError);
  });
  byId("page-next").addEventListener("click", () => {
    table.offset += table.limit;
    loadTable().catch(showError);
  });
  byId("state-filter").addEventListener("change", (event) => {
    table.state = event.target.value;
    table.offset = 0;
    loadTable().catch(showError);
  });
  byId("export-csv").href = `${base}/export.csv`;
  byId("export-json").href = `${base}/export.json`;

  function showError(error) {
    clr.message(`could not load: ${error.message}`, true);
  }

  // -- charts -----------------------------------------------------------------------------

  async function loadHistory() {
    const history = await api(`${base}/history`);
    const box = byId("chart-history");
    byId("history-note").textContent = `${history.numbers.length} complete trials`;
    if (!history.numbers.length) return clr.emptyChart("history", box, "no complete trial yet");
    clr.chart("history", box, {
      scales: { x: { time: false } },
      axes: [{ label: "trial" }, { label: live.study.objective, size: 60 }],
      series: [
        { label: "trial" },
        { label: "value", stroke: clr.stateColours.complete, paths: () => null,
          points: { show: true, size: 6, fill: clr.stateColours.complete } },
        { label: "best so far", stroke: clr.bestColour, width: 2,
          paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } },
      ],
    }, [history.numbers, history.values, history.best_so_far], "history");
  }

  async function loadCurves() {
    const curves = await api(`${base}/curves`);
    const box = byId("chart-curves");
    const shown = curves.curves.length;
    byId("curves-note").textContent = shown < curves.total_trials
      ? `${shown} of ${curves.total_trials} trials: the best, the running and the latest`
      : `${shown} trials`;
    if (!shown) return clr.emptyChart("curves", box, "no epoch reported yet");
    // The best curve goes last so that it is drawn on top of the others.
    const ordered = curves.curves.filter((c) => c.number !== curves.best_number)
      .concat(curves.curves.filter((c) => c.number === curves.best_number));
    const readout = byId("curves-readout");
    // Losses on a log scale: one diverging trial would otherwise flatten all the others.
    const positive = curves.curves.every((c) => c.values.every((v) => v === null || v > 0));
    const log = curves.metric.endsWith("loss") && positive;
    const plot = clr.chart("curves", box, {
      scales: { x: { time: false }, y: { distr: log ? 3 : 1 } },
      legend: { show: false },
      cursor: { focus: { prox: 20 } },
      focus: { alpha: 0.35 },
      axes: [{ label: "epoch" }, { label: curves.metric + (log ? " (log)" : ""), size: 60,
        values: (u, ticks) => ticks.map((tick) => num(tick, 2)) }],
      series: [{ label: "epoch" }, ...ordered.map((curve) => {
        const best = curve.number === curves.best_number;
        return { label: `trial ${curve.number} (${curve.state}${best ? ", best" : ""})`,
          stroke: best ? clr.bestColour : clr.stateColours[curve.state],
          width: best ? 3 : curve.state === "pruned" ? 1 : 1.5 };
      })],
      hooks: { setSeries: [(u, index) => {
        readout.textContent = index ? u.series[index].label : "";
        box.dataset.focused = index ? ordered[index - 1].number : "";
      }] },
    }, [curves.epochs, ...ordered.map((curve) => curve.values)],
    `${log}:${curves.best_number}:` + ordered.map((c) => `${c.number}:${c.state}`).join(","));
    if (!box.dataset.clickable) {
      box.dataset.clickable = "yes";
      box.addEventListener("click", () => {
        if (box.dataset.focused) location.href = clr.trialUrl(name, box.dataset.focused);
      });
    }
    return plot;
  }

  async function loadSchedules() {
    const data = await api(`${base}/schedules`);
    const box = byId("chart-schedules");
    const count = data.schedules.length;
    byId("schedules-note").textContent = count
      ? `top ${count}, ${data.iterations.length} points each (log scale)` : "";
    if (!count) return clr.emptyChart("schedules", box, "no complete trial yet");
    clr.chart("schedules", box, {
      scales: { x: { time: false }, y: { distr: 3 } },
      axes: [{ label: "iteration" }, { label: "learning rate", size: 70,
        values: (u, ticks) => ticks.map((tick) => num(tick, 2)) }],
      series: [{ label: "iteration" }, ...data.schedules.map((schedule, index) => ({
        label: `trial ${schedule.number} (${num(schedule.value)})`,
        stroke: clr.palette[index % clr.palette.length], width: index === 0 ? 2 : 1.25,
        points: { show: false },
      }))],
    }, [data.iterations, ...data.schedules.map((schedule) => schedule.lr)],
    data.schedules.map((schedule) => schedule.number).join(","));
  }

  async function loadImportances() {
    const data = await api(`${base}/importances`);
    const box = byId("chart-importances");
    const entries = Object.entries(data.importances).sort((a, b) => b[1] - a[1]);
    byId("importances-note").textContent = entries.length
      ? `Optuna's evaluator, ${data.complete_trials} complete trials` : "";
    box.dataset.bars = String(entries.length);
    if (!entries.length) {
      box.replaceChildren(el("div", { class: "empty", text: data.note || "none yet" }));
      return;
    }
    const top = entries[0][1] || 1;
    box.replaceChildren(...entries.map(([param, value]) => el("div", { class: "row" },
      el("span", { text: param }),
      el("span", { class: "track" }, el("span", { class: "fill",
        style: `display: block; width: ${(100 * value) / top}%` })),
      el("span", { class: "value", text: value.toFixed(3) }))));
  }

  // Kept so that a resize can redraw the canvas without fetching again.
  let parallelData = null;

  async function loadParallel() {
    const data = await api(`${base}/parallel`);
    parallelData = data;
    const shown = data.lines.length;
    byId("parallel-note").textContent = shown < data.total_trials
      ? `${shown} of ${data.total_trials}, evenly sampled; darker is better`
      : `${shown} trials; darker is better, the best in red`;
    drawParallel(byId("chart-parallel"), data);
  }

  async function loadComparison() {
    const data = await api(`${base}/comparison`);
    const box = byId("comparison-box");
    const chartBox = byId("chart-comparison");
    box.hidden = data === null;
    if (data === null) return clr.emptyChart("comparison", chartBox, "");
    const runs = [data.cyclic, data.baseline].filter((run) => run !== null);
    const label = (run) => run.kind === "cyclic"
      ? `best CyclicLR (trial ${run.number}, ${num(run.value)})`
      : `best baseline (trial ${run.number}, ${num(run.value)}: ${paramsText(run.params)})`;
    byId("comparison-note").textContent = `${data.metric} per epoch. ` +
      reachText(live.study.baseline_comparison, data.metric);
    clr.chart("comparison", chartBox, {
      scales: { x: { time: false } },
      axes: [{ label: "epoch" }, { label: data.metric, size: 60 }],
      series: [{ label: "epoch" }, ...runs.map((run) => ({ label: label(run),
        stroke: run.kind === "cyclic" ? clr.bestColour : "#374151", width: 2,
        dash: run.kind === "cyclic" ? undefined : [6, 4] }))],
    }, [data.epochs, ...runs.map((run) => run.values)],
    runs.map((run) => run.number).join(","));
  }

  // Smith's headline figure, as the server computes it (StudyDetail.baseline_comparison).
  function reachText(summary, metric) {
    if (!summary) return "";
    const target = `the baseline's final ${metric} (${num(summary.baseline_value)})`;
    if (summary.cyclic_iterations_to_reach === null) {
      return `The best CyclicLR trial did not reach ${target}.`;
    }
    const ratio = summary.iteration_ratio === null ? ""
      : `: ${num(summary.iteration_ratio, 2)} of the baseline's ` +
        `${summary.baseline_iterations} iterations`;
    return `The best CyclicLR trial reached ${target} after ` +
      `${summary.cyclic_iterations_to_reach} iterations${ratio}.`;
  }

  function paramsText(params) {
    return Object.entries(params).map(([key, value]) => `${key} ${num(value)}`).join(", ");
  }

  // -- the LR range test -----------------------------------------------------------------

  // Every study with lr_bounds "auto" gets its range-test trial when it is created, so the
  // spec says whether there is one without a request that would answer 404.
  const hasRangeTest = live.study.spec.lr_bounds === "auto";
  let rangeTestEnded = false;

  async function loadRangeTest() {
    if (!hasRangeTest || rangeTestEnded) return;
    const view = await api(`/api/v1/studies/${clr.enc(name)}/range-test?max_points=1000`);
    // An ended range test never changes again: it is not fetched at later updates.
    rangeTestEnded = ["complete", "failed", "stopped"].includes(view.state);
    const link = byId("range-test-link");
    link.textContent = `trial #${view.trial_number}`;
    link.href = clr.trialUrl(name, view.trial_number);
    clrCyclic.drawRangeTest("rangeTest", byId("chart-range-test"), view, {
      state: byId("range-test-state"), note: byId("range-test-note"),
      error: byId("range-test-error"),
    });
  }

  // -- parallel coordinates (drawn on a canvas: uPlot has no such chart) -----------------

  function drawParallel(box, data) {
    const canvas = box.querySelector("canvas");
    const axes = [...data.axes, { name: data.objective, kind: "float", log: false }];
    box.dataset.lines = String(data.lines.length);
    box.dataset.axes = String(axes.length);
    const width = box.clientWidth || 800;
    const height = 320;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "12px system-ui, sans-serif";
    if (!data.lines.length) {
      ctx.fillStyle = "#6b7280";
      ctx.textAlign = "center";
      ctx.fillText("no complete trial yet", width / 2, height / 2);
      return;
    }
    const top = 36;
    const bottom = height - 24;
    const left = 60;
    const right = width - 70;
    const step = axes.length > 1 ? (right - left) / (axes.length - 1) : 0;
    const xs = axes.map((_, index) => left + index * step);
    const columnOf = (line, index) => (index < data.axes.length ? line.params[index] : line.value);
    const scales = axes.map((axis, index) =>
      makeScale(axis, data.lines.map((line) => columnOf(line, index)), top, bottom));

    // Worse lines first, so the better ones are drawn over them.
    const better = data.direction === "minimize" ? (a, b) => b.value - a.value
      : (a, b) => a.value - b.value;
    const ordered = [...data.lines].sort(better);
    ordered.forEach((line, rank) => {
      const isBest = line.number === data.best_number;
      ctx.strokeStyle = isBest ? clr.bestColour
        : ramp(ordered.length > 1 ? rank / (ordered.length - 1) : 1);
      ctx.lineWidth = isBest ? 2.5 : 1;
      ctx.beginPath();
      let drawing = false;
      axes.forEach((_, index) => {
        const y = scales[index].y(columnOf(line, index));
        if (y === null) {
          drawing = false;
          return;
        }
        if (drawing) ctx.lineTo(xs[index], y);
        else ctx.moveTo(xs[index], y);
        drawing = true;
      });
      ctx.stroke();
    });

    ctx.lineWidth = 1;
    axes.forEach((axis, index) => {
      const x = xs[index];
      ctx.strokeStyle = "#374151";
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.stroke();
      ctx.fillStyle = "#1d2430";
      ctx.textAlign = "center";
      ctx.fillText(axis.name + (axis.log ? " (log)" : ""), x, top - 20);
      ctx.fillStyle = "#4b5563";
      ctx.textAlign = "left";
      for (const [text, y] of scales[index].ticks) ctx.fillText(text, x + 4, y + 4);
    });
  }

  function makeScale(axis, values, top, bottom) {
    if (axis.kind === "choice") {
      const categories = (axis.categories || []).map(String);
      const at = (index) => categories.length > 1
        ? bottom - (index * (bottom - top)) / (categories.length - 1) : (top + bottom) / 2;
      return {
        y: (value) => {
          const index = categories.indexOf(String(value));
          return index < 0 ? null : at(index);
        },
        ticks: categories.map((category, index) => [category, at(index)]),
      };
    }
    const forward = axis.log ? Math.log10 : (v) => v;
    const usable = values.filter((v) => typeof v === "number" && (!axis.log || v > 0));
    let low = Math.min(...usable.map(forward));
    let high = Math.max(...usable.map(forward));
    if (!(high > low)) {
      low -= 0.5;
      high += 0.5;
    }
    const y = (value) => (typeof value !== "number" || (axis.log && value <= 0) ? null
      : bottom - ((forward(value) - low) / (high - low)) * (bottom - top));
    const back = axis.log ? (t) => 10 ** t : (t) => t;
    const ticks = [low, (low + high) / 2, high].map((t) => [num(back(t), 3), y(back(t))]);
    return { y, ticks };
  }

  // From light yellow (worst) through teal to deep purple (best), like viridis reversed.
  function ramp(fraction) {
    const stops = [[253, 231, 37], [33, 145, 140], [68, 1, 84]];
    const scaled = fraction * (stops.length - 1);
    const index = Math.min(stops.length - 2, Math.floor(scaled));
    const t = scaled - index;
    const [r, g, b] = stops[index].map((c, k) => Math.round(c + t * (stops[index + 1][k] - c)));
    return `rgba(${r}, ${g}, ${b}, 0.7)`;
  }

  // -- live updates -----------------------------------------------------------------------

  let lastComplete = -1;

  // Learning curves change with every epoch reported, and the range test until it ends;
  // everything else on the page draws complete trials only, so it is fetched again only
  // when another trial completes.
  async function loadCharts() {
    const jobs = [loadCurves(), loadRangeTest()];
    // Baselines count apart from the search's trials (other_counts), and a completed
    // baseline changes the comparison chart.
    const completed = live.study.counts.complete + live.study.other_counts.complete;
    if (completed !== lastComplete) {
      lastComplete = completed;
      jobs.push(loadHistory(), loadSchedules(), loadParallel(), loadComparison(),
        loadImportances());
    }
    await Promise.all(jobs);
  }

  async function refresh(force = false) {
    const next = await api(`${base}/live`);
    if (!force && next.stamp === live.stamp) return;
    live = next;
    renderHeader();
    await Promise.all([loadTable(), loadCharts()]);
  }

  window.addEventListener("resize", () => {
    if (parallelData) drawParallel(byId("chart-parallel"), parallelData);
  });

  byId("range-test-box").hidden = !hasRangeTest;
  renderHeader();
  renderTable();
  loadCharts().catch(showError);
  clr.poll(refresh);
})();
