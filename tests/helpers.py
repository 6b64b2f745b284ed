"""Shared test helpers: random metrics and random layer primitives."""
import random

import torch

UNARY = ["abs", "neg", "sqr", "sqrt", "exp", "log", "tanh", "sigmoid", "mms", "zsn", "mms_row", "zsn_row"]
BINARY = ["add", "sub", "mul", "div"]


def random_expr(rng: random.Random, depth: int = 3, terminals=("W", "G", "X")) -> str:
    """A random metric in function form, like the trees a GP search produces."""
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(list(terminals) + ["0.5", "2"]) if rng.random() < 0.9 else rng.choice(terminals)
    if rng.random() < 0.5:
        return f"{rng.choice(UNARY)}({random_expr(rng, depth - 1, terminals)})"
    return f"{rng.choice(BINARY)}({random_expr(rng, depth - 1, terminals)}, {random_expr(rng, depth - 1, terminals)})"


def primitives(out=16, inp=32, seed=0, dtype=torch.float64):
    """Random W, G, X of one layer, in ranges like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=dtype) * 0.05
    G = torch.rand(out, inp, generator=g, dtype=dtype) * 1e-3 + 1e-5
    X = torch.rand(1, inp, generator=g, dtype=dtype) * 10 + 0.1
    return {"W": W, "G": G, "X": X, "N": 32}

