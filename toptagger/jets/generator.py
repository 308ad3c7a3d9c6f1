"""Generate top and QCD jets with Pythia8 and FastJet, following the reference-sample recipe.

The Top Quark Tagging Reference Dataset was made with Pythia8 at 14 TeV without multi-parton
interactions, anti-kT R = 0.8 jets with 550 < pT < 650 GeV and |eta| < 2, and top jets matched to
the parton-level top and all three of its decay quarks within Delta R = 0.8. This module does the
same at particle level (no Delphes detector simulation), so its jets are somewhat easier to tag.

Speed: jets are clustered by Pythia's ``SlowJet`` with ``useFJcore=True``, i.e. FastJet's own
anti-kT (fjcore, the FastJet core bundled with Pythia) running in C++ on the event record. Python
touches only the constituents of jets that pass the selection, never every particle of an event.
``tests/toptagger/jets/test_generator.py`` checks the result against the standalone ``fastjet``
package on the same events.

Reproducibility: work is cut into fixed blocks of jets, each with its own seed derived from the
user's seed, and Pythia's random generator is re-seeded per block. The file therefore depends on
the seed only, not on the number of workers or on which worker ran which block.

The command-line form is ``python -m components.generate`` (the pipeline's data step).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from toptagger.errors import ConfigError
from toptagger.jets.dataset import N_CONSTITUENTS, JetBatch
from toptagger.jets.kinematics import delta_r

SIGNAL, BACKGROUND = "signal", "background"
BLOCK_JETS = 50  # jets per seeded work unit: small enough for a smooth progress bar
MAX_PYTHIA_SEED = 900_000_000
TOP_ID, W_ID = 6, 24


@dataclass(frozen=True)
class Recipe:
    """The physics choices of the sample; the defaults are the reference dataset's."""

    ecm_gev: float = 14000.0
    jet_radius: float = 0.8
    pt_min: float = 550.0
    pt_max: float = 650.0
    eta_max: float = 2.0
    match_radius: float = 0.8
    # pT-hat windows chosen to feed the jet window efficiently: a few tens of GeV around it so
    # that radiation in and out of the cone still populates the window edges.
    signal_pthat: tuple[float, float] = (500.0, 700.0)
    background_pthat: tuple[float, float] = (520.0, 680.0)
    extra_settings: tuple[str, ...] = field(default_factory=tuple)

    def pythia_settings(self, process: str) -> list[str]:
        common = [
            f"Beams:eCM = {self.ecm_gev}",
            "PartonLevel:MPI = off",
            "Next:numberCount = 0",
            "Print:quiet = on",
            "Random:setSeed = on",
        ]
        if process == SIGNAL:
            lo, hi = self.signal_pthat
            specific = [
                "Top:gg2ttbar = on",
                "Top:qqbar2ttbar = on",
                # Hadronic W decays only: W -> q q' (d, u, s, c, b).
                "24:onMode = off",
                "24:onIfAny = 1 2 3 4 5",
            ]
        elif process == BACKGROUND:
            lo, hi = self.background_pthat
            specific = ["HardQCD:all = on"]
        else:
            raise ConfigError(f"unknown process {process!r}; expected {SIGNAL!r} or {BACKGROUND!r}")
        return [*common, *specific, f"PhaseSpace:pTHatMin = {lo}", f"PhaseSpace:pTHatMax = {hi}", *self.extra_settings]


@dataclass(frozen=True)
class Block:
    """One seeded unit of work: ``n_jets`` jets of one process."""

    process: str
    index: int
    n_jets: int
    seed: int


def plan_blocks(process: str, n_jets: int, seed: int) -> list[Block]:
    """Cut ``n_jets`` into blocks with seeds derived from (seed, process, block index)."""
    process_key = 0 if process == SIGNAL else 1
    blocks = []
    for index, first in enumerate(range(0, n_jets, BLOCK_JETS)):
        state = np.random.SeedSequence([seed, process_key, index]).generate_state(1)[0]
        blocks.append(Block(process, index, min(BLOCK_JETS, n_jets - first), int(state % MAX_PYTHIA_SEED) + 1))
    return blocks


class JetFactory:
    """One initialised Pythia instance plus FastJet anti-kT clustering for one process."""

    def __init__(self, process: str, recipe: Recipe) -> None:
        import pythia8mc

        self.process, self.recipe = process, recipe
        self.pythia = pythia8mc.Pythia("", False)
        for setting in recipe.pythia_settings(process):
            if not self.pythia.readString(setting):
                raise ConfigError(f"Pythia rejected the setting {setting!r}")
        if not self.pythia.init():
            raise ConfigError(f"Pythia failed to initialise the {process} process")
        # power -1 = anti-kT; select 2 = visible final-state particles (no neutrinos);
        # massSet 2 = keep particle masses (E-scheme recombination); useFJcore = FastJet's core.
        self.clustering = pythia8mc.SlowJet(-1, recipe.jet_radius, recipe.pt_min, 25.0, 2, 2, None, True, True)

    def block(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """Generate exactly ``block.n_jets`` selected jets: constituents [n, 200, 4], truth [n, 4]."""
        self.pythia.rndm.init(block.seed)
        constituents = np.zeros((block.n_jets, N_CONSTITUENTS, 4), np.float32)
        truth = np.zeros((block.n_jets, 4), np.float32)
        filled = 0
        while filled < block.n_jets:
            if not self.pythia.next():
                continue  # Pythia's own rare failures: the event is simply skipped
            for jet_constituents, top in self._selected_jets():
                constituents[filled] = jet_constituents
                truth[filled] = top
                filled += 1
                if filled == block.n_jets:
                    break
        return constituents, truth

    def _selected_jets(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        event, clustering, recipe = self.pythia.event, self.clustering, self.recipe
        clustering.analyze(event)
        tops = self._top_decays() if self.process == SIGNAL else []
        for j in range(clustering.sizeJet()):
            pt = clustering.pT(j)
            axis = clustering.p(j)
            if not (recipe.pt_min < pt < recipe.pt_max and abs(axis.eta()) < recipe.eta_max):
                continue
            top = np.zeros(4, np.float32)
            if self.process == SIGNAL:
                matched = [t for t, partons in tops if self._contains(axis, partons)]
                if not matched:
                    continue
                top = matched[0]
            yield self._constituents(event, clustering.constituents(j)), top

    def _contains(self, axis: object, partons: np.ndarray) -> bool:
        """True when every parton (rows of eta, phi) lies within the match radius of the jet axis."""
        distances = delta_r(partons[:, 0], partons[:, 1], axis.eta(), axis.phi())  # type: ignore[attr-defined]
        return bool((distances < self.recipe.match_radius).all())

    def _top_decays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each top: its four-momentum and the (eta, phi) of the top, b and both W quarks."""
        event = self.pythia.event
        found = []
        # In a 2 -> 2 hard process the outgoing tops sit at entries 5 and 6 of the event record;
        # their last copies (after recoils) are the ones that decay.
        for i in (5, 6):
            if event[i].idAbs() != TOP_ID:
                continue
            top = event[event[i].iBotCopyId()]
            partons = [top]
            for d in top.daughterList():
                daughter = event[d]
                if daughter.idAbs() == W_ID:
                    w = event[daughter.iBotCopyId()]
                    partons += [event[q] for q in w.daughterList()]
                else:
                    partons.append(daughter)
            etaphi = np.array([(p.eta(), p.phi()) for p in partons])
            found.append((np.array([top.e(), top.px(), top.py(), top.pz()], np.float32), etaphi))
        return found

    @staticmethod
    def _constituents(event: object, indices: Sequence[int]) -> np.ndarray:
        """The leading 200 constituents, pT-ordered, zero-padded."""
        p4 = np.array([(event[k].e(), event[k].px(), event[k].py(), event[k].pz()) for k in indices])  # type: ignore[index]
        order = np.argsort(-np.hypot(p4[:, 1], p4[:, 2]), kind="stable")[:N_CONSTITUENTS]
        out = np.zeros((N_CONSTITUENTS, 4), np.float32)
        out[: len(order)] = p4[order]
        return out


# --- worker processes -------------------------------------------------------------------------
_factories: dict[str, JetFactory] = {}
_recipe: Recipe = Recipe()


def _init_worker(recipe: Recipe) -> None:
    global _recipe
    _recipe = recipe
    # fjcore prints its banner on C++ stdout at first use; keep the terminal for the progress bar.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)


def _run_block(block: Block) -> tuple[Block, np.ndarray, np.ndarray]:
    factory = _factories.get(block.process)
    if factory is None:
        factory = _factories[block.process] = JetFactory(block.process, _recipe)
    constituents, truth = factory.block(block)
    return block, constituents, truth


def generate_jets(
    n_signal: int,
    n_background: int,
    seed: int = 1,
    workers: int | None = None,
    recipe: Recipe | None = None,
    progress: bool = False,
) -> JetBatch:
    """Generate ``n_signal`` top jets and ``n_background`` QCD jets, shuffled by ``seed``."""
    for name, n in (("signal", n_signal), ("background", n_background)):
        if not isinstance(n, int | np.integer) or n < 1:
            raise ConfigError(f"the number of {name} jets must be a whole number >= 1, got {n!r}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    recipe = recipe or Recipe()
    blocks = plan_blocks(SIGNAL, n_signal, seed) + plan_blocks(BACKGROUND, n_background, seed)
    results: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    from tqdm import tqdm

    bar = tqdm(total=n_signal + n_background, unit="jet", desc="generating", disable=not progress, file=sys.stderr)
    # spawn, not fork: the caller may hold threads (torch, gRPC) that fork would copy half-way.
    context = multiprocessing.get_context("spawn")
    with bar, context.Pool(min(workers, len(blocks)), initializer=_init_worker, initargs=(recipe,)) as pool:
        for block, constituents, truth in pool.imap_unordered(_run_block, blocks):
            results[(block.process, block.index)] = (constituents, truth)
            bar.update(block.n_jets)

    ordered = [results[(b.process, b.index)] for b in blocks]
    labels = np.concatenate([np.full(b.n_jets, int(b.process == SIGNAL), np.int64) for b in blocks])
    batch = JetBatch(
        np.concatenate([c for c, _ in ordered]),
        labels,
        np.concatenate([t for _, t in ordered]),
        np.zeros(len(labels), np.int64),
    )
    return batch[np.random.default_rng(seed).permutation(len(batch))]
