"use strict";
// The schedule preview page: CyclicLR settings and a task go to POST
// /api/v1/schedule/preview, and the LR and momentum it answers are drawn. The server is
// the only judge of the settings (its 422 names the field), so the form checks nothing
// itself. A pasted study spec is previewed at the centre of its space by
// POST /dashboard/api/preview/spec.

(() => {
  const { el, num } = clr;
  const byId = (id) => document.getElementById(id);
  const form = byId("preview-form");
  const PARAMS = ["base_lr", "max_lr", "step_size_up", "step_size_down", "step_size_unit",
    "mode", "gamma", "scale_mode", "cycle_momentum", "base_momentum", "max_momentum"];
  const NUMBERS = new Set(["base_lr", "max_lr", "step_size_up", "step_size_down", "gamma",
    "base_momentum", "max_momentum", "epochs", "batch_size", "batches_per_epoch"]);
  const TYPING_MS = 300;

  // -- the form -------------------------------------------------------------------------

  // A field left empty is left out, so the server's default (or its "field required")
  // applies; a number the browser cannot parse is sent as typed, for the server to name.
  function value(name) {
    const field = form.elements[name];
    if (field.type === "checkbox") return field.checked;
    const text = field.value.trim();
    if (text === "") return undefined;
    if (!NUMBERS.has(name)) return text;
    return Number.isFinite(Number(text)) ? Number(text) : text;
  }

  function requestBody() {
    const params = {};
    for (const name of PARAMS) {
      const given = value(name);
      if (given !== undefined) params[name] = given;
    }
    const task = { dataset: value("dataset"), optimizer: { name: value("optimizer") } };
    for (const name of ["epochs", "batch_size", "data_path"]) {
      const given = value(name);
      if (given !== undefined) task[name] = given;
    }
    const body = { params, task };
    const batches = value("batches_per_epoch");
    if (batches !== undefined) body.batches_per_epoch = batches;
    return body;
  }

  // Fields named in the address fill the form: the trial page links here that way, and
  // every preview drawn writes its settings back, so the address can be shared.
  function fillFromAddress() {
    const query = new URLSearchParams(location.search);
    for (const [name, given] of query) {
      const field = form.elements[name];
      if (!field || field instanceof RadioNodeList) continue;
      if (field.type === "checkbox") field.checked = given === "true";
      else field.value = given;
    }
  }

  function writeAddress() {
    const query = new URLSearchParams(location.search);
    for (const field of form.elements) {
      if (!field.name) continue;
      const given = field.type === "checkbox" ? String(field.checked) : field.value.trim();
      if (given === "") query.delete(field.name);
      else query.set(field.name, given);
    }
    history.replaceState(null, "", `${location.pathname}?${query}`);
  }

  // -- the preview ----------------------------------------------------------------------

  // Each request is numbered, and only the answer to the latest is drawn: typing fires
  // requests faster than the server may answer them.
  let latest = 0;

  async function draw() {
    const ticket = ++latest;
    const box = byId("chart-preview");
    const shown = byId("preview-error");
    let schedule;
    try {
      schedule = await clrCyclic.preview(requestBody());
    } catch (error) {
      if (ticket !== latest) return;
      shown.hidden = false;
      shown.textContent = error.status === 422
        ? `refused: ${error.message}` : `could not preview: ${error.message}`;
      box.dataset.refused = "yes";
      byId("preview-note").textContent = "";
      byId("preview-facts").replaceChildren();
      clr.emptyChart("preview", box, "no schedule for these settings");
      return;
    }
    if (ticket !== latest) return;
    shown.hidden = true;
    shown.textContent = "";
    box.dataset.refused = "no";
    byId("preview-note").textContent = pointsNote(schedule);
    showFacts(byId("preview-facts"), schedule);
    clrCyclic.drawSchedule("preview", box, schedule, "predicted");
    writeAddress();
  }

  function pointsNote(schedule) {
    const shown = schedule.iterations.length;
    return shown < schedule.total_steps
      ? `${shown} of ${schedule.total_steps} steps shown (evenly thinned on the server)`
      : `${schedule.total_steps} steps`;
  }

  function showFacts(node, schedule) {
    const cycle = schedule.step_size_up + schedule.step_size_down;
    const facts = [
      ["batches per epoch", schedule.batches_per_epoch],
      ["optimizer steps", schedule.total_steps],
      ["half cycle up", `${schedule.step_size_up} iterations`],
      ["half cycle down", `${schedule.step_size_down} iterations`],
      ["whole cycles", num(schedule.total_steps / cycle, 3)],
      ["learning rate", `${num(Math.min(...schedule.lr), 3)} to ` +
        `${num(Math.max(...schedule.lr), 3)}`],
      ["momentum", `${num(Math.min(...schedule.momentum), 3)} to ` +
        `${num(Math.max(...schedule.momentum), 3)}`],
    ];
    node.replaceChildren(...facts.flatMap(([key, text]) =>
      [el("dt", { text: key }), el("dd", { text })]));
  }

  let typing = null;
  form.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(draw, TYPING_MS);
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(typing);
    draw();
  });

  // -- a whole spec ---------------------------------------------------------------------

  async function drawSpec() {
    const shown = byId("spec-error");
    const box = byId("chart-spec");
    const fail = (text) => {
      shown.hidden = false;
      shown.textContent = text;
      box.dataset.refused = "yes";
      byId("spec-params").replaceChildren();
      byId("spec-note").textContent = "";
      clr.emptyChart("spec", box, "no schedule for this spec");
    };
    let spec;
    try {
      spec = JSON.parse(byId("spec-text").value);
    } catch (error) {
      return fail(`not JSON: ${error.message}`);
    }
    if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
      return fail("a spec is a JSON object, as for POST /api/v1/studies");
    }
    // The name matters only to a submitted study; the preview needs some valid name.
    if (!("name" in spec)) spec = Object.assign({ name: "preview" }, spec);
    const body = { spec };
    const batches = value("batches_per_epoch");
    if (batches !== undefined) body.batches_per_epoch = batches;
    let answer;
    try {
      answer = await clr.api("/dashboard/api/preview/spec", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (error) {
      return fail(error.status === 422
        ? `refused: ${error.message}` : `could not preview: ${error.message}`);
    }
    shown.hidden = true;
    box.dataset.refused = "no";
    clr.keyValues(byId("spec-params"), Object.entries(answer.params)
      .filter(([, given]) => given !== null)
      .map(([key, given]) => [key, num(given, 4)]));
    byId("spec-note").textContent = pointsNote(answer.preview);
    clrCyclic.drawSchedule("spec", box, answer.preview, "predicted");
  }

  byId("spec-button").addEventListener("click", () => drawSpec());

  fillFromAddress();
  draw();
})();
