"""Paired activation harvesting into a sharded on-disk store (or live, with no store), and
activation normalization."""

from crossdiff.activations.harvest import harvest
from crossdiff.activations.live import LiveActivations
from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.pairing import Pairing, list_pairings, load_pairing
from crossdiff.activations.source import ActivationSource
from crossdiff.activations.store import ActivationStore

__all__ = [
    "ActivationSource",
    "ActivationStore",
    "LiveActivations",
    "Pairing",
    "RunningStats",
    "harvest",
    "list_pairings",
    "load_pairing",
]
