"""Topology-aware choice of whole GPUs for GetPreferredAllocation.

Two layers, both plain functions over plain data (sans-IO):

* :class:`Topology`, built once per discovery epoch from the :class:`NodeModel`
  (:meth:`Topology.from_model`): for each pair of GPUs the NVLink count, the PCIe
  relationship (NVML's common-ancestor level) and the resulting :func:`pair_score`.  The
  weights are NVIDIA's (go-gpuallocator ``besteffort_policy.go``), so a score here means
  what it means there.
* :func:`best_set`, the policy: of the GPUs the kubelet offers, the ``size`` that include
  every ``must_include`` and have the highest *set score* (the sum of their pair scores).

Where we part from NVIDIA's best-effort policy, on purpose:

* NVIDIA enumerates every partition of the available GPUs into sets of ``size`` and
  keeps the best set of the best partition: combinatorial (16-30 s reported on 8 GPUs,
  #774; about two million partitions for 16 GPUs and size 2) and not always the best set
  for this pod.  We maximise the set score itself, exactly, by branch and bound, and take
  care of the *next* pod with the tie-break: among equally good sets, the one that leaves
  the GPUs still free with the highest score among themselves (less fragmentation, the
  complaint of #1193), then the lowest GPU indices.
* NVIDIA fails the whole call (and so the pod) when any GPU of the node cannot be read
  (#2038) or a link is seen from one side only (a panic, #448).  Here a lost GPU is
  simply absent from ``available``, unknown IDs are dropped, one-sided link data counts
  as a link, and a request that cannot be met as asked gets the best valid answer: the
  kubelet tolerates short, long or foreign answers and fills the gaps itself (devicesToAllocate
  in the kubelet's pkg/kubelet/cm/devicemanager/manager.go), whereas an error rejects the pod.
* The kubelet gives GetPreferredAllocation no deadline, and a call that hangs blocks the
  admission of every pod on the node (kubernetes #129249).  :func:`best_set` therefore
  works within a time budget and answers greedily past it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

from ._node_model import NodeModel

__all__ = [
    "DEFAULT_BUDGET",
    "NVLINK_WEIGHT",
    "PCIE_WEIGHTS",
    "Choice",
    "Topology",
    "best_set",
    "brute_force",
    "pair_score",
]

#: Points per NVLink between two GPUs (NVIDIA: ``k`` links score ``100 * k``).
NVLINK_WEIGHT: Final = 100

#: Points for the PCIe relationship, by NVML common-ancestor level (NVIDIA's P2P link
#: types SameBoard .. CrossCPU).  Any other level, or none, scores 0.
PCIE_WEIGHTS: Final[Mapping[int, int]] = MappingProxyType({
    0: 60,   # same board (NVML_TOPOLOGY_INTERNAL)
    10: 50,  # single PCIe switch
    20: 40,  # multiple PCIe switches
    30: 30,  # same host bridge
    40: 20,  # same NUMA node / CPU
    50: 10,  # across NUMA nodes (the SMP interconnect)
})

#: Seconds :func:`best_set` searches before it settles for the greedy answer.
DEFAULT_BUDGET: Final = 0.05

# How many search nodes pass between two looks at the clock: often enough that the
# budget is overrun by microseconds, rarely enough that the clock costs nothing.
_CLOCK_EVERY: Final = 32


def pair_score(nvlinks: int, pcie_level: int | None) -> int:
    """NVIDIA's score for a pair of GPUs.

    Args:
        nvlinks: NVLinks between the two (each counts :data:`NVLINK_WEIGHT`; NVIDIA lists
            1 to 18, and more are counted the same way; negative counts as 0).
        pcie_level: NVML's common-ancestor level (see :data:`PCIE_WEIGHTS`); ``None`` or
            an unlisted level is unknown and adds nothing.
    """
    links = nvlinks if nvlinks > 0 else 0
    p2p = PCIE_WEIGHTS.get(pcie_level, 0) if pcie_level is not None else 0
    return NVLINK_WEIGHT * links + p2p


def _nearer(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclasses.dataclass(frozen=True)
class Topology:
    """Pairwise closeness of the node's GPUs; immutable, built once per epoch.

    The constructor takes square matrices in the order of ``ids`` and makes them
    symmetric by the rules of :meth:`from_model` (the larger NVLink count, the nearer
    PCIe level), so hand-made or half-filled data is accepted as it is.

    Attributes:
        ids: GPU UUIDs in NVML index order; a GPU's position here is its index for
            every tie-break.
        nvlinks: NVLink count per pair (``nvlinks[i][j]``), symmetric, 0 on the diagonal.
        pcie: NVML common-ancestor level per pair, ``None`` where unknown.
        numa: each GPU's NUMA node (``None`` when unknown), for callers that align with
            CPUs; not part of the score, which already carries NVML's NUMA levels.
        scores: :func:`pair_score` per pair, symmetric, 0 on the diagonal.
    """

    ids: tuple[str, ...]
    nvlinks: tuple[tuple[int, ...], ...]
    pcie: tuple[tuple[int | None, ...], ...]
    numa: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    scores: tuple[tuple[int, ...], ...] = dataclasses.field(init=False, repr=False)
    _position: Mapping[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(set(self.ids)) != n:
            raise ValueError(f"duplicate GPU IDs in {self.ids!r}")
        for name, matrix in (("nvlinks", self.nvlinks), ("pcie", self.pcie)):
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise ValueError(f"{name} must be a {n}x{n} matrix in the order of ids")
        links = tuple(tuple(0 if i == j else max(self.nvlinks[i][j], self.nvlinks[j][i], 0)
                            for j in range(n)) for i in range(n))
        levels = tuple(tuple(None if i == j else _nearer(self.pcie[i][j], self.pcie[j][i])
                             for j in range(n)) for i in range(n))
        scores = tuple(tuple(0 if i == j else pair_score(links[i][j], levels[i][j])
                             for j in range(n)) for i in range(n))
        object.__setattr__(self, "nvlinks", links)
        object.__setattr__(self, "pcie", levels)
        object.__setattr__(self, "numa", MappingProxyType(
            {uuid: self.numa.get(uuid) for uuid in self.ids}))
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "_position", MappingProxyType(
            {uuid: i for i, uuid in enumerate(self.ids)}))

    @classmethod
    def from_links(cls, ids: Sequence[str], nvlinks: Mapping[tuple[str, str], int],
                   pcie: Mapping[tuple[str, str], int],
                   numa: Mapping[str, int | None] | None = None) -> Topology:
        """A topology from per-pair data keyed by UUID pairs, in either or both orders.

        Pairs that are absent have no NVLink and an unknown PCIe level; pairs naming a
        UUID outside ``ids`` are ignored.  Handy for tests and for hand-made nodes.
        """
        order = list(dict.fromkeys(ids))
        where = {uuid: i for i, uuid in enumerate(order)}
        n = len(order)
        links = [[0] * n for _ in range(n)]
        levels: list[list[int | None]] = [[None] * n for _ in range(n)]
        for (a, b), count in nvlinks.items():
            if a in where and b in where:
                links[where[a]][where[b]] = max(links[where[a]][where[b]], count)
        for (a, b), level in pcie.items():
            if a in where and b in where:
                i, j = where[a], where[b]
                levels[i][j] = _nearer(levels[i][j], level)
        return cls(tuple(order), tuple(map(tuple, links)), tuple(map(tuple, levels)),
                   dict(numa or {}))

    @classmethod
    def from_model(cls, model: NodeModel) -> Topology:
        """The topology of the GPUs discovery found (MIG or not: placement is by
        physical GPU).

        Tolerant of what NVML gets wrong or leaves out:

        * a link seen from one side only exists (the larger count wins); NVIDIA's
          allocator panics on such data instead (#448);
        * where the two directions give different PCIe levels the nearer one counts,
          and a pair without a level scores nothing for PCIe;
        * links to peers that are not GPUs of this node are ignored.

        GPUs that both have NVSwitch links (DGX A100, H100) reach each other through the
        switch fabric, so the pair counts ``min`` of their switch links as NVLinks.
        NVIDIA's go-gpuallocator counts none there (the remote end of each link is the
        switch, not a GPU); our figure adds the same constant to every pair of such GPUs
        on a node, so the choice among them is the same, only the scores are higher.
        """
        gpus: dict[str, tuple[Mapping[str, int], int]] = {}
        for gpu in model.gpus:
            gpus.setdefault(gpu.uuid, (gpu.nvlinks, gpu.nvswitch_links))
        ids = list(gpus)
        links: dict[tuple[str, str], int] = {}
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                (a_links, a_switch), (b_links, b_switch) = gpus[a], gpus[b]
                count = max(a_links.get(b, 0), b_links.get(a, 0), 0)
                if a_switch > 0 and b_switch > 0:
                    count += min(a_switch, b_switch)
                if count:
                    links[(a, b)] = count
        numa = {gpu.uuid: gpu.numa_node for gpu in model.gpus}
        return cls.from_links(ids, links, model.pcie, numa)

    def position(self, uuid: str) -> int:
        """A GPU's index in :attr:`ids`; ``KeyError`` naming the UUID if unknown."""
        try:
            return self._position[uuid]
        except KeyError:
            raise KeyError(f"no GPU {uuid!r} in this topology") from None

    def __contains__(self, uuid: object) -> bool:
        """Whether ``uuid`` is one of this topology's GPUs."""
        return uuid in self._position

    def score(self, a: str, b: str) -> int:
        """The pair score of two GPUs (0 for a GPU with itself)."""
        return self.scores[self.position(a)][self.position(b)]

    def set_score(self, ids: Iterable[str]) -> int:
        """The sum of the pair scores over all pairs of ``ids`` (duplicates count once)."""
        positions = sorted({self.position(uuid) for uuid in ids})
        scores = self.scores
        return sum(scores[i][j] for k, i in enumerate(positions) for j in positions[k + 1:])


@dataclasses.dataclass(frozen=True)
class Choice:
    """The answer of :func:`best_set`.

    Attributes:
        ids: the chosen GPUs: the honoured ``must_include`` first, then the others, each
            part in index order.
        score: their set score.
        exact: ``False`` when the time budget ran out and the answer is the greedy one
            (or the best the search had found by then, which is never worse).
    """

    ids: list[str]
    score: int
    exact: bool


@dataclasses.dataclass(frozen=True)
class _Request:
    """A request reduced to positions: what both solvers work on."""

    must: list[int]   # honoured must_include positions, index order
    free: list[int]   # the other candidates, index order
    k: int            # how many of ``free`` to choose
    answer: list[int] | None  # set when the request needs no search


def _normalise(topology: Topology, available: Sequence[str], must_include: Sequence[str],
               size: int) -> _Request:
    known = topology._position
    must_given = [known[uuid] for uuid in dict.fromkeys(must_include) if uuid in known]
    if size <= 0:
        return _Request([], [], 0, [])
    if len(must_given) >= size:
        # More required than asked for: the first ``size`` are still a valid answer.
        must = sorted(must_given[:size])
        return _Request(must, [], 0, must)
    must = sorted(must_given)
    taken = set(must)
    # The kubelet lists the must_include devices in available too; honour them if not.
    free = sorted({known[uuid] for uuid in available if uuid in known} - taken)
    k = size - len(must)
    if k >= len(free):
        # Too few to choose from: all of them; the kubelet makes up the rest.
        return _Request(must, free, len(free), must + free)
    return _Request(must, free, k, None)


def _choice(topology: Topology, must: list[int], chosen: Iterable[int], exact: bool) -> Choice:
    rest = sorted(chosen)
    ids = [topology.ids[i] for i in must + rest]
    return Choice(ids, topology.set_score(ids), exact)


class _OutOfTime(Exception):
    """The search passed its deadline."""


def best_set(topology: Topology, available: Sequence[str], must_include: Sequence[str],
             size: int, *, budget: float = DEFAULT_BUDGET,
             clock: Callable[[], float] = time.perf_counter) -> Choice:
    """The ``size`` GPUs of ``available`` (with every ``must_include``) that score best.

    Objective, in this order: the highest set score; then, among sets with that score,
    the highest score of the candidates left over (so the next pod finds them well
    connected); then the lowest GPU indices (first differing index chosen).  The search
    is exact (branch and bound) unless it passes ``budget`` seconds of ``clock``; then
    the answer is the greedy one (or the search's best so far, never worse) and
    ``exact`` is ``False``.  ``budget <= 0`` answers greedily at once (still ``exact``
    where greedy is provably optimal: one GPU to add, or a pair with none required).

    Never raises for bad requests; it answers with the best valid set instead:

    * IDs the topology does not know are dropped, duplicates count once;
    * ``must_include`` IDs missing from ``available`` are still honoured;
    * ``size <= 0`` gives ``[]``;
    * more ``must_include`` than ``size`` gives the first ``size`` of them;
    * ``size`` beyond the candidates gives all of them (the kubelet fills the rest).
    """
    start = clock()
    request = _normalise(topology, available, must_include, size)
    if request.answer is not None:
        return _choice(topology, request.must, request.answer[len(request.must):], True)
    problem = _Problem(topology, request)
    incumbent = problem.greedy()
    if problem.greedy_is_exact:
        return _choice(topology, request.must, problem.gpus(incumbent), True)
    if budget <= 0 or clock() - start >= budget:
        return _choice(topology, request.must, problem.gpus(incumbent), False)
    search = problem.search(incumbent, start + budget, clock)
    try:
        search.run()
    except _OutOfTime:
        return _choice(topology, request.must, problem.gpus(problem.answer(search)), False)
    return _choice(topology, request.must, problem.gpus(problem.answer(search)), True)


class _Problem:
    """The request as one integer objective over the free candidates.

    ``V(X) = 2**c * (M * S(X) - D(X)) + sum(2**(c-1-p) for p in X)`` over the set ``X``
    (``c`` candidates, ``p`` a candidate's rank in index order), where ``S`` is the set
    score and ``D`` the sum over ``X`` of each GPU's total score to all candidates.
    With ``R`` the candidates left over, ``S(R) = S(all) + S(X) - D(X)``, so for equal
    ``S(X)`` a smaller ``D(X)`` is a better-connected remainder; ``M`` exceeds any
    difference of ``D`` and the bits are below ``2**c``, so the three criteria are
    compared in order and no two sets have the same ``V``: the maximum is unique, and
    the search may visit candidates in any order and prune on ``bound <= best``.
    ``V`` is a quadratic function: node weights plus pair weights.
    """

    def __init__(self, topology: Topology, request: _Request) -> None:
        candidates = sorted(request.must + request.free)
        c = len(candidates)
        scores = topology.scores
        rows = [[scores[i][j] for j in candidates] for i in candidates]
        degree = [sum(row) for row in rows]
        m = sum(degree) + 1  # sum(degree) == 2 * S(all) bounds any difference of D
        scale = 1 << c
        pair = scale * m
        rank = {gpu: r for r, gpu in enumerate(candidates)}
        must = [rank[gpu] for gpu in request.must]
        free = [rank[gpu] for gpu in request.free]
        self.free = request.free
        self.k = request.k
        self.alone = not must
        self.complement = False
        #: node weight of each free candidate, its pairs with must_include folded in
        self.node = [scale * -degree[r] + (1 << (c - 1 - r))
                     + pair * sum(rows[r][q] for q in must) for r in free]
        #: pair weight between free candidates (by position in ``free``)
        self.pair = [[pair * rows[r][q] for q in free] for r in free]

    def gpus(self, chosen: Iterable[int]) -> list[int]:
        """Topology positions of chosen free candidates."""
        return [self.free[i] for i in chosen]

    def greedy(self) -> list[int]:
        """Free candidates chosen one at a time by largest gain in ``V``.

        Starts from the best pair when nothing is required, since a lone GPU gains
        nothing from the first pick and would be chosen by its tie-break alone.
        """
        node, pair, n, k = self.node, self.pair, len(self.node), self.k
        chosen: list[int] = []
        gain = list(node)
        if self.alone and k >= 2:
            best, first, second = None, 0, 1
            for i in range(n):
                row = pair[i]
                for j in range(i + 1, n):
                    v = gain[i] + gain[j] + row[j]
                    if best is None or v > best:
                        best, first, second = v, i, j
            chosen = [first, second]
            gain = [gain[x] + pair[first][x] + pair[second][x] for x in range(n)]
        while len(chosen) < k:
            pick = max((x for x in range(n) if x not in chosen), key=gain.__getitem__)
            chosen.append(pick)
            row = pair[pick]
            gain = [g + w for g, w in zip(gain, row)]
        return sorted(chosen)

    @property
    def greedy_is_exact(self) -> bool:
        """Whether :meth:`greedy` tried every set: one to choose, or a pair from none."""
        return self.k == 1 or (self.k == 2 and self.alone)

    def search(self, incumbent: list[int], deadline: float,
               clock: Callable[[], float]) -> _Search:
        """A search seeded with ``incumbent``, over whichever of the set and its
        complement is smaller.

        Choosing ``k`` of ``n`` is choosing the ``n - k`` left out: with ``Z`` the left
        out, ``V(X) = V(all) - sum(node[z] + pair(z, all)) + pair weights within Z``, the
        same kind of objective over ``Z``.  Search depth, and so its cost, follows the
        smaller of ``k`` and ``n - k``.
        """
        n, k = len(self.node), self.k
        if 2 * k <= n:
            return _Search(self.node, self.pair, k, incumbent, deadline, clock)
        self.complement = True
        node = [-(w + sum(row)) for w, row in zip(self.node, self.pair)]
        kept = set(incumbent)
        return _Search(node, self.pair, n - k, [i for i in range(n) if i not in kept],
                       deadline, clock)

    def answer(self, search: _Search) -> list[int]:
        """The free candidates the search chose (undoing the complement)."""
        found = search.result()
        if not self.complement:
            return found
        left_out = set(found)
        return [i for i in range(len(self.node)) if i not in left_out]


class _Search:
    """Branch and bound: the ``k`` of ``n`` items with the largest ``V``, where ``V`` is
    the sum of the chosen items' ``node`` weights and of the ``pair`` weights among them.

    Items are tried most promising first, taking an item before leaving it out, so a
    good set comes early and prunes the rest.  At each search node the bound is the
    value so far plus the ``r`` best of, for each item still open, its exact gain
    against what is already chosen plus half its ``r - 1`` heaviest pair weights to the
    other open items (each pair among the new picks is shared by two of them; values are
    doubled to stay in integers).
    """

    def __init__(self, node: list[int], pair: list[list[int]], k: int, incumbent: list[int],
                 deadline: float, clock: Callable[[], float]) -> None:
        self.k = k
        self.deadline = deadline
        self.clock = clock
        n = len(node)
        # The diagonal is a 0 among weights >= 0: no need to leave it out (see _top).
        potential = [2 * w + sum(sorted(row, reverse=True)[:k - 1])
                     for w, row in zip(node, pair)]
        self.order = sorted(range(n), key=potential.__getitem__, reverse=True)
        o = self.order
        self.node2 = [2 * node[i] for i in o]
        self.pair = [[pair[i][j] for j in o] for i in o]
        self.pair2 = [[2 * w for w in row] for row in self.pair]
        # ``top[start][i - start][r]``: the r heaviest pair weights of item i to the
        # other items at or after ``start`` (search order), filled on first use.
        self.top: list[list[list[int]] | None] = [None] * n
        rank = {item: pos for pos, item in enumerate(o)}
        self.best = sorted(rank[i] for i in incumbent)
        self.best_value = self._value(self.best)
        self.nodes = 0

    def _value(self, chosen: list[int]) -> int:
        node2, pair2 = self.node2, self.pair2
        total = sum(node2[i] for i in chosen)
        for a, i in enumerate(chosen):
            row = pair2[i]
            total += sum(row[j] for j in chosen[a + 1:])
        return total

    def _top(self, start: int) -> list[list[int]]:
        top = self.top[start]
        if top is None:
            # A row's own diagonal entry is a 0 among weights that are all >= 0, so
            # leaving it in changes no top sum and saves a filter.
            width = self.k
            accumulate = itertools.accumulate
            top = [list(accumulate(sorted(row[start:], reverse=True)[:width], initial=0))
                   for row in self.pair[start:]]
            self.top[start] = top
        return top

    def result(self) -> list[int]:
        """The best set found so far, as item numbers."""
        return sorted(self.order[i] for i in self.best)

    def run(self) -> None:
        """Search to the end; ``_OutOfTime`` past the deadline."""
        self._visit(0, self.k, 0, self.node2, [])

    def _visit(self, start: int, r: int, value: int, gain: list[int],
               chosen: list[int]) -> None:
        self.nodes += 1
        if self.nodes % _CLOCK_EVERY == 0 and self.clock() >= self.deadline:
            raise _OutOfTime
        n = len(gain)
        if r == 1:
            # Exact: the single best open item.
            best = max(range(start, n), key=gain.__getitem__)
            if value + gain[best] > self.best_value:
                self.best_value = value + gain[best]
                self.best = chosen + [best]
            return
        if n - start == r:
            rest = list(range(start, n))
            total = value + sum(gain[i] for i in rest) + self._value(rest) - sum(
                self.node2[i] for i in rest)
            if total > self.best_value:
                self.best_value = total
                self.best = chosen + rest
            return
        top = self._top(start)
        optimistic = sorted((gain[i] + top[i - start][r - 1] for i in range(start, n)),
                            reverse=True)
        if value + sum(optimistic[:r]) <= self.best_value:
            return
        row = self.pair2[start]
        taken = [g + w for g, w in zip(gain, row)]
        self._visit(start + 1, r - 1, value + gain[start], taken, chosen + [start])
        if n - start - 1 >= r:
            self._visit(start + 1, r, value, gain, chosen)


def brute_force(topology: Topology, available: Sequence[str], must_include: Sequence[str],
                size: int) -> Choice:
    """:func:`best_set` by trying every set: the reference for tests and the bench.

    Same request handling and objective, computed from the definitions: the highest set
    score, then the highest score of the candidates left over, then the first set in
    index order.  Exponential; never bounded by time.
    """
    request = _normalise(topology, available, must_include, size)
    if request.answer is not None:
        return _choice(topology, request.must, request.answer[len(request.must):], True)
    scores = topology.scores
    must, free, k = request.must, request.free, request.k
    n = len(free)
    rows = [[scores[i][j] for j in free] for i in free]
    # gain[j]: what free candidate j adds to the set score of the set so far.
    first_gain = [sum(scores[f][m] for m in must) for f in free]
    best: list[tuple[int, int, tuple[int, ...]]] = []

    def remainder(chosen: tuple[int, ...]) -> int:
        left = [j for j in range(n) if j not in chosen]
        return sum(rows[i][j] for a, i in enumerate(left) for j in left[a + 1:])

    def extend(start: int, chosen: tuple[int, ...], score: int, gain: list[int]) -> None:
        # Sets come in index order (each tuple before those that follow it), so only a
        # strictly better one replaces the best.
        if len(chosen) == k - 1:
            for j in range(start, n):
                total = score + gain[j]
                if best and total < best[0][0]:
                    continue
                combo = chosen + (j,)
                key = (total, remainder(combo))
                if not best or key > best[0][:2]:
                    best[:] = [(*key, combo)]
            return
        for j in range(start, n - (k - len(chosen)) + 1):
            row = rows[j]
            extend(j + 1, chosen + (j,), score + gain[j], [g + w for g, w in zip(gain, row)])

    extend(0, (), 0, first_gain)
    return _choice(topology, must, (free[j] for j in best[0][2]), True)
