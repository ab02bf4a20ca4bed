"""The parser of hey's summary in experiments/bench_serve_hey.py, on outputs hey 0.1.4 printed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_serve_hey.py"

# hey -z 8s -c 2 -q 150 -m POST -T application/json -D rank.json against the service (SQLite, 2 workers)
SERVICE = """
Summary:
  Total:	8.0224 secs
  Slowest:	0.0463 secs
  Fastest:	0.0012 secs
  Average:	0.0057 secs
  Requests/sec:	222.1267

  Total data:	2336030 bytes
  Size/request:	1310 bytes

Response time histogram:
  0.001 [1]	|
  0.006 [1296]	|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.046 [3]	|


Latency distribution:
  10% in 0.0014 secs
  25% in 0.0015 secs
  50% in 0.0019 secs
  75% in 0.0068 secs
  90% in 0.0170 secs
  95% in 0.0203 secs
  99% in 0.0306 secs

Details (average, fastest, slowest):
  DNS+dialup:	0.0000 secs, 0.0012 secs, 0.0463 secs
  DNS-lookup:	0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:	0.0000 secs, 0.0000 secs, 0.0001 secs
  resp wait:	0.0050 secs, 0.0012 secs, 0.0442 secs
  resp read:	0.0007 secs, 0.0000 secs, 0.0155 secs

Status code distribution:
  [200]	1782 responses



"""

# 80 answers: hey leaves p99 out ("0% in 0.0000 secs"); with a 503 and a timed-out request added
FEW_WITH_ERRORS = """
Latency distribution:
  10% in 0.0174 secs
  50% in 0.0367 secs
  95% in 0.0618 secs
  0% in 0.0000 secs

Status code distribution:
  [200]	79 responses
  [503]	1 responses

Error distribution:
  [1]	Post "http://127.0.0.1:8000/v1/rank": context deadline exceeded (Client.Timeout exceeded while awaiting headers)
"""

# nothing listens on the port
REFUSED = """
Summary:
  Total:	0.0003 secs
  Average:	 NaN secs
  Requests/sec:	10468.0985

Latency distribution:

Status code distribution:

Error distribution:
  [3]	Get "http://127.0.0.1:18778/": dial tcp 127.0.0.1:18778: connect: connection refused
"""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve_hey", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_of_a_run_gives_its_requests_and_percentiles_in_ms(bench):
    got = bench.parse_hey(SERVICE)
    assert (got["requests"], got["errors"], got["kinds"]) == (1782, 0, {})
    assert got["p50"] == pytest.approx(1.9) and got["p99"] == pytest.approx(30.6)
    assert got["rps"] == pytest.approx(222.1267)


def test_errors_are_non_200_answers_and_failed_requests_and_a_missing_p99_is_nan(bench):
    got = bench.parse_hey(FEW_WITH_ERRORS)
    assert got["requests"] == 81 and got["errors"] == 2
    assert got["kinds"] == {"timeout": 1, "503": 1}
    assert got["p50"] == pytest.approx(36.7) and math.isnan(got["p99"])


def test_a_run_without_answers(bench):
    got = bench.parse_hey(REFUSED)
    assert (got["requests"], got["errors"], got["kinds"]) == (3, 3, {"connection refused": 3})
    assert math.isnan(got["p50"]) and math.isnan(got["p99"])


def test_the_rate_is_split_over_heys_workers(bench):
    assert bench.hey_rate(300, 2) == (2, 150)
    with pytest.raises(ValueError):
        bench.hey_rate(100, 3)
