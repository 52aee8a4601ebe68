"""The global rank budget's allocation (lib_ckpt2lora/budget.py), pure: no torch, no files.

Small spectra worked out by hand (one per objective, chosen so that the three objectives pick
three different allocations), then greedy against a brute-force optimum over every rank vector
within the floors and caps, the floor, the caps, the too-small refusal, target mode, and
parse_size.

What greedy guarantees, and what is tested (values within a layer only fall, so each layer's
curve of kept objective against its rank is concave and the cost per triplet is constant):

* Optimal at its own size whenever it took a prefix of the triplets in value-per-byte order
  (no triplet was skipped for not fitting before the last one taken). Why: the linear
  relaxation of the problem (fractional triplets allowed) at capacity B is solved by filling
  triplets in value-per-byte order, and concavity keeps that order consistent with each
  layer's own order; a prefix of exactly B bytes reaches that bound, so nothing of <= B bytes
  beats it. With equal costs everywhere greedy always takes a prefix (the first misfit means
  nothing else fits either), so there it is optimal for every budget.
* Otherwise, greedy >= optimum - v*, v* the value of the first triplet, in that order, that
  did not fit. Why: the prefix before it plus a fraction of it is the relaxation's optimum, an
  upper bound on every integer allocation; greedy keeps that prefix and only adds to it.
  The bound is tight: "budget used exactly" alone does not make greedy optimal when costs
  differ (layers A: cost 6 value 60; B: cost 5 value 49.5; C: cost 5 value 45; D: cost 4
  value 4; budget 10: greedy takes A then D, 64 in exactly 10 bytes, B + C gives 94.5).
* Target mode (smallest size reaching a fraction T of the objective): greedy stops at the first
  prefix reaching T; the prefix one triplet shorter falls short of T and is the best of its
  size, so every allocation reaching T is larger than it: greedy bytes < optimum bytes + the
  cost of the last triplet taken (equal to the optimum with equal costs).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lib_ckpt2lora.budget import (
    BudgetTooSmall,
    Spectrum,
    allocate,
    format_size,
    largest_bytes,
    parse_size,
    smallest_bytes,
)
from lib_ckpt2lora.errors import UserError

OBJECTIVES = ("relative", "energy", "fraction", "balanced")


# -- helpers: the objective and the brute-force optimum, written independently of budget.py ---


def weight(spectrum: Spectrum, objective: str) -> float:
    return {
        "energy": 1.0,
        "fraction": 1.0 / spectrum.total_energy,
        "relative": 1.0 / spectrum.weight_energy,
        "balanced": 1.0 / math.sqrt(spectrum.total_energy),
    }[objective]


def value(spectra, ranks, objective) -> float:
    """The objective kept (not normalized) by ``ranks``."""
    return math.fsum(weight(s, objective) * math.fsum(x * x for x in s.values[:r]) for s, r in zip(spectra, ranks))


def fraction_kept(spectra, ranks, objective) -> float:
    total = math.fsum(weight(s, objective) * s.total_energy for s in spectra)
    return value(spectra, ranks, objective) / total


def size(spectra, ranks) -> int:
    return sum(r * s.cost for s, r in zip(spectra, ranks))


def every_allocation(spectra):
    """Every rank vector between the floor (1, or 0 for an empty layer) and the cap."""
    return itertools.product(*[range(min(1, len(s.values)), len(s.values) + 1) for s in spectra])


def table(spectra, objective) -> list[tuple[int, float, float]]:
    """(bytes, value, fraction kept) of every allocation: the brute force's whole search space."""
    return [
        (size(spectra, r), value(spectra, r, objective), fraction_kept(spectra, r, objective))
        for r in every_allocation(spectra)
    ]


def best_within(spectra, objective, budget, rows=None) -> float:
    return max(v for b, v, _ in rows or table(spectra, objective) if b <= budget)


def smallest_reaching(spectra, objective, target, rows=None) -> int:
    return min(b for b, _, f in rows or table(spectra, objective) if f >= target)


def triplets_in_order(spectra, objective):
    """(value, cost, layer) of every triplet above the floor, best value per byte first."""
    items = [
        (weight(s, objective) * x * x, s.cost, i)
        for i, s in enumerate(spectra)
        for x in s.values[min(1, len(s.values)) :]
    ]
    return sorted(items, key=lambda item: -item[0] / item[1])


def first_misfit(spectra, objective, budget) -> tuple[float, list[int]]:
    """The value of the first triplet (value-per-byte order) that does not fit after the ones
    before it (0.0 when all fit), and the ranks of the prefix before it."""
    ranks = [min(1, len(s.values)) for s in spectra]
    spent = size(spectra, ranks)
    for item_value, cost, layer in triplets_in_order(spectra, objective):
        if spent + cost > budget:
            return item_value, ranks
        ranks[layer] += 1
        spent += cost
    return 0.0, ranks


def random_spectra(rng: random.Random, layers: int, equal_costs: bool = False) -> list[Spectrum]:
    spectra = []
    for index in range(layers):
        values = sorted((rng.uniform(0.05, 3.0) ** 2 for _ in range(rng.randint(1, 4))), reverse=True)
        total = math.fsum(x * x for x in values) * rng.uniform(1.0, 1.5)  # a tail beyond the cap
        cost = 10 if equal_costs else rng.choice((6, 10, 14, 22, 30))
        spectra.append(Spectrum(f"layer{index}", values, total, rng.uniform(0.5, 40.0), cost))
    return spectra


# -- small spectra worked out by hand -------------------------------------------------------------

# Three layers, floor rank 1 each:
#   A: cost 10, values [4, 2, 1], ||delta||^2 = 21 (= 16+4+1), ||W||^2 = 4
#   B: cost 30, values [6, 3],    ||delta||^2 = 45 (= 36+9),   ||W||^2 = 1
#   C: cost 20, values [3, 2],    ||delta||^2 = 13 (= 9+4),    ||W||^2 = 1
# Budget 110 bytes. The floors take 10 + 30 + 20 = 60, leaving 50 for the triplets above them:
#   A2 (s^2 4, 10 B), A3 (s^2 1, 10 B, needs A2), B2 (s^2 9, 30 B), C2 (s^2 4, 20 B).
# All four take 70 > 50; the largest sets that fit in 50 are
#   X = {A2, A3, B2} (50 B) -> ranks (3, 2, 1)
#   Y = {A2, A3, C2} (40 B) -> ranks (3, 1, 2)
#   Z = {B2, C2}     (50 B) -> ranks (1, 2, 2)
# (every other set that fits is inside one of these).
# energy,   weight 1:                X = 4+1+9 = 14,      Y = 4+1+4 = 9,        Z = 9+4 = 13   -> X
# relative, weight 1/||W||^2 = 1/4, 1, 1:
#                                    X = 1+.25+9 = 10.25, Y = 1+.25+4 = 5.25,   Z = 9+4 = 13   -> Z
# fraction, weight 1/||delta||^2 = 1/21, 1/45, 1/13:
#                                    X = 5/21+9/45 = .438, Y = 5/21+4/13 = .546, Z = 9/45+4/13 = .508 -> Y
# Greedy gets there too: per byte, energy A2 .4 > B2 .3 > C2 .2 > A3 .1 -> A2, B2 (100 B), C2 does
# not fit, A3 (110 B); relative B2 .3 > C2 .2 > A2 .1 -> B2, C2 (110 B), nothing else fits;
# fraction A2 .0190 > C2 .0154 > B2 .0067 > A3 .0048 -> A2, C2 (90 B), B2 does not fit, A3 (100 B).
HAND = [
    Spectrum("A", [4.0, 2.0, 1.0], 21.0, 4.0, 10),
    Spectrum("B", [6.0, 3.0], 45.0, 1.0, 30),
    Spectrum("C", [3.0, 2.0], 13.0, 1.0, 20),
]
HAND_ANSWERS = {
    "energy": ([3, 2, 1], 110, 21 + 45 + 9, 21 + 45 + 13),
    "relative": ([1, 2, 2], 110, 16 / 4 + 45 + 13, 21 / 4 + 45 + 13),
    "fraction": ([3, 1, 2], 100, 1 + 36 / 45 + 1, 3),
}


@pytest.mark.parametrize("objective", HAND_ANSWERS)
def test_hand_worked_allocation_for_each_objective(objective):
    ranks, spent, kept, total = HAND_ANSWERS[objective]
    allocation = allocate(HAND, objective, budget_bytes=110)
    assert allocation.ranks == ranks
    assert allocation.bytes == spent
    assert allocation.captured_objective == pytest.approx(kept / total)
    energy = sum(x * x for s, r in zip(HAND, ranks) for x in s.values[:r])
    assert allocation.captured_energy == pytest.approx(energy / 79)
    # and the hand derivation agrees with the brute force
    assert value(HAND, ranks, objective) == pytest.approx(best_within(HAND, objective, 110))


def test_the_three_objectives_pick_three_different_allocations():
    assert len({tuple(allocate(HAND, objective, budget_bytes=110).ranks) for objective in HAND_ANSWERS}) == 3


# balanced (weight 1/||delta||) sits between energy (1) and fraction (1/||delta||^2). Two layers,
# cost 10 each, floors 20, budget 30: room for one more triplet, A2 or B2 (equal costs, so the
# better value wins).
#   A: values [4, 3], ||delta||^2 = 25 (||delta|| = 5): A2 has s^2 = 9
#   B: values [6, 4], ||delta||^2 = 100 (10):             B2 has s^2 = 16
#     energy 9 < 16 -> B2; balanced 9/5 = 1.8 > 16/10 = 1.6 -> A2; fraction .36 > .16 -> A2
#   B': values [6, 5], ||delta||^2 = 100:                  B2 has s^2 = 25
#     energy 9 < 25 -> B2; balanced 1.8 < 2.5 -> B2; fraction .36 > .25 -> A2
@pytest.mark.parametrize(
    "b_values, picks",
    [([6.0, 4.0], {"energy": [1, 2], "balanced": [2, 1], "fraction": [2, 1]}),
     ([6.0, 5.0], {"energy": [1, 2], "balanced": [1, 2], "fraction": [2, 1]})],
)
def test_hand_worked_balanced_between_energy_and_fraction(b_values, picks):
    spectra = [Spectrum("A", [4.0, 3.0], 25.0, 1.0, 10), Spectrum("B", b_values, 100.0, 1.0, 10)]
    for objective, ranks in picks.items():
        assert allocate(spectra, objective, budget_bytes=30).ranks == ranks, objective
    assert allocate(spectra, budget_bytes=30).ranks == picks["balanced"]  # the default objective


def test_hand_worked_two_layers_from_the_brief():
    # A: cost 10, values [4, 2, 1]; B: cost 30, values [6, 3]; budget 80, energy. Floors 40,
    # 40 left: A2 (4, 10 B) + B2 (9, 30 B) = 13 in 40 B beats A2 + A3 = 5 in 20 B (both do not
    # fit with B2: 50 B) -> (2, 2), the budget used exactly.
    spectra = [Spectrum("A", [4.0, 2.0, 1.0], 21.0, 1.0, 10), Spectrum("B", [6.0, 3.0], 45.0, 1.0, 30)]
    allocation = allocate(spectra, "energy", budget_bytes=80)
    assert (allocation.ranks, allocation.bytes) == ([2, 2], 80)
    # 10 bytes less: B2 no longer fits; A2 and A3 do -> (3, 1), 60 bytes
    assert allocate(spectra, "energy", budget_bytes=70).ranks == [3, 1]


# -- against the brute force ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_greedy_against_brute_force(seed, objective):
    rng = random.Random(seed)
    spectra = random_spectra(rng, layers=3 + seed % 2)
    low, high = smallest_bytes(spectra), largest_bytes(spectra)
    rows = table(spectra, objective)
    optimal_prefixes = 0
    for budget in range(low, high + 1, 2):
        allocation = allocate(spectra, objective, budget_bytes=budget)
        assert allocation.bytes == size(spectra, allocation.ranks) <= budget
        assert all(1 <= r <= len(s.values) for s, r in zip(spectra, allocation.ranks))
        got, best = value(spectra, allocation.ranks, objective), best_within(spectra, objective, budget, rows)
        assert got <= best * (1 + 1e-12)
        misfit, prefix = first_misfit(spectra, objective, budget)
        assert got >= best - misfit - 1e-9 * best, (budget, allocation.ranks)
        if allocation.ranks == prefix:
            # a value-per-byte prefix is the best of all allocations of its own size or less
            assert got == pytest.approx(best_within(spectra, objective, allocation.bytes, rows), rel=1e-12)
            optimal_prefixes += allocation.bytes == budget
    assert optimal_prefixes > 0  # the exact-fit prefix case did occur


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_greedy_is_optimal_for_every_budget_with_equal_costs(seed, objective):
    spectra = random_spectra(random.Random(100 + seed), layers=4, equal_costs=True)
    rows = table(spectra, objective)
    for budget in range(smallest_bytes(spectra), largest_bytes(spectra) + 1, 5):
        ranks = allocate(spectra, objective, budget_bytes=budget).ranks
        assert value(spectra, ranks, objective) == pytest.approx(best_within(spectra, objective, budget, rows), rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_mode_against_brute_force(seed, objective):
    rng = random.Random(200 + seed)
    equal = seed % 2 == 0
    spectra = random_spectra(rng, layers=3 + seed % 2, equal_costs=equal)
    rows = table(spectra, objective)
    at_cap = fraction_kept(spectra, [len(s.values) for s in spectra], objective)
    for target in sorted(rng.uniform(0.05, at_cap) for _ in range(8)):
        allocation = allocate(spectra, objective, target=target)
        assert allocation.captured_objective >= target
        assert allocation.captured_objective == pytest.approx(fraction_kept(spectra, allocation.ranks, objective))
        smallest = smallest_reaching(spectra, objective, target, rows)
        largest_step = max(s.cost for s in spectra)
        assert smallest <= allocation.bytes < smallest + largest_step
        if equal:
            assert allocation.bytes == smallest


def test_target_reached_by_the_floors_adds_nothing_and_unreachable_target_stops_at_the_cap():
    assert allocate(HAND, "energy", target=0.5).ranks == [1, 1, 1]  # the floors keep 61 of 79
    # A with 21 more energy beyond its cap: the caps keep 79 of 100, 0.99 is out of reach
    beyond_cap = [Spectrum("A", [4.0, 2.0, 1.0], 42.0, 4.0, 10), *HAND[1:]]
    capped = allocate(beyond_cap, "energy", target=0.99)
    assert capped.ranks == [3, 2, 2] and capped.captured_objective == pytest.approx(79 / 100)


# -- floor, caps, too small ----------------------------------------------------------------------------


def test_every_layer_keeps_its_floor_even_when_worthless():
    worthless = Spectrum("tiny", [1e-6, 1e-7], 1e-12, 1e6, 1000)
    strong = Spectrum("strong", [10.0, 9.0, 8.0, 7.0], 300.0, 1.0, 10)
    for objective in OBJECTIVES:
        allocation = allocate([worthless, strong], objective, budget_bytes=1040)
        assert allocation.ranks == [1, 4]
        assert allocation.bytes == 1040


def test_caps_hold_however_large_the_budget():
    for objective in OBJECTIVES:
        allocation = allocate(HAND, objective, budget_bytes=10**12)
        assert allocation.ranks == [len(s.values) for s in HAND]
        assert allocation.bytes == largest_bytes(HAND) == 3 * 10 + 2 * 30 + 2 * 20
        assert allocation.captured_energy == pytest.approx(1.0)


def test_too_small_names_the_floor_bytes():
    assert smallest_bytes(HAND) == 10 + 30 + 20
    allocate(HAND, "relative", budget_bytes=60)  # exactly the floors: fine
    with pytest.raises(BudgetTooSmall) as caught:
        allocate(HAND, "relative", budget_bytes=59)
    assert caught.value.floor_bytes == 60
    assert isinstance(caught.value, UserError)


def test_an_empty_layer_has_no_floor():
    empty = Spectrum("unchanged", [], 0.0, 1.0, 50)
    assert smallest_bytes([empty, *HAND]) == 60
    assert allocate([empty, *HAND], "fraction", budget_bytes=60).ranks == [0, 1, 1, 1]


def test_largest_and_smallest_bytes_with_a_higher_floor():
    spectra = [Spectrum("a", [3.0, 2.0, 1.0], 14.0, 1.0, 7, floor=2), Spectrum("b", [1.0], 1.0, 1.0, 5, floor=2)]
    assert smallest_bytes(spectra) == 2 * 7 + 1 * 5  # a floor above the cap is the cap
    assert largest_bytes(spectra) == 3 * 7 + 5


# -- parse_size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("100MB", 100 * 10**6),
        ("100 mb", 100 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("300MiB", 300 * 2**20),
        ("2KiB", 2048),
        ("0.5GiB", 2**29),
        ("1KB", 1000),
        ("512", 512),
        ("512B", 512),
        (512, 512),
        (".5MB", 500_000),
        ("4.35MB", 4_350_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


# 8.2 * 10**6 is 8199999.999999999 in binary floating point: truncating gave 8199999 bytes
@pytest.mark.parametrize("text, expected", [("8.2MB", 8_200_000), ("1.005MB", 1_005_000)])
def test_parse_size_decimals_are_not_truncated_below_the_exact_value(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "100 megabytes", "-5MB", "1e6", "5 MB MB", "100M", "MB"])
def test_parse_size_refuses_bad_text_in_one_sentence(text):
    with pytest.raises(UserError) as caught:
        parse_size(text)
    message = str(caught.value)
    assert "--target-size" in message and "\n" not in message and message.endswith(".")


@pytest.mark.parametrize("text", ["0", "0MB", "0.0GB", 0, "0.0000001MB"])
def test_parse_size_refuses_zero(text):
    with pytest.raises(UserError, match="more than 0 bytes"):
        parse_size(text)


def test_format_size():
    assert format_size(100 * 10**6) == "100.0 MB"
    assert format_size(2500) == "2.5 KB"
