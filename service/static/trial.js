"use strict";
// The trial page: the LR and momentum the worker applied at each step (recorded, not
// recomputed), the per-epoch curves, and the trial's facts. Polls while the trial runs.

(() => {
  const { el, num, time, duration } = clr;
  const byId = (id) => document.getElementById(id);
  const initial = clr.initial();
  let trial = initial.trial;
  const url = `/api/v1/studies/${clr.enc(trial.study_name)}/trials/${trial.number}` +
    "?max_points=5000";
  const FINAL = ["complete", "pruned", "failed", "stopped"];

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
      [initial.objective, num(trial.value)],
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
    const trace = trial.lr_trace;
    const box = byId("chart-trace");
    const shown = trace.iterations.length;
    byId("trace-note").textContent = shown < trace.total_steps
      ? `${trace.total_steps} steps, ${shown} shown (evenly thinned on the server)`
      : `${trace.total_steps} steps`;
    if (!shown) return clr.emptyChart("trace", box, "no epoch reported yet");
    const withMomentum = trace.momentum.length === shown;
    const series = [{ label: "iteration" },
      { label: "learning rate", stroke: clr.palette[0], width: 1.5, scale: "lr",
        points: { show: false } }];
    const data = [trace.iterations, trace.lr];
    if (withMomentum) {
      series.push({ label: "momentum", stroke: clr.palette[1], width: 1.25, scale: "momentum",
        points: { show: false } });
      data.push(trace.momentum);
    }
    clr.chart("trace", box, {
      scales: { x: { time: false } },
      axes: [{ label: "iteration" },
        { label: "learning rate", scale: "lr", size: 70,
          values: (u, ticks) => ticks.map((tick) => num(tick, 3)) },
        ...(withMomentum ? [{ label: "momentum", scale: "momentum", side: 1, size: 60,
          grid: { show: false } }] : [])],
      series,
    }, data, `trace:${withMomentum}`);
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
