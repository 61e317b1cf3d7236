"""Progress of long jobs (cmd_plugin/progress.py): what is read from fairseq's log lines, how a nested
job's progress is passed on, and jobs run side by side with a line per period naming their logs."""

import io
import sys
import time

import pytest

from cmd_plugin.progress import (
    CountProgress,
    FairseqProgress,
    JobFailed,
    LatestLine,
    LoggedJob,
    format_seconds,
    run_jobs,
)

TRAIN_LINE = (
    "[2026-11-22 12:53:10,493][train_inner][INFO] - epoch 001:     {n} / 157 loss=10.48, sic_loss=5.99, "
    "num_updates={n}, lr=0.0004, gnorm=68.845, train_wall=12, wall=12"
)
VALID_LINE = (
    "[2026-11-22 12:55:59,001][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 6.07 | "
    "mean_r1 {r} | mean_r10 90.1 | wps 1.2e+06 | num_updates {n}"
)


def test_fairseq_progress_reads_updates_the_latest_valid_figure_and_time_left():
    p = FairseqProgress(total_updates=1200, metric="mean_r1")
    assert p.describe() == "starting"
    p.read(TRAIN_LINE.format(n=10) + "\n", now=100.0)
    assert p.updates == 10 and p.seconds_left() is None  # one reading gives no rate
    p.read(TRAIN_LINE.format(n=20) + "\n" + TRAIN_LINE.format(n=30) + "\n", now=110.0)
    assert p.updates == 30
    assert p.seconds_left() == pytest.approx((1200 - 30) * 10.0 / 20)
    assert "no valid mean_r1 yet" in p.describe()
    p.read(VALID_LINE.format(r=52.3, n=157) + "\n", now=200.0)
    assert p.valid == 52.3 and p.updates == 157
    line = VALID_LINE.format(r=61.75, n=314)
    p.read(line[:-30], now=250.0)  # a line still being written is not read before its end
    assert p.valid == 52.3 and p.updates == 157
    p.read(line[-30:] + "\n", now=300.0)
    assert p.describe() == f"314/1200 updates, valid mean_r1 61.75, ~{format_seconds((1200 - 314) * 200 / 304)} left"


def test_a_valid_field_is_matched_whole_not_by_prefix():
    p = FairseqProgress(metric="uer")
    p.read(
        "[valid][INFO] - epoch 002 | valid on 'valid' subset | loss 1.2 | uer_raw 9.9 | uer 4.4 | num_updates 888\n",
        now=1.0,
    )
    assert p.valid == 4.4 and p.describe() == "888 updates, valid uer 4.4"


def test_a_nested_runner_passes_its_latest_line_on():
    follower = LatestLine()
    assert follower.describe() == "running"
    follower.read("+ /usr/bin/python learn_kmeans.py feats train 1\n\n", now=1.0)  # any other line, as it is
    assert follower.describe() == "+ /usr/bin/python learn_kmeans.py feats train 1"
    follower.read("x" * 500 + "\n", now=1.5)
    assert len(follower.describe()) == LatestLine.width and follower.describe().endswith("...")
    follower.read("+ [HuBERT pre-training] fairseq-hydra-train --config-dir x   (log: /w/pretrain.log)\n", now=2.0)
    assert follower.describe() == "HuBERT pre-training: started"
    report = "  [HuBERT pre-training 1m00s] 200/400 updates, valid loss 6.1, ~1m00s left   (log: /w/p.log)"
    follower.read(report[:20], now=3.0)  # a line still being written is not passed on cut short
    assert follower.describe() == "HuBERT pre-training: started"
    follower.read(report[20:] + "\n", now=3.5)
    assert follower.describe() == report.strip()


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return [sys.executable, str(path)]


def test_jobs_run_side_by_side_with_progress_lines_naming_their_logs(tmp_path):
    # each job says it started, then waits until the other one has started too: run one after the
    # other, the first would time out
    body = (
        "import os, sys, time\n"
        "mine, other = sys.argv[1], sys.argv[2]\n"
        "open(mine, 'w').close()\n"
        "deadline = time.time() + 20\n"
        "while not os.path.exists(other):\n"
        "    assert time.time() < deadline, 'the other job never started'\n"
        "    time.sleep(0.05)\n"
        "print('num_updates=5', flush=True); time.sleep(0.6); print('num_updates=10', flush=True)\n"
        "print('threads', os.environ.get('OMP_NUM_THREADS'), flush=True)\n"
    )
    cmd = _script(tmp_path, "job.py", body)
    a, b = str(tmp_path / "a.started"), str(tmp_path / "b.started")
    jobs = [
        LoggedJob("job a", cmd + [a, b], str(tmp_path / "logs" / "a.log"), total_updates=10, threads=1),
        LoggedJob("job b", cmd + [b, a], str(tmp_path / "logs" / "b.log")),
    ]
    out = io.StringIO()
    seconds = run_jobs(jobs, every=0.2, out=out, poll=0.05)
    assert set(seconds) == {"job a", "job b"}
    text = out.getvalue()
    assert f"(log: {tmp_path / 'logs' / 'a.log'})" in text and "[job a] done in" in text and "[job b] done in" in text
    assert "updates" in text  # a progress line of the fairseq-followed job
    assert "threads 1" in (tmp_path / "logs" / "a.log").read_text()


def test_a_failed_job_names_its_log_and_stops_the_others(tmp_path):
    slow = _script(tmp_path, "slow.py", "import time\nopen(__import__('sys').argv[1], 'w').close()\ntime.sleep(60)\n")
    bad = _script(tmp_path, "bad.py", "import sys, time\ntime.sleep(0.3)\nprint('something broke')\nsys.exit(3)\n")
    marker = tmp_path / "slow.started"
    out = io.StringIO()
    with pytest.raises(JobFailed, match=r"bad job failed \(exit 3\): see .*bad\.log"):
        run_jobs(
            [
                LoggedJob("slow job", slow + [str(marker)], str(tmp_path / "slow.log")),
                LoggedJob("bad job", bad, str(tmp_path / "bad.log")),
            ],
            every=60,
            out=out,
            poll=0.05,
        )
    assert "something broke" in out.getvalue()  # the failed log's end is shown


def test_an_appended_log_keeps_what_it_held_and_only_new_lines_are_read(tmp_path):
    log = tmp_path / "resumed.log"
    log.write_text(TRAIN_LINE.format(n=390) + "\n")
    cmd = _script(tmp_path, "more.py", "print('num_updates=395', flush=True)\n")
    out = io.StringIO()
    run_jobs([LoggedJob("resumed", cmd, str(log), total_updates=400, append=True)], every=60, out=out, poll=0.05)
    assert log.read_text().splitlines() == [TRAIN_LINE.format(n=390), "num_updates=395"]


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (59.6, "1m00s"), (61, "1m01s"), (3725, "1h02m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_a_count_progress_prints_at_the_period_with_time_left_and_closes_its_lines():
    lines = []
    progress = CountProgress("spoken captions", 4, "written", log=lines.append, every=0.0)
    progress.update(1)
    progress.update(4)
    assert lines[0].startswith("spoken captions: 1/4 written, ~") and lines[0].endswith(" left")
    assert lines[1] == "spoken captions: 4/4 written"  # the end says it is done, without a time left
    quiet = []
    progress = CountProgress("spoken captions", 4, "written", log=quiet.append, every=3600.0)
    for done in range(1, 5):
        progress.update(done)
    assert quiet == []  # a loop shorter than the period prints nothing


def test_a_job_held_back_starts_once_its_file_exists_and_fails_if_nothing_makes_it(tmp_path):
    # job a writes the marker half a second in; job b records when it started
    first = _script(
        tmp_path, "first.py", "import sys, time\ntime.sleep(0.5)\nopen(sys.argv[1], 'w').close()\ntime.sleep(0.3)\n"
    )
    second = _script(tmp_path, "second.py", "import sys, time\nopen(sys.argv[1], 'w').write(repr(time.time()))\n")
    marker, started = tmp_path / "stage.done", tmp_path / "b.started"
    out = io.StringIO()
    t0 = time.time()
    seconds = run_jobs(
        [
            LoggedJob("job a", first + [str(marker)], str(tmp_path / "a.log")),
            LoggedJob("job b", second + [str(started)], str(tmp_path / "b.log"), start_after=str(marker)),
        ],
        every=0.1,
        out=out,
        poll=0.05,
    )
    assert float(started.read_text()) - t0 >= 0.5  # not before the marker
    assert seconds["job b"] < seconds["job a"]  # its seconds count from its own start
    assert f"[job b] starts once {marker} exists" in out.getvalue()
    with pytest.raises(JobFailed, match=r"job c: waited for .*never\.done, which no job made"):
        run_jobs(
            [
                LoggedJob("job a", first + [str(tmp_path / "other.done")], str(tmp_path / "a2.log")),
                LoggedJob(
                    "job c", second + [str(started)], str(tmp_path / "c.log"), start_after=str(tmp_path / "never.done")
                ),
            ],
            every=60,
            out=io.StringIO(),
            poll=0.05,
        )
