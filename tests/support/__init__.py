"""Test support: how the tests start the CLI.

    runner.py     run_cli (the CLI in this process) and run_cli_process (the real `python cli.py`)
    launch.py     N real CPU ranks of a script (torchrun + ACCELERATE_USE_CPU); also used by bench/chaos.py
    chaos_cli.py  cli.py with slowed zarr writes (fault injection for kills mid-unit)
    probe_cli.py  cli.py with recorders (what each rank saw, batches, a stall to kill it in)

The scripts are started as `python tests/support/<script>.py ...` with PYTHONPATH=<repo root>
(launch_env sets it) and import each other as `tests.support.<module>`.
"""
