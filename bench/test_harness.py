"""Unit tests of the bench harness's verdicts: which targets a run meets, and when a miss is put
down to the machine (a ceiling computed from the run's own CPU figures) rather than excused.
Run by deploy/test: `python3 -m unittest bench/test_harness.py`."""

import importlib.util
import unittest
from pathlib import Path

spec = importlib.util.spec_from_file_location("harness", Path(__file__).with_name("harness.py"))
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)

H2 = "h2 keep-alive 1 KiB (-c50 -m10)"
H1 = "HTTP/1.1 keep-alive 1 KiB (-c50)"
NEW = "new TLS connection per request"


def row(system, workload, rps, loadgen=0.1, proxy=0.1, origin=0.05, hsm=0.0, **extra):
    """A measured row: CPU-seconds per 1k requests for client, proxy, origin and HSM workers."""
    return {"system": system, "workload": workload, "rps": rps, "requests": rps * 10, "p50_ms": 1.0, "p99_ms": 2.0,
            "loadgen_cpu_s_per_1k": loadgen, "proxy_cpu_s_per_1k": proxy, "origin_cpu_s_per_1k": origin,
            "hsm_cpu_s_per_1k": hsm, "peak_rss_mib": 50.0, "cpu_split_pct": {"loadgen": 30, "proxy": 50, "origin": 20},
            **extra}


def verdicts(rows, mint_micro=None):
    return {g["target"]: g for g in harness.targets(rows, mint_micro)}


class Targets(unittest.TestCase):
    def test_ratios_to_nginx_proxy_are_checked_against_the_same_run(self):
        goals = verdicts([row("nginx-proxy", H2, 20_000), row("tollgate", H2, 31_000),
                          row("nginx-proxy", H1, 40_000), row("tollgate", H1, 43_000)])
        self.assertTrue(goals[f"{H2}: >= 1.5x nginx-proxy"]["met"])
        self.assertEqual(goals[f"{H2}: >= 1.5x nginx-proxy"]["measured"], "1.55x")
        # HTTP/1.1 keep-alive wants a margin over nginx, not parity.
        self.assertFalse(goals[f"{H1}: >= 1.1x nginx-proxy"]["met"])

    def test_busy_polling_is_checked_against_off_under_load_and_at_light_load(self):
        goals = verdicts([row("nginx-proxy", H1, 20_000), row("tollgate", H1, 23_000),
                          row("tollgate-no-busy-poll", H1, 21_000)])
        gain = goals[f"{H1}: busy-polling (default) against busy_poll_us = 0, no slower (3 % noise)"]
        self.assertEqual(gain["measured"], "1.095x")
        self.assertTrue(gain["met"])
        # The default row is the one held to the ratio to nginx-proxy.
        self.assertEqual(goals[f"{H1}: >= 1.1x nginx-proxy"]["measured"], "1.15x")
        slower = verdicts([row("tollgate", H1, 20_000), row("tollgate-no-busy-poll", H1, 21_000)])
        self.assertFalse(slower[f"{H1}: busy-polling (default) against busy_poll_us = 0, no slower (3 % noise)"]["met"])

        light, heavy = harness.LIGHT_LOADS
        goals = verdicts([row("tollgate", light, 500, proxy=0.12), row("tollgate-no-busy-poll", light, 500, proxy=0.11),
                          row("tollgate", heavy, 5000, proxy=0.15), row("tollgate-no-busy-poll", heavy, 5000, proxy=0.10)])
        cheap = goals[f"{light}: busy-polling's CPU per request <= 1.25x busy_poll_us = 0"]
        self.assertEqual(cheap["measured"], "1.09x")
        self.assertTrue(cheap["met"])
        # Spinning through the gaps at moderate load shows as CPU per request, and fails.
        self.assertFalse(goals[f"{heavy}: busy-polling's CPU per request <= 1.25x busy_poll_us = 0"]["met"])

    def test_logged_rows_compare_with_nginx_logging_too(self):
        goals = verdicts([row("nginx-proxy-logged", H1, 30_000), row("tollgate-logged", H1, 31_000),
                          row("nginx-proxy-logged", NEW, 2_000), row("tollgate-logged", NEW, 1_900),
                          row("tollgate", H1, 32_000)])
        self.assertTrue(goals[f"{H1}, logs on: >= 1.0x nginx-proxy logging too"]["met"])
        self.assertFalse(goals[f"{NEW}, logs on: >= 1.0x nginx-proxy logging too"]["met"])
        self.assertTrue(goals[f"{H1}: access and decryption logs on within 5 % of off"]["met"])

    def test_a_policy_costs_at_most_three_percent(self):
        goals = verdicts([row("tollgate", H2, 30_000), row("tollgate-policy", H2, 29_200),
                          row("tollgate", NEW, 2_000), row("tollgate-policy", NEW, 1_900)])
        self.assertTrue(goals[f"{H2}: three rules and a 100k-entry list within 3 % of none"]["met"])
        self.assertEqual(goals[f"{NEW}: three rules and a 100k-entry list within 3 % of none"]["measured"], "0.950x")
        self.assertFalse(goals[f"{NEW}: three rules and a 100k-entry list within 3 % of none"]["met"])

    def test_logging_costs_at_most_five_percent(self):
        goals = verdicts([row("tollgate", H2, 30_000), row("tollgate-logged", H2, 29_000),
                          row("tollgate", NEW, 2_000), row("tollgate-logged", NEW, 1_800)])
        self.assertTrue(goals[f"{H2}: access and decryption logs on within 5 % of off"]["met"])
        self.assertEqual(goals[f"{NEW}: access and decryption logs on within 5 % of off"]["measured"], "0.900x")
        self.assertFalse(goals[f"{NEW}: access and decryption logs on within 5 % of off"]["met"])

    def test_a_miss_within_the_machines_reach_has_no_excuse(self):
        # Client + 2 x origin = 0.2 ms per request: 2 cores allow 10,000/s, above 20x mitmdump.
        goals = verdicts([row("tollgate", H2, 5_000), row("mitmdump", H2, 300)])
        goal = goals[f"{H2}: >= 20x mitmdump"]
        self.assertFalse(goal["met"])
        self.assertEqual(goal["note"], "")

    def test_a_miss_beyond_the_ceiling_says_so_with_the_figures(self):
        # Client + 2 x origin = 0.5 ms per request: 2 cores allow 4,000/s, below 20x 300.
        goals = verdicts([row("tollgate", H2, 3_500, loadgen=0.3, origin=0.1), row("mitmdump", H2, 300)])
        note = goals[f"{H2}: >= 20x mitmdump"]["note"]
        self.assertIn("out of reach: 20x mitmdump = 6,000/s", note)
        self.assertIn("4,000/s", note)

    def test_the_new_host_row_is_compared_with_mitmdump_against_two_handshakes(self):
        # nginx alone: client 0.2 + server 0.2 ms per handshake; a new host costs two: 0.8 ms,
        # so 2 cores allow 2,500/s, below 20x mitmdump's 200/s.
        rows = [row("nginx-origin", NEW, 4_000, loadgen=0.2, proxy=0.2, origin=0.0),
                row("tollgate", harness.NEW_HOST, 2_000, loadgen=0.25, proxy=0.5, origin=0.2, hsm=0.09,
                    raw_sign_rate=20_000, ratio_to_raw_sign=0.1),
                row("mitmdump", harness.NEW_HOST, 200)]
        goals = verdicts(rows)
        goal = goals[f"{harness.NEW_HOST}: >= 20x mitmdump"]
        self.assertFalse(goal["met"])
        self.assertEqual(goal["measured"], "10.0x")
        self.assertIn("two full handshakes", goal["note"])
        self.assertIn("2,500/s", goal["note"])
        # SoftHSM's share would not make up this miss, so it is not offered as the reason.
        self.assertNotIn("SoftHSM2", goal["note"])
        mint = goals["new-host mint end to end >= 0.8x raw SoftHSM sign"]
        self.assertIn("the ceiling is 2,500/s; measured 2,000/s = 80% of it", mint["note"])

    def test_softhsm_is_named_where_a_hardware_hsm_would_make_up_the_miss(self):
        inbound = "inbound: full handshake per request (HSM signs)"
        rows = [row("tollgate-inbound", inbound, 4_500, loadgen=0.18, proxy=0.24, origin=0.02, hsm=0.07),
                row("nginx-origin", inbound, 4_000, loadgen=0.18, proxy=0.29, origin=0.0),
                row("mitmdump", inbound, 250)]
        note = verdicts(rows)[f"{inbound}: >= 20x mitmdump"]["note"]
        self.assertIn("SoftHSM2's signing takes 0.070 ms", note)
        # Client 0.18 + nginx's handshake 0.29 + origin 0.02 ms: 4,082/s on 2 cores, which
        # tollgate already beats, so it is not offered as tollgate's ceiling.
        self.assertNotIn("out of reach", note)
        slower = [row("tollgate-inbound", inbound, 3_900, loadgen=0.18, proxy=0.3, origin=0.02, hsm=0.07), *rows[1:]]
        note = verdicts(slower)[f"{inbound}: >= 20x mitmdump"]["note"]
        self.assertIn("out of reach: 20x mitmdump = 5,000/s", note)
        self.assertIn("a server whose handshake costs what nginx's own does (software key) tops out at 4,082/s", note)

    def test_the_software_key_site_shows_what_the_hsm_costs(self):
        inbound = harness.INBOUND_FULL
        rows = [row("tollgate-inbound", inbound, 4_500, loadgen=0.18, proxy=0.21, origin=0.02, hsm=0.07),
                row("tollgate-inbound-software", inbound, 6_800, loadgen=0.17, proxy=0.12, origin=0.02),
                row("mitmdump", inbound, 260)]
        goals = harness.targets(rows, None)
        against_mitmdump = [g for g in goals if g["target"] == f"{inbound}: >= 20x mitmdump"]
        # The software-key site is a reference, with no target of its own.
        self.assertEqual(len(against_mitmdump), 1)
        self.assertEqual(against_mitmdump[0]["measured"], "17.3x")
        note = against_mitmdump[0]["note"]
        self.assertIn("the same listener with the key in software: 6,800/s = 26.2x mitmdump", note)
        self.assertIn("the key on the HSM costs tollgate 0.090 ms more CPU per handshake", note)


class Table(unittest.TestCase):
    def test_every_proxy_row_shows_its_ratio_to_mitmdump_and_leaf_memory_is_reported(self):
        rows = [row("nginx-proxy", NEW, 3_000), row("tollgate", NEW, 6_000), row("mitmdump", NEW, 250),
                row("tollgate", harness.NEW_HOST, 2_000, raw_sign_rate=20_000, ratio_to_raw_sign=0.1,
                    rss_kib_per_cached_leaf=3.21),
                row("mitmdump", harness.NEW_HOST, 200)]
        lines = harness.table(rows, {}, None, {}, []).splitlines()
        self.assertIn("Cached leaves (new-host row, growth after its first run): 3.21 KiB of tollgate's RSS each", lines)
        tollgate = {line.split(" | ")[1]: line for line in lines if line.startswith("| tollgate |")}
        self.assertIn("| 2.00x | 24x |", tollgate[NEW])
        self.assertIn("| 0.10x raw sign | 10x |", tollgate[harness.NEW_HOST])


if __name__ == "__main__":
    unittest.main()
