"use strict";
// The workers page: each worker, what it holds, and whether its lease is being renewed.

(() => {
  const { el, num, time, duration } = clr;
  const table = document.getElementById("workers");
  const body = table.querySelector("tbody");

  function row(worker) {
    const holds = worker.study_name === null ? "—" : el("a", {
      href: clr.trialUrl(worker.study_name, worker.trial_number),
      text: `${worker.study_name} · trial ${worker.trial_number}`,
    });
    return el("tr", { dataset: { worker: worker.id, health: worker.health } },
      el("td", { text: worker.id }),
      el("td", { text: worker.host || "—" }),
      el("td", { text: worker.device }),
      el("td", {}, holds),
      el("td", { title: time(worker.last_contact_at),
        text: `${duration(worker.last_contact_s_ago)} ago` }),
      el("td", { class: "num", text: worker.lease_left_s === null ? "—"
        : `${num(Math.max(0, worker.lease_left_s), 3)} s` }),
      el("td", {}, clr.badge(worker.health)),
      el("td", { text: time(worker.first_seen_at) }));
  }

  function render(workers) {
    document.getElementById("empty").hidden = workers.length > 0;
    table.dataset.rows = String(workers.length);
    body.replaceChildren(...workers.map(row));
  }

  render(clr.initial().workers);
  clr.poll(async () => render(await clr.api("/dashboard/api/workers")));
})();
