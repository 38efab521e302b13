"""The ``dpfl`` command line."""
