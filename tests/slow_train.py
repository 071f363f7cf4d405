"""train.py with a pause in every step (the numbers are unchanged), so a test can signal a run
mid-training: ``python tests/slow_train.py SECONDS <train.py arguments>``. With $HOLD_FILE set, each
step after the first waits while that file exists (a test holds the run mid-training). Exit statuses as train.py's."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

pause, real_step = float(sys.argv[1]), train.train_step


def slow_step(state, *args, **kwargs):
    while state.step >= 1 and os.environ.get("HOLD_FILE") and os.path.exists(os.environ["HOLD_FILE"]):
        time.sleep(0.05)                                 # step 1 is logged, step 2 waits
    time.sleep(pause / 2)
    out = real_step(state, *args, **kwargs)
    time.sleep(pause / 2)
    return out


train.train_step = slow_step
try:
    train.main(sys.argv[2:])
except train.Preempted as e:
    sys.exit(e.exit_code)
