"""Run `clipcond train clip` and SIGKILL the process right after optimizer step $CLIPCOND_KILL_AT_STEP.

Used by the resume test: the kill comes with no warning, as from the OOM killer or a pre-empted node.
"""

import os
import signal
import sys

from clipcond.train import clip as train_clip

kill_at = int(os.environ["CLIPCOND_KILL_AT_STEP"])
steps = 0
after_step = train_clip.ClipStage.after_optimizer_step


def after_step_then_maybe_die(self):
    global steps
    after_step(self)
    steps += 1
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


train_clip.ClipStage.after_optimizer_step = after_step_then_maybe_die
sys.exit(train_clip.main(sys.argv[1:]))
