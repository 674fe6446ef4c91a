"""Under ``composer -n 2``: runs that keep their checkpoints in an S3 object store, killed and resumed
(``store_steps.py`` says how).

    store_runs.py RECIPES OUT STORE STEP [STEP ...]

Composer's uploaders run in spawned processes, and each of them imports this file first: it imports
nothing heavy itself.
"""

import sys

if __name__ == "__main__":
    from store_steps import main

    main(sys.argv[1:])
