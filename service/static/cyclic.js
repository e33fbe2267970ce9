"use strict";
// Charts about cyclic schedules themselves, shared by the study, trial and preview pages:
// a schedule (LR and momentum per iteration, as run or predicted) and the LR range test
// (smoothed loss against LR on a log axis, with the bounds read off it marked).

const clrCyclic = (() => {
  const { num } = clr;
  const FINAL = ["complete", "pruned", "failed", "stopped"];
  // The range test's three readings, each drawn as a marked point on the curve and a
  // dashed vertical line at its exact LR.
  const MARKERS = [
    { key: "base_lr", label: "suggested base_lr", colour: "#2ca02c" },
    { key: "max_lr", label: "suggested max_lr", colour: clr.bestColour },
    { key: "loss_minimum_lr", label: "loss minimum", colour: "#6b7280" },
  ];

  // -- schedules ------------------------------------------------------------------------

  // LR and momentum at each iteration. A predicted schedule is dashed and its legend says
  // so (`predicted` is the words to use), so it is never mistaken for what a worker
  // recorded.
  function drawSchedule(name, box, schedule, predicted = "") {
    const shown = schedule.iterations.length;
    const withMomentum = schedule.momentum.length === shown;
    const suffix = predicted ? `, ${predicted}` : "";
    const dash = predicted ? [6, 4] : undefined;
    const series = [{ label: "iteration" },
      { label: `learning rate${suffix}`, stroke: clr.palette[0], width: 1.5, scale: "lr",
        dash, points: { show: false } }];
    const data = [schedule.iterations, schedule.lr];
    if (withMomentum) {
      series.push({ label: `momentum${suffix}`, stroke: clr.palette[1], width: 1.25,
        scale: "momentum", dash, points: { show: false } });
      data.push(schedule.momentum);
    }
    box.dataset.predicted = predicted ? "yes" : "no";
    return clr.chart(name, box, {
      scales: { x: { time: false } },
      axes: [{ label: "iteration" },
        { label: "learning rate", scale: "lr", size: 70,
          values: (u, ticks) => ticks.map((tick) => tickText(tick, 3)) },
        ...(withMomentum ? [{ label: "momentum", scale: "momentum", side: 1, size: 60,
          grid: { show: false } }] : [])],
      series,
    }, data, `${predicted ? "predicted" : "run"}:${withMomentum}`);
  }

  // POST /api/v1/schedule/preview; a refusal (422) comes back as the error's message.
  function preview(body) {
    return clr.api("/api/v1/schedule/preview", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  // uPlot passes null for the ticks it leaves unlabelled (the minor ticks of a log axis).
  function tickText(tick, digits) {
    return tick === null ? "" : num(tick, digits);
  }

  // -- the LR range test ----------------------------------------------------------------

  // The curve's LRs with each reading's LR merged in, so that its marker sits at its
  // exact LR rather than at the nearest recorded step; the curve bridges the gap.
  function rangeTestData(view) {
    const marks = MARKERS.filter(({ key }) => typeof view[key] === "number" && view[key] > 0);
    const losses = new Map(view.lrs.map((lr, index) => [lr, view.losses[index]]));
    const xs = [...new Set([...view.lrs, ...marks.map(({ key }) => view[key])])]
      .sort((a, b) => a - b);
    const curve = xs.map((lr) => (losses.has(lr) ? losses.get(lr) : null));
    const points = marks.map(({ key }) =>
      xs.map((lr) => (lr === view[key] ? lossAt(view, lr) : null)));
    return { marks, data: [xs, curve, ...points] };
  }

  // The smoothed loss at `lr`, interpolated on the log-LR axis the chart draws.
  function lossAt(view, lr) {
    const { lrs, losses } = view;
    if (lr <= lrs[0]) return losses[0];
    for (let index = 1; index < lrs.length; index += 1) {
      if (lr <= lrs[index]) {
        const t = Math.log(lr / lrs[index - 1]) / Math.log(lrs[index] / lrs[index - 1]);
        return losses[index - 1] + t * (losses[index] - losses[index - 1]);
      }
    }
    return losses[losses.length - 1];
  }

  // The loss axis stops a little above where the test itself stops (4x its best) or the
  // starting loss, whichever is higher: past it the loss explodes, and drawing all of it
  // would flatten the part of the curve the bounds are read from.
  function lossCeiling(view) {
    const best = Math.min(...view.losses);
    return 1.1 * Math.max(view.losses[0], 4 * best);
  }

  function rangeTestNote(view) {
    if (view.state === "queued") return "queued: no trial starts before it has run";
    if (view.state === "running") return "running on a worker; no trial starts before it ends";
    if (view.state === "stopped") return "stopped before it ended";
    if (view.state === "failed") return "failed: no bounds were read off the curve";
    const ended = view.diverged ? ", stopped where the loss diverged" : "";
    return `suggests base_lr ${num(view.base_lr, 3)} and max_lr ${num(view.max_lr, 3)} ` +
      `(the loss is lowest at ${num(view.loss_minimum_lr, 3)}); ` +
      `${view.lrs.length} points${ended}`;
  }

  // A range test as GET /api/v1/studies/{name}/range-test answers it (or a range-test
  // trial's result, with its state), in `box`; `parts` holds the nodes for its state,
  // note and (where the page does not show it already) error.
  function drawRangeTest(name, box, view, parts) {
    parts.state.className = `badge ${view.state}`;
    parts.state.textContent = view.state;
    parts.note.textContent = rangeTestNote(view);
    if (parts.error) {
      parts.error.hidden = !view.error;
      parts.error.textContent = view.error || "";
    }
    if (!view.lrs.length) {
      box.dataset.markers = "";
      return clr.emptyChart(name, box, FINAL.includes(view.state)
        ? "no curve was recorded" : "the curve appears when the range test ends");
    }
    const { marks, data } = rangeTestData(view);
    box.dataset.markers = marks.map(({ key }) => key).join(",");
    box.dataset.curvePoints = String(view.lrs.length);
    return clr.chart(name, box, {
      scales: { x: { time: false, distr: 3 }, y: { range: (u, low, high) => {
        const top = Math.min(high, lossCeiling(view));
        const margin = 0.05 * (top - low) || 0.1;
        return [low - margin, top + margin];
      } } },
      axes: [
        { label: "learning rate (log)", values: (u, ticks) => ticks.map((t) => tickText(t, 1)) },
        { label: "smoothed loss", size: 60,
          values: (u, ticks) => ticks.map((t) => tickText(t, 3)) },
      ],
      series: [{ label: "learning rate", value: (u, v) => num(v, 3) },
        { label: "smoothed loss", stroke: clr.palette[0], width: 2, spanGaps: true,
          points: { show: false }, value: (u, v) => num(v, 4) },
        // The legend shows each reading's LR, whatever the cursor points at.
        ...marks.map(({ key, label, colour }) => ({
          label, stroke: colour, fill: colour, value: () => num(view[key], 3),
          paths: () => null, points: { show: true, size: 10, fill: colour, stroke: colour },
        }))],
      hooks: { draw: [(u) => drawMarkerLines(u, marks, view)] },
    }, data, marks.map(({ key }) => `${key}=${view[key]}`).join(","));
  }

  // A dashed vertical line at each reading's LR, hidden with its series in the legend.
  function drawMarkerLines(u, marks, view) {
    const ctx = u.ctx;
    const { top, height } = u.bbox;
    ctx.save();
    ctx.lineWidth = 1.5 * uPlot.pxRatio;
    ctx.setLineDash([6 * uPlot.pxRatio, 4 * uPlot.pxRatio]);
    marks.forEach(({ key, colour }, index) => {
      if (!u.series[index + 2].show) return;
      const x = Math.round(u.valToPos(view[key], "x", true));
      ctx.strokeStyle = colour;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
    });
    ctx.restore();
  }

  return { drawSchedule, preview, drawRangeTest, MARKERS };
})();
