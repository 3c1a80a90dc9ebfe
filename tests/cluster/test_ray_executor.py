"""The ray executor (`jobs/executors/ray.py`) under the real worker, on a real local Ray cluster: a head that runs no
training (no CPUs) and two worker nodes of one CPU each, which the tests start themselves (one cluster for the
module; every process of it is ended at the end, even on failure). LoRA runs of a tiny model complete through the
worker with their resource request on the Ray job, end `cancelled` with a checkpoint when cancelled, stop at once
when killed, resume from their checkpoint on the other node when theirs is lost, and are adopted by a restarted
server's worker by their handle. Every node shares this machine's disk: the work folder is shared storage."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the runs' environment comes from this one: no hub lookups

import msgspec
import pytest
import ray_support

from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.inspect import training_bytes
from tuneforge.catalog.registry import Catalog
from tuneforge.jobs.executors.ray import RUN_BASE_MEMORY, RayExecutor, Resources, resources, submission_id
from tuneforge.jobs.executors.registry import make_executor
from tuneforge.jobs.worker import Worker, _run_env
from tuneforge.settings import Settings
from tuneforge.storage import open_blob_store
from tuneforge.storage.layout import final_prefix
from tuneforge.store import jobs as repo
from tuneforge.store import open_database
from tuneforge.store.tables import JobRow
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, load_spec, standalone_plan
from tuneforge.train.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny/llama-on-ray"
PARAMS = 50_000_000  # what the catalog says of the model: its memory request is sized from this
ROWS = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(8)]  # fmt: skip
SHORT = {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3}  # 4 steps
LONG = {"n_epochs": 500, "batch_size": 2, "learning_rate": 1e-4}  # 2,000 steps: stopped long before its end
# Node death is noticed within about two seconds (the default takes 15 s or more).
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                      "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}  # fmt: skip
TERMINAL = ("completed", "cancelled", "error", "user_error")
# Every port of a worker node, chosen free (Ray's defaults are the head's, or another cluster's).
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port")  # fmt: skip


# -- the cluster ---------------------------------------------------------------------------------------------------
class Head(ray_support.RayCluster):
    def env(self) -> dict[str, str]:
        return {**super().env(), **FAST_HEALTH_CHECKS}


class Node:
    """A worker node: `ray start --address` in a temporary folder of its own (which names its processes), on free
    ports, with one CPU and 3 GiB of memory to give."""

    def __init__(self, head: Head, name: str) -> None:
        self.head, self.name = head, name
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"tfray-{name}-", dir="/tmp"))

    def start(self) -> Node:
        low = ray_support._free_port()
        workers = (low, low + 100) if low + 100 < 65535 else (low - 100, low)
        cmd = [ray_support._ray(), "start", "--address", f"{ray_support.HOST}:{self.head.gcs_port}",
               "--node-ip-address", ray_support.HOST, "--num-cpus", "1", "--memory", str(3 << 30),
               "--object-store-memory", str(80 << 20), "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
               "--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[1])]  # fmt: skip
        for flag in NODE_PORTS:
            cmd += [flag, str(ray_support._free_port())]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.head.env(), timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray start (node {self.name}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return self

    def pids(self) -> list[int]:
        """The node's processes (their command lines name its folder) and everything they started."""
        return _tree(lambda cmdline: str(self.temp_dir).encode() in cmdline)

    def kill(self) -> None:
        """The node is lost: every process of it dies at once."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to whatever of them is left: found once, so that a process whose parent ended
        first (and which no longer descends from the node's) is not missed."""
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while _live(pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            pids = sorted(set(_live(pids)) | set(self.pids()))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _live(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


_tree = ray_support.process_tree


def _trainers(spec_path: str) -> list[int]:
    """Live training processes of this spec (on whichever node)."""
    return _live(_tree(lambda cmdline: b"tuneforge.train" in cmdline and spec_path.encode() in cmdline.split(b"\0")))


@dataclass
class Cluster:
    head: Head
    nodes: list[Node]
    started_in_s: float

    @property
    def address(self) -> str:
        return self.head.address

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    began = time.monotonic()
    head = Head(num_cpus=0)  # runs Ray's own services and no training: the runs go to the worker nodes
    nodes = [Node(head, "a"), Node(head, "b")]

    def stop() -> None:
        for node in nodes:
            node.stop()
        head.stop()
        atexit.unregister(stop)

    atexit.register(stop)  # should the module's teardown never run
    try:
        head.start()
        errors: list[BaseException] = []

        def start(node: Node) -> None:
            try:
                node.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(node,)) for node in nodes]  # the two start side by side
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        _wait(lambda: _alive_cpu_nodes(head.address) == 2, 60, "the worker nodes did not join")
    except BaseException:
        stop()
        raise
    started = Cluster(head, nodes, time.monotonic() - began)
    print(f"\nRay cluster (head + 2 worker nodes) started in {started.started_in_s:.1f} s")
    try:
        yield started
    finally:
        stop()


def _alive_cpu_nodes(address: str) -> int:
    from ray.util.state import list_nodes

    return sum(1 for n in list_nodes(address=address) if n.state == "ALIVE" and n.resources_total.get("CPU"))


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.2)


# -- jobs ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("ray-model") / "llama", "llama")


@dataclass
class Env:
    settings: Settings
    db: Any
    blobs: Any
    model_dir: Path

    def worker(self, **kwargs: Any) -> Worker:
        return Worker(self.db, self.blobs, self.settings, make_executor("ray", self.settings), **kwargs)

    def insert(self, job_id: str, hyper: dict[str, Any]) -> None:
        """A queued job of LoRA on the tiny model, as `jobs.queue.enqueue` leaves one."""
        source = ModelSource(name=MODEL, source_kind="local", source=str(self.model_dir))
        plan = msgspec.structs.replace(standalone_plan(source, Hyper(**hyper)), training_file="file-ray")
        now = time.time()
        row = JobRow(
            id=job_id, owner="alice", status="pending", model=MODEL, output_name=f"alice/tiny-{job_id}",
            training_file="file-ray", validation_file=None, request_hash=job_id, error=None, progress={},
            params=plan.to_builtins(), secrets={}, runner=None, attempt=0, created_at=now, updated_at=now, deleted=0,
        )  # fmt: skip
        with self.db.session() as s:
            repo.insert_job(s, row=row, event_type="job_pending", message="created")
            assert repo.transition(s, job_id=job_id, from_statuses=("pending",), to_status="queued",
                                   event_type="job_pending", message="queued")  # fmt: skip

    def job(self, job_id: str) -> JobRow:
        with self.db.session() as s:
            return repo.get_job(s, job_id=job_id)

    def drive(self, worker: Worker, job_id: str, until: Callable[[JobRow], bool] | None = None,
              timeout: float = 180) -> JobRow:  # fmt: skip
        """Tick the worker until `until(job)` holds (default: the job ended)."""
        until = until or (lambda job: job.status in TERMINAL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker.tick()
            job = self.job(job_id)
            if until(job):
                return job
            assert job.status not in TERMINAL, (job.status, job.error, self.log(job_id))
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} stuck in {job.status}: {self.log(job_id)}")

    def log(self, job_id: str) -> str:
        logs = sorted((self.settings.home / "work" / job_id).glob("train-*.log"))
        return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-3000:]}" for p in logs)

    def records(self, job_id: str, attempt: int) -> list[dict[str, Any]]:
        path = self.settings.home / "work" / job_id / f"events-{attempt}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path, model_dir: Path, cluster: Cluster) -> Env:
    settings = Settings(home=tmp_path / "home", executor="ray", ray_address=cluster.address, train_threads=1,
                        max_attempts=3, cancel_grace_s=20)  # fmt: skip
    settings.ensure_home()
    blobs = open_blob_store(settings.storage_url)
    Catalog(blobs).add(ModelEntry(name=MODEL, source_kind="local", source=str(model_dir), params=PARAMS))
    with blobs.writer("files/file-ray") as w:
        w.write("".join(json.dumps(r) + "\n" for r in ROWS).encode())
    return Env(settings, open_database(settings.database_url), blobs, model_dir)


def _reserved(cluster: Cluster, sid: str) -> dict[str, float]:
    """The resources Ray holds for a job's entrypoint: its supervisor actor's (named after the submission id)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 30
    while True:
        actors = list_actors(address=cluster.address, filters=[("class_name", "=", "JobSupervisor")], detail=True,
                             raise_on_missing_output=False)  # fmt: skip
        found = [a for a in actors if a.name and a.name.endswith(f"job_actor_{sid}")]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(found) == 1, actors
    return dict(found[0].required_resources or {})


def _running(job: JobRow) -> bool:
    return int((job.progress or {}).get("steps_completed", 0)) >= 2


def _handle(job: JobRow) -> dict[str, Any]:
    return dict((job.runner or {})["handle"])


# -- without a cluster ---------------------------------------------------------------------------------------------
def test_the_ray_executor_needs_a_reachable_cluster(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ValueError, match="TUNEFORGE_RAY_ADDRESS"):
        make_executor("ray", Settings(home=tmp_path / "none", executor="ray", ray_address=""))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    settings = Settings(home=tmp_path / "home", executor="ray", ray_address=address)
    settings.ensure_home()
    blobs = open_blob_store(settings.storage_url)
    env = Env(settings, open_database(settings.database_url), blobs, model_dir)
    env.insert("ft-ray-nocluster", SHORT)
    job = env.drive(env.worker(), "ft-ray-nocluster", timeout=60)
    assert job.status == "error"
    assert f"the Ray cluster at {address} (TUNEFORGE_RAY_ADDRESS) is unreachable" in job.error
    # A run out of reach counts as running (the worker's heartbeat timeout ends that), and as gone once killed.
    executor = RayExecutor(settings)
    handle = {"executor": "ray", "address": address, "submission_id": submission_id("ft-ray-nocluster", 1)}
    assert executor.poll(handle) is None
    executor.kill(handle)
    assert executor.poll(handle) == -1


def test_a_runs_request_follows_its_threads_processes_device_and_model(tmp_path: Path) -> None:
    url = str(tmp_path / "blobs")
    Catalog(open_blob_store(url)).add(ModelEntry(name=MODEL, source_kind="local", source="/m", params=PARAMS))
    plan = standalone_plan(ModelSource(name=MODEL, source_kind="local", source="/m"), Hyper(training_type="full"))
    spec = TrainSpec(job_id="ft-x", plan=plan, storage_url=url, cache_dir="/c", work_dir="/w", events_path="/w/e",
                     training_file_key="files/x", output_prefix="jobs/ft-x", output_name="a/b",
                     num_threads=4)  # fmt: skip
    per_process = RUN_BASE_MEMORY + training_bytes(PARAMS, "full")  # weights, gradients and AdamW's moments
    assert resources(spec) == Resources(cpus=4, gpus=0, memory=per_process)
    two = msgspec.structs.replace(spec, processes=2, device="cuda")  # two ranks, a GPU and a model copy each
    assert resources(two) == Resources(cpus=4, gpus=2, memory=2 * per_process)
    assert resources(msgspec.structs.replace(spec, num_threads=None)).cpus == 1
    unknown = msgspec.structs.replace(spec, plan=msgspec.structs.replace(plan, model="not/in-the-catalog"))
    assert resources(unknown).memory == RUN_BASE_MEMORY
    with pytest.raises(ValueError, match="TUNEFORGE_TRAIN_DEVICE=cuda"):
        resources(msgspec.structs.replace(spec, device="cuda:1"))  # Ray picks the GPU


# -- on the cluster ------------------------------------------------------------------------------------------------
def test_a_lora_job_completes_as_a_ray_job_that_asks_for_its_resources(
    env: Env, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEFORGE_NOT_FOR_RUNS", "server-only")  # not a variable a run is given
    worker = env.worker()
    env.insert("ft-ray-done", SHORT)
    worker.tick()
    handle = _handle(env.job("ft-ray-done"))
    assert handle["submission_id"] == submission_id("ft-ray-done", 1) == "tuneforge-train-ft-ray-done-1"
    info = cluster.client().get_job_info(handle["submission_id"])
    memory = RUN_BASE_MEMORY + training_bytes(PARAMS, "lora")  # sized from the catalog's parameter count
    assert info.metadata | {"cpus": "1", "gpus": "0", "memory": str(memory)} == info.metadata
    # What Ray reserved: the job's supervisor actor (which runs the entrypoint) holds the entrypoint's resources.
    assert _reserved(cluster, handle["submission_id"]) == {"CPU": 1.0, "memory": float(memory)}  # no GPU on cpu
    spec_path = str(env.settings.home / "work" / "ft-ray-done" / "spec-1.json")
    assert f"-m tuneforge.train {spec_path}" in info.entrypoint
    plan = load_spec(Path(spec_path).read_bytes()).plan
    expected = {**_run_env(env.settings, plan, {}), "RAY_JOB_STOP_WAIT_TIME_S": "20"}
    assert info.runtime_env["env_vars"] == expected  # the worker's explicit environment, nothing more
    assert "TUNEFORGE_NOT_FOR_RUNS" not in info.runtime_env["env_vars"]

    job = env.drive(worker, "ft-ray-done")
    assert job.status == "completed" and job.attempt == 1, (job.error, env.log("ft-ray-done"))
    with env.db.session() as s:
        types = [e.type for e in repo.list_events(s, job_id="ft-ray-done")]
        assert "training_start" in types and types[-1] == "job_complete"
        assert [m.step for m in repo.list_metrics(s, job_id="ft-ray-done")] == [1, 2, 3, 4]
        assert [(c.step, c.kind) for c in repo.list_checkpoints(s, job_id="ft-ray-done")][-1] == (4, "final")
    assert env.blobs.exists(f"{final_prefix('ft-ray-done', 'adapter')}/adapter_model.safetensors")
    assert str(cluster.client().get_job_status(handle["submission_id"])) in ("SUCCEEDED", "JobStatus.SUCCEEDED")
    assert Path(handle["log_path"]).stat().st_size > 0  # the run's output, in the work folder as for a local run


def test_ray_gives_a_stopped_run_the_cancel_grace_to_finish(env: Env, cluster: Cluster, tmp_path: Path) -> None:
    """Ray's own grace is 3 s; a run stopped through the executor gets `cancel_grace_s` before its SIGKILL."""
    executor = RayExecutor(env.settings)
    ready, done = tmp_path / "ready", tmp_path / "done"
    script = "\n".join([
        "import pathlib, signal, sys, time",
        f"def finish(*_):\n    time.sleep(5); pathlib.Path({str(done)!r}).write_text('saved'); sys.exit(0)",
        "signal.signal(signal.SIGTERM, finish)",
        f"pathlib.Path({str(ready)!r}).write_text('')",
        "time.sleep(120)",
    ])  # fmt: skip
    client = cluster.client()
    sid = client.submit_job(entrypoint=f"exec {shlex.join([sys.executable, '-c', script])}", entrypoint_num_cpus=1,
                            runtime_env=executor.runtime_env({"PATH": os.environ["PATH"]}))  # fmt: skip
    _wait(ready.exists, 60, "the stand-in run did not start")
    handle = {"executor": "ray", "address": cluster.address, "submission_id": sid}
    stopped_at = time.monotonic()
    executor.cancel(handle)
    _wait(lambda: executor.poll(handle) is not None, 30, "not stopped")
    assert time.monotonic() - stopped_at >= 5 and executor.poll(handle) == -15  # STOPPED
    assert done.read_text() == "saved"  # not SIGKILLed after Ray's own 3 s


def test_a_cancelled_run_ends_cancelled_with_a_checkpoint(env: Env, cluster: Cluster) -> None:
    worker = env.worker()
    env.insert("ft-ray-cancel", LONG)
    env.drive(worker, "ft-ray-cancel", until=_running)
    with env.db.session() as s:
        assert repo.transition(s, job_id="ft-ray-cancel", from_statuses=("running",), to_status="cancel_requested",
                               event_type="cancel_requested", message="cancel")  # fmt: skip
    worker.request_cancel("ft-ray-cancel")
    asked = time.monotonic()
    job = env.drive(worker, "ft-ray-cancel", timeout=60)
    assert job.status == "cancelled", (job.error, env.log("ft-ray-cancel"))
    assert time.monotonic() - asked < env.settings.cancel_grace_s  # it stopped by itself, not killed
    records = env.records("ft-ray-cancel", 1)
    result = records[-1]
    assert result["kind"] == "result" and result["status"] == "cancelled" and "checkpoint saved" in result["message"]
    last_step = [r for r in records if r["kind"] == "progress"][-1]["step"]
    with env.db.session() as s:
        [ckpt] = repo.list_checkpoints(s, job_id="ft-ray-cancel")
    assert ckpt.step == last_step < 2000 and env.blobs.exists(f"{ckpt.path}/resume/state.json")
    info = cluster.client().get_job_info(_handle_of(env, "ft-ray-cancel", 1)["submission_id"])
    assert str(info.status).endswith("STOPPED")
    assert _trainers(_handle_of(env, "ft-ray-cancel", 1)["spec_path"]) == []


def _handle_of(env: Env, job_id: str, attempt: int) -> dict[str, Any]:
    spec_path = str(env.settings.home / "work" / job_id / f"spec-{attempt}.json")
    return {"executor": "ray", "address": env.settings.ray_address, "submission_id": submission_id(job_id, attempt),
            "spec_path": spec_path}  # fmt: skip


def test_a_killed_run_stops_at_once(env: Env, cluster: Cluster) -> None:
    worker = env.worker()
    env.insert("ft-ray-kill", LONG)
    env.drive(worker, "ft-ray-kill", until=_running)
    handle = worker.runs["ft-ray-kill"].handle
    assert _trainers(handle["spec_path"])
    killed = time.monotonic()
    worker.executor.kill(handle)
    _wait(lambda: not _trainers(handle["spec_path"]), 30, "the run still trains")
    took = time.monotonic() - killed
    _wait(lambda: worker.executor.poll(handle) is not None, 30, "Ray did not see the run end")
    print(f"\nkill: the run was gone {took:.1f} s after the kill (a stop waits {env.settings.cancel_grace_s:.0f} s)")
    assert took < 10 < env.settings.cancel_grace_s
    assert worker.executor.poll(handle) == -9  # SIGKILLed, as a local child would be
    assert not [r for r in env.records("ft-ray-kill", 1) if r["kind"] == "result"]


def test_a_restarted_servers_worker_adopts_a_run_by_its_handle(env: Env, cluster: Cluster) -> None:
    # The first server's worker starts the run and goes away (its pid does not exist), the run does not.
    first = Worker(env.db, env.blobs, env.settings, make_executor("ray", env.settings),
                   worker_id=f"{socket.gethostname()}:999999999:gone")  # fmt: skip
    env.insert("ft-ray-adopt", SHORT | {"n_epochs": 40})  # 80 steps
    first.tick()
    handle = _handle(env.job("ft-ray-adopt"))

    second = env.worker()  # a new worker with a new executor: it knows the run only by the handle on the job row
    second.recover()
    assert second.runs["ft-ray-adopt"].handle == handle and second.executor.poll(handle) is None  # adopted, running
    forgotten = handle | {"submission_id": submission_id("ft-ray-adopt", 7)}  # as after the cluster restarted
    assert second.executor.poll(forgotten) == -1  # gone: its job would resume from its checkpoint
    job = env.drive(second, "ft-ray-adopt")
    assert job.status == "completed" and job.attempt == 1, (job.error, env.log("ft-ray-adopt"))  # not resumed
    with env.db.session() as s:
        assert [m.step for m in repo.list_metrics(s, job_id="ft-ray-adopt")] == list(range(1, 81))  # once each
    # Submitting the same attempt again is refused by Ray, not run twice.
    spec = load_spec(Path(handle["spec_path"]).read_bytes())
    with pytest.raises(RuntimeError, match="not starting it twice"):
        second.executor.start(spec, spec_path=handle["spec_path"], env={})
    runs = [j.submission_id for j in cluster.client().list_jobs() if "ft-ray-adopt" in (j.submission_id or "")]
    assert runs == [handle["submission_id"]]


def test_a_run_on_a_lost_node_resumes_on_another_from_its_checkpoint(env: Env, cluster: Cluster) -> None:
    worker = env.worker()
    env.insert("ft-ray-node", LONG | {"n_epochs": 100, "n_checkpoints": 20})  # 400 steps, a checkpoint every 20

    def checkpointed(job: JobRow) -> bool:
        with env.db.session() as s:
            return bool(repo.list_checkpoints(s, job_id=job.id))

    job = env.drive(worker, "ft-ray-node", until=checkpointed)
    first_handle = _handle(job)
    [trainer] = _trainers(first_handle["spec_path"])
    [lost] = [node for node in cluster.nodes if trainer in node.pids()]  # the node Ray put it on
    lost.kill()
    job = env.drive(worker, "ft-ray-node", timeout=240)
    assert job.status == "completed" and job.attempt == 2, (job.error, env.log("ft-ray-node"))
    before = env.records("ft-ray-node", 1)
    assert not [r for r in before if r["kind"] == "result"]  # the first run died mid-way
    ckpt_step = [r["step"] for r in before if r["kind"] == "checkpoint"][-1]  # its last checkpoint
    resumed = load_spec((env.settings.home / "work" / "ft-ray-node" / "spec-2.json").read_bytes())
    assert resumed.resume is not None and resumed.resume.step == ckpt_step
    progress = [r["step"] for r in env.records("ft-ray-node", 2) if r["kind"] == "progress"]
    assert progress[0] == ckpt_step + 1 and progress[-1] == 400
    client = cluster.client()
    first = client.get_job_info(first_handle["submission_id"])
    second = client.get_job_info(submission_id("ft-ray-node", 2))
    assert str(first.status).endswith("FAILED") and first.driver_exit_code is None  # lost with its node
    assert second.driver_node_id and second.driver_node_id != first.driver_node_id
    with env.db.session() as s:
        restarted = [e for e in repo.list_events(s, job_id="ft-ray-node") if e.type == "job_restarted"]
    assert len(restarted) == 1 and f"from the checkpoint at step {ckpt_step}" in restarted[0].message
