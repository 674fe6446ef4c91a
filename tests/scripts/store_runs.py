"""Under ``composer -n 2``: runs that keep their checkpoints in an S3 object store, killed and resumed
(``store_steps.py`` says how).

    store_runs.py RECIPES OUT STORE STEP [STEP ...]

Composer's uploaders run in spawned processes, and each of them imports this file first: it imports
nothing heavy itself. A rank that fails (or that the launcher ends with SIGTERM) ends those processes
with it: they would outlive it and keep the launcher's output open.
"""

import signal
import sys

if __name__ == "__main__":
    import psutil

    from store_steps import main

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        main(sys.argv[1:])
    except BaseException:
        for child in psutil.Process().children(recursive=True):
            child.kill()
        raise
