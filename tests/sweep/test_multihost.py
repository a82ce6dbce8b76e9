"""Many hosts on one PostgreSQL-backed sweep.

The main test builds two "hosts" on this machine: network namespaces with hostnames of their
own (UTS namespaces), each joined to the root namespace by a veth pair, with a PostgreSQL
server listening on the root ends. A worker on each host claims from the one sweep; the first
host is cut off (its link taken down) in the middle of a long trial: the other host reaps the
expired lease, re-runs the trial (resuming from the checkpoint the first host left on the
shared filesystem), and when the link comes back the cut-off worker learns it lost the lease
and its late result is discarded. Every trial completes exactly once.

Namespaces need root (CAP_NET_ADMIN); elsewhere the test skips, except in CI, where it must
run. Traffic goes only to loopback and to the addresses this test gives its veths.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg import PASSWORD, PostgresServer, postgres_server, postgres_url  # noqa: F401  (fixtures)
from sweep_helpers import TINY_BASE, complete_count_by_trial, env

from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.storages.postgresql import pg_engine_kwargs
from saesweep.sweep.store import COMPLETE, FAIL, LEASE_ATTR, RUNNING, SweepStore
from saesweep.sweep.worker import open_sweep

pytestmark = pytest.mark.postgres


# ------------------------------------------------------------------------ the hosts
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


class Hosts:
    """Network namespaces ``host-a``, ``host-b``... each with a veth pair to the root namespace
    (root end 10.231.N.4k+1/30, host end 10.231.N.4k+2/30), and a PostgreSQL server listening
    on loopback and on the root ends. Everything is removed by :meth:`close`."""

    def __init__(self, names: tuple[str, ...] = ("host-a", "host-b")) -> None:
        self.tag = f"{os.getpid() % 1000}{random.randrange(100):02d}"
        used = _ip("-4", "-o", "addr").stdout
        octet = next(o for o in random.sample(range(20, 250), 230) if f"10.231.{o}." not in used)
        self.names = names
        self.ns = {h: f"saes{self.tag}{h[-1]}" for h in names}
        self.veth = {h: f"sw{self.tag}{h[-1]}" for h in names}  # root end; the host end adds "p"
        self.gateway = {h: f"10.231.{octet}.{4 * i + 1}" for i, h in enumerate(names)}
        self.address = {h: f"10.231.{octet}.{4 * i + 2}" for i, h in enumerate(names)}
        self.pg: PostgresServer | None = None
        try:
            for h in names:
                ns, veth = self.ns[h], self.veth[h]
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", veth + "p")
                _ip("link", "set", veth + "p", "netns", ns)
                _ip("addr", "add", f"{self.gateway[h]}/30", "dev", veth)
                _ip("link", "set", veth, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.address[h]}/30", "dev", veth + "p")
                _ip("netns", "exec", ns, "ip", "link", "set", veth + "p", "up")
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.pg = PostgresServer()
            self._listen_on_gateways(octet)
        except BaseException:
            self.close()
            raise

    def _listen_on_gateways(self, octet: int) -> None:
        pg = self.pg
        with open(pg.data / "pg_hba.conf", "a") as fh:
            fh.write(f"host all all 10.231.{octet}.0/24 scram-sha-256\n")
        listen = ",".join(["127.0.0.1", *self.gateway.values()])
        pg._run([pg.pg_ctl, "-D", str(pg.data), "-l", str(pg.dir / "log"), "-w", "-t", "60", "-m", "fast", "-o",
                 f"-p {pg.port} -c listen_addresses={listen} -k {pg.dir} -c max_connections=200 -c fsync=off",
                 "restart"])

    def url(self, database_url: str, host: str | None = None) -> str:
        """The database URL as ``host`` reaches it (the root end of its veth), without the password."""
        bare = database_url.replace(f":{PASSWORD}@", "@")
        return bare if host is None else bare.replace("127.0.0.1", self.gateway[host])

    def start(self, host: str, argv: list[str], log: Path, extra_env: dict | None = None) -> subprocess.Popen:
        """Run ``argv`` on ``host``: in its network namespace, with its hostname."""
        cmd = ["ip", "netns", "exec", self.ns[host], "unshare", "--uts", "sh", "-c",
               f'hostname {host} && exec "$@"', "sh", *argv]
        return subprocess.Popen(cmd, env={**env(), **(extra_env or {})}, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def cut(self, host: str) -> None:
        _ip("link", "set", self.veth[host], "down")

    def restore(self, host: str) -> None:
        _ip("link", "set", self.veth[host], "up")

    def close(self) -> None:
        for h in self.names:
            _ip("link", "del", self.veth[h], check=False)
            _ip("netns", "del", self.ns[h], check=False)
        if self.pg is not None:
            self.pg.stop()
            self.pg = None


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "the ip and unshare commands are missing"
    probe = f"saesprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def hosts():
    why = netns_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-host test must run in CI: {why}")
        pytest.skip(why)
    h = Hosts()
    try:
        yield h
    finally:
        h.close()


# ------------------------------------------------------------------------ helpers
def cut_spec(tmp_path, storage: str, n: int = 4):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 100_000, "batch_size": 512, "log_every": 50}}
    return parse_spec({
        "name": "cut", "base": base, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"), "storage": storage,
        "grids": {"relu": {"lr": [1e-3 * (i + 1) for i in range(n)], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
        "execution": {"pack_size": 1, "lease_s": 3, "heartbeat_s": 0.5, "checkpoint_every_s": 0.5, "max_retries": 2},
    })


def queue_one_long_trial(store: SweepStore, spec, long_tokens: int) -> str:
    """Queue the spec's trials, the first one long; returns its trial id."""
    configs = expand(spec)
    configs[0] = configs[0].with_updates(**{"train.tokens": long_tokens})
    store.add_trials(configs, [{"lr": c.lr} for c in configs])
    return configs[0].trial_id


def holder(store: SweepStore, trial_id: str):
    """(state, worker holding the lease) of the latest attempt of ``trial_id``."""
    attempts = [t for t in store.trials() if t.user_attrs.get("trial_id") == trial_id]
    last = attempts[-1]
    beat = last.system_attrs.get(LEASE_ATTR) or {}
    return last.state, beat.get("worker", "")


def wait_until(cond, timeout: float, what: str, procs=()) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time()
        for p in procs:
            assert p.poll() is None, f"a worker exited early ({p.returncode}) while waiting for {what}"
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def worker_argv(url: str) -> list[str]:
    return [sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", url, "--sweep", "cut", "--device", "cpu",
            "--threads", "1"]


# ------------------------------------------------------------------------ the tests
def test_host_cut_off_mid_trial_loses_its_lease_and_nothing_is_lost(hosts, tmp_path):
    db = hosts.pg.new_database()
    spec = cut_spec(tmp_path, db, n=2)
    store = open_sweep(spec)
    long_id = queue_one_long_trial(store, spec, long_tokens=3_500_000)
    pw = {"PGPASSWORD": PASSWORD}  # the hosts' URLs carry no password: libpq takes it from the environment
    procs = {}
    t = {"start": time.time()}
    try:
        for h in ("host-a", "host-b"):
            procs[h] = hosts.start(h, worker_argv(hosts.url(db, h)), tmp_path / f"{h}.log", pw)
        # one host claims the long trial (whichever asks first), the other runs the short one;
        # the long one is mid-trial and has left a checkpoint on the shared disk
        t["both_busy"] = wait_until(lambda: store.counts()["complete"] == 1 and holder(store, long_id)[0] == RUNNING
                                    and any((spec.sweep_dir / "checkpoints").glob("*.safetensors")),
                                    120, "one host mid-trial, the other done with the short trial", procs.values())
        cut = holder(store, long_id)[1].split(":")[0]
        other = next(h for h in procs if h != cut)
        hosts.cut(cut)
        t["cut"] = time.time()
        # the other host reaps the lease the cut-off one can no longer renew, and runs the trial again
        t["took_over"] = wait_until(lambda: holder(store, long_id)[1].startswith(f"{other}:"), 90,
                                    "the other host to take over the cut-off host's trial", procs.values())
        assert procs[cut].poll() is None  # the cut-off worker is alive: its heartbeat failures did not kill it
        hosts.restore(cut)
        t["restored"] = time.time()
        codes = {k: p.wait(timeout=300) for k, p in procs.items()}
        t["end"] = time.time()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {k: (tmp_path / f"{k}.log").read_text() for k in procs}
    assert codes == {"host-a": 0, "host-b": 0}, logs

    store = SweepStore(db, "cut", create=False)
    done = complete_count_by_trial(store)
    assert len(done) == 2 and set(done.values()) == {1}, done  # every trial complete, exactly once
    assert store.counts() == {"waiting": 0, "running": 0, "complete": 2, "failed": 0, "pruned": 0}
    attempts = [tr for tr in store.trials() if tr.user_attrs["trial_id"] == long_id]
    assert [a.state for a in attempts] == [FAIL, COMPLETE]
    lost, rerun = attempts
    assert lost.user_attrs["reason"].startswith(f"lease expired: no heartbeat from {cut}:")
    assert rerun.user_attrs["worker"].startswith(f"{other}:")  # re-run on the other host
    assert rerun.user_attrs["metrics"]["resumed_from_step"] > 0  # from the cut host's checkpoint on the shared disk
    stats = {k: v for k, v in store.info.items() if k.startswith(f"worker:{cut}:")}
    assert len(stats) == 1 and next(iter(stats.values()))["lost_leases"] == 1  # its late result was discarded
    timings = {k: round(v - t["cut"], 1) for k, v in t.items()}
    print(f"network-cut timeline (s from cutting {cut} off):", json.dumps(timings))
    (tmp_path / "timeline.json").write_text(json.dumps(timings))


def test_leases_run_on_the_database_clock(postgres_url, tmp_path, monkeypatch):
    """A host whose clock is a day off neither reaps live leases nor keeps dead ones: heartbeats
    and the reaper both read the database server's clock."""
    spec = cut_spec(tmp_path, postgres_url)
    store = open_sweep(spec)
    store.add_trials(expand(spec)[:2], [{"lr": 1e-3}, {"lr": 2e-3}])
    claim = store.claim("w")[0]
    beat = store.storage.get_trial(claim.trial_pk).system_attrs[LEASE_ATTR]
    from sqlalchemy import text

    with store.rdb_engine().connect() as c:
        server_now = float(c.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar())
    assert abs(beat["t"] - server_now) < 5
    skewed = SweepStore(postgres_url, "cut", create=False)
    import saesweep.sweep.store as store_mod

    monkeypatch.setattr(store_mod.time, "time", lambda: server_now + 86400)  # this host's clock: a day ahead
    assert skewed.reap_expired(lease_s=30) == []  # the live lease is not reaped
    assert abs(skewed.now() - server_now) < 5
    monkeypatch.undo()
    time.sleep(0.05)
    assert skewed.reap_expired(lease_s=0.01) == [claim.trial_id]  # and a lease that did expire is reaped


def test_unbeaten_claim_is_reaped_after_a_lease_seen_by_the_reaper(tmp_path):
    """A trial claimed by a worker that died before its first heartbeat: its lease is counted
    from when a reaper first saw it, never from the claiming host's wall clock."""
    spec = cut_spec(tmp_path, str(tmp_path / "s.journal"))
    store = open_sweep(spec)
    store.add_trials(expand(spec)[:1], [{"lr": 1e-3}])
    (t,) = store.trials()
    assert store.storage.set_trial_state_values(store.pk_of(t), RUNNING)  # claimed; no heartbeat written
    assert store.reap_expired(lease_s=0.3) == []  # first seen now
    time.sleep(0.4)
    assert store.reap_expired(lease_s=0.3) == [t.user_attrs["trial_id"]]
    assert store.counts()["waiting"] == 1


def test_connection_settings_bound_every_wait(postgres_url, monkeypatch):
    from saesweep.sweep.storages import postgresql as backends

    # a setting this server does not know (an older PostgreSQL's) is skipped, the others apply
    monkeypatch.setitem(backends.PG_SESSION_SETTINGS, "no_such_setting", 1)
    store = SweepStore(postgres_url, "s")
    from sqlalchemy import text

    with store.rdb_engine().connect() as c:
        shown = {g: c.execute(text(f"SHOW {g}")).scalar() for g in
                 ("statement_timeout", "idle_in_transaction_session_timeout", "tcp_keepalives_idle", "tcp_user_timeout")}
    assert shown == {"statement_timeout": "5min", "idle_in_transaction_session_timeout": "1min",
                     "tcp_keepalives_idle": "10", "tcp_user_timeout": "30000"}
    kw = pg_engine_kwargs(postgres_url)
    assert kw["pool_pre_ping"] and kw["connect_args"]["connect_timeout"] == 10
    assert kw["connect_args"]["tcp_user_timeout"] == 30_000 and kw["connect_args"]["keepalives"] == 1
    kw = pg_engine_kwargs(postgres_url + "?connect_timeout=3")  # a setting in the URL wins
    assert "connect_timeout" not in kw["connect_args"] and kw["connect_args"]["keepalives_idle"] == 10
    with store.lock():  # the advisory lock: no statement timeout while waiting, a long idle allowance
        pass


@pytest.mark.slow
def test_frozen_worker_loses_its_lease_and_its_late_result_is_discarded(postgres_url, tmp_path):
    """The loopback variant (no namespaces needed): a worker frozen by SIGSTOP mid-trial, as a
    host that stops answering; another worker takes the trial over; thawed, the first learns
    it lost the lease and records nothing."""
    spec = cut_spec(tmp_path, postgres_url)
    store = open_sweep(spec)
    long_id = queue_one_long_trial(store, spec, long_tokens=3_000_000)
    bare = postgres_url.replace(f":{PASSWORD}@", "@")
    e = {**env(), "PGPASSWORD": PASSWORD}
    a = subprocess.Popen(worker_argv(bare), env=e, stdout=open(tmp_path / "a.log", "w"), stderr=subprocess.STDOUT)
    b = None
    try:
        wait_until(lambda: holder(store, long_id)[0] == RUNNING and any((spec.sweep_dir / "checkpoints").glob("*")),
                   90, "the first worker mid-trial", [a])
        a.send_signal(signal.SIGSTOP)
        b = subprocess.Popen(worker_argv(bare), env=e, stdout=open(tmp_path / "b.log", "w"), stderr=subprocess.STDOUT)
        first = holder(store, long_id)[1]
        wait_until(lambda: holder(store, long_id)[1] not in ("", first), 90, "the second worker to take over", [b])
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=180) == 0 and b.wait(timeout=180) == 0
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    done = complete_count_by_trial(SweepStore(postgres_url, "cut", create=False))
    assert len(done) == 4 and set(done.values()) == {1}
    stats = [v for k, v in store.info.items() if k.startswith("worker:") and v.get("lost_leases")]
    assert len(stats) == 1 and stats[0]["lost_leases"] == 1
