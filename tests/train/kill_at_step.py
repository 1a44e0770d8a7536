"""Run a training command and SIGKILL the process right after optimizer step $CLIPCOND_KILL_AT_STEP.

    python kill_at_step.py MODULE STAGE [ARGS...]     # e.g. clipcond.train.decoder DecoderStage --clip ...

runs `MODULE.main(ARGS)` with `MODULE.STAGE.after_optimizer_step` wrapped. Used by the resume tests of every stage:
the kill comes with no warning, as from the OOM killer or a pre-empted node.
"""

import importlib
import os
import signal
import sys
from pathlib import Path

PATH = str(Path(__file__).resolve())  # what the tests run: [sys.executable, PATH, MODULE, STAGE, *args]


def main() -> int:
    module = importlib.import_module(sys.argv[1])
    stage = getattr(module, sys.argv[2])
    kill_at, steps = int(os.environ["CLIPCOND_KILL_AT_STEP"]), 0
    after_step = stage.after_optimizer_step

    def after_step_then_maybe_die(self):
        nonlocal steps
        after_step(self)
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    stage.after_optimizer_step = after_step_then_maybe_die
    return module.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
