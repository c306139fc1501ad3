"""Build, check and print schedules with the Python API (no MPI needed).

python examples/show_schedule.py
"""

from mpipipe.errors import ScheduleError
from mpipipe.schedule import Costs, check, from_text, lower, one_f_one_b, render

plan = one_f_one_b(pp=4, m=8)
report = check(plan)  # proves it deadlock-free and simulates it
print(render(plan))
print("peak stashed activations per rank:", report.peak_stash)
print(
    f"bubble with F=B=1, W=0: {check(plan, Costs(f=1, b=1, w=0)).bubble:.3f}"
    f"  (closed form (p-1)/(m+p-1) = {3 / 11:.3f})"
)
print("rank 1 with its messages:", " ".join(str(a) for a in lower(plan).actions[1]))

# A schedule written by hand: rank 1 runs micro-batch 1 first, which needs rank 0's F1,
# while rank 0 waits in B0 for rank 1's B0. The checker refuses it before anything runs.
bad = from_text("""
F0 B0 W0 F1 B1 W1
F1 B1 W1 F0 B0 W0
""")
try:
    check(bad)
except ScheduleError as e:
    print("\nrejected as expected:\n" + str(e))
else:
    raise SystemExit("the checker accepted a deadlocking schedule")
