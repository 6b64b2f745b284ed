"""Fuzz the simplifier: thousands of random metric trees, each scored as written (operator by
operator) and in its simplified compiled form on random layers; every tree whose kept weights
differ beyond ties is printed and saved. The same check as tests/test_oos_property.py, larger.

    python experiments/fuzz_oos.py --trees 5000 --seed 0
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_oos_property import disagreement, layer, tree  # noqa: E402

from prunerzero import Metric  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz_oos.json"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    t0, checked, refused, failures = time.perf_counter(), 0, 0, []
    while checked < a.trees:
        text = tree(rng, rng.randint(2, 6))
        try:
            Metric.parse(text)
        except Exception:  # noqa: BLE001 - trees the language refuses
            refused += 1
            continue
        checked += 1
        for s in (rng.randrange(10**6), rng.randrange(10**6)):
            why = disagreement(text, layer(s))
            if why:
                failures.append(dict(tree=text, simplified=str(Metric.parse(text).simplify()), layer_seed=s, why=why))
                print(f"DIFFERS {text} -> {failures[-1]['simplified']}: {why}")
                break
    result = dict(trees=checked, refused=refused, differing=len(failures), seconds=time.perf_counter() - t0,
                  settings=vars(a), failures=failures)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{checked} trees ({refused} refused by the language), {len(failures)} rank differently, "
          f"{result['seconds']:.0f} s; saved {a.out}")


if __name__ == "__main__":
    main()
