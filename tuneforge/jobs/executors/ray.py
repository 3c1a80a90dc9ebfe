"""The `ray` executor: each run is a Ray job on the cluster at `ray_address` (the dashboard's http address), whose
entrypoint is the local executor's command (`local.command`: `python -m tuneforge.train SPEC`, or torchrun on one
node for `train_processes` > 1), its output appended to `train-<attempt>.log` beside the spec as a local run's
(Ray's own job log keeps only Ray's lines), and Ray picks the node.

Ray places the run by what it asks for: `entrypoint_num_cpus` (the run's torch threads, `train_threads`, at least
one per process; 1 when unset, though the run then uses every core of its node, so set it), `entrypoint_num_gpus`
(one per process when `train_device` is CUDA: Ray sets CUDA_VISIBLE_DEVICES to the GPUs it grants, which the run
sees from cuda:0, so `train_device` must be `cuda` or `cuda:0`) and `entrypoint_memory`: per process, what training
holds at least, the bound the plan checks a model against a host's memory (`catalog.inspect.training_bytes`, from
the catalog's parameter count of the plan's model), plus `RUN_BASE_MEMORY` for the process itself. Neither the plan
nor the spec carries the memory, so it is computed here from the spec (`resources`), with the catalog in the spec's
blob store. The run's environment is the explicit one
the worker built (`runtime_env.env_vars`; never this server's whole environment), on top of the environment the
node's Ray processes were started with.

Shared storage: the run reads its spec from, and writes its event stream, log and local scratch to, the job's
work folder (`<home>/work/<job>`), and the worker reads the stream from there as it does for a local run; the blob
store (`storage_url`) holds the data, base models and outputs. So the work folder must be on storage the server
and every Ray node share, at the same path (NFS or the like), and every node must reach the blob store (S3, or a
shared folder), run the same Python at the same path with the same tuneforge installed. Without a shared work
folder the executor would have to ship the spec with the job (in its entrypoint or runtime_env), the run would keep
its scratch on its node, and its events would need another way back: appended to the blob store and tailed by the
worker, or sent to the server over HTTP, with the stream's offset kept as now.

The submission id is `tuneforge-train-<job>-<attempt>`: the handle (address and submission id) finds the run again
after a server restart, and a second submit of the same attempt is refused by Ray ("already exists") instead of
training twice.

Ray job statuses, as the worker's exit codes: PENDING and RUNNING are None; SUCCEEDED 0; FAILED the entrypoint's
exit code, or -1 when Ray has none (its node or its supervisor died, or it never started: Ray's reason is logged);
STOPPED -15 (a SIGTERM, as for a local child). A submission the cluster no longer knows (it restarted) is gone (-1).
The worker tells a run that ended with a result line from one that died by the result, not the code: a run lost
with its node resumes from its checkpoint, as a crashed local child does, and a stopped one that reported
`cancelled` ends the job cancelled when a cancel was asked for. While the cluster cannot be reached the run counts
as running (the worker's heartbeat timeout ends that), unless it was killed: then it counts as gone.

Cancel is Ray's stop: SIGTERM to the entrypoint and its children (the run checkpoints and reports `cancelled`),
then SIGKILL once `RAY_JOB_STOP_WAIT_TIME_S` passes. Ray's default, 3 s (`DEFAULT_RAY_JOB_STOP_WAIT_TIME_S`), is too
short to save a checkpoint of a real model. The job's supervisor actor (ray/dashboard/modules/job/job_supervisor.py,
`JobSupervisor.run`) reads it from its own environment when it stops the job, and that environment is the job's
runtime_env, so each job carries it there (`runtime_env`), set to the worker's `cancel_grace_s`. Ray has no
immediate stop, so a kill is a tiny Ray job of its own, pinned to the run's node (Ray's `ray.io/node-id` label),
that SIGKILLs the processes whose command line names this attempt's spec (as the local executor recognises its
runs); a run still waiting for a node is stopped instead. Ray keeps the runtime_env, secrets included (the W&B key,
the hub token), and shows it through its dashboard: as for the model servers (`serve/placement.py`), the dashboard
must be private to the cluster's operators.

`ray` is imported only here, when a run is started or watched: a server with the local executor never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from tuneforge.jobs.executors import local
from tuneforge.jobs.executors.base import Handle
from tuneforge.settings import Settings
from tuneforge.train.spec import TrainSpec

log = logging.getLogger("tuneforge.executor.ray")

# Memory a run holds besides its model's weights and optimizer state: Python, torch, the tokenizer, the data and
# the activations of a modest batch.
RUN_BASE_MEMORY = 1 << 30
# Ray's job statuses that are still going.
_GOING = ("PENDING", "RUNNING")
_STOPPED = -15  # as `subprocess` reports a child ended by SIGTERM
_GONE = -1  # ended without an exit code: lost with its node, never started, or forgotten by a restarted cluster
# Kills the training processes of one spec on its node: those whose command line names `tuneforge.train` and the
# spec (a run, or a torchrun and its ranks; the name is split so that this script's own command line never matches).
_KILL_SCRIPT = """\
import os, signal, sys
mark, spec = ("tuneforge" + ".train").encode(), sys.argv[1].encode()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        if mark in cmdline and spec in cmdline.split(b"\\0") and int(pid) not in (os.getpid(), os.getppid()):
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass
"""


@dataclass(frozen=True)
class Resources:
    """What a run asks Ray for."""

    cpus: float
    gpus: int
    memory: int


def resources(spec: TrainSpec) -> Resources:
    """The run's request: its threads as CPUs, a GPU per process on CUDA, its processes' training memory (see the
    module docstring)."""
    device, _, index = spec.device.partition(":")
    if device == "cuda" and index not in ("", "0"):
        raise ValueError(
            f"train_device {spec.device} names a GPU of this host; on Ray a run gets the GPUs Ray grants it, which it "
            "sees from cuda:0: set TUNEFORGE_TRAIN_DEVICE=cuda"
        )
    processes = spec.processes
    return Resources(cpus=max(spec.num_threads or 1, processes), gpus=processes if device == "cuda" else 0,
                     memory=processes * (RUN_BASE_MEMORY + training_memory(spec)))  # fmt: skip


def training_memory(spec: TrainSpec) -> int:
    """What training the plan's model holds at least (weights, and for full training gradients and AdamW's moments),
    from the catalog's parameter count of `plan.model` (for a bring-your-own model, its template's); 0 when the
    catalog does not know the count."""
    from tuneforge.catalog.inspect import training_bytes
    from tuneforge.catalog.registry import Catalog
    from tuneforge.storage import open_blob_store

    try:
        entry = Catalog(open_blob_store(spec.storage_url)).find(spec.plan.model)
    except Exception:
        log.warning("job %s: could not read the catalog to size its run; asking Ray for the base memory only",
                    spec.job_id, exc_info=True)  # fmt: skip
        return 0
    return training_bytes(entry.params, spec.hyper.training_type) if entry and entry.params else 0


def submission_id(job_id: str, attempt: int) -> str:
    return f"tuneforge-train-{job_id}-{attempt}"


class RayExecutor:
    name = "ray"

    def __init__(self, settings: Settings, *, address: str | None = None) -> None:
        self.address = (address if address is not None else settings.ray_address).rstrip("/")
        if not self.address:
            raise ValueError(
                "the ray executor needs the Ray cluster's dashboard address: set TUNEFORGE_RAY_ADDRESS (e.g. "
                "http://HEAD:8265)"
            )
        # Ray SIGKILLs a stopped run this long after its SIGTERM (an integer: Ray parses it with int()).
        self.stop_wait_s = max(1, math.ceil(settings.cancel_grace_s))
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ended: dict[str, int] = {}  # runs we ended without Ray saying so: killed while pending or unreachable
        self._killing: set[str] = set()  # runs whose kill job was submitted (the worker repeats a kill each round)
        self._unreachable_logged = 0.0

    # -- the cluster ------------------------------------------------------------------------------------
    def _client(self, address: str | None = None) -> Any:
        """The job client for `address` (this executor's by default), made once: it checks the connection."""
        address = address or self.address
        with self._lock:
            client = self._clients.get(address)
        if client is not None:
            return client
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(address)
        except (OSError, RuntimeError) as exc:
            raise ConnectionError(
                f"the Ray cluster at {address} (TUNEFORGE_RAY_ADDRESS) is unreachable: {exc}"
            ) from None
        with self._lock:
            self._clients[address] = client
        return client

    def _info(self, handle: Handle) -> Any | None:
        """The run's Ray job details; None when the cluster no longer knows it. Raises ConnectionError when the
        cluster cannot be reached."""
        client = self._client(handle.get("address"))
        try:
            return client.get_job_info(handle["submission_id"])
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return None
            raise ConnectionError(str(exc)) from None
        except OSError as exc:
            raise ConnectionError(str(exc)) from None

    # -- the Executor contract --------------------------------------------------------------------------
    def start(self, spec: TrainSpec, *, spec_path: str, env: dict[str, str]) -> Handle:
        want = resources(spec)
        sid = submission_id(spec.job_id, spec.attempt)
        log_path = os.path.join(os.path.dirname(spec_path), f"train-{spec.attempt}.log")
        command = shlex.join(local.command(spec, spec_path))
        # Ray's job details do not show the resource request (its job supervisor actor holds it): the metadata says
        # it, for people reading the dashboard.
        metadata = {"tuneforge": "training-run", "job_id": spec.job_id, "attempt": str(spec.attempt),
                    "spec_path": spec_path, "log_path": log_path, "cpus": str(want.cpus), "gpus": str(want.gpus),
                    "memory": str(want.memory)}  # fmt: skip
        client = self._client()
        try:
            client.submit_job(
                # In a shell on the chosen node: the run's output goes to the work folder's log, as a local run's.
                entrypoint=f"exec {command} >> {shlex.quote(log_path)} 2>&1",
                submission_id=sid,
                runtime_env=self.runtime_env(env, gpus=want.gpus),
                metadata=metadata,
                entrypoint_num_cpus=want.cpus,
                entrypoint_num_gpus=want.gpus,
                entrypoint_memory=want.memory,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):
                raise RuntimeError(
                    f"attempt {spec.attempt} of job {spec.job_id} was submitted to Ray before (job {sid}); "
                    "not starting it twice"
                ) from None
            raise
        except OSError as exc:
            raise ConnectionError(
                f"the Ray cluster at {self.address} (TUNEFORGE_RAY_ADDRESS) is unreachable: {exc}"
            ) from None
        return {"executor": self.name, "address": self.address, "submission_id": sid, "spec_path": spec_path,
                "log_path": log_path}  # fmt: skip

    def runtime_env(self, env: dict[str, str], *, gpus: int = 0) -> dict[str, Any]:
        """The Ray job's runtime_env: the run's explicit environment, and Ray's stop grace for its supervisor."""
        env = dict(env)
        if gpus:
            env.pop("CUDA_VISIBLE_DEVICES", None)  # Ray sets it to the GPU it grants the run
        # Read by the job's supervisor actor from its environment, which is this runtime_env (module docstring).
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(self.stop_wait_s)
        return {"env_vars": env}

    def poll(self, handle: Handle) -> int | None:
        if handle.get("executor") != self.name or not handle.get("submission_id"):
            return _GONE  # not a Ray run (a run of another executor, before the server switched): not ours to watch
        sid = handle["submission_id"]
        if sid in self._ended:
            return self._ended[sid]
        try:
            info = self._info(handle)
        except ConnectionError as exc:
            now = time.monotonic()
            if now - self._unreachable_logged > 60:
                self._unreachable_logged = now
                log.warning("cannot reach the Ray cluster to watch job %s; counting it as running: %s", sid, exc)
            return None
        if info is None:
            log.warning("Ray no longer knows job %s (the cluster restarted?): the run is gone", sid)
            return _GONE
        status = _status(info)
        if status in _GOING:
            return None
        if status == "SUCCEEDED":
            return 0
        if status == "STOPPED":
            return _STOPPED
        code = info.driver_exit_code
        if code is None:
            log.warning("Ray job %s failed (%s): %s", sid, info.error_type, (info.message or "")[-2000:])
            return _GONE
        return int(code)

    def cancel(self, handle: Handle) -> None:
        with contextlib.suppress(ConnectionError):
            self._stop(handle)

    def kill(self, handle: Handle) -> None:
        sid = handle["submission_id"]
        if sid in self._killing or sid in self._ended:
            return
        try:
            info = self._info(handle)
        except ConnectionError:
            self._ended[sid] = _GONE  # out of reach: given up on (its job resumes, fenced, if it still runs)
            return
        if info is None:
            return  # the cluster forgot it: nothing runs
        status = _status(info)
        if status == "RUNNING" and info.driver_node_id:
            self._killing.add(sid)
            self._kill_on_node(handle, info.driver_node_id)
        elif status == "PENDING":
            # Not placed yet: Ray's stop waits for it in Ray's queue, and stops it the moment it starts.
            with contextlib.suppress(ConnectionError):
                self._stop(handle)
            self._ended[sid] = _STOPPED

    # -- stopping -------------------------------------------------------------------------------------
    def _stop(self, handle: Handle) -> None:
        try:
            self._client(handle.get("address")).stop_job(handle["submission_id"])
        except RuntimeError as exc:  # not found, or already ended
            log.info("Ray job %s: stop refused: %s", handle["submission_id"], exc)
        except OSError as exc:
            raise ConnectionError(str(exc)) from None

    def _kill_on_node(self, handle: Handle, node_id: str) -> None:
        """SIGKILL the run's processes now, by a Ray job on its node (no CPUs: it runs beside the run)."""
        script = shlex.join([sys.executable, "-c", _KILL_SCRIPT, handle["spec_path"]])
        try:
            self._client(handle.get("address")).submit_job(
                entrypoint=script,
                submission_id=f"{handle['submission_id']}-kill",
                entrypoint_num_cpus=0,
                entrypoint_label_selector={"ray.io/node-id": node_id},
                metadata={"tuneforge": "kill", "of": handle["submission_id"]},
            )
        except (RuntimeError, OSError) as exc:  # a second kill of the same run ("already exists"), or out of reach
            log.info("Ray job %s: kill not submitted: %s", handle["submission_id"], exc)


def _status(info: Any) -> str:
    status = info.status
    return str(getattr(status, "value", status))
