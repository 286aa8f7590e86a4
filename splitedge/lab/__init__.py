"""Orchestration: what runs the other layers together, never imported by them.

=================  ==========================================================
``launch``         starting cloud and edge processes, reading their logs
``demo``           ``splitedge demo``: export, one cloud, a few edges
``experiment``     ``splitedge experiment``: grids of runs, reports, plots
``bench``          ``splitedge bench``: every benchmark (ratios from one run)
=================  ==========================================================

Only the CLIs import this package (``tests/test_layers.py`` checks it).
"""
