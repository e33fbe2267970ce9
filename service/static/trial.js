"use strict";
// The trial page: the LR and momentum the worker applied at each step (recorded, not
// recomputed; before the first report, the schedule predicted for it, marked so), the
// per-epoch curves, and the trial's facts. Polls while the trial runs.

(() => {
  const { el, num, time, duration } = clr;
  const byId = (id) => document.getElementById(id);
  const initial = clr.initial();
  let trial = initial.trial;
  const url = `/api/v1/studies/${clr.enc(trial.study_name)}/trials/${trial.number}` +
    "?max_points=5000";
  const FINAL = ["complete", "pruned", "failed", "stopped"];
  const WAITING = ["queued", "running"];

  function render() {
    const state = byId("trial-state");
    state.className = `badge ${trial.state}`;
    state.textContent = trial.state;
    const ran = trial.started_at
      ? ((trial.finished_at ? new Date(`${trial.finished_at}Z`) : Date.now())
        - new Date(`${trial.started_at}Z`)) / 1000 : null;
    const facts = [
      ["study", el("a", { href: clr.studyUrl(trial.study_name), text: trial.study_name })],
      ["kind", trial.kind],
      // A range test's value is the max_lr it suggests, not an objective.
      [trial.kind === "range_test" ? "suggested max_lr" : initial.objective, num(trial.value)],
      ["epochs run", trial.epochs_run],
      ["worker", trial.worker_id || "—"],
      ["attempts", trial.attempts],
      ["created", time(trial.created_at)],
      ["started", time(trial.started_at)],
      ["finished", time(trial.finished_at)],
      ["duration", duration(ran)],
    ];
    byId("facts").replaceChildren(...facts.flatMap(([key, value]) =>
      [el("dt", { text: key }), el("dd", {}, value)]));
    const error = byId("error");
    error.hidden = !trial.error;
    error.textContent = trial.error || "";
    clr.keyValues(byId("params"),
      Object.entries(trial.params).map(([key, value]) => [key, num(value, 6)]));
    drawTrace();
    drawEpochs();
  }

  function drawTrace() {
    if (trial.kind === "range_test") return drawRangeTest();
    const trace = trial.lr_trace;
    const box = byId("chart-trace");
    const shown = trace.iterations.length;
    if (awaitsFirstStep()) return drawPredicted(box);
    showPredicted(false);
    byId("trace-note").textContent = shown < trace.total_steps
      ? `${trace.total_steps} steps, ${shown} shown (evenly thinned on the server)`
      : `${trace.total_steps} steps`;
    if (!shown) return clr.emptyChart("trace", box, "no epoch reported yet");
    clrCyclic.drawSchedule("trace", box, trace);
  }

  // -- the predicted schedule of a trial not yet run --------------------------------------

  // Asked for once: the prediction depends only on the trial's parameters and the task.
  let predicted = null;

  function awaitsFirstStep() {
    return trial.kind === "cyclic" && WAITING.includes(trial.state) &&
      !trial.lr_trace.iterations.length;
  }

  function showPredicted(on) {
    byId("trace-title").textContent = on ? "LR and momentum at each optimizer step"
      : "LR and momentum at each optimizer step, as run";
    byId("trace-predicted").hidden = !on;
  }

  // The schedule the server predicts with the workers' own code, until the first report
  // brings the recorded one.
  async function drawPredicted(box) {
    showPredicted(true);
    if (!predicted) {
      predicted = clrCyclic.preview({ params: trial.params, task: initial.task })
        .then((schedule) => ({ schedule }), (error) => ({ error }));
    }
    const { schedule, error } = await predicted;
    // A later update may have brought the recorded trace (or the end) meanwhile; it wins.
    if (!awaitsFirstStep()) return;
    const note = byId("trace-note");
    if (error) {
      if (error.status !== 422) predicted = null; // not a refusal: ask again next update
      note.replaceChildren();
      box.dataset.predicted = "no";
      clr.emptyChart("trace", box, error.status === 422
        ? `no prediction: ${error.message}` : `could not predict: ${error.message}`);
      if (error.status === 422) {
        box.firstChild.append(" (the ", clr.el("a", { href: previewUrl(), text:
          "preview page" }), " takes batches per epoch)");
      }
      return;
    }
    const thinned = schedule.iterations.length < schedule.total_steps
      ? `, ${schedule.iterations.length} shown` : "";
    note.textContent = `${schedule.total_steps} steps (${schedule.batches_per_epoch} per ` +
      `epoch), half cycles of ${schedule.step_size_up} and ${schedule.step_size_down} ` +
      `iterations${thinned}`;
    clrCyclic.drawSchedule("trace", box, schedule, "predicted (not yet run)");
  }

  // The preview page, filled in with this trial's parameters and task.
  function previewUrl() {
    const task = initial.task;
    const fields = Object.assign({}, trial.params, { dataset: task.dataset,
      epochs: task.epochs, batch_size: task.batch_size, optimizer: task.optimizer.name,
      data_path: task.data_path });
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(fields)) {
      if (value !== null && value !== undefined) query.set(key, String(value));
    }
    return `/dashboard/preview?${query}`;
  }

  // -- a range test's own page ------------------------------------------------------------

  function drawRangeTest() {
    byId("trace-box").hidden = true;
    byId("range-test-box").hidden = false;
    const result = trial.result || {};
    // The trial page shows the error already, so the chart does not repeat it.
    clrCyclic.drawRangeTest("rangeTest", byId("chart-range-test"), {
      state: trial.state, lrs: result.lrs || [], losses: result.losses || [],
      diverged: Boolean(result.diverged), base_lr: result.base_lr ?? null,
      max_lr: result.max_lr ?? null, loss_minimum_lr: result.loss_minimum_lr ?? null,
    }, { state: byId("range-test-state"), note: byId("range-test-note") });
  }

  function drawEpochs() {
    const epochs = trial.epochs;
    const x = epochs.map((epoch) => epoch.epoch);
    if (!epochs.length) {
      clr.emptyChart("loss", byId("chart-loss"), "no epoch reported yet");
      clr.emptyChart("accuracy", byId("chart-accuracy"), "no epoch reported yet");
    } else {
      clr.chart("loss", byId("chart-loss"), {
        scales: { x: { time: false } },
        axes: [{ label: "epoch" }, { label: "loss", size: 60 }],
        series: [{ label: "epoch" },
          { label: "training loss", stroke: clr.palette[0], width: 2 },
          { label: "validation loss", stroke: clr.palette[1], width: 2 }],
      }, [x, epochs.map((e) => e.train_loss), epochs.map((e) => e.val_loss)], "loss");
      clr.chart("accuracy", byId("chart-accuracy"), {
        scales: { x: { time: false } },
        axes: [{ label: "epoch" }, { label: "validation accuracy", size: 60 }],
        series: [{ label: "epoch" },
          { label: "validation accuracy", stroke: clr.palette[2], width: 2 }],
      }, [x, epochs.map((e) => e.val_accuracy)], "accuracy");
    }
    byId("epochs").tBodies[0].replaceChildren(...epochs.map((epoch) => el("tr", {},
      el("td", { text: epoch.epoch }), el("td", { class: "num", text: epoch.iterations }),
      el("td", { class: "num", text: num(epoch.train_loss) }),
      el("td", { class: "num", text: num(epoch.val_loss) }),
      el("td", { class: "num", text: num(epoch.val_accuracy) }),
      el("td", { class: "num", text: duration(epoch.duration_s) }),
      el("td", { text: epoch.decision }))));
  }

  render();
  if (!FINAL.includes(trial.state)) {
    const stop = clr.poll(async () => {
      trial = await clr.api(url);
      render();
      if (FINAL.includes(trial.state)) stop();
    });
  }
})();
