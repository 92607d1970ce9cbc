"""`retinanet fastpaths`: this machine's measured fast paths with their figures; --reset forgets them."""

from __future__ import annotations

import argparse

from retinanet.runtime.machine import Cache, cache_key

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    cache = Cache()
    if args.reset:
        count = cache.reset()
        print(
            f"forgot the {count} measured choices of this machine ({cache_key()}) in {cache.path()}: each is "
            "measured again at its first use"
        )
        return 0
    mine = cache.mine()
    print(f"{cache.path() or 'no cache file (RETINANET_CACHE_DIR=off)'}, this machine: {cache_key()}")
    if not mine:
        print("no measured choices yet")
    for kind, records in sorted(mine.items()):
        print(f"{kind}: {len(records)} shape class(es)")
        for key, r in sorted(records.items()):
            figures = ", ".join(f"{k[:-3]} {v:.3g} ms" for k, v in r.items() if k.endswith("_ms"))
            busy = f"; measured while {r['busy']} other process(es) computed" if r.get("busy") else ""
            print(f"  {key}: {r['choice']}" + (f" ({figures})" if figures else "") + busy)
    return 0
