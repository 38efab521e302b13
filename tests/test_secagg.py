"""SecAgg+: exact unmasking under dropouts at every stage, uniform masked inputs, the clients' checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dpfl.privacy.secure_sum import setup_problem
from dpfl.secagg.protocol import (
    SecAggClient,
    SecAggServer,
    SecAggSetup,
    TooFewSurvivors,
    mask,
    run_round,
)

SIZE = 6


@st.composite
def rounds(draw):
    """A round's setup, the inputs, and who drops out before each stage."""
    n = draw(st.integers(3, 9))
    degree = draw(st.sampled_from(sorted({2, 4, 6, n - 1} & set(range(2, n)))))
    min_inputs = draw(st.integers(1, n))
    bits = draw(st.sampled_from([8, 16, 32, 62]))
    nodes = tuple(sorted(draw(st.sets(st.integers(1, 2**63 - 1), min_size=n, max_size=n))))
    setup = SecAggSetup(nodes, degree, min_inputs, bits, draw(st.binary(min_size=32, max_size=32)))
    inputs = {node: np.array(draw(st.lists(st.integers(0, 2**bits - 1), min_size=SIZE, max_size=SIZE)),
                             dtype=np.uint64) for node in nodes}  # fmt: skip
    stage_of = {node: draw(st.sampled_from([None, None, 0, 1, 2, 3])) for node in nodes}
    dropped = {stage: [node for node, at in stage_of.items() if at == stage] for stage in range(4)}
    return setup, inputs, dropped


def recoverable(setup: SecAggSetup, dropped: dict[int, list[int]]) -> bool:
    """Whether the rules say the sum can be released: stated here from the protocol's conditions
    (who holds whose shares and who answers), not by running it."""
    r, t = setup.share_threshold, setup.min_inputs
    advertised = set(setup.nodes) - set(dropped[0])
    if len(advertised) < t:
        return False
    holders = {node: (setup.neighbours(node) & advertised) | {node} for node in advertised}
    shared = {node for node in advertised - set(dropped[1]) if len(holders[node]) >= r}
    if len(shared) < t:
        return False
    masked = {node for node in shared - set(dropped[2]) if len(setup.neighbours(node) & shared) + 1 >= r}
    if len(masked) < t:
        return False
    answered = masked - set(dropped[3])
    if len(answered) < t:
        return False
    must_rebuild = masked | {node for node in shared - masked if setup.neighbours(node) & masked}
    return all(len(holders[node] & shared & answered) >= r for node in must_rebuild)


@settings(max_examples=40, deadline=None)
@given(rounds())
def test_unmasking_is_exact_under_dropouts_at_every_stage(case):
    setup, inputs, dropped = case
    expected_ok = recoverable(setup, dropped)
    try:
        total, survivors = run_round(setup, inputs, dropped)
    except TooFewSurvivors:
        assert not expected_ok
        return
    assert expected_ok
    assert len(survivors) >= setup.min_inputs
    assert not set(survivors) & set(dropped[0] + dropped[1] + dropped[2])
    expected = np.zeros(SIZE, dtype=np.uint64)
    for node in survivors:
        expected = (expected + inputs[node]) & np.uint64((1 << setup.bits) - 1)
    np.testing.assert_array_equal(total, expected)


def masked_zero_input(bits: int, size: int) -> np.ndarray:
    setup = SecAggSetup(tuple(range(1, 6)), 4, 3, bits, os.urandom(32))
    clients = {node: SecAggClient(node, setup) for node in setup.nodes}
    server = SecAggServer(setup)
    keys = server.public_keys_for({node: client.advertise() for node, client in clients.items()})
    routed = server.route_shares({node: client.share_keys(keys[node]) for node, client in clients.items()})
    return clients[1].masked_input(routed[1], np.zeros(size, dtype=np.uint64))


@pytest.mark.parametrize("bits", [8, 32])
def test_a_masked_input_is_uniform_mod_2_to_the_b(bits):
    """What the server receives from one client, for the input 0, is uniform on Z_{2^b}: its
    top 8 bits and its bottom 8 bits are each uniform over 256 bins (chi-square)."""
    masked = masked_zero_input(bits, 1 << 16)
    for part in (masked >> np.uint64(bits - 8), masked & np.uint64(255)):
        counts = np.bincount(part.astype(np.int64), minlength=256)
        assert chisquare(counts).pvalue > 1e-6


def test_masks_are_exactly_b_bits_of_a_keyed_stream():
    seed = os.urandom(32)
    np.testing.assert_array_equal(mask(seed, 100, 16), mask(seed, 100, 16))
    assert not np.array_equal(mask(seed, 100, 16), mask(os.urandom(32), 100, 16))
    assert int(mask(seed, 10_000, 5).max()) == 31  # the top residue is reachable (Flower's generator stops below it)


def test_clients_check_what_the_server_tells_them():
    setup = SecAggSetup(tuple(range(1, 8)), 2, 4, 16, os.urandom(32))
    client = SecAggClient(1, setup)
    others = {node: SecAggClient(node, setup).advertise() for node in setup.nodes if node != 1}
    strangers = {node: keys for node, keys in others.items() if node not in setup.neighbours(1)}
    with pytest.raises(ValueError, match="not this client's neighbours"):
        client.share_keys(strangers)
    neighbours = {node: keys for node, keys in others.items() if node in setup.neighbours(1)}
    client.share_keys(neighbours)
    with pytest.raises(TooFewSurvivors, match="fewer than the threshold 4"):
        client.unmask([1, 2, 3])


def test_neighbourhoods_are_a_regular_graph():
    setup = SecAggSetup(tuple(range(100, 130)), 6, 10, 32, os.urandom(32))
    graph = {node: setup.neighbours(node) for node in setup.nodes}
    assert all(len(peers) == 6 and node not in peers for node, peers in graph.items())
    assert all(node in graph[peer] for node, peers in graph.items() for peer in peers)  # symmetric
    assert setup.share_threshold == 4


@pytest.mark.parametrize(
    ("n", "degree", "min_inputs", "bits", "message"),
    [
        (5, 4, 6, 32, "secagg-threshold 6 must be between 1 and the number of clients 5"),
        (10, 3, 5, 32, "secagg-neighbours 3 must be an even number"),
        (10, 4, 5, 64, "secagg-bits 64 must be between 2 and 62"),
        (1, 4, 1, 32, "at least 2 clients"),
    ],
)
def test_bad_settings_are_one_line_errors(n, degree, min_inputs, bits, message):
    assert message in setup_problem(n, degree, min_inputs, bits)
    with pytest.raises(ValueError, match=message):
        SecAggSetup(tuple(range(n)), degree, min_inputs, bits, bytes(32))


def test_key_material_cannot_be_pickled_and_a_node_keeps_it_only_explicitly():
    """Nothing of a round's secrets can reach a checkpoint or a log by pickling; a node keeps
    its client between exchanges only through secrets()/from_secrets(), and the kept client
    completes the round exactly."""
    import pickle

    setup = SecAggSetup((1, 2, 3), 2, 2, 16, os.urandom(32))
    for party in (SecAggClient(1, setup), SecAggServer(setup)):
        with pytest.raises(TypeError, match="never (pickled|serialised)"):
            pickle.dumps(party)

    def kept(clients):
        return {node: SecAggClient.from_secrets(node, setup, client.secrets()) for node, client in clients.items()}

    clients = {node: SecAggClient(node, setup) for node in setup.nodes}
    server = SecAggServer(setup)
    keys_for = server.public_keys_for({node: client.advertise() for node, client in kept(clients).items()})
    clients = kept(clients)
    routed = server.route_shares({node: client.share_keys(keys_for[node]) for node, client in clients.items()})
    clients = kept(clients)
    inputs = {node: np.arange(6, dtype=np.uint64) * node for node in setup.nodes}
    survivors = server.survivors({node: clients[node].masked_input(routed[node], inputs[node]) for node in (1, 3)})
    clients = kept(clients)
    total = server.unmasked_sum({node: clients[node].unmask(survivors) for node in survivors})
    assert np.array_equal(total, (inputs[1] + inputs[3]) % 2**16)


def unmasked_views(inputs: dict[int, int], bits: int, rounds: int) -> list[tuple[int, int]]:
    """What the server can compute of one round: each survivor's masked input minus its self-mask
    (rebuilt from the revealed seed shares), for clients 1 and 2 of a 3-client round."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    views = []
    for _ in range(rounds):
        setup = SecAggSetup((1, 2, 3), 2, 3, bits, os.urandom(32))
        clients = {node: SecAggClient(node, setup) for node in setup.nodes}
        server = SecAggServer(setup)
        keys = server.public_keys_for({node: client.advertise() for node, client in clients.items()})
        routed = server.route_shares({node: client.share_keys(keys[node]) for node, client in clients.items()})
        masked = {node: client.masked_input(routed[node], np.array([value], dtype=np.uint64))
                  for (node, client), value in zip(clients.items(), inputs.values())}  # fmt: skip
        survivors = server.survivors(masked)
        revealed = {node: clients[node].unmask(survivors) for node in survivors}
        view = []
        for owner in (1, 2):
            seed = combine_shares([reply[owner][1] for reply in revealed.values()][: setup.share_threshold])
            view.append(int((masked[owner] - mask(seed, 1, bits))[0] & np.uint64((1 << bits) - 1)))
        views.append(tuple(view))
    return views


def test_the_servers_view_depends_on_the_inputs_only_through_their_sum():
    """Two input assignments with the same sum mod 2^b: what the server can unmask of clients
    1 and 2 (their inputs plus pairwise masks) has the same distribution (chi-square homogeneity
    over the 16 cells of a 2-bit field), while the inputs themselves differ."""
    from scipy.stats import chi2_contingency

    bits, rounds = 2, 160
    first = unmasked_views({1: 1, 2: 2, 3: 3}, bits, rounds)
    second = unmasked_views({1: 2, 2: 0, 3: 0}, bits, rounds)
    table = np.zeros((2, 16))
    for row, views in enumerate((first, second)):
        for a, b in views:
            table[row, 4 * a + b] += 1
    assert chi2_contingency(table).pvalue > 1e-6


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_the_defaults_are_valid_settings(n):
    from dpfl.privacy.secure_sum import default_degree, default_min_inputs

    assert setup_problem(n, default_degree(n), default_min_inputs(n), 32) is None
    assert default_min_inputs(n) >= 2 * n / 3
