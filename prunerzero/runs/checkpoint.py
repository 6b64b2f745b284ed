"""Checkpoints as data: JSON with a checksum, never pickle.

A run folder may come from another machine, so resuming one must not execute anything it
holds. A checkpoint is `checkpoint.json`:

    {"format": "prunerzero-checkpoint", "version": 1, "kind": "evolve" | "darwin" | "allocation",
     "sha256": <hex digest of the canonical JSON of "state">, "state": {...}}

The evolve state holds metric texts (re-parsed by prunerzero's own parser, never eval'd),
fitness values, the caches, the logbook records and the RNG states as numbers. A damaged,
edited or foreign checkpoint is detected by its format, kind and checksum and reported
before any model is loaded."""
from __future__ import annotations

import base64
import hashlib
import json
import random

import numpy as np
import torch

from ..errors import PrunerZeroError

FORMAT, VERSION, FILE, LEGACY = "prunerzero-checkpoint", 1, "checkpoint.json", "checkpoint.pkl"


class CheckpointError(PrunerZeroError):
    """A run folder whose checkpoint cannot be trusted or does not belong to this command."""


def _digest(state) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def encode(kind: str, state: dict) -> bytes:
    return json.dumps(dict(format=FORMAT, version=VERSION, kind=kind, sha256=_digest(state), state=state)).encode()


def decode(raw: bytes, kind: str, where) -> dict:
    """The state of a checkpoint file's bytes, or CheckpointError saying what is wrong."""
    fix = f"start a new run instead of --resume {where}"
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}/{FILE} is damaged (not valid JSON); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"{where}/{FILE} is not a prunerzero checkpoint of this version; {fix}")
    if doc.get("kind") != kind:
        raise CheckpointError(f"{where} is a `prunerzero {doc.get('kind')}` run, not a `prunerzero {kind}` run; "
                              f"resume it with prunerzero {doc.get('kind')} --resume {where}")
    state = doc.get("state")
    if not isinstance(state, dict) or doc.get("sha256") != _digest(state):
        raise CheckpointError(f"{where}/{FILE} fails its checksum (damaged or edited); {fix}")
    if not isinstance(state.get("gen"), int) or state["gen"] < 0:
        raise CheckpointError(f"{where}/{FILE} has no valid generation count; {fix}")
    return state


# ---- the pieces of an evolve state ---------------------------------------------------------

def rng_state() -> dict:
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(words), gauss],
                numpy=[name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                torch=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode())


def set_rng_state(s: dict):
    version, words, gauss = s["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))
