"""``python -m fastbegan``: the command line (:mod:`fastbegan.cli`).

Under torchrun (WORLD_SIZE > 1) the process leaves with ``os._exit`` once the command has
returned: everything is on disk by then (checkpoints fsync'ed and renamed, logs closed, the
process group left), and torch's C++ threads torn down in the interpreter's finalisation
have aborted a rank after a finished run ("terminate called without an active
exception", under load), which makes torchrun report the whole run failed.
"""
import os
import sys

from .cli import main

try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
