"""`python -m tuneforge.train SPEC.json`: run one TrainSpec and end its event stream with exactly one `result` line.

Loads the spec, opens the event stream, runs the recipe from the registry. SIGTERM sets a stop flag: the recipe
finishes its step, checkpoints and returns `cancelled`. Every exception becomes a result: `user_error` when the
data or the request is at fault (an `InvalidRequestError`), `error` with a readable reason otherwise.
Exit status 0 for completed or cancelled, 1 for errors, 2 for a spec that cannot be read.

Under torchrun (`spec.processes` > 1, started so by the local executor) each rank runs this same entry point: it
joins the process group first (`train/distributed.py`), and only rank 0 writes the event stream, so there is still
exactly one `result` line; the other ranks write theirs to a `NullEventWriter`. torchrun passes a SIGTERM on to
every rank, and the recipe agrees on the stop flag across ranks, so they all checkpoint and stop at the same step.
Only the SFT recipe trains data-parallel; DPO refuses to run as several processes.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from pathlib import Path
from types import FrameType

from tuneforge.errors import InvalidRequestError, TuneForgeError
from tuneforge.train import distributed
from tuneforge.train.events import EventWriter, NullEventWriter
from tuneforge.train.fencing import Superseded
from tuneforge.train.registry import load_recipe
from tuneforge.train.spec import load_spec

# The recipes that can run as several processes (`train/distributed.py`). DPO stays one process: its reference
# log-probabilities, pairs and metrics would each need the same sharing and reductions SFT has.
DATA_PARALLEL_RECIPES = ("sft",)


def main(argv: list[str] | None = None) -> int:
    """Run the spec named by the one argument; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuneforge.train SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = load_spec(Path(args[0]).read_bytes())
    except Exception as exc:  # no spec, no event stream to report into: say it on stderr
        print(f"cannot read the training spec {args[0]}: {exc}", file=sys.stderr)
        return 2
    out = EventWriter(spec.events_path) if distributed.from_env().rank == 0 else NullEventWriter()
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        recipe = load_recipe(spec.recipe)
        if distributed.from_env().size > 1 and spec.recipe not in DATA_PARALLEL_RECIPES:
            raise InvalidRequestError(f"the {spec.recipe} recipe trains in one process only; run it without "
                                      "torchrun (processes=1)")  # fmt: skip
        distributed.init(spec.device)
        outcome = recipe(spec, out, stop)
        out.result(outcome.status, outcome.message, **outcome.data)
        return 0
    except InvalidRequestError as exc:
        out.result("user_error", exc.message)
        return 1
    except Superseded as exc:
        out.result("error", str(exc))
        return 1
    except KeyboardInterrupt:
        out.result("cancelled", "Interrupted before the run could checkpoint")
        return 0
    except Exception as exc:
        traceback.print_exc()
        out.result("error", _reason(exc))
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.teardown()
        out.close()


def _reason(exc: BaseException) -> str:
    """A sentence a person can act on for an unexpected failure."""
    if isinstance(exc, TuneForgeError):
        return exc.message
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if distributed.peer_failure(exc):
        return (
            f"Training failed: another of this run's {distributed.size()} data-parallel processes stopped (its "
            f"error is in the run's log), which ended this one: {type(exc).__name__}: {text[:300]}"
        )
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "Training ran out of memory; use a smaller batch_size or max_seq_length "
            f"({type(exc).__name__}: {text or 'no details'})"
        )
    return f"Training failed: {type(exc).__name__}: {text}" if text else f"Training failed: {type(exc).__name__}"


if __name__ == "__main__":
    sys.exit(main())
