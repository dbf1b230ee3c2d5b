"""ProcessTreeClock counts the CPU time of child processes, per stage."""

import subprocess
import sys
import time

from common.cpu_clock import ProcessTreeClock, format_stage_table

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_stage_counts_children_cpu_and_idle_wall():
    clock = ProcessTreeClock(interval=0.05)
    try:
        with clock.stage("child"):
            subprocess.run([sys.executable, "-c", BUSY.format(s=1.0) + "time.sleep(0.3)\n"], check=True)
        with clock.stage("idle"):
            time.sleep(0.3)
    finally:
        clock.close()
    rows = {r["stage"]: r for r in clock.rows()}
    assert 0.7 <= rows["child"]["cpu_s"] <= 2.0, rows  # the child's second of CPU (less its last interval)
    assert rows["idle"]["cpu_s"] < 0.2 and rows["idle"]["wall_s"] >= 0.3
    assert rows["total"]["cpu_s"] == rows["child"]["cpu_s"] + rows["idle"]["cpu_s"]
    table = format_stage_table(clock.rows())
    assert "child" in table and "total" in table
