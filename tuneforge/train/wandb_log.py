"""Weights & Biases logging for one training run, when its job asked for it (a `wandb_*` field or a W&B key).

`start` opens the W&B run and says so with a `wandb_init` event (its `wandb_url` becomes the job's); the recipe then
calls `log` for each step's metrics and `finish` at the end. W&B trouble never stops training: a run that cannot
start, or whose logging fails mid-run, costs one warning event, and the metrics are recorded with the job as always.

The key never passes through here: the worker hands the job's secret to the run in its environment
(WANDB_API_KEY), wandb sends it to the W&B server only (HTTP basic auth) and writes it to no file. Any text of a
W&B error that reaches an event has the key blanked out all the same. wandb is imported only when a run asks for it.

One job is one W&B run: its id is the job's, and a later attempt that continues from a checkpoint resumes it.
Its local files go under the job's work folder unless WANDB_DIR says otherwise. The server's own WANDB_* settings
apply and take precedence over the defaults below, e.g. WANDB_MODE=offline on a machine without access to W&B: runs
are then only written locally (`wandb sync <folder>` uploads them later) and the job has no `wandb_url`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from tuneforge.train.events import EventWriter
from tuneforge.train.spec import TrainSpec

__all__ = ["FINISH_TIMEOUT_S", "WandbRun", "start"]

# How long the end of training waits for W&B to take the last data (an unreachable W&B must not hold the weights).
FINISH_TIMEOUT_S = 120.0
# wandb settings a training server wants, each unless the server's environment sets it (WANDB_<NAME>): the run's
# console output, the code and the git state are the server's, not the user's.
DEFAULT_SETTINGS: dict[str, Any] = {
    "console": "off",
    "save_code": False,
    "disable_git": True,
    "finish_timeout": FINISH_TIMEOUT_S,
    "finish_timeout_raises": True,
}
STILL_RECORDED = "the metrics are still recorded with the job"


class WandbRun:
    """A started W&B run; `log` and `finish` never raise (a failure is one warning event, then logging stops)."""

    def __init__(self, run: Any, out: EventWriter) -> None:
        self._run = run
        self._out = out

    @property
    def url(self) -> str | None:
        return _url(self._run) if self._run is not None else None

    def log(self, values: Mapping[str, float], *, step: int) -> None:
        if self._run is None:
            return
        try:
            self._run.log(dict(values), step=step)
        except Exception as exc:
            # Whatever state the client is in, the process's exit hook finishes what it can (within finish_timeout).
            self._run = None
            _warn(self._out, f"Weights & Biases logging failed at step {step} and stopped ({_reason(exc)})")

    def finish(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
        except TimeoutError:
            _warn(self._out, "Weights & Biases did not take the run's last data in time; the W&B run may be incomplete")
        except Exception as exc:
            _warn(self._out, f"Weights & Biases could not finish the run ({_reason(exc)})")


def start(spec: TrainSpec, out: EventWriter, total_steps: int) -> WandbRun | None:
    """The run's W&B run when the job asked for one and it could start; else None (after a warning event)."""
    cfg = spec.wandb
    if cfg is None:
        return None
    try:
        import wandb
    except ImportError:
        _warn(out, "Weights & Biases logging was requested, but wandb is not installed on this server")
        return None
    online = os.environ.get("WANDB_MODE", "online") not in ("offline", "dryrun", "disabled")
    if online and not os.environ.get("WANDB_API_KEY"):
        _warn(out, "Weights & Biases logging was requested (a wandb_* field is set), but the job has no W&B key: "
              "create it with wandb_api_key")  # fmt: skip
        return None
    try:
        overrides = {k: v for k, v in DEFAULT_SETTINGS.items() if f"WANDB_{k.upper()}" not in os.environ}
        if cfg.base_url:
            overrides["base_url"] = cfg.base_url
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or spec.output_name,
            id=spec.job_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else spec.work_dir,
            config=run_config(spec, total_steps),
            settings=wandb.Settings(**overrides),
        )
    except Exception as exc:
        _warn(out, f"Weights & Biases logging could not start ({_reason(exc)})")
        return None
    if _flag(run, "disabled"):
        _warn(out, "Weights & Biases logging was requested, but W&B is disabled on this server (WANDB_MODE=disabled)")
        return None
    url = _url(run)
    where = f": {url}" if url else " (offline: the run is kept on the server for `wandb sync`)"
    out.event("wandb_init", f"Logging to Weights & Biases{where}", wandb_url=url)
    return WandbRun(run, out)


def run_config(spec: TrainSpec, total_steps: int) -> dict[str, Any]:
    """The W&B run's config: the hyperparameters, and what was trained."""
    hyper: dict[str, Any] = msgspec.to_builtins(spec.hyper)
    hyper["lora_alpha"] = spec.hyper.alpha  # the value the run uses (a default is stored as None)
    return {**hyper, "total_steps": total_steps, "base_model": spec.model.name, "method": spec.recipe,
            "job_id": spec.job_id, "output_name": spec.output_name}  # fmt: skip


def _url(run: Any) -> str | None:
    """The run's page on W&B; None offline (asking an offline run prints a warning)."""
    if _flag(run, "offline") or _flag(run, "disabled"):
        return None
    try:
        url = run.url
    except Exception:
        return None
    return str(url) if url else None


def _flag(run: Any, name: str) -> bool:
    try:
        return getattr(run, name, False) is True
    except Exception:
        return False


def _warn(out: EventWriter, message: str) -> None:
    out.event("warning", f"{message}; {STILL_RECORDED}", level="warning")


def _reason(exc: BaseException) -> str:
    """The first line of an error, short, with the W&B key (if it appears) blanked out."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    key = os.environ.get("WANDB_API_KEY", "")
    if len(key) >= 8:
        text = text.replace(key, "***")
    return text[:300]
