"""Worker throughput: the worker's training against a bare hand-written PyTorch loop, and
the time from one trial's end to the next trial's first optimizer step.

    python -m benchmarks.worker_throughput --repeats 5

Throughput, samples per second over a whole trial (model built, every epoch trained and
evaluated), four ways in the same process, interleaved repeat by repeat:

- `bare`: a loop written by hand: the same model (`worker.models.build_model`), data,
  batch size, SGD settings and torch `CyclicLR`; shuffled each epoch, evaluated each
  epoch in batches of 1,024 like the worker, nothing logged or reported;
- `train_trial`: `worker.training.train_trial` with a report callback that answers
  `continue` at once (LR and momentum logged at every step, no network);
- `worker`: `Worker.run_trial` on a trial claimed from a real `clrsearch serve`
  process (SQLite, pruner `none`): every epoch spooled and reported over HTTP by the
  outbox's sender thread while the next epoch trains, heartbeat thread, the wait for the
  last report's answer, completion. The claimed trial's parameters are replaced by the
  fixed ones the other two use, so all three train the same thing;
- `worker, instant server`: the same, with a stand-in client that answers every result
  at once: the worker's own part of reporting, without the server's answers or HTTP
  (on this 2-core machine the server shares the cores with training).

Turnaround, measured in process: a real `Worker.run()` against the same server runs a
study of `--turnaround-trials` one-epoch trials with the data set already cached.
`worker.loop.train_trial` is wrapped to stamp the end of each trial's training, and a
global optimizer pre-step hook stamps each trial's first optimizer step; the gap is
split into the completion call (which carries the next claim), a claim call of its own
(none unless the completion's answer was lost) and the set-up before the first step.
The baseline is the bare loop's own gap: building the next model, optimizer and
schedule and reaching the first step, with no server.

Goals (issue 6): worker >= 0.97x bare samples/s; turnaround < 100 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim.lr_scheduler import CyclicLR  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import worker.loop  # noqa: E402
from benchmarks import _common as common  # noqa: E402
from clrsearch import protocol  # noqa: E402
from clrsearch.spec import CyclicParams, TaskSpec  # noqa: E402
from worker.data import PreparedData  # noqa: E402
from worker.loop import Worker  # noqa: E402
from worker.models import build_model  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.training import MIN_EVAL_BATCH_SIZE, train_trial  # noqa: E402

THROUGHPUT_GOAL = 0.97
TURNAROUND_GOAL_S = 0.100
# torch's documented CyclicLR example, with a half cycle of two epochs.
PARAMS = CyclicParams(base_lr=0.01, max_lr=0.1, step_size_up=2, step_size_unit="epochs")


def bare_trial(task: TaskSpec, data: PreparedData, first_step: list[float]) -> float:
    """The hand-written loop; returns its wall time. Stamps its first optimizer step."""
    started = time.perf_counter()
    torch.manual_seed(task.seed)
    model = build_model(task.model, data.in_channels, data.image_size, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=PARAMS.base_lr,
                                momentum=task.optimizer.momentum,
                                weight_decay=task.optimizer.weight_decay)
    count = len(data.train_y)
    steps = -(-count // task.batch_size)
    scheduler = CyclicLR(optimizer, base_lr=PARAMS.base_lr, max_lr=PARAMS.max_lr,
                         step_size_up=int(PARAMS.step_size_up * steps),
                         base_momentum=PARAMS.base_momentum,
                         max_momentum=PARAMS.max_momentum)
    shuffle = torch.Generator().manual_seed(task.seed)
    for _ in range(task.epochs):
        model.train()
        order = torch.randperm(count, generator=shuffle)
        for start in range(0, count, task.batch_size):
            index = order[start:start + task.batch_size]
            loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not first_step:
                first_step.append(time.perf_counter() - started)
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            total, correct = 0.0, 0
            for start in range(0, len(data.val_y), MIN_EVAL_BATCH_SIZE):
                logits = model(data.val_x[start:start + MIN_EVAL_BATCH_SIZE])
                target = data.val_y[start:start + MIN_EVAL_BATCH_SIZE]
                total += float(F.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=1) == target).sum())
    return time.perf_counter() - started


def loop_trial(task: TaskSpec, data: PreparedData) -> float:
    started = time.perf_counter()
    train_trial(PARAMS, task, "val_loss", data, torch.device("cpu"), lambda _: "continue")
    return time.perf_counter() - started


def worker_trial(trial_worker: Worker, client: httpx.Client,
                 calls: dict[str, list[tuple[float, float]]]) -> float:
    answer = client.post("/claim", json={"worker_id": "throughput", "device": "cpu"}).json()
    assignment = protocol.TrialAssignment.model_validate(answer["trial"])
    assignment = assignment.model_copy(update={"params": PARAMS})
    started = time.perf_counter()
    trial_worker.run_trial(assignment)
    return time.perf_counter() - started


class InstantServer:
    """Stands in for the worker's HTTP client: every result is answered at once, as
    recorded and "continue", so a worker on it pays only its own part of reporting
    (LR logging, spool files, the sender thread), not the server's."""

    def send_result(self, call: str, trial_id: int, body: dict, patience_s: Any = None
                    ) -> protocol.Decision | protocol.Ack:
        if call == "report":
            return protocol.Decision(action="continue")
        return protocol.Ack(recorded=True, state="complete")

    def heartbeat(self, trial_id: int, lease_id: str, patience_s: Any = None
                  ) -> protocol.Decision:
        return protocol.Decision(action="continue")

    def close(self) -> None:
        pass


def instant_trial(trial_worker: Worker, number: int, task: TaskSpec) -> float:
    assignment = protocol.TrialAssignment(
        trial_id=number, lease_id=f"instant-{number}", study_name="instant", number=number,
        attempt=1, params=PARAMS, task=task, objective="val_loss", lease_s=600,
        heartbeat_s=300)
    started = time.perf_counter()
    trial_worker.run_trial(assignment)
    return time.perf_counter() - started


def time_result_calls(trial_worker: Worker) -> dict[str, list[tuple[float, float]]]:
    """Wrap the worker's result path: what the training thread spends in the outbox (each
    report's spool file; the completion's spool file and HTTP call) and the HTTP calls
    (the reports' on the outbox's sender thread, the completion's on the training one)."""
    calls: dict[str, list[tuple[float, float]]] = {"outbox": [], "report": [], "complete": []}
    stamps = Stamps()
    for name in ("post", "send"):
        setattr(trial_worker.outbox, name,
                stamps.wrap_call(getattr(trial_worker.outbox, name), calls["outbox"]))
    for name in ("report", "complete"):
        setattr(trial_worker.client, name,
                stamps.wrap_call(getattr(trial_worker.client, name), calls[name]))
    return calls


class Stamps:
    """When each trial's training ended and when the next one's first step came."""

    def __init__(self) -> None:
        self.trial_ends: list[float] = []
        self.first_steps: list[float] = []
        self.claims: list[tuple[float, float]] = []
        self.completes: list[tuple[float, float]] = []
        self._waiting_for_step = False

    def on_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        if self._waiting_for_step:
            self.first_steps.append(time.perf_counter())
            self._waiting_for_step = False

    def wrap_training(self, train: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._waiting_for_step = True
            try:
                return train(*args, **kwargs)
            finally:
                self.trial_ends.append(time.perf_counter())
        return timed

    def wrap_call(self, call: Any, into: list[tuple[float, float]]) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                into.append((started, time.perf_counter()))
        return timed


def measure_turnaround(server_url: str, data_dir: Path, task: TaskSpec, trials: int,
                       threads: int) -> dict[str, list[float]]:
    spec = common.study_spec("turnaround", trials, 1)
    spec.update(pruner="none", task={**task.model_dump(mode="json"), "epochs": 1})
    common.submit(server_url, spec)
    stamps = Stamps()
    settings = WorkerSettings(server_url=server_url, worker_id="turnaround", device="cpu",
                              data_dir=data_dir, max_idle_s=0.5, torch_threads=threads)
    turnaround_worker = Worker(settings)
    # The data set is cached before the first trial, as it is from a worker's second
    # trial on.
    turnaround_worker.datasets.get(TaskSpec.model_validate(spec["task"]))
    original = worker.loop.train_trial
    worker.loop.train_trial = stamps.wrap_training(original)
    client = turnaround_worker.client
    client.claim = stamps.wrap_call(client.claim, stamps.claims)
    client.complete = stamps.wrap_call(client.complete, stamps.completes)
    hook = register_optimizer_step_pre_hook(stamps.on_step)
    try:
        turnaround_worker.run()
    finally:
        hook.remove()
        worker.loop.train_trial = original

    gaps: dict[str, list[float]] = {"gap": [], "complete (with the next claim)": [],
                                    "claim of its own": [], "set-up": []}
    for index in range(len(stamps.trial_ends) - 1):
        ended, next_step = stamps.trial_ends[index], stamps.first_steps[index + 1]
        complete = next(c for c in stamps.completes if c[0] >= ended)
        # None when the completion carried the claim, as it does unless its answer was lost.
        claim = next((c for c in stamps.claims if complete[1] <= c[0] <= next_step), None)
        gaps["gap"].append(next_step - ended)
        gaps["complete (with the next claim)"].append(complete[1] - complete[0])
        gaps["claim of its own"].append(claim[1] - claim[0] if claim else 0.0)
        gaps["set-up"].append(next_step - (claim[1] if claim else complete[1]))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_options(parser, trials=10)
    parser.add_argument("--repeats", type=int, default=5, help="trials per variant (5)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: leaves a core to the server and the rest)")
    args = parser.parse_args()
    common.quiet_optuna()
    torch.set_num_threads(args.threads)
    task = TaskSpec(dataset=args.dataset, model=args.model, batch_size=args.batch_size,
                    epochs=args.epochs)
    print(f"worker throughput, {args.dataset}/{args.model}, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.threads} torch thread(s), CPU; {common.machine()}")

    times: dict[str, list[float]] = {"bare": [], "train_trial": [], "worker": [],
                                     "worker, instant server": []}
    bare_first_steps: list[float] = []
    with common.workdir() as folder, \
            common.fresh_database(args.database, folder, args.postgres_url) as database, \
            common.running_server(database, folder, claim_retry_s="0.1") as server:
        spec = common.study_spec("throughput", args.repeats + 1, 1)
        spec.update(pruner="none", task=task.model_dump(mode="json"))
        common.submit(server.url, spec)
        settings = WorkerSettings(server_url=server.url, worker_id="throughput",
                                  device="cpu", data_dir=folder / "data",
                                  torch_threads=args.threads)
        trial_worker = Worker(settings)
        instant_worker = Worker(settings.model_copy(update={"worker_id": "instant"}),
                                client=InstantServer())  # type: ignore[arg-type]
        calls = time_result_calls(trial_worker)
        data = trial_worker.datasets.get(task)
        samples = len(data.train_y) * args.epochs
        with httpx.Client(base_url=f"{server.url}/api/v1/worker", timeout=60) as client:
            # Round 0 warms torch's kernels, the HTTP connections and the server up; it is
            # not counted.
            for repeat in range(args.repeats + 1):
                first_step: list[float] = []
                bare_s = bare_trial(task, data, first_step)
                loop_s = loop_trial(task, data)
                if repeat == 1:
                    for stamped in calls.values():
                        stamped.clear()
                worker_s = worker_trial(trial_worker, client, calls)
                instant_s = instant_trial(instant_worker, repeat, task)
                if repeat > 0:
                    times["bare"].append(bare_s)
                    bare_first_steps.append(first_step[0])
                    times["train_trial"].append(loop_s)
                    times["worker"].append(worker_s)
                    times["worker, instant server"].append(instant_s)
        trial_worker.client.close()
        instant_worker.outbox.close()
        gaps = measure_turnaround(server.url, folder / "data", task, args.trials,
                                  args.threads)

    rates = {name: samples / statistics.median(values) for name, values in times.items()}
    print()
    print(common.table(
        ["samples/s (median of repeats)", "rate", "vs bare", "every repeat, s"],
        [[name, f"{rate:.0f}", f"{rate / rates['bare']:.3f}x",
          ", ".join(f"{value:.2f}" for value in times[name])]
         for name, rate in rates.items()],
    ))
    print(f"goal: worker >= {THROUGHPUT_GOAL}x bare")
    outbox_s, report_s, complete_s = (
        sum(end - start for start, end in calls[name]) / args.repeats
        for name in ("outbox", "report", "complete"))
    print(f"worker's result calls per trial: {outbox_s * 1000:.0f} ms on the training "
          f"thread in the outbox, of which {complete_s * 1000:.0f} ms waiting for the "
          f"server's answer to the completion and {(outbox_s - complete_s) * 1000:.0f} ms "
          f"writing the spool; the reports' HTTP calls, on the outbox's sender thread "
          f"while training goes on: {report_s * 1000:.0f} ms; worker trial without the "
          f"training thread's part: {statistics.median(times['worker']) - outbox_s:.2f} s")
    print()
    print(f"turnaround over {len(gaps['gap'])} trial changes (ms):")
    print(common.table(["", "p50", "max"], [
        [name, common.ms(common.percentile(values, 50)), common.ms(max(values))]
        for name, values in gaps.items()
    ] + [["bare loop: start to first step (baseline)",
          common.ms(common.percentile(bare_first_steps, 50)), common.ms(max(bare_first_steps))]]))
    print(f"goal: gap < {common.ms(TURNAROUND_GOAL_S)} ms")


if __name__ == "__main__":
    main()
