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
# clients (chosen before the round's public random order), and survive the dropouts the
# default threshold allows (a third of the clients, at random), except with this probability
# a round.
COLLUDING_FRACTION = 0.2
NEIGHBOURHOOD_FAILURE = 2.0**-20


def default_degree(num_nodes: int) -> int:
    """The smallest even k of the Harary graph on a random order of the n clients at which, except
    with probability ≤ 2⁻²⁰ a round (hypergeometric tails, union over the n neighbourhoods), no
    neighbourhood holds a Shamir majority (⌊(k+1)/2⌋ + 1) of colluders when the server colludes
    with a fifth of the clients, and none keeps fewer live holders than that majority when the
    n − ⌈2n/3⌉ dropouts the default threshold allows fall at random; the complete graph (classic
    SecAgg: secure against fewer than ⌊n/2⌋ + 1 colluders whatever the order) when that k is
    n − 1 or more. 4 at n = 6, 64 at 100, 160 at 400, 328 at 10,000: it grows with log n
    (Bell et al. 2020), not with n."""
    from scipy.stats import hypergeom

    colluders, dropouts = int(COLLUDING_FRACTION * num_nodes), num_nodes - default_min_inputs(num_nodes)
    for degree in range(2, num_nodes - 1, 2):
        majority = (degree + 1) // 2 + 1
        failure = (hypergeom(num_nodes - 1, colluders, degree).sf(majority - 1)
                   + hypergeom(num_nodes - 1, dropouts, degree).sf(degree + 1 - majority))  # fmt: skip
        if num_nodes * failure <= NEIGHBOURHOOD_FAILURE:
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
