"""`cli.py` with slowed zarr writes, for fault injection only (bench/chaos.py and the kill tests).

With OFAKD_CHAOS_SLOW_WRITES=SECONDS every zarr array write sleeps that long afterwards, which widens
the window in which a SIGKILL lands inside a unit's writes. The product code has no such hook.

    PYTHONPATH=. python tests/support/chaos_cli.py cache-teacher ...      (or as torchrun's script)
"""

import os
import time

import zarr

delay = float(os.environ.get("OFAKD_CHAOS_SLOW_WRITES", "0"))
if delay:
    _real_setitem = zarr.Array.__setitem__

    def _slow_setitem(self, key, value):
        _real_setitem(self, key, value)
        time.sleep(delay)

    zarr.Array.__setitem__ = _slow_setitem

import cli  # noqa: E402

if __name__ == "__main__":
    cli.main()
