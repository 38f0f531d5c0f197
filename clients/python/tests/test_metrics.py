"""The daemon's Prometheus listener, scraped over HTTP and parsed with prometheus_client's own text parser."""

import socket
import urllib.request
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_a_scrape_parses_and_counts_what_the_client_did(make_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    d = make_daemon(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    with d.client() as c:
        with c.session() as s:
            assert s.run("echo hi").stdout == b"hi\n"
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {
        sample.name: sample.value for family in families.values() for sample in family.samples
    }
    # Counters and gauges of system.stats, with what this test did in them.
    assert samples["sessiond_sessions_created_total"] >= 1
    assert samples["sessiond_commands_started_total"] >= 1
    assert samples["sessiond_commands_completed_total"] >= 1
    # A latency histogram with its buckets, count and sum.
    histograms = [f for f in families.values() if f.type == "histogram"]
    assert histograms, f"no histogram among {sorted(families)}"
    assert any(s.name.endswith("_bucket") for s in histograms[0].samples)
    # Every family carries help text and a type.
    for family in families.values():
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram", "untyped"), family.name
