"""dpfl: federated learning with client-level differential privacy.

The top-level folders of the repository are the subpackages of this namespace,
one concept each, in layers (a module imports only from lower ones; README,
"Layout"): ``privacy`` (pure math), ``task`` (models, data, evaluation),
``compression`` and ``cim``, ``settings``, ``strategies`` and ``deployment``,
``client``, ``server``, ``plugins``, ``engines``, ``analysis`` and ``cli``.
"""

__version__ = "0.1.0"

import logging as _logging
import os as _os

# Opacus calls logging.basicConfig() when imported (opacus/utils/module_utils.py),
# which gives the root logger a stderr handler. Flower's logger has its own console
# handler and propagates to the root, so every Flower line was printed twice in any
# process that imports Opacus (ClientApp, ServerApp). Flower's lines need no root
# handler; dpfl's in-process engine sets the same attribute while it redirects them.
_logging.getLogger("flwr").propagate = False

# NO_COLOR (https://no-color.org): Flower's console lines without ANSI colours, for logs
# and pipes. In a Flower process (flwr run's ServerApp and ClientApps) flwr is loaded, with
# its console handler, before the app imports dpfl; Flower itself has no such switch.
if _os.environ.get("NO_COLOR"):
    for _handler in _logging.getLogger("flwr").handlers:
        if hasattr(_handler, "colored"):
            _handler.colored = False
