"""Optional copies of a run's records in Weights & Biases and trackio (config keys `log.wandb`, `log.trackio`).

    trackers = start_trackers(cfg, run_dir, say=sink.say, text=sink.text)   # rank 0; None when both are off
    sink.attach(trackers)     # every sink.log(kind, step, **fields) is forwarded: numbers become `kind/field`
    sink.close(status)        # drains the queue, then finishes each service with the run's final status

Records are handed to a side thread through a bounded queue, so a slow or failing service never holds up a
training step: a service that raises is dropped with one warning in train.log and the run carries on.
The ids that let `lmlab resume` continue the same W&B run / trackio run are kept in `<run>/trackers.json`.

Neither package is imported until a run asks for it (`lmlab --help` loads neither).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import queue
import secrets
import string
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_text, error_line

STATE = "trackers.json"
QUEUE_SIZE = 10_000  # records waiting for the side thread; beyond that new ones are dropped (with one warning)
CLOSE_WAIT_S = 60.0  # how long close() waits for queued records to be handed over before finishing anyway
_STOP = object()


def missing_package(name: str) -> bool:
    """True when `import name` would fail (a module set to None in sys.modules counts as missing)."""
    if name in sys.modules:
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def scalars(kind: str, fields: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record as `kind/field` (TensorBoard's tags); an event's as `event/NAME.field`
    (`event/finished.val_loss`); lists of dicts (system `gpus`) become `kind/field.INDEX.key`. Strings,
    booleans and non-finite values are left out."""
    out: dict[str, float] = {}
    if kind == "event" and isinstance(fields.get("event"), str):
        kind = f"event/{fields['event']}."
    else:
        kind = f"{kind}/"

    def put(name: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = v

    for k, v in fields.items():
        if isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    idx = item.get("index", i)
                    for sub, x in item.items():
                        if sub != "index":
                            put(f"{kind}{k}.{idx}.{sub}", x)
        else:
            put(f"{kind}{k}", v)
    return out


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow a service's console chatter during init/finish (lmlab prints its own one line)."""
    return contextlib.redirect_stdout(io.StringIO())


# ---------------------------------------------------------------------------------------------- services
class WandbTracker:
    name = "wandb"

    def __init__(self, cfg, run_dir: Path, saved: dict):
        lg = cfg.log
        if lg.wandb_mode != "online":  # nothing leaves the machine: not even wandb's own crash reports
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        self.run_id = saved.get("id") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                 for _ in range(8))
        root = os.environ.get("WANDB_DIR") or str(run_dir)  # offline files: <root>/wandb/offline-run-*-<id>
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False)
        # not muted: online without a login, wandb may ask for one on the terminal
        self.run = wandb.init(project=lg.wandb_project, name=run_dir.name, id=self.run_id, resume="allow",
                              dir=root, mode=lg.wandb_mode, config=cfg.to_dict(), reinit="create_new",
                              settings=settings)
        self.last_step = int(getattr(self.run, "starting_step", 0) or 0)  # a resumed online run keeps its steps
        self.mode = lg.wandb_mode
        self.state = {"id": self.run_id, "project": lg.wandb_project}

    def describe(self) -> str:
        if self.mode == "offline":
            sync_dir = Path(self.run.settings.sync_dir)
            return f"offline run {self.run_id}, nothing sent; upload later: wandb sync {sync_dir}"
        return f"run {self.run_id}: {self.run.url}"

    def log(self, step: int, values: dict[str, float]) -> None:
        if step < self.last_step:  # W&B refuses steps below its current one
            if not any(k.startswith("event/") for k in values):
                return  # a resume repeats a few steps: already there
            # an event about an earlier step (the device guard reports skips at the next log step): at the
            # current step, naming its own
            values, step = {**values, "event/step": float(step)}, self.last_step
        self.last_step = step
        self.run.log(values, step=step)

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status in ("finished", "stopped") else 1)


class TrackioTracker:
    name = "trackio"

    def __init__(self, cfg, run_dir: Path, saved: dict):
        import trackio

        lg = cfg.log
        self.project, self.run_name = lg.trackio_project, saved.get("name") or run_dir.name
        with _quiet():
            self.run = trackio.init(project=self.project, name=self.run_name, config=cfg.to_dict(),
                                    resume="allow" if saved else "never", embed=False, auto_log_gpu=False,
                                    auto_log_cpu=False)
        self.state = {"project": self.project, "name": self.run.name, "id": self.run.id}

    def describe(self) -> str:
        return f"project {self.project}, run {self.run.name} (local; view: trackio show --project {self.project})"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, status: str) -> None:
        from trackio import context_vars

        with _quiet():
            self.run.finish()
        if context_vars.current_run.get() is self.run:  # so trackio's exit hook does not finish it again
            context_vars.current_run.set(None)


SERVICES: dict[str, type] = {"wandb": WandbTracker, "trackio": TrackioTracker}


# ---------------------------------------------------------------------------------------------- the fan-out
class Trackers:
    """The started services behind one queue and one side thread."""

    def __init__(self, services: list, warn: Callable[[str], None]):
        self.services, self._warn = list(services), warn
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._dropped = 0  # records dropped on a full queue; reported once, by the side thread
        self._reported = False
        self._thread = threading.Thread(target=self._drain, name="lmlab-trackers", daemon=True)
        self._thread.start()

    def log(self, kind: str, step: int, fields: dict[str, Any]) -> None:
        values = scalars(kind, fields)
        if not values:
            return
        try:
            self._queue.put_nowait((step, values))
        except queue.Full:  # no warning from here: the caller holds the sink's lock, which _warn takes
            self._dropped += 1

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            step, values = item
            if self._dropped and not self._reported:
                self._reported = True
                self._warn(f"trackers: more than {QUEUE_SIZE} records were waiting; some were dropped (training "
                           f"is never held up for them)")
            for s in list(self.services):
                try:
                    s.log(step, values)
                except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                    self.services.remove(s)
                    self._warn(f"{s.name}: stopped logging at step {step} ({error_line(e)}); training continues "
                               f"without it")

    def close(self, status: str) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=CLOSE_WAIT_S)
        self._thread.join(timeout=CLOSE_WAIT_S)
        if self._thread.is_alive():  # a service hangs: finishing it would likely hang too
            self._warn(f"trackers: {', '.join(s.name for s in self.services)} still busy after "
                       f"{CLOSE_WAIT_S:.0f} s; left unfinished")
            self.services = []
        for s in self.services:
            try:
                s.finish(status)
            except Exception as e:  # noqa: BLE001
                self._warn(f"{s.name}: could not finish the run ({error_line(e)})")
        self.services = []


def read_state(run_dir: Path) -> dict:
    try:
        d = json.loads((Path(run_dir) / STATE).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def start_trackers(cfg, run_dir: Path, *, say: Callable[[str], None], text: Callable[[str], None]) -> Trackers | None:
    """Start the services the config asks for (rank 0). One that cannot start is reported on the console
    and in train.log, and the run goes on without it. None when no service is on or none started."""
    lg = getattr(cfg, "log", None)
    wanted = [n for n in SERVICES if lg is not None and getattr(lg, n)
              and not (n == "wandb" and lg.wandb_mode == "disabled")]
    if not wanted:
        return None
    state = read_state(run_dir)
    started = []
    for name in wanted:
        try:
            s = SERVICES[name](cfg, Path(run_dir), state.get(name) or {})
        except Exception as e:  # noqa: BLE001 - a missing login, a network error: the run goes on without it
            line = f"{name}: not started ({error_line(e)}); training continues without it"
            say(line)
            text(line)
            continue
        state[name] = s.state
        started.append(s)
        say(f"{name:<9} {s.describe()}")
        text(f"{name}: {s.describe()}")
    if not started:
        return None
    try:
        atomic_write_text(Path(run_dir) / STATE, json.dumps(state, indent=1) + "\n")
    except OSError as e:
        text(f"trackers: could not write {STATE} ({e}); a resume will start new tracker runs")
    return Trackers(started, warn=text)
