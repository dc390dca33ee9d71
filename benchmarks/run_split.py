"""Wall time of a Snakemake run split per rule, read from the run's log.

    snakemake --cores 8 --resources gpu=1 2>&1 | tee run.log
    python3 benchmarks/run_split.py run.log            # or .snakemake/log/<newest>.snakemake.log

Prints, per rule: jobs, summed job wall time (s), and the span from its first job's start to its last
job's end (jobs of one rule may overlap each other and other rules' jobs, so the spans add to more than
the run's wall time; the summed times are what the rule costs on the machine's cores at that
parallelism). The run's total is first job start to last job end.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

TIMESTAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
STARTED = re.compile(r"^\s*(?:local)?rule (\w+):$")
JOB_ID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_times(log_text: str) -> dict[int, tuple[str, datetime, datetime | None]]:
    """``{job id: (rule, start, end or None)}`` from the log's ``[timestamp]`` / rule / ``jobid:`` blocks."""
    jobs: dict[int, tuple[str, datetime, datetime | None]] = {}
    stamp: datetime | None = None
    pending_rule: str | None = None
    for line in log_text.splitlines():
        if match := TIMESTAMP.match(line):
            stamp = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
        elif match := STARTED.match(line):
            pending_rule = match.group(1)
        elif (match := JOB_ID.match(line)) and pending_rule is not None and stamp is not None:
            jobs[int(match.group(1))] = (pending_rule, stamp, None)
            pending_rule = None
        elif (match := FINISHED.match(line)) and stamp is not None:
            job_id = int(match.group(1))
            if job_id in jobs:
                rule, start, _ = jobs[job_id]
                jobs[job_id] = (rule, start, stamp)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="the terminal output or .snakemake/log file of one run")
    arguments = parser.parse_args()
    jobs = {job_id: times for job_id, times in job_times(arguments.log.read_text()).items() if times[2] is not None}
    if not jobs:
        raise SystemExit(f"{arguments.log}: no finished jobs found (is this a Snakemake log?)")
    per_rule: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for rule, start, end in jobs.values():
        per_rule[rule].append((start, end))
    print(f"{'rule':<24}{'jobs':>6}{'summed s':>11}{'span s':>9}   first start")
    for rule, spans in sorted(per_rule.items(), key=lambda item: min(start for start, _ in item[1])):
        summed = sum((end - start).total_seconds() for start, end in spans)
        first, last = min(start for start, _ in spans), max(end for _, end in spans)
        print(f"{rule:<24}{len(spans):>6}{summed:>11.0f}{(last - first).total_seconds():>9.0f}   {first:%H:%M:%S}")
    run_start = min(start for _, start, _ in jobs.values())
    run_end = max(end for _, _, end in jobs.values())
    print(f"{'total (wall)':<24}{len(jobs):>6}{'':>11}{(run_end - run_start).total_seconds():>9.0f}   {run_start:%H:%M:%S}")


if __name__ == "__main__":
    main()
