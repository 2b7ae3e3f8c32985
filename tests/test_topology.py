"""Topology model and the preferred-allocation policy for whole GPUs.

Expected values are worked out here from NVIDIA's weights (its
go-gpuallocator's link scores) and the presets' links, not read back from the code;
the exhaustive comparisons use :func:`brute_force`, which computes the objective from
its definition (set score, then the score of what is left free, then index order).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator

import pytest

from trio_gpu_plugin import _topology
from trio_gpu_plugin._discovery import discover
from trio_gpu_plugin._node_model import GpuInfo, NodeModel
from trio_gpu_plugin._nvml_sim import PRESETS, SimulatedNVML
from trio_gpu_plugin._topology import Choice, Topology, best_set, brute_force, pair_score

# NVLink counts of the DGX-1 hybrid cube-mesh (NVIDIA's DGX-1 documentation), by index.
DGX1_LINKS = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2, (1, 2): 2, (1, 3): 1, (1, 5): 2,
              (2, 3): 2, (2, 6): 1, (3, 7): 1, (4, 5): 1, (4, 6): 1, (4, 7): 2, (5, 6): 2,
              (5, 7): 1, (6, 7): 2}


def model_of(preset: str) -> NodeModel:
    nvml = SimulatedNVML(PRESETS[preset])
    nvml.nvmlInit()
    return discover(nvml, "/nonexistent").model


@pytest.fixture(scope="module")
def dgx1() -> Topology:
    return Topology.from_model(model_of("dgx-1"))


def dgx1_level(i: int, j: int) -> int:
    """The simulator's PCIe layout of the preset: pairs (0,1), (2,3).. share a switch,
    0-3 and 4-7 share a NUMA node."""
    if i // 2 == j // 2:
        return 10
    return 40 if i // 4 == j // 4 else 50


def dgx1_score(i: int, j: int) -> int:
    links = DGX1_LINKS.get((min(i, j), max(i, j)), 0)
    return 100 * links + {10: 50, 40: 20, 50: 10}[dgx1_level(i, j)]


def two_islands() -> Topology:
    """16 GPUs: two DGX-1 cube-meshes (0-7 and 8-15) joined only through PCIe across
    NUMA nodes."""
    ids = [f"GPU-{i:02d}" for i in range(16)]
    links: dict[tuple[str, str], int] = {}
    levels: dict[tuple[str, str], int] = {}
    for i, j in itertools.combinations(range(16), 2):
        if i // 8 == j // 8:
            a, b = i % 8, j % 8
            if (a, b) in DGX1_LINKS:
                links[(ids[i], ids[j])] = DGX1_LINKS[(a, b)]
            levels[(ids[i], ids[j])] = dgx1_level(a, b)
        else:
            levels[(ids[i], ids[j])] = 50
    return Topology.from_links(ids, links, levels)


def indices(topology: Topology, choice: Choice) -> list[int]:
    return [topology.position(uuid) for uuid in choice.ids]


# -- scores -------------------------------------------------------------------------------


def test_pair_score_uses_nvidias_weights() -> None:
    levels = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
    for level, weight in levels.items():
        assert pair_score(0, level) == weight
    assert pair_score(0, None) == 0
    assert pair_score(0, 7) == 0  # a level NVML does not define is unknown
    for k in range(1, 19):
        assert pair_score(k, None) == 100 * k
    assert pair_score(24, 50) == 2410  # beyond NVIDIA's 18 links: counted the same way
    assert pair_score(2, 10) == 250
    assert pair_score(-1, 10) == 50


def test_dgx1_model_has_the_cube_mesh_links_and_pcie_levels(dgx1: Topology) -> None:
    model = model_of("dgx-1")
    assert dgx1.ids == tuple(gpu.uuid for gpu in model.gpus)
    for i, j in itertools.permutations(range(8), 2):
        assert dgx1.nvlinks[i][j] == DGX1_LINKS.get((min(i, j), max(i, j)), 0), (i, j)
        assert dgx1.pcie[i][j] == dgx1_level(i, j)
        assert dgx1.scores[i][j] == dgx1.scores[j][i] == dgx1_score(i, j)
        assert dgx1.score(dgx1.ids[i], dgx1.ids[j]) == dgx1_score(i, j)
    assert all(dgx1.scores[i][i] == 0 for i in range(8))
    assert dict(dgx1.numa) == {gpu.uuid: gpu.numa_node for gpu in model.gpus}
    assert dgx1.set_score(dgx1.ids[:2]) == 150
    assert dgx1.set_score([dgx1.ids[0], dgx1.ids[0], dgx1.ids[1]]) == 150


def test_nvswitch_pairs_all_get_the_same_nvlink_part() -> None:
    a100 = Topology.from_model(model_of("dgx-a100"))
    for i, j in itertools.permutations(range(8), 2):
        # 12 switch links on each GPU: every pair reaches every other through them.
        assert a100.nvlinks[i][j] == 12
        assert a100.scores[i][j] - pair_score(0, a100.pcie[i][j]) == 1200
    # So PCIe decides, as it does for NVIDIA: the pair behind one switch.
    choice = best_set(a100, a100.ids, [], 2)
    assert indices(a100, choice) == [0, 1] and choice.score == 1250 and choice.exact


def test_pcie_only_node_scores_by_numa() -> None:
    pcie4 = Topology.from_model(model_of("pcie-4"))
    assert all(pcie4.nvlinks[i][j] == 0 for i in range(4) for j in range(4))
    choice = best_set(pcie4, pcie4.ids[::-1], [], 2)
    assert choice == brute_force(pcie4, pcie4.ids, [], 2)


# -- the policy against the definition ----------------------------------------------------


def dgx1_requests() -> Iterator[tuple[list[int], list[int], int]]:
    """Every subset of free GPUs, every size up to it, every must_include of 0-2."""
    for count in range(1, 9):
        for available in itertools.combinations(range(8), count):
            musts = [m for r in range(3) for m in itertools.combinations(available, r)]
            for size in range(1, count + 1):
                for must in musts:
                    if len(must) <= size:
                        yield list(available), list(must), size


def test_best_set_equals_brute_force_on_every_dgx1_request(dgx1: Topology) -> None:
    ids = dgx1.ids
    rng = random.Random(8)
    checked = 0
    for available, must, size in dgx1_requests():
        order = [ids[i] for i in available]
        rng.shuffle(order)  # the kubelet sends Go set order
        wanted = [ids[i] for i in must]
        expected = brute_force(dgx1, order, wanted, size)
        got = best_set(dgx1, order, wanted, size, budget=10.0)
        assert got == expected, (available, must, size)
        assert got.exact and len(got.ids) == size
        checked += 1
    # sum over a free GPUs of C(8, a) subsets x sizes 1..a x must_include of 0-2 of them
    assert checked == sum(math.comb(8, a) * sum(math.comb(a, r) for size in range(1, a + 1)
                                                for r in range(min(2, size) + 1))
                          for a in range(1, 9)) == 12800


def test_best_set_equals_brute_force_on_sampled_16_gpu_requests() -> None:
    topology = two_islands()
    rng = random.Random(16)
    for _ in range(60):
        available = rng.sample(topology.ids, rng.randint(4, 12))
        size = rng.randint(1, len(available))
        must = rng.sample(available, min(size, rng.randint(0, 2)))
        got = best_set(topology, available, must, size, budget=10.0)
        assert got == brute_force(topology, available, must, size), (available, must, size)


# -- hand-checked choices -----------------------------------------------------------------


def test_dgx1_size_2_takes_a_two_nvlink_pair_behind_one_switch(dgx1: Topology) -> None:
    # Two NVLinks (200) and one PCIe switch (50) is the best a pair can have: 2-3 and
    # 6-7.  The mesh maps onto itself by i -> i + 4 (mod 8), so what they leave free is
    # equally good and the lower indices win.
    best = max(dgx1_score(i, j) for i, j in itertools.combinations(range(8), 2))
    assert best == 250
    choice = best_set(dgx1, dgx1.ids, [], 2)
    assert indices(dgx1, choice) == [2, 3] and choice.score == 250


def test_dgx1_size_4_takes_a_fully_linked_quad(dgx1: Topology) -> None:
    # 0-3 (and 4-7) are the quads in which every pair has an NVLink: 9 links (900),
    # two switch pairs (50 each) and four same-NUMA pairs (20 each) = 1080.
    scores = {quad: sum(dgx1_score(i, j) for i, j in itertools.combinations(quad, 2))
              for quad in itertools.combinations(range(8), 4)}
    assert max(scores.values()) == scores[(0, 1, 2, 3)] == scores[(4, 5, 6, 7)] == 1080
    choice = best_set(dgx1, dgx1.ids, [], 4)
    assert indices(dgx1, choice) == [0, 1, 2, 3] and choice.score == 1080


def test_must_include_comes_first_and_pulls_the_set_towards_it(dgx1: Topology) -> None:
    ids = dgx1.ids
    choice = best_set(dgx1, ids, [ids[7]], 2)
    # GPU 7's best partner: 6 (two NVLinks, same switch).
    assert indices(dgx1, choice) == [7, 6] and choice.score == 250
    choice = best_set(dgx1, ids, [ids[5], ids[0]], 4)
    assert indices(dgx1, choice)[:2] == [0, 5]
    assert choice == brute_force(dgx1, ids, [ids[0], ids[5]], 4)


def test_16_gpus_size_8_takes_a_whole_island() -> None:
    topology = two_islands()
    choice = best_set(topology, topology.ids, [], 8)
    assert indices(topology, choice) == list(range(8)) and choice.exact
    # With one GPU of the first island busy the whole second island is the answer.
    available = [uuid for uuid in topology.ids if uuid != "GPU-03"]
    assert indices(topology, best_set(topology, available, [], 8)) == list(range(8, 16))


def test_16_gpus_size_4_stays_in_one_island_and_keeps_the_rest_together() -> None:
    topology = two_islands()
    choice = best_set(topology, topology.ids, [], 4)
    assert indices(topology, choice) == [0, 1, 2, 3] and choice.score == 1080
    # Free: 0-4 of the first island, 8-11 of the second.  Quads 0-3 and 8-11 score the
    # same (1080), but taking 0-3 would leave 4 with 8-11, joined only across NUMA
    # (1080 + 4 * 10), while taking 8-11 leaves 0-4 together (1080 + 210 + 3 * 10).
    free = [topology.ids[i] for i in (0, 1, 2, 3, 4, 8, 9, 10, 11)]
    choice = best_set(topology, free, [], 4)
    assert indices(topology, choice) == [8, 9, 10, 11] and choice.score == 1080
    left = [uuid for uuid in free if uuid not in choice.ids]
    assert topology.set_score(left) == 1320 > 1120


# -- lost GPUs, odd data, bad requests ----------------------------------------------------


def test_a_lost_gpu_is_never_chosen_and_nothing_fails(dgx1: Topology) -> None:
    ids = dgx1.ids
    available = [uuid for uuid in ids if uuid != ids[3]]
    for size in range(1, 8):
        choice = best_set(dgx1, available, [], size)
        assert ids[3] not in choice.ids and len(choice.ids) == size
    assert indices(dgx1, best_set(dgx1, available, [], 4)) == [4, 5, 6, 7]
    # Gone from discovery too (a new epoch without it): its ID is unknown and dropped.
    model = model_of("dgx-1")
    shrunk = NodeModel(tuple(gpu for gpu in model.gpus if gpu.index != 3), model.pcie)
    topology = Topology.from_model(shrunk)
    assert ids[3] not in topology.ids and ids[3] not in topology
    choice = best_set(topology, ids, [ids[3]], 4)
    assert ids[3] not in choice.ids and len(choice.ids) == 4
    assert choice == brute_force(topology, ids, [], 4)


def gpu(uuid: str, index: int, nvlinks: dict[str, int] | None = None) -> GpuInfo:
    return GpuInfo(uuid=uuid, index=index, minor=index, name="Tesla V100-SXM2-16GB",
                   memory_bytes=16 << 30, pci_bus_id=f"00000000:{index + 6:02X}:00.0",
                   compute_capability=(7, 0), numa_node=0, nvlinks=nvlinks or {})


def test_asymmetric_link_data_counts_from_either_side() -> None:
    # NVML answered for A's links only, and gave two different PCIe levels for A-B.
    model = NodeModel(
        (gpu("GPU-A", 0, {"GPU-B": 2, "GPU-elsewhere": 4}), gpu("GPU-B", 1), gpu("GPU-C", 2)),
        pcie={("GPU-A", "GPU-B"): 40, ("GPU-B", "GPU-A"): 10, ("GPU-C", "GPU-A"): 50},
    )
    topology = Topology.from_model(model)
    assert topology.score("GPU-A", "GPU-B") == topology.score("GPU-B", "GPU-A") == 250
    assert topology.score("GPU-A", "GPU-C") == topology.score("GPU-C", "GPU-A") == 10
    assert topology.score("GPU-B", "GPU-C") == 0  # no data at all: unknown, not an error
    choice = best_set(topology, ["GPU-C", "GPU-B", "GPU-A"], [], 2)
    assert choice.ids == ["GPU-A", "GPU-B"] and choice.score == 250


def test_the_constructor_symmetrises_and_checks_its_shape() -> None:
    topology = Topology(("a", "b"), ((0, 3), (1, 0)), ((None, None), (20, None)))
    assert topology.nvlinks == ((0, 3), (3, 0))
    assert topology.pcie == ((None, 20), (20, None))
    assert topology.score("a", "b") == topology.score("b", "a") == 340
    assert dict(topology.numa) == {"a": None, "b": None}
    with pytest.raises(ValueError, match="duplicate"):
        Topology(("a", "a"), ((0, 0), (0, 0)), ((None, None), (None, None)))
    with pytest.raises(ValueError, match="2x2"):
        Topology(("a", "b"), ((0,),), ((None, None), (None, None)))
    with pytest.raises(KeyError, match="GPU-x"):
        topology.score("a", "GPU-x")


def test_bad_requests_get_the_best_valid_answer(dgx1: Topology) -> None:
    ids = dgx1.ids
    # Nothing asked for.
    assert best_set(dgx1, ids, [], 0) == Choice([], 0, True)
    assert best_set(dgx1, ids, [ids[1]], -3) == Choice([], 0, True)
    # More than there is: everything there is (the kubelet makes up or fails the rest).
    choice = best_set(dgx1, [ids[5], ids[2], ids[2]], [], 4)
    assert indices(dgx1, choice) == [2, 5] and choice.score == dgx1_score(2, 5)
    # Unknown IDs are dropped, the rest still chosen well.
    choice = best_set(dgx1, ["GPU-bogus", *ids[:4], "GPU-gone"], ["GPU-bogus"], 2)
    assert indices(dgx1, choice) == [2, 3]
    # More must_include than size: the first ``size`` of them.
    choice = best_set(dgx1, ids, [ids[6], ids[1], ids[4]], 2)
    assert indices(dgx1, choice) == [1, 6] and choice.exact
    # must_include missing from available is still honoured.
    choice = best_set(dgx1, ids[4:], [ids[0]], 2)
    assert indices(dgx1, choice) == [0, 4]
    # Nothing known at all.
    assert best_set(dgx1, ["GPU-bogus"], [], 1) == Choice([], 0, True)
    assert brute_force(dgx1, ["GPU-bogus"], [], 1) == Choice([], 0, True)


# -- the time budget ----------------------------------------------------------------------


def test_no_budget_answers_greedily(dgx1: Topology) -> None:
    topology = two_islands()
    available = [topology.ids[i] for i in (0, 2, 5, 7, 8, 9, 12, 13, 14, 15)]
    choice = best_set(topology, available, [], 5, budget=0)
    assert not choice.exact
    exact = best_set(topology, available, [], 5)
    assert exact.exact and exact.score >= choice.score
    assert choice.ids == best_set(topology, available, [], 5, budget=-1).ids
    # One to choose is exact even without a budget: the greedy pick tries them all.
    assert best_set(dgx1, dgx1.ids, [dgx1.ids[0]], 2, budget=0).exact


def stepping_clock(times: list[float]) -> Callable[[], float]:
    """A clock that reads ``times`` in turn, then stays at the last."""
    values = iter(times)
    last = [times[-1]]

    def clock() -> float:
        return next(values, last[0])

    return clock


def test_a_clock_past_the_budget_stops_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    topology = two_islands()
    available = list(topology.ids)
    greedy = best_set(topology, available, [], 6, budget=0)
    # Past the budget before the search starts: the greedy answer.
    late = best_set(topology, available, [], 6, clock=stepping_clock([0.0, 1.0]))
    assert late == greedy and not late.exact
    # Past it at the first look during the search: the best found so far, at least
    # as good as greedy.
    monkeypatch.setattr(_topology, "_CLOCK_EVERY", 1)
    cut = best_set(topology, available, [], 6, clock=stepping_clock([0.0, 0.0, 1.0]))
    assert not cut.exact and cut.score >= greedy.score and len(cut.ids) == 6
    # A clock that never moves lets it finish.
    done = best_set(topology, available, [], 6, clock=stepping_clock([0.0]))
    assert done.exact and done == brute_force(topology, available, [], 6)
