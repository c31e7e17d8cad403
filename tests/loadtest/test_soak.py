"""The soak script end to end, cut short: a `loradock serve` with tenants (tiny llama, five adapters, four slots)
under 8 requests in flight for 3 + 6 s with adapter churn, hang-ups, a rate-limited tenant and SIGHUPs, then back to
idle. About 30 s (a server start, five peft adapters, the load and its drain). RSS drift over 6 s says nothing
about leaks, so its limit is lifted here; the 10-minute run is the real check."""

from __future__ import annotations

import json

from loradock.loadtest import soak


def test_a_short_soak_passes_and_reports(model_dir, tmp_path):
    out = tmp_path / "soak.json"
    status = soak.main(["--model", str(model_dir("llama")), "--minutes", "0.1", "--concurrency", "8", "--warmup", "3",
                        "--hup-every", "2", "--max-rss-drift", "1", "--work-dir", str(tmp_path / "work"),
                        "--json", str(out)])
    result = json.loads(out.read_text())
    assert status == 0, result["failures"]
    assert result["idle"]["idle"] and result["idle"]["adapter_pins"] == 0 and result["idle"]["kv_cache_usage"] == 0
    assert result["per_tenant"]["hang-up"]["errors_by_status"].get("hung_up", 0) > 0
    assert result["per_tenant"]["steady"]["ok"] > 0 and result["per_tenant"]["heavy"]["ok"] > 0
    assert result["admin_calls"] and result["sighups"] >= 1
    assert result["rss_bytes"]["end"] > 0
