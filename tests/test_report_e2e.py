"""``report``, ``status --timeline`` and ``stats`` sparklines of a real job on the test cluster.

One job (module fixture) serves every test here: three host-runtime services on one node, ``db``
with a log readiness wait, ``worker`` that starts once db is ready, fails, is restarted once and
fails again (so the job fails, exit 3), and ``monitor`` running beside them; the metrics sampler
every second. The job takes about 15 s.

The page's screenshot in headless Chromium (Debian's ``chromium``, which ``.ci/run`` installs on
the host) is checked pixel by pixel at the report's fixed layout. Chromium is not in the newer Slurm
generations' roots, so that test is collected only on the host's cluster (HPC_COMPOSE_TEST_SLURM
unset or 22.05) and there, under CI=true, it is required: collected, never skipped.
"""
import html.parser
import os
import shutil
import struct
import subprocess
import tempfile
import zlib

import pytest

import hpc_compose
from slurm_support import REPO_ROOT, cancel_job, run_tool_cli, submitted_job_id, wait_for_job


COMPOSE = """\
name: rpt
x-slurm:
  job_name: rpt
  runtime: host
  time: "00:05:00"
  cpus_per_task: 1
  mem: 256M
  metrics:
    interval_seconds: 1
    collectors: [slurm]
services:
  db:
    command: "echo starting-db; sleep 3; echo db-ready; sleep 120"
    readiness:
      type: log
      pattern: db-ready
      timeout_seconds: 60
  worker:
    depends_on:
      db:
        condition: service_healthy
    command: "echo 'working <b>&amp;</b>'; python3 -c 'sum(range(20000000))'; exit 3"
    x-slurm:
      failure_policy:
        mode: restart_on_failure
        max_restarts: 1
        backoff_seconds: 1
  monitor:
    command: "echo monitoring; sleep 120"
"""
SERVICES = ["db", "worker", "monitor"]


class FinishedJob(object):
    def __init__(self, directory, job_id, up):
        self.directory, self.job_id, self.up = directory, job_id, up
        self.compose = os.path.join(directory, "compose.yaml")


@pytest.fixture(scope="module")
def finished_job(slurm, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("report"))
    with open(os.path.join(directory, "compose.yaml"), "w") as handle:
        handle.write(COMPOSE)
    result = run_tool_cli(["up", "-f", "compose.yaml"], cwd=directory, timeout=300)
    job_id = submitted_job_id(result.out)
    try:
        assert wait_for_job(job_id, timeout=120) == "FAILED", result
    finally:
        cancel_job(job_id)
    assert result.code != 0, result
    return FinishedJob(directory, job_id, result)


def write_report(job, name="report.html"):
    path = os.path.join(job.directory, name)
    result = run_tool_cli(["report", job.job_id, "-f", job.compose, "-o", path], cwd=job.directory)
    assert result.code == 0, result
    with open(path, encoding="utf-8") as handle:
        return path, handle.read()


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        html.parser.HTMLParser.__init__(self)
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag != "meta":
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.errors.append(tag)


def test_report_of_a_real_job_has_its_timeline_charts_and_logs(finished_job):
    _, page = write_report(finished_job)
    tags = _Tags()
    tags.feed(page)
    tags.close()
    assert tags.errors == [] and tags.stack == []
    assert "<script" not in page
    rows = [page.index("<text x=\"24\" y=\"%d\"" % (hpc_compose._GANTT_TOP + i * 30 + 20))
            for i in range(3)]
    assert rows == sorted(rows)
    assert [page[r:page.index("</text>", r)].rsplit(">", 1)[1] for r in rows] == [
        "db", "worker \u2717", "monitor"]
    # Steps named for their services: db and monitor run to the end, so the 1 s sampler sees
    # them; the worker lives about a second per launch, which a loaded node may not sample.
    assert "Memory (RSS) (MiB)" in page and "db (" in page and "monitor (" in page
    assert "working &lt;b&gt;&amp;amp;&lt;/b&gt;" in page
    assert '<div class="log failed"><h3>worker</h3>' in page


def test_status_timeline_and_stats_sparklines_of_a_real_job_fit_80_columns_in_ascii(finished_job):
    environment = {"LANG": "C", "LC_ALL": "", "LC_CTYPE": ""}
    result = run_tool_cli(["status", "--timeline", "--job-id", finished_job.job_id, "-f",
                           finished_job.compose], cwd=finished_job.directory, env=environment)
    assert result.code == 0, result
    timeline = result.out[result.out.index("timeline of the job: failed (exit code 3)"):]
    lines = timeline.splitlines()
    assert all(len(line) <= 80 and all(ord(c) < 128 for c in line) for line in lines), timeline
    assert [line.split(" ", 1)[0] for line in lines[1:4]] == SERVICES
    assert "-#" in lines[1]                    # db: starting, then ready
    assert "R" in lines[2] and lines[2].endswith("FAILED 3")
    result = run_tool_cli(["stats", "--job-id", finished_job.job_id, "-f", finished_job.compose],
                          cwd=finished_job.directory, env=environment)
    assert result.code == 0, result
    sparklines = [line for line in result.out.splitlines() if " last " in line]
    assert sparklines and all(len(line) <= 80 for line in sparklines), result.out


# --- the screenshot ---------------------------------------------------------------------------

def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


_HOST_CLUSTER = os.environ.get("HPC_COMPOSE_TEST_SLURM", "") in ("", "22.05")
SCREENSHOT_WIDTH, SCREENSHOT_HEIGHT = 1000, 960
BODY_MARGIN = 24   # the page's body margin (_REPORT_STYLE)


def load_png(path):
    """``(width, height, rows of (r, g, b) tuples)`` of an 8-bit RGB or RGBA, non-interlaced PNG."""
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, [], None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    size = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * size
    previous = bytearray(stride)
    rows = []
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(size, stride):
                line[i] = (line[i] + line[i - size]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                left = line[i - size] if i >= size else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - size] if i >= size else 0
                b, c = previous[i], previous[i - size] if i >= size else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, size)])
        previous = line
    return width, height, rows


def near(pixel, colour, tolerance=12):
    target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, target))


def runs(column, colours):
    """``[(colour, first y, last y)]``: vertical runs of pixels near one of ``colours``."""
    found = []
    for y, pixel in enumerate(column):
        colour = next((c for c in colours if near(pixel, c)), None)
        if colour is None:
            continue
        if found and found[-1][0] == colour and found[-1][2] == y - 1:
            found[-1] = (colour, found[-1][1], y)
        else:
            found.append((colour, y, y))
    return found


def screenshot(page_path, png_path):
    profile = tempfile.mkdtemp(prefix="hpc-compose-chromium-")
    try:
        result = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
             "--user-data-dir=" + profile, "--screenshot=" + png_path,
             "--window-size=%d,%d" % (SCREENSHOT_WIDTH, SCREENSHOT_HEIGHT),
             "file://" + page_path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert os.path.exists(png_path), result.stderr[-2000:]


if _HOST_CLUSTER and (_chromium() or os.environ.get("CI") == "true"):
    def test_report_screenshot_shows_one_bar_per_service_in_order_and_marks_the_failing_one(
            finished_job):
        assert _chromium(), "chromium is not installed (apt-get install -y chromium)"
        page_path, _ = write_report(finished_job)
        png_path = os.path.join(finished_job.directory, "report.png")
        screenshot(page_path, png_path)
        width, height, rows = load_png(png_path)
        assert (width, height) == (SCREENSHOT_WIDTH, SCREENSHOT_HEIGHT)
        # Not blank: many colours, a good share of the pixels not white.
        sample = [pixel for row in rows[::8] for pixel in row[::8]]
        assert len(set(sample)) > 20
        assert sum(1 for p in sample if p != (255, 255, 255)) > len(sample) // 20
        # The badges: one square per service down the label column, the failing one vermillion.
        badge_x = BODY_MARGIN + 4 + 7
        ok, failed = hpc_compose._SERVICE_OK_COLOUR, hpc_compose._SERVICE_FAILED_COLOUR
        badges = runs([row[badge_x] for row in rows], (ok, failed))
        assert [colour for colour, _, _ in badges] == [ok, failed, ok], badges
        assert all(12 <= last - first + 1 <= 16 for _, first, last in badges), badges
        # One bar per row in the bar area, in its phase colours; the worker's ends failed.
        x0 = BODY_MARGIN + hpc_compose._GANTT_LABEL_WIDTH
        phases = [hpc_compose._PHASE_COLOURS[p] for p in ("starting", "running", "ready",
                                                          "restarting", "failed")]
        for (_, first, last), name in zip(badges, ("db", "worker", "monitor")):
            row = rows[(first + last) // 2]
            coloured = [x for x in range(x0, x0 + hpc_compose._GANTT_BAR_WIDTH)
                        if any(near(row[x], c) for c in phases)]
            assert len(coloured) > hpc_compose._GANTT_BAR_WIDTH // 10, (name, len(coloured))
            if name == "worker":
                tail = row[x0 + hpc_compose._GANTT_BAR_WIDTH - 4]
                assert near(tail, hpc_compose._PHASE_COLOURS["failed"]), tail
                assert any(near(row[x], hpc_compose._PHASE_COLOURS["restarting"])
                           for x in range(x0, x0 + hpc_compose._GANTT_BAR_WIDTH))
        if os.environ.get("HPC_COMPOSE_UPDATE_SCREENSHOT"):
            shutil.copyfile(png_path, os.path.join(REPO_ROOT, "docs", "images", "report.png"))
