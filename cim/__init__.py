"""Simulated compute-in-memory edge device: bit-sliced memristive crossbars with
parasitic wire resistance, naive and Manhattan Distance Mapping (MDM) of weights.

``device`` holds the tile physics parameters, ``circuit`` the crossbar solvers,
``mapping`` the placement of weights on tiles, ``engine`` bit-serial products and
their distortion, ``model`` whole-model analog inference, ``metrics`` distortion
measures, ``study`` the deploy study and its report, ``plots`` its figures, ``names``
the mappings and modes (no torch, so that ``--help`` lists them quickly).
"""
