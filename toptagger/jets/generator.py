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

from toptagger.errors import ConfigError, DataError
from toptagger.jets.dataset import N_CONSTITUENTS, JetBatch
from toptagger.jets.kinematics import delta_r
from toptagger.storage import atomic_output

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


def plan_jets(n_signal: int, n_background: int, seed: int = 1) -> list[Block]:
    """Every seeded block of a sample, in the order the file holds them (signal, then background)."""
    for name, n in (("signal", n_signal), ("background", n_background)):
        if not isinstance(n, int | np.integer) or n < 1:
            raise ConfigError(f"the number of {name} jets must be a whole number >= 1, got {n!r}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    return plan_blocks(SIGNAL, n_signal, seed) + plan_blocks(BACKGROUND, n_background, seed)


BlockJets = dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]  # (process, index) -> constituents, truth


def generate_blocks(
    blocks: Sequence[Block], workers: int | None = None, recipe: Recipe | None = None, progress: bool = False
) -> BlockJets:
    """Generate ``blocks`` on ``workers`` processes; each block's jets depend on its seed only."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    results: BlockJets = {}
    if not blocks:
        return results
    recipe = recipe or Recipe()

    from tqdm import tqdm

    total = sum(b.n_jets for b in blocks)
    bar = tqdm(total=total, unit="jet", desc="generating", disable=not progress, file=sys.stderr)
    # spawn, not fork: the caller may hold threads (torch, gRPC) that fork would copy half-way.
    context = multiprocessing.get_context("spawn")
    with bar, context.Pool(min(workers, len(blocks)), initializer=_init_worker, initargs=(recipe,)) as pool:
        for block, constituents, truth in pool.imap_unordered(_run_block, blocks):
            results[(block.process, block.index)] = (constituents, truth)
            bar.update(block.n_jets)
    return results


def assemble(blocks: Sequence[Block], results: BlockJets, seed: int) -> JetBatch:
    """The sample from its blocks' jets: blocks in plan order, then shuffled by ``seed``."""
    ordered = [results[(b.process, b.index)] for b in blocks]
    labels = np.concatenate([np.full(b.n_jets, int(b.process == SIGNAL), np.int64) for b in blocks])
    batch = JetBatch(
        np.concatenate([c for c, _ in ordered]),
        labels,
        np.concatenate([t for _, t in ordered]),
        np.zeros(len(labels), np.int64),
    )
    return batch[np.random.default_rng(seed).permutation(len(batch))]


def generate_jets(
    n_signal: int,
    n_background: int,
    seed: int = 1,
    workers: int | None = None,
    recipe: Recipe | None = None,
    progress: bool = False,
) -> JetBatch:
    """Generate ``n_signal`` top jets and ``n_background`` QCD jets, shuffled by ``seed``."""
    blocks = plan_jets(n_signal, n_background, seed)
    return assemble(blocks, generate_blocks(blocks, workers, recipe, progress), seed)


# --- shards: the same blocks on several machines ------------------------------------------------
# A shard generates every n-th block of the plan and saves the blocks' jets with their identity
# (process, index, seed); the merge puts them back in plan order. Because a block's jets depend on
# its seed alone, the merged file equals the one generate_jets writes, whatever the shard count.
_SHARD_FIELDS = ("process", "index", "n_jets", "seed")


def shard_blocks(blocks: Sequence[Block], shard: int, n_shards: int) -> list[Block]:
    """The blocks shard ``shard`` of ``n_shards`` generates (round robin, so shards stay balanced)."""
    if n_shards < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n_shards}")
    if not 0 <= shard < n_shards:
        raise ConfigError(f"shard must be in [0, {n_shards}), got {shard}")
    return list(blocks[shard::n_shards])


def save_shard(path: str | os.PathLike[str], blocks: Sequence[Block], results: BlockJets) -> None:
    """Write the jets of ``blocks`` with the blocks' identity to an ``.npz`` file, atomically."""
    arrays: dict[str, np.ndarray] = {
        "process": np.array([int(b.process == SIGNAL) for b in blocks], np.int64),
        "index": np.array([b.index for b in blocks], np.int64),
        "n_jets": np.array([b.n_jets for b in blocks], np.int64),
        "seed": np.array([b.seed for b in blocks], np.int64),
    }
    empty = (np.zeros((0, N_CONSTITUENTS, 4), np.float32), np.zeros((0, 4), np.float32))
    parts = [results[(b.process, b.index)] for b in blocks] or [empty]
    arrays["constituents"] = np.concatenate([c for c, _ in parts])
    arrays["truth"] = np.concatenate([t for _, t in parts])
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def merge_shards(blocks: Sequence[Block], shard_files: Sequence[str | os.PathLike[str]], seed: int) -> JetBatch:
    """The sample of ``blocks`` from shard files; refuses missing, repeated or foreign blocks."""
    planned = {(b.process, b.index): b for b in blocks}
    results: BlockJets = {}
    for path in shard_files:
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {name: data[name] for name in (*_SHARD_FIELDS, "constituents", "truth")}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{path}: not a shard file of the generator ({exc})") from None
        first = 0
        for process, index, n_jets, block_seed in zip(*(fields[name] for name in _SHARD_FIELDS), strict=True):
            key = (SIGNAL if process == 1 else BACKGROUND, int(index))
            block = planned.get(key)
            if block is None or (block.n_jets, block.seed) != (int(n_jets), int(block_seed)):
                raise DataError(f"{path}: block {key[0]} {key[1]} is not one of this sample's (another seed or size)")
            if key in results:
                raise DataError(f"{path}: block {key[0]} {key[1]} was already in another shard")
            results[key] = (fields["constituents"][first : first + n_jets], fields["truth"][first : first + n_jets])
            first += int(n_jets)
    missing = [f"{process} {index}" for process, index in planned if (process, index) not in results]
    if missing:
        raise DataError(f"the shards lack {len(missing)} block(s) of the sample: {', '.join(missing[:5])}")
    return assemble(blocks, results, seed)
