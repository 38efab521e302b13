"""The public shape of a secure-aggregation round: threshold t, neighbourhood degree k, modulus bits b.

What a run's settings check before it starts and what :mod:`dpfl.secagg.protocol` runs with;
here (pure, no Flower) so that the settings layer can check them without the protocol's
cryptography.
"""

from __future__ import annotations

import math


def default_min_inputs(num_nodes: int) -> int:
    """t = ⌈2n/3⌉: a round survives a third of its clients dropping out, and the noise (each share
    sized for t) is √(n/t) ≈ 1.22 times what n shares sized for n would give."""
    return math.ceil(2 * num_nodes / 3)


# The default neighbourhoods protect against a server colluding with up to this share of the
# clients (chosen before the round's public random order), except with this probability a round.
COLLUDING_FRACTION = 0.2
COLLUSION_FAILURE = 2.0**-20


def default_degree(num_nodes: int) -> int:
    """The smallest even k at which no neighbourhood of the Harary graph on a random order holds a
    Shamir majority (⌊(k+1)/2⌋ + 1) of colluders when the server colludes with a fifth of the
    clients, except with probability ≤ 2⁻²⁰ a round (hypergeometric tail, union over the n
    neighbourhoods); the complete graph (classic SecAgg, secure against fewer than ⌊n/2⌋ + 1
    colluders whatever the order) when that k is n − 1 or more. 4 at n = 10, 36 at 100, 60 at
    400, 88 at 10,000: a client's masks and shares grow with log n, not n (Bell et al. 2020)."""
    from scipy.stats import hypergeom

    colluders = int(COLLUDING_FRACTION * num_nodes)
    for degree in range(2, num_nodes - 1, 2):
        majority = (degree + 1) // 2 + 1
        if num_nodes * hypergeom(num_nodes - 1, colluders, degree).sf(majority - 1) <= COLLUSION_FAILURE:
            return degree
    return num_nodes - 1


def setup_problem(num_nodes: int, degree: int, min_inputs: int, bits: int) -> str | None:
    """Why these SecAgg settings cannot work (one line naming the value and what is allowed), or None."""
    if num_nodes < 2:
        return f"secure aggregation needs at least 2 clients a round, got {num_nodes}"
    if not 1 <= min_inputs <= num_nodes:
        return f"secagg-threshold {min_inputs} must be between 1 and the number of clients {num_nodes}"
    if degree < num_nodes - 1 and (degree < 2 or degree % 2):
        return f"secagg-neighbours {degree} must be an even number >= 2 (or at least the number of clients - 1)"
    if not 2 <= bits <= 62:
        return f"secagg-bits {bits} must be between 2 and 62"
    return None
