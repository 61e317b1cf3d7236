"""Progress of long subprocesses whose output goes to a log file: one line every 30 s (see
:func:`progress_period`) per job (what it has done of its total, its latest validation figure, time left, where its log is), and
several independent jobs side by side.

fairseq's own trainings (``fairseq-hydra-train``) are followed through the lines they log
(``num_updates=N`` in ``train_inner`` lines, ``| mean_r1 71.2 |`` style fields in ``valid`` lines);
any other job through the latest line it printed, so that a script that runs its own jobs with
:func:`run_jobs` (``examples/train_hubert_upstream.py`` runs fairseq's HuBERT recipe) passes their
progress on to whoever runs it.
"""

import dataclasses
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

_NESTED = re.compile(r"\+ \[(?P<started>[^\]]+)\] |  \[(?P<report>.+)")
_UPDATES = re.compile(r"num_updates[=\s]+(\d+)")


def fairseq_log_fields(line: str) -> dict:
    """The numeric ``key value`` fields of one of fairseq's ``|``-separated log lines (validation and
    epoch summaries: ``prefix | key value | ...``), as floats; the prefix and non-numeric fields are left out."""
    fields = {}
    for part in line.split(" | ")[1:]:
        key, _, value = part.strip().rpartition(" ")
        try:
            fields[key] = float(value)
        except ValueError:
            pass
    return fields


def whole_lines(pending: str, text: str):
    """(the whole lines of ``pending + text``, the start of a line still being written)."""
    *lines, rest = (pending + text).split("\n")
    return lines, rest


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclasses.dataclass
class FairseqProgress:
    """What a fairseq training log says so far: the latest update number, the latest valid value of
    ``metric``, and when (on the watcher's clock) the update count was first and last seen to move."""

    total_updates: Optional[int] = None
    metric: Optional[str] = None
    updates: int = 0
    valid: Optional[float] = None
    first_seen: Optional[tuple] = None  # (time, updates) of the first update count read
    last_seen: Optional[tuple] = None
    pending: str = ""  # the start of a line whose end has not been logged yet

    def read(self, text: str, now: float) -> None:
        """Take in newly logged ``text``; a line still being written is kept until its end arrives."""
        lines, self.pending = whole_lines(self.pending, text)
        for line in lines:
            match = _UPDATES.search(line)
            if match:
                self.updates = max(self.updates, int(match.group(1)))
            if self.metric and "valid on" in line:
                value = fairseq_log_fields(line).get(self.metric)
                if value is not None:
                    self.valid = value
        if self.updates and (self.last_seen is None or self.updates != self.last_seen[1]):
            self.last_seen = (now, self.updates)
            if self.first_seen is None:
                self.first_seen = self.last_seen

    def seconds_left(self) -> Optional[float]:
        """From the update rate between the first and latest update counts seen; None before two."""
        if not self.total_updates or self.first_seen is None or self.last_seen is None:
            return None
        (t0, u0), (t1, u1) = self.first_seen, self.last_seen
        if u1 <= u0 or t1 <= t0:
            return None
        return (self.total_updates - u1) * (t1 - t0) / (u1 - u0)

    def describe(self) -> str:
        if not self.updates:
            return "starting"
        done = f"{self.updates}/{self.total_updates}" if self.total_updates else str(self.updates)
        parts = [f"{done} updates"]
        if self.metric:
            parts.append(
                f"valid {self.metric} {self.valid:g}" if self.valid is not None else f"no valid {self.metric} yet"
            )
        left = self.seconds_left()
        if left is not None:
            parts.append(f"~{format_seconds(left)} left")
        return ", ".join(parts)


class LatestLine:
    """Follows any other job: its latest line, shortened. A job that runs its own jobs with
    :func:`run_jobs` passes their lines on this way (a "+ [label] command" line reads "label: started")."""

    width = 160

    def __init__(self):
        self.line = None
        self.pending = ""

    def read(self, text: str, now: float) -> None:
        lines, self.pending = whole_lines(self.pending, text)
        for line in lines:
            if not line.strip():
                continue
            match = _NESTED.match(line)
            if match and match.group("started"):
                self.line = f"{match.group('started')}: started"
            elif match:
                self.line = "[" + match.group("report").strip()
            else:
                line = line.strip()
                self.line = line if len(line) <= self.width else line[: self.width - 3] + "..."

    def describe(self) -> str:
        return self.line or "running"


@dataclasses.dataclass
class LoggedJob:
    """A command whose output goes to ``log_path``. ``total_updates``/``metric`` make it a fairseq
    training (followed by :class:`FairseqProgress`); without them it is followed by :class:`LatestLine`.
    ``threads`` sets OMP_NUM_THREADS for it (None: inherited); ``append`` keeps what the log already
    holds (a resumed run) instead of starting it anew. ``start_after`` (a file path) holds the job back
    until that file exists (e.g. a stage of another job that should have the machine to itself);
    its seconds count from its start."""

    label: str
    cmd: List[str]
    log_path: str
    total_updates: Optional[int] = None
    metric: Optional[str] = None
    threads: Optional[int] = None
    env: Optional[Dict[str, str]] = None
    fairseq: bool = False
    append: bool = False
    start_after: Optional[str] = None

    def follower(self):
        if self.fairseq or self.total_updates or self.metric:
            return FairseqProgress(self.total_updates, self.metric)
        return LatestLine()


class CountProgress:
    """A loop's progress: ``update(done)`` prints "label: done/total unit, ~T left" when at least the
    progress period has passed since the last line (and at the end, if a line was printed before)."""

    def __init__(self, label: str, total: int, unit: str, log=print, every: Optional[float] = None):
        self.label, self.total, self.unit, self.log = label, total, unit, log
        self.every = progress_period() if every is None else every
        self.start = self.last = time.time()
        self.printed = False

    def update(self, done: int) -> None:
        now = time.time()
        finished = done >= self.total
        if now - self.last < self.every and not (finished and self.printed):
            return
        self.last, self.printed = now, True
        left = (
            ""
            if finished or done == 0
            else f", ~{format_seconds((now - self.start) * (self.total - done) / done)} left"
        )
        self.log(f"{self.label}: {done:,}/{self.total:,} {self.unit}{left}")


class JobFailed(RuntimeError):
    pass


def progress_period() -> float:
    """Seconds between progress lines: 30, or the environment's CMD_PLUGIN_PROGRESS_SECONDS (which the
    jobs inherit, so that a nested runner reports at the same pace)."""
    value = os.environ.get("CMD_PLUGIN_PROGRESS_SECONDS", "30")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"CMD_PLUGIN_PROGRESS_SECONDS={value!r}: expected a number of seconds") from None


def run_jobs(jobs: List[LoggedJob], every: Optional[float] = None, out=None, poll: float = 0.5) -> Dict[str, float]:
    """Run ``jobs`` side by side, each writing to its log; print every ``every`` seconds (default:
    :func:`progress_period`) one line per job still running, and one when each ends. Returns
    {label: seconds}. If one fails, the others are stopped and :class:`JobFailed` names the failed
    job's log (its last lines are printed first)."""
    out = out or sys.stdout
    every = progress_period() if every is None else every
    start = time.time()
    running = {}

    def launch(job):
        os.makedirs(os.path.dirname(os.path.abspath(job.log_path)), exist_ok=True)
        env = dict(os.environ if job.env is None else job.env)
        if job.threads:
            env["OMP_NUM_THREADS"] = str(job.threads)
        log = open(job.log_path, "a" if job.append else "w")
        reader = open(job.log_path, errors="replace")
        reader.seek(0, os.SEEK_END)  # only what this run logs
        print(f"+ [{job.label}] " + " ".join(job.cmd) + f"   (log: {job.log_path})", file=out, flush=True)
        proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        running[job.label] = (job, proc, log, job.follower(), reader, time.time())

    waiting = []
    for job in jobs:
        if job.start_after and not os.path.exists(job.start_after):
            print(f"  [{job.label}] starts once {job.start_after} exists", file=out, flush=True)
            waiting.append(job)
        else:
            launch(job)
    seconds, next_report = {}, start + every
    try:
        while running or waiting:
            for job in [j for j in waiting if os.path.exists(j.start_after)]:
                waiting.remove(job)
                launch(job)
            if waiting and not running:
                raise JobFailed(
                    f"{', '.join(j.label for j in waiting)}: waited for "
                    f"{', '.join(j.start_after for j in waiting)}, which no job made"
                )
            time.sleep(poll)
            now = time.time()
            for label in list(running):
                job, proc, log, follower, reader, began = running[label]
                follower.read(reader.read(), now)
                if proc.poll() is None:
                    continue
                log.close()
                reader.close()
                del running[label]
                seconds[label] = now - began
                if proc.returncode != 0:
                    with open(job.log_path, errors="replace") as f:
                        out.write(f.read()[-4000:])
                    raise JobFailed(f"{label} failed (exit {proc.returncode}): see {job.log_path}")
                print(f"  [{label}] done in {format_seconds(seconds[label])}", file=out, flush=True)
            if running and now >= next_report:
                next_report = now + every
                for job, _, _, follower, _, began in running.values():
                    print(
                        f"  [{job.label} {format_seconds(now - began)}] {follower.describe()}   (log: {job.log_path})",
                        file=out,
                        flush=True,
                    )
                for job in waiting:
                    print(f"  [{job.label}] waiting for {job.start_after}", file=out, flush=True)
    finally:
        for job, proc, log, _, reader, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
            reader.close()
    return seconds


def run_job(job: LoggedJob, every: Optional[float] = None, out=None) -> float:
    """One job with progress lines (see :func:`run_jobs`); returns its seconds."""
    return run_jobs([job], every=every, out=out)[job.label]
