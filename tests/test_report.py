"""The job as a picture: the plotting core (scales, ticks, the time axis, sparklines), the
timeline built from timeline.jsonl, ``status --timeline``, ``stats`` sparklines and ``report``'s
HTML page (escaped, parser-valid, self-contained).

A real job's report, screenshotted by headless Chromium, is in test_report_e2e.py and
test_report_screenshot_e2e.py.
"""
import html.parser
import json
import math
import os
import re
import time

import pytest

import hpc_compose

from test_tracking import make_record

# timeline.jsonl of a real job (db with log readiness, worker restarted once then failed, monitor).
TIMELINE = """\
{"at_ms": 1796559267247, "status": "running", "exit_code": null, "services": [["waiting", 0, null], ["waiting", 0, null], ["waiting", 0, null]]}
{"at_ms": 1796559267477, "status": "running", "exit_code": null, "services": [["starting", 1, null], ["waiting", 0, null], ["running", 1, null]]}
{"at_ms": 1796559270800, "status": "running", "exit_code": null, "services": [["ready", 1, null], ["running", 1, null], ["running", 1, null]]}
{"at_ms": 1796559274114, "status": "running", "exit_code": null, "services": [["ready", 1, null], ["restarting", 1, 3], ["running", 1, null]]}
{"at_ms": 1796559275167, "status": "running", "exit_code": null, "services": [["ready", 1, null], ["running", 2, null], ["running", 1, null]]}
{"at_ms": 1796559279163, "status": "running", "exit_code": null, "services": [["stopped", 1, null], ["failed", 2, 3], ["stopped", 1, null]]}
{"at_ms": 1796559279461, "status": "failed", "exit_code": 3, "services": [["stopped", 1, 143], ["failed", 2, 3], ["stopped", 1, 143]]}
"""
START = 1796559267247
END = 1796559279461


def state(names=("db", "worker", "monitor"), status="failed", failed=("worker",)):
    return {"status": status, "exit_code": 3, "attempt": 0, "signals": [],
            "reason": "service 'worker' exited with code 3",
            "services": [{"name": n, "status": "failed" if n in failed else "stopped",
                          "placement": {"nodelist": "n1"}} for n in names]}


def records():
    return [json.loads(line) for line in TIMELINE.splitlines()]


# --- the plotting core -----------------------------------------------------------------------

def test_nice_ticks_round_the_domain_outwards_to_a_1_2_5_step():
    low, high, ticks = hpc_compose._nice_ticks(0.3, 9.2, 5)
    assert (low, high) == (0.0, 10.0)
    assert ticks == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_nice_ticks_of_one_value_still_make_an_axis_around_it():
    low, high, ticks = hpc_compose._nice_ticks(5.0, 5.0)
    assert low <= 5.0 < high and len(ticks) >= 2
    assert hpc_compose._nice_ticks(0.0, 0.0)[:2] == (0.0, 1.0)


def test_nice_ticks_without_finite_bounds_fall_back_to_zero_to_one():
    for bounds in ((float("nan"), float("nan")), (None, None), (float("inf"), float("-inf"))):
        assert hpc_compose._nice_ticks(*bounds)[:2] == (0.0, 1.0)
    low, high, _ = hpc_compose._nice_ticks(float("nan"), 7.0)
    assert low <= 7.0 <= high


def test_nice_ticks_of_huge_and_negative_values_stay_few_and_finite():
    low, high, ticks = hpc_compose._nice_ticks(0, 3.7e18)
    assert high >= 3.7e18 and 2 <= len(ticks) <= 22 and all(math.isfinite(t) for t in ticks)
    low, high, ticks = hpc_compose._nice_ticks(-3, 12, 5)
    assert low <= -3 and high >= 12 and 0.0 in ticks


def test_scale_maps_the_domain_linearly_and_a_point_domain_to_the_middle():
    assert hpc_compose._scale(5, (0, 10), (100, 200)) == 150
    assert hpc_compose._scale(0, (0, 10), (200, 100)) == 200
    assert hpc_compose._scale(3, (3, 3), (0, 50)) == 25


def test_tick_labels_shorten_huge_numbers():
    assert [hpc_compose._format_number(v) for v in (0, 0.5, 1500, 2.5e6, 3e9, 4e18)] == [
        "0", "0.5", "1,500", "2.5M", "3G", "4e+18"]


def test_time_ticks_are_round_elapsed_times_from_the_start():
    ticks = hpc_compose._time_ticks(1000, 1000 + 150000, 6)
    assert [label for _, label in ticks] == ["0s", "30s", "1m", "1m30s", "2m", "2m30s"]
    assert ticks[1][0] == 31000
    assert [label for _, label in hpc_compose._time_ticks(0, 0)] == ["0s", "1s"]
    assert hpc_compose._format_elapsed(3900) == "1h05m"


def test_sparkline_of_no_values_is_empty_and_of_one_value_is_one_mid_block():
    assert hpc_compose._format_sparkline([]) == ""
    assert hpc_compose._format_sparkline([float("nan"), None]) == ""
    assert hpc_compose._format_sparkline([7.0]) == hpc_compose._SPARK_UNICODE[4]


def test_sparkline_rises_with_the_values_and_leaves_nan_blank():
    assert hpc_compose._format_sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == hpc_compose._SPARK_UNICODE
    assert hpc_compose._format_sparkline([0, float("nan"), 7], ascii_only=True) == "_ #"


def test_sparkline_fits_its_width_whatever_the_number_of_samples():
    line = hpc_compose._format_sparkline(list(range(10000)) + [1e300], 20)
    assert len(line) == 20


def test_ascii_is_chosen_under_lang_c_even_after_pythons_utf8_coercion():
    wants = hpc_compose._text_wants_ascii
    assert wants(None, {"LANG": "C"})
    assert wants(None, {"LANG": "C", "LC_CTYPE": "C.UTF-8"})  # PEP 538
    assert wants(None, {})
    assert not wants(None, {"LANG": "en_US.UTF-8"})
    assert wants(None, {"LANG": "en_US.UTF-8", "LC_ALL": "C"})


# --- the timeline ----------------------------------------------------------------------------

def test_timeline_rows_follow_the_services_phases_restarts_and_exits():
    timeline = hpc_compose._build_timeline(records(), state(), now_ms=END + 99999)
    assert (timeline.start_ms, timeline.end_ms, timeline.status) == (START, END, "failed")
    db, worker, monitor = timeline.services
    assert [s.phase for s in db.spans] == ["waiting", "starting", "ready"]
    assert [s.phase for s in worker.spans] == ["waiting", "running", "restarting", "running",
                                               "failed"]
    assert [s.phase for s in monitor.spans] == ["waiting", "running"]
    assert [e.kind for e in worker.events] == ["launch", "exit", "restart", "exit"]
    assert worker.failed and worker.last_exit_code == 3
    assert not db.failed and [e.kind for e in db.events] == ["launch", "ready"]
    assert [e.kind for e in timeline.events] == ["start", "end"]


def test_a_running_job_s_timeline_reaches_now():
    timeline = hpc_compose._build_timeline(records()[:3], state(status="running"), now_ms=START + 9000)
    assert timeline.end_ms == START + 9000
    assert timeline.services[0].spans[-1] == hpc_compose._TimelineSpan("ready", 1796559270800,
                                                                     START + 9000)


def test_without_timeline_jsonl_the_timeline_comes_from_state_json_times():
    old = state()
    old["services"][1].update(started_at="2026-12-06T12:14:35+00:00",
                              finished_at="2026-12-06T12:14:38+00:00", last_exit_code=3)
    timeline = hpc_compose._build_timeline([], old, now_ms=0)
    assert timeline.source == "state"
    assert timeline.services[1].spans[0].end_ms - timeline.services[1].spans[0].start_ms == 3000
    assert hpc_compose._build_timeline([], None, 0).start_ms is None


def test_timeline_text_fits_80_columns_in_unicode_and_ascii():
    timeline = hpc_compose._build_timeline(records(), state(names=("db", "a-very-long-service-name",
                                                                   "monitor")), 0)
    for ascii_only in (False, True):
        text = hpc_compose._format_timeline_text(timeline, 80, ascii_only)
        assert all(len(line) <= 80 for line in text.splitlines()), text
        assert "FAILED 3" in text
    ascii_text = hpc_compose._format_timeline_text(timeline, 80, True)
    assert all(ord(c) < 128 for c in ascii_text)
    assert re.search(r"^a-very-long-ser~ \|\.+=+r+R=+X", ascii_text, re.M)


def test_timeline_text_of_a_job_that_has_not_started_says_so():
    empty = hpc_compose._build_timeline([], None, 0)
    assert "not started" in hpc_compose._format_timeline_text(empty)


# --- charts and sparklines -------------------------------------------------------------------

def write_samples(job_dir):
    os.makedirs(os.path.join(job_dir, "metrics"), exist_ok=True)
    rows = [{"sampled_at": "2026-12-06T12:14:%02dZ" % second, "step_id": "5.%d" % step,
             "ntasks": "2", "ave_cpu": "00:00:%02d" % (second - 28), "ave_rss": str(1048576 * second)}
            for second in (28, 30, 32) for step in (0, 1)]
    with open(os.path.join(job_dir, "metrics", "slurm.jsonl"), "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows) + '{"half written')
    gpus = [{"sampled_at": "2026-12-06T12:14:30Z", "index": "0", "utilization_gpu": "37",
             "memory_used_mib": "1024"},
            {"sampled_at": "2026-12-06T12:14:30Z", "index": "1", "utilization_gpu": "[N/A]",
             "memory_used_mib": "0"}]
    with open(os.path.join(job_dir, "metrics", "gpu.jsonl"), "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in gpus))


def test_charts_turn_cpu_time_into_cores_and_rss_into_mib(tmp_path):
    write_samples(str(tmp_path))
    charts = hpc_compose._load_charts(str(tmp_path), {"5.1": "db"})
    cpu, rss, gpu, gpu_memory = charts
    assert [s.label for s in cpu.series] == ["step 5.0", "db (1)"]
    assert [v for _, v in cpu.series[0].points] == [2.0, 2.0]   # 2 tasks, 2 s each per 2 s
    assert [v for _, v in rss.series[0].points] == [28.0, 30.0, 32.0]
    assert [s.points for s in gpu.series] == [((1796559270000, 37.0),), ()]
    assert gpu_memory.unit == "MiB"


def test_sparklines_carry_min_max_last_in_80_columns(tmp_path):
    write_samples(str(tmp_path))
    text = hpc_compose._format_chart_sparklines(hpc_compose._load_charts(str(tmp_path)), 80, True)
    assert "min 28 max 32 last 32" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "(no samples)" in text   # GPU 1 never had a utilisation figure


def test_chart_svg_of_one_point_draws_a_dot_and_of_no_point_nothing():
    chart = hpc_compose._Chart("CPU", "cores", (hpc_compose._ChartSeries("a", ((1000, 3.0),)),
                                               hpc_compose._ChartSeries("b", ())))
    svg = hpc_compose._format_chart_svg(chart, 0, 5000)
    assert svg.count("<circle") == 1 and "<polyline" not in svg


# --- the HTML page ---------------------------------------------------------------------------

class _TagChecker(html.parser.HTMLParser):
    """Every opened tag closed in order (void elements aside); records attributes."""
    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self):
        html.parser.HTMLParser.__init__(self)
        self.stack, self.errors, self.attributes = [], [], []

    def handle_starttag(self, tag, attrs):
        self.attributes += attrs
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.attributes += attrs

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append("</%s> closes %s" % (tag, self.stack[-1:] or "nothing"))
        else:
            self.stack.pop()


def check_page(page):
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    return checker


def html_page(names=("db", "worker", "monitor"), logs=None, charts=()):
    timeline = hpc_compose._build_timeline(records(), state(names=names, failed=(names[1],)), 0)
    facts = [("job", "rpt (1549)"), ("runtime", "failed")]
    logs = logs if logs is not None else [(n, n == names[1], ["line of " + n]) for n in names]
    return hpc_compose._format_report_html(facts, timeline, list(charts), logs, "no samples here")


def test_report_page_is_valid_and_self_contained():
    page = html_page()
    checker = check_page(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    for name, value in checker.attributes:
        if name in ("src", "href"):
            pytest.fail("external reference %s=%s" % (name, value))
    assert "@import" not in page and "url(http" not in page


def test_report_page_escapes_service_names_and_log_lines():
    hostile = '<img src=x onerror="alert(1)">&amp;'
    page = html_page(names=("db", hostile, "m"),
                     logs=[(hostile, True, ["</pre><script>alert(2)</script>", hostile])])
    check_page(page)
    assert "<img" not in page and "<script" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;amp;" in page


def test_report_page_marks_the_failing_service_and_its_log():
    page = html_page()
    assert page.count('class="badge"') == 3
    assert page.count('fill="%s"/>' % hpc_compose._SERVICE_FAILED_COLOUR) == 1
    assert '<div class="log failed"><h3>worker</h3>' in page


def test_report_page_without_samples_says_so_and_still_draws_the_timeline():
    page = html_page()
    assert "no samples here" in page and 'aria-label="timeline"' in page


def test_report_output_does_not_depend_on_the_hash_seed(tmp_path):
    page = html_page()
    assert page == html_page()


# --- the commands ----------------------------------------------------------------------------

def tracked_job(hc, tmp_path, samples=True):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, 1549, services=[("db", "db"), ("worker", "worker"),
                                                   ("monitor", "monitor")], job_name="rpt")
    hc._record_job(str(tmp_path), record)
    os.makedirs(os.path.join(record["job_dir"], "logs"))
    for name in ("db", "worker", "monitor"):
        with open(os.path.join(record["job_dir"], "logs", name + ".log"), "w") as handle:
            handle.write("first line of %s\n<last> line of %s\n" % (name, name))
    with open(os.path.join(record["job_dir"], "timeline.jsonl"), "w") as handle:
        handle.write(TIMELINE)
    with open(os.path.join(record["job_dir"], "state.json"), "w") as handle:
        json.dump(state(), handle)
    if samples:
        write_samples(record["job_dir"])
    return record


NO_TOOLS = ["--squeue-bin", "/nonexistent/squeue", "--sacct-bin", "/nonexistent/sacct"]


def test_report_command_writes_the_page_for_the_latest_or_a_named_job(hc, cli, tmp_path):
    tracked_job(hc, tmp_path)
    compose = str(tmp_path / "compose.yaml")
    out = tmp_path / "r.html"
    result = cli(["report", "-f", compose, "-o", str(out)] + NO_TOOLS)
    assert result.code == 0, result
    page = out.read_text()
    check_page(page)
    assert "&lt;last&gt; line of worker" in page and "CPU (cores)" in page
    result = cli(["report", "1549", "-f", compose, "-o", "-"] + NO_TOOLS)
    assert result.code == 0 and result.out.startswith("<!DOCTYPE html>")
    result = cli(["report", "1549", "--job-id", "7", "-f", compose] + NO_TOOLS)
    assert result.code == 2 and "differ" in result.err


def test_status_timeline_and_stats_sparklines_print_in_80_columns_under_lang_c(hc, cli, tmp_path):
    tracked_job(hc, tmp_path)
    compose = str(tmp_path / "compose.yaml")
    environment = {"LANG": "C", "LC_ALL": "", "LC_CTYPE": ""}
    result = cli(["status", "--timeline", "-f", compose] + NO_TOOLS, env=environment)
    assert result.code == 0, result
    timeline = result.out[result.out.index("timeline of the job"):]
    assert all(len(line) <= 80 and ord(max(line or " ")) < 128 for line in timeline.splitlines())
    assert re.search(r"^worker +\|", timeline, re.M)
    result = cli(["stats", "-f", compose, "--sstat-bin", "/nonexistent/sstat"] + NO_TOOLS,
                 env=environment)
    assert result.code == 0, result
    assert "Memory (RSS) (MiB):" in result.out and "last 32" in result.out


def test_status_timeline_json_is_the_timeline(hc, cli, tmp_path):
    tracked_job(hc, tmp_path, samples=False)
    result = cli(["status", "--timeline", "--format", "json", "-f", str(tmp_path / "compose.yaml")]
                 + NO_TOOLS)
    data = json.loads(result.out)
    assert [s["name"] for s in data["services"]] == ["db", "worker", "monitor"]
    assert data["services"][1]["failed"] is True


def test_watch_redraws_until_the_job_has_ended(hc, cli, tmp_path):
    tracked_job(hc, tmp_path)
    result = cli(["status", "--timeline", "--watch", "0.01", "-f", str(tmp_path / "compose.yaml")]
                 + NO_TOOLS)
    assert result.code == 0 and result.out.count("timeline of the job") == 1
    result = cli(["stats", "--watch", "0", "-f", str(tmp_path / "compose.yaml")] + NO_TOOLS)
    assert result.code == 2


def test_thinned_chart_points_keep_each_runs_peak():
    points = [(t, 1.0) for t in range(1000)]
    points[500] = (500, 99.0)
    thinned = hpc_compose._thin_points(points, 100)
    assert len(thinned) == 100 and max(v for _, v in thinned) == 99.0
    assert hpc_compose._thin_points(points[:3], 100) == points[:3]


def test_signals_the_job_received_are_job_events_on_the_timeline():
    signalled = state()
    signalled["signals"] = [{"signal": "USR1", "received_at": "2026-12-06T12:14:33+00:00",
                             "action": "forward"}]
    timeline = hpc_compose._build_timeline(records(), signalled, 0)
    assert [e.text for e in timeline.events] == ["job start", "SIGUSR1 (forward)", "job failed"]


def test_a_report_that_cannot_be_written_is_one_error_with_a_hint(hc, cli, tmp_path):
    tracked_job(hc, tmp_path, samples=False)
    (tmp_path / "file").write_text("")
    result = cli(["report", "-f", str(tmp_path / "compose.yaml"), "-o",
                  str(tmp_path / "file" / "r.html")] + NO_TOOLS)
    assert result.code == 1 and "cannot write the report" in result.err
    assert "Traceback" not in result.err and "-o FILE" in result.err
