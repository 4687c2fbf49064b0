"""Imported by Python inside a sandbox only (nsprovisioner puts this directory on its
PYTHONPATH): the sandbox's own user base, $PYTHONUSERBASE in the sandbox's state
directory, is on sys.path even where Python hides user sites (a venv), and pip
installs there when the interpreter's site-packages is read-only. Nothing outside a
sandbox imports this file or that user base.
"""

import os
import site
import sys

site.ENABLE_USER_SITE = True
_user_site = site.getusersitepackages()
try:
    # made now, so that a package pip installs later in this process's life is
    # found: Python never looks again at a sys.path entry that was missing
    os.makedirs(_user_site, exist_ok=True)
except OSError:
    pass
site.addsitedir(_user_site)


def _chain() -> None:
    """Run the sitecustomize this one shadows, if the interpreter has one."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_sitecustomize_chained", candidate)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_chain()
