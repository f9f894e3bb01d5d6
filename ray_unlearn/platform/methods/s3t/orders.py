"""S3T slice orders: which permutations of a shard's L slices to train, and what survives.

Pure Python + numpy + scipy (no torch): the order selection, the deactivation rule and the
deletion-rate simulation all run without a model.

Orders are tuples of slice indices ``(S_1, ..., S_L)``: stage i of an order trains on
``S_1..S_i``. A deleted sample in the slice at position j (1-based) makes stages j..L of
that order unusable, so an order's *surviving prefix* is the number of leading positions
whose slices hold no deleted sample. A shard serves the order with the longest surviving
prefix; it is dead when every order's prefix is 0, i.e. when every order's *first* slice
is hit. Training B orders whose first slices differ is what buys deletions (S3T,
Chowdhury et al., "Towards Scalable Exact Machine Unlearning Using Parameter-Efficient
Fine-Tuning", Lemma 1: deletion rate O(mL log(m min(B, L))) against SISA's O(mL log m)).

Two selections, both from the paper:

* :func:`cyclic_orders` - cyclic rotations of ``(0..L-1)``; for B > L the rotations of
  sub-sequences (the paper's extension, its Fig. 3 right).
* :func:`bms_orders` - bipartite-matching selection: the orders are built one position at
  a time, each position assigned by a maximum-weight matching of orders to slices whose
  weights are the orders' scores under a deletion prior (the paper's Fig. 4).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

Order = tuple[int, ...]


def _check_sizes(num_slices: int, budget: int) -> None:
    if num_slices < 1:
        raise ValueError(f"the number of slices L must be >= 1, got {num_slices}")
    if budget < 1:
        raise ValueError(f"the budget B (orders per shard) must be >= 1, got {budget}")
    if budget > math.factorial(num_slices):
        raise ValueError(
            f"budget B={budget} exceeds the {math.factorial(num_slices)} distinct orders of "
            f"L={num_slices} slices (L!); use B <= {math.factorial(num_slices)}"
        )


# -- cyclic rotation ---------------------------------------------------------------------


def cyclic_orders(num_slices: int, budget: int) -> list[Order]:
    """B distinct orders of ``range(L)`` by cyclic rotation.

    B <= L: the first B left rotations of ``(0, 1, ..., L-1)``; L=3, B=3 gives
    ``[(0,1,2), (1,2,0), (2,0,1)]``. Every order starts with a different slice.

    B > L (the paper's extension by rotating sub-sequences): the orders grow as a tree.
    Depth 0 takes all L rotations. At depth d every current order ``o`` branches into
    rotations of its suffix ``o[d:]`` (keeping the prefix ``o[:d]``): ``c_o`` children,
    the rotations by 0..c_o-1, with the B orders spread as evenly as possible over the
    current ones (the first ``B mod n`` get one more) and at most ``L - d`` each. Depths
    are added until B orders exist (at most L-2 of them, since B <= L!). Children of one
    order differ at position d, so all orders are distinct, and every slice is first in
    ``B/L`` orders (rounded), which is what the deletion rate depends on.
    """
    _check_sizes(num_slices, budget)
    orders: list[Order] = [tuple(range(num_slices))]
    depth = 0
    while len(orders) < budget:
        n, room = len(orders), num_slices - depth
        if budget >= n * room:
            counts = [room] * n
        else:
            counts = [budget // n + (1 if i < budget % n else 0) for i in range(n)]
        grown: list[Order] = []
        for order, c in zip(orders, counts, strict=True):
            head, tail = order[:depth], order[depth:]
            grown += [head + tail[r:] + tail[:r] for r in range(c)]
        orders, depth = grown, depth + 1
    return orders[:budget]


# -- bipartite-matching selection --------------------------------------------------------


def _prior(num_slices: int, deletion_probs: Sequence[float] | None) -> np.ndarray:
    if deletion_probs is None:
        return np.full(num_slices, 1.0 / num_slices)
    p = np.asarray(deletion_probs, dtype=np.float64)
    if p.shape != (num_slices,):
        raise ValueError(
            f"deletion_probs must hold one probability per slice (L={num_slices}), got {p.shape[0] if p.ndim else 'a scalar'}"
        )
    if not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(
            f"deletion_probs must be finite, non-negative and not all zero, got {p.tolist()}"
        )
    return p / p.sum()


def bms_score(prefix: Sequence[int], probs: Sequence[float], horizon: float) -> float:
    """Score of a (partial) order under a deletion prior.

    ``sum_{n=1}^{len(prefix)} (1 - c_n) ** horizon`` with ``c_n`` the prior mass of the
    first n slices: the expected surviving prefix length of this order (capped at its
    current length) after ``horizon`` deletions drawn independently from the prior. The
    paper scores sequences the same way, by how likely their prefixes survive; its
    reference code weights the n-th term by n and uses a fixed horizon of 100 deletions,
    which underflows to 0 for skewed priors and a few slices (then every order scores
    the same). We use unit weights (the quantity is then an expectation, in slices) and a
    horizon of L deletions by default (the order of the ``L * H(min(B, L))`` deletions a
    shard receives before it dies).
    """
    c, score = 0.0, 0.0
    for s in prefix:
        c += float(probs[s])
        score += max(0.0, 1.0 - c) ** horizon
    return score


def bms_orders(
    num_slices: int,
    budget: int,
    deletion_probs: Sequence[float] | None = None,
    horizon: float | None = None,
) -> list[Order]:
    """B orders of ``range(L)`` by bipartite-matching selection (BMS).

    The orders are built one position at a time. At each position the B partial orders
    (rows) are matched to slices (columns) by :func:`scipy.optimize.linear_sum_assignment`
    (maximum weight). Weight of appending slice j to order i::

        bms_score(prefix_i + [j]) - DUP * copy - DUP * (L + 1) * shared(prefix_i + [j])

    * ``bms_score`` (see there) under the prior ``deletion_probs`` (uniform when None):
      slices likely to be deleted go late, so prefixes survive longer;
    * columns are (slice, copy) pairs: the first order to take a slice at this position
      uses copy 0 for free, a second one pays ``DUP`` (larger than any score
      difference). So as long as it is possible, orders take *different* slices at each
      position - with B <= L the first slices are all distinct, and with B = L every
      position is a perfect matching, as in the paper - and it never fails when it is
      not (with B < L the last positions may have to repeat a slice);
    * ``shared`` (only for B > L): the orders are built in batches of L; an order of a
      later batch pays for every earlier order that has the same prefix, so it leaves the
      earlier orders' paths as early as possible (all 6 orders for L=3, B=6);
    * slices already in ``prefix_i`` are infeasible (weight -1e9).

    Ties (e.g. under the uniform prior) go to the lowest slice index, deterministically.
    """
    _check_sizes(num_slices, budget)
    p = _prior(num_slices, deletion_probs)
    t = float(num_slices if horizon is None else horizon)
    if t <= 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    dup = float(num_slices + 1)  # > any score (a score is at most L)
    infeasible = -1e9
    done: list[Order] = []
    while len(done) < budget:
        rows = min(num_slices, budget - len(done))
        prefixes: list[list[int]] = [[] for _ in range(rows)]
        copies = rows
        for _position in range(num_slices):
            w = np.full((rows, num_slices * copies), infeasible)
            for i, pre in enumerate(prefixes):
                for j in range(num_slices):
                    if j in pre:
                        continue
                    cand = (*pre, j)
                    shared = sum(1 for o in done if o[: len(cand)] == cand)
                    base = bms_score(cand, p, t) - dup * (num_slices + 1) * shared
                    for c in range(copies):
                        w[i, j * copies + c] = base - dup * c
            r, col = linear_sum_assignment(w, maximize=True)
            for i, cidx in zip(r.tolist(), col.tolist(), strict=True):
                prefixes[i].append(cidx // copies)
        done += [tuple(pre) for pre in prefixes]
    return done[:budget]


def select_orders(
    selection: str,
    num_slices: int,
    budget: int,
    deletion_probs: Sequence[float] | None = None,
) -> list[Order]:
    """``selection`` is 'cyclic' or 'bms'."""
    if selection == "cyclic":
        return cyclic_orders(num_slices, budget)
    if selection == "bms":
        return bms_orders(num_slices, budget, deletion_probs)
    raise ValueError(f"unknown order selection {selection!r}; allowed: 'cyclic', 'bms'")


# -- deactivation ------------------------------------------------------------------------


def surviving_prefix(order: Sequence[int], dead_slices: Collection[int]) -> int:
    """Number of leading stages of ``order`` trained on no dead slice.

    A deleted sample in the slice at position j (1-based) leaves stages 1..j-1: the stage
    j-1 snapshot never saw slices ``S_j..S_L``.
    """
    for pos, s in enumerate(order):
        if s in dead_slices:
            return pos
    return len(order)


def best_order(orders: Sequence[Sequence[int]], dead_slices: Collection[int]) -> tuple[int, int]:
    """(order index, prefix) of the order with the longest surviving prefix; ties go to the
    lowest order index. Prefix 0 means the shard is dead (no usable stage)."""
    best_i, best_p = 0, -1
    for i, order in enumerate(orders):
        p = surviving_prefix(order, dead_slices)
        if p > best_p:
            best_i, best_p = i, p
    return best_i, best_p


# -- deletion rate -----------------------------------------------------------------------


def harmonic(n: int) -> float:
    """H(n) = 1 + 1/2 + ... + 1/n."""
    return float(sum(1.0 / k for k in range(1, n + 1)))


def deletion_rate_formula(num_shards: int, num_slices: int, budget: int) -> float:
    """``m * L * H(m * min(B, L))``: expected deletions until every shard is dead.

    Coupon-collector argument (the paper's Lemma 1): a deletion hits (shard, slice) with
    probability 1/(mL); a shard is dead once every *first* slice of its orders is hit;
    with cyclic or BMS orders those are min(B, L) distinct slices, so the system is dead
    when m * min(B, L) given coupons of probability 1/(mL) each are collected, which takes
    ``sum_{i=1}^{m B'} mL / i`` draws in expectation. Exact (not only asymptotic) for
    independent uniform draws of (shard, slice), i.e. for deletions sampled with
    replacement or from slices much larger than the number of deletions. B = 1 is SISA
    (``mL H(m)``): one order, dead when its first slice is hit.
    """
    return num_shards * num_slices * harmonic(num_shards * min(budget, num_slices))


def deletions_until_dead(
    orders: Sequence[Sequence[int]],
    num_shards: int,
    rng: np.random.Generator,
    samples_per_slice: int | None = None,
) -> int:
    """Draw deletions until every shard's best surviving prefix is 0; returns their number.

    Every shard trains the same ``orders`` (as S3T does; slice indices are per shard).
    Deletions pick a (shard, slice) uniformly (equal slices; a slice can be hit again),
    or, with ``samples_per_slice``, a live sample uniformly without replacement. A shard
    dies when :func:`best_order` reports prefix 0 - the code the S3T shard uses.
    """
    num_slices = len(orders[0])
    dead: list[set[int]] = [set() for _ in range(num_shards)]
    alive = num_shards
    count = 0
    if samples_per_slice is not None:
        pool = rng.permutation(num_shards * num_slices * samples_per_slice)
        cells: Iterable[int] = (int(x) // samples_per_slice for x in pool)
    else:
        cells = _uniform_cells(rng, num_shards * num_slices)
    for cell in cells:
        count += 1
        k, s = divmod(cell, num_slices)
        if s in dead[k]:
            continue
        was_alive = best_order(orders, dead[k])[1] > 0
        dead[k].add(s)
        if was_alive and best_order(orders, dead[k])[1] == 0:
            alive -= 1
            if alive == 0:
                return count
    raise RuntimeError("ran out of samples before every shard died")  # pragma: no cover


def _uniform_cells(rng: np.random.Generator, n_cells: int) -> Iterable[int]:
    while True:
        yield from rng.integers(0, n_cells, size=256).tolist()


def simulate_deletion_rate(
    num_shards: int,
    num_slices: int,
    budget: int,
    selection: str = "cyclic",
    seeds: int = 1000,
    seed: int = 0,
    samples_per_slice: int | None = None,
    deletion_probs: Sequence[float] | None = None,
) -> dict:
    """Mean (over ``seeds`` runs) number of deletions until the whole system must retrain
    (every shard dead), beside :func:`deletion_rate_formula`. ``selection='sisa'`` is one
    order per shard, ``(0..L-1)``, which is what B=1 cyclic gives too."""
    if selection == "sisa":
        orders = [tuple(range(num_slices))]
        budget = 1
    else:
        orders = select_orders(selection, num_slices, budget, deletion_probs)
    counts = np.array(
        [
            deletions_until_dead(
                orders,
                num_shards,
                np.random.default_rng(np.random.SeedSequence([seed, run, 0x53335444])),
                samples_per_slice,
            )
            for run in range(seeds)
        ],
        dtype=np.float64,
    )
    formula = deletion_rate_formula(num_shards, num_slices, budget)
    mean = float(counts.mean())
    return {
        "m": num_shards,
        "L": num_slices,
        "B": budget,
        "selection": selection,
        "deletions_mean": mean,
        "deletions_sem": float(counts.std(ddof=1) / math.sqrt(seeds)) if seeds > 1 else 0.0,
        "formula": formula,
        "ratio": mean / formula,
        "seeds": seeds,
        "samples_per_slice": samples_per_slice,
    }
