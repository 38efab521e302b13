"""dpfl: federated learning with client-level differential privacy.

The top-level folders of the repository are the subpackages of this namespace:
``dpfl.server``, ``dpfl.client``, ``dpfl.strategies``, ``dpfl.privacy``,
``dpfl.task`` (models and data), ``dpfl.compression``, ``dpfl.cim`` and
``dpfl.cli``.
"""

__version__ = "0.1.0"
