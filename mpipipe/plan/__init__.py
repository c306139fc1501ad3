"""The planner: which layouts fit, how fast each runs, and proof of the predictions.

What to do, not how: no MPI and no arrays here (calibrate and validate launch processes).
"""
