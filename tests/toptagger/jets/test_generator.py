"""Pythia8 + FastJet generation: the reference selection, reproducibility and argument checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tolerances import EPS32
from toptagger.errors import ConfigError, DataError
from toptagger.jets import kinematics as kin
from toptagger.jets.dataset import JetBatch
from toptagger.jets.generator import (
    SIGNAL,
    JetFactory,
    Recipe,
    generate_blocks,
    generate_jets,
    merge_shards,
    plan_blocks,
    plan_jets,
    save_shard,
    shard_blocks,
)

REPO = Path(__file__).resolve().parents[3]


def test_selection_window(small_jets: JetBatch) -> None:
    jets = kin.jet_four_momentum(small_jets.constituents)
    pt, eta = kin.pt(jets), kin.eta(jets)
    # The clustering axis is the E-scheme sum of all constituents; only the leading 200 are kept,
    # so the stored sum may fall short by the softest particles of very busy jets.
    n = (small_jets.constituents[..., 0] > 0).sum(axis=1)
    full = n < 200
    # The window was applied in float64 before the constituents were stored as float32: rounding
    # each px, py, pz (u relative) moves the summed px, py, pz by at most u * sum |component|, so pT
    # by at most u * (sum |px| + sum |py|) and eta = asinh(pz / pT) by at most
    # u * (sum |pz| + |pz / pT| * (sum |px| + sum |py|)) / (pT cosh eta). Doubled for the float64 sums.
    c = small_jets.constituents.astype(np.float64)
    transverse = np.abs(c[..., 1]).sum(axis=1) + np.abs(c[..., 2]).sum(axis=1)
    pt_slack = 2 * EPS32 * transverse
    eta_slack = 2 * EPS32 * (np.abs(c[..., 3]).sum(axis=1) + np.abs(jets[:, 3]) / pt * transverse) / (pt * np.cosh(eta))
    assert ((pt > 550 - pt_slack) & (pt < 650 + pt_slack))[full].all()
    assert (np.abs(eta) < 2.0 + eta_slack).all()
    assert set(np.unique(small_jets.labels)) == {0, 1}
    assert small_jets.labels.sum() == 200


def test_constituents_are_pt_ordered_and_zero_padded(small_jets: JetBatch) -> None:
    c = small_jets.constituents
    pt = kin.pt(c)
    # sorted in float64, stored as float32: each pT moves by at most u (px, py rounded, u each),
    # so a later one may exceed an earlier one by u (pT_i + pT_i+1); doubled for float64's hypot
    slack = 2 * EPS32 * (pt[:, 1:] + pt[:, :-1])
    assert (np.diff(pt, axis=1) <= slack).all(), "constituents must be in decreasing pT"
    real = c[..., 0] > 0
    n = real.sum(axis=1)
    assert (n >= 2).all()
    # padding: every row after the last real constituent is exactly zero
    after = np.arange(200)[None, :] >= n[:, None]
    assert (c[after] == 0).all()
    assert not (c[~after] == 0).all(axis=-1).any()


def test_signal_is_truth_matched_and_background_has_no_truth(small_jets: JetBatch) -> None:
    top = small_jets.labels == 1
    truth = small_jets.truth
    assert (truth[~top] == 0).all()
    jets = kin.jet_four_momentum(small_jets.constituents[top])
    dr = kin.delta_r(kin.eta(truth[top]), kin.phi(truth[top]), kin.eta(jets), kin.phi(jets))
    assert (dr < 0.8).all()
    top_mass = kin.mass(truth[top].astype(np.float64))
    # truth four-vectors are top quarks: Breit-Wigner around Pythia's 172.5 GeV (wide tails allowed)
    assert abs(np.median(top_mass) - 172.5) < 3
    assert np.mean(np.abs(top_mass - 172.5) < 15) > 0.9
    # physics sanity: jet mass separates the classes (top ~175 GeV, QCD much lower)
    mass = kin.mass(kin.jet_four_momentum(small_jets.constituents))
    assert np.median(mass[top]) > 150 > np.median(mass[~top])


def test_same_seed_same_jets_whatever_the_worker_count() -> None:
    one = generate_jets(60, 60, seed=7, workers=1)
    two = generate_jets(60, 60, seed=7, workers=2)
    np.testing.assert_array_equal(one.constituents, two.constituents)
    np.testing.assert_array_equal(one.labels, two.labels)
    other = generate_jets(60, 60, seed=8, workers=2)
    assert not np.array_equal(one.constituents, other.constituents)


def test_blocks_have_distinct_seeds() -> None:
    blocks = plan_blocks(SIGNAL, 1000, seed=3)
    assert sum(b.n_jets for b in blocks) == 1000
    assert len({b.seed for b in blocks}) == len(blocks)


def test_fjcore_clustering_matches_standalone_fastjet() -> None:
    """Our in-Pythia anti-kT (fjcore) gives the same jets as the fastjet package on the same events."""
    import fastjet

    factory = JetFactory(SIGNAL, Recipe())
    factory.pythia.rndm.init(4242)
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, 0.8)
    compared = 0
    for _ in range(5):
        assert factory.pythia.next()
        event = factory.pythia.event
        particles = [
            fastjet.PseudoJet(p.px(), p.py(), p.pz(), p.e())
            for p in (event[i] for i in range(event.size()))
            if p.isFinal() and p.isVisible()
        ]
        sequence = fastjet.ClusterSequence(particles, definition)  # jets need it alive
        reference = sequence.inclusive_jets(550.0)
        ours = factory.clustering
        ours.analyze(event)
        assert ours.sizeJet() == len(reference)
        for j, ref in enumerate(sorted(reference, key=lambda jet: -jet.pt())):
            assert ours.pT(j) == pytest.approx(ref.pt(), rel=1e-9)
            assert ours.p(j).e() == pytest.approx(ref.e(), rel=1e-9)
            assert len(ours.constituents(j)) == len(ref.constituents())
            compared += 1
    assert compared > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_signal": 0, "n_background": 5}, "signal jets must be a whole number >= 1"),
        ({"n_signal": 5, "n_background": -2}, "background jets must be a whole number >= 1"),
        ({"n_signal": 5, "n_background": 5, "workers": -1}, "workers must be >= 1"),
        ({"n_signal": 5, "n_background": 5, "seed": -1}, "seed must be in"),
    ],
)
def test_impossible_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_jets(**kwargs)


# --- shards -------------------------------------------------------------------------------------
# The same 60 + 60 jets, seed 5, as the ``tiny_jets`` fixture: four blocks (50 + 10 of each process).


@pytest.fixture(scope="module")
def tiny_blocks() -> tuple[list, dict]:
    """Every block of ``tiny_jets``, each generated by its own shard of four (one block per shard)."""
    blocks = plan_jets(60, 60, seed=5)
    assert len(blocks) == 4
    results: dict = {}
    for shard in range(4):
        mine = shard_blocks(blocks, shard, 4)
        assert len(mine) == 1
        results |= generate_blocks(mine, workers=1)
    return blocks, results


def _shard_files(blocks: list, results: dict, n_shards: int, folder: Path) -> list[Path]:
    paths = []
    for shard in range(n_shards):
        path = folder / f"shard-{n_shards}-{shard}.npz"
        save_shard(path, shard_blocks(blocks, shard, n_shards), results)
        paths.append(path)
    return paths


@pytest.mark.parametrize("n_shards", [1, 3, 4, 6])
def test_shards_merge_to_the_unsharded_jets_whatever_their_number(
    tiny_jets: JetBatch, tiny_blocks: tuple[list, dict], n_shards: int, tmp_path: Path
) -> None:
    blocks, results = tiny_blocks
    shards = [shard_blocks(blocks, shard, n_shards) for shard in range(n_shards)]
    # Every block in exactly one shard (6 shards of 4 blocks: two are empty).
    assert sorted((b.process, b.index) for s in shards for b in s) == sorted((b.process, b.index) for b in blocks)
    merged = merge_shards(blocks, _shard_files(blocks, results, n_shards, tmp_path), seed=5)
    np.testing.assert_array_equal(merged.constituents, tiny_jets.constituents)
    np.testing.assert_array_equal(merged.labels, tiny_jets.labels)
    np.testing.assert_array_equal(merged.truth, tiny_jets.truth)


def test_merge_refuses_missing_repeated_and_foreign_blocks(tiny_blocks: tuple[list, dict], tmp_path: Path) -> None:
    blocks, results = tiny_blocks
    files = _shard_files(blocks, results, 2, tmp_path)
    with pytest.raises(DataError, match=r"the shards lack 2 block\(s\) of the sample: signal 1, background 1"):
        merge_shards(blocks, files[:1], seed=5)
    with pytest.raises(DataError, match=r"shard-2-0.npz: block signal 0 was already in another shard"):
        merge_shards(blocks, [files[0], *files], seed=5)
    # Same sizes, another seed: the blocks' seeds differ, so the shard belongs to another sample.
    with pytest.raises(DataError, match=r"shard-2-0.npz: block signal 0 is not one of this sample's"):
        merge_shards(plan_jets(60, 60, seed=6), files, seed=6)
    junk = tmp_path / "junk.npz"
    junk.write_text("not a shard")
    with pytest.raises(DataError, match=r"junk.npz: not a shard file of the generator"):
        merge_shards(blocks, [junk], seed=5)


def test_shard_numbers_are_checked() -> None:
    blocks = plan_jets(60, 60, seed=5)
    with pytest.raises(ConfigError, match=r"n_shards must be >= 1, got 0"):
        shard_blocks(blocks, 0, 0)
    with pytest.raises(ConfigError, match=r"shard must be in \[0, 4\), got 4"):
        shard_blocks(blocks, 4, 4)
