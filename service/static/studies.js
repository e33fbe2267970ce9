"use strict";
// The studies page: one row per study, redrawn from GET /api/v1/studies at each poll.

(() => {
  const { el, num, time, pct } = clr;
  const table = document.getElementById("studies");
  const body = table.querySelector("tbody");
  // One stop button per study, kept across redraws, so that a poll between the two
  // clicks does not disarm it.
  const stopButtons = new Map();

  function stopButton(name) {
    if (!stopButtons.has(name)) stopButtons.set(name, clr.stopButton(name, refresh));
    return stopButtons.get(name);
  }

  function row(study) {
    const counts = study.counts;
    const done = counts.complete + counts.pruned + counts.failed + counts.stopped;
    const progress = el("span", { class: "mini-progress" },
      el("span", { style: `width: ${pct(done, study.n_trials)}%` }),
      el("span", { style: `width: ${pct(counts.running, study.n_trials)}%` }));
    const direction = study.direction === "minimize" ? "min" : "max";
    return el("tr", { dataset: { study: study.name } },
      el("td", {}, el("a", { href: clr.studyUrl(study.name), text: study.name })),
      el("td", { title: study.stop_reason || "" }, clr.badge(study.state)),
      el("td", { class: "progress-cell" }, progress, `${done} / ${study.n_trials}`),
      el("td", { class: "num running-count", text: counts.running }),
      el("td", { class: "num", text: num(study.best_value) }),
      el("td", { text: `${study.objective} (${direction})` }),
      el("td", { text: study.sampler }),
      el("td", { text: study.pruner }),
      el("td", { text: time(study.created_at) }),
      el("td", { text: time(study.updated_at) }),
      el("td", {}, study.state === "running" ? stopButton(study.name) : null));
  }

  function render(studies) {
    document.getElementById("empty").hidden = studies.length > 0;
    table.dataset.rows = String(studies.length);
    body.replaceChildren(...studies.map(row));
  }

  async function refresh() {
    render(await clr.api("/api/v1/studies"));
  }

  render(clr.initial().studies);
  clr.poll(refresh);
})();
