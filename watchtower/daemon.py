"""Wires the parts: probe resources, monitor + scheduler, web server, housekeeping, signals."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import resource
import signal
import time
from contextlib import AsyncExitStack

import aiohttp
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from watchtower import __version__, gcpolicy, logs
from watchtower.backups.watch import BackupWatch
from watchtower.certificates import CertificateWatch
from watchtower.config import Config, ConfigError, load_config
from watchtower.drill import DrillRunner
from watchtower.engine.correlate import TargetState
from watchtower.engine.maintenance import incident_muted
from watchtower.engine.monitor import Monitor, open_shared
from watchtower.notify.alertmanager import AlertmanagerSink
from watchtower.notify.outbox import Alerting
from watchtower.notify.sender import channel_problems
from watchtower.plan_distribution import PlanDistributor
from watchtower.readmodel import IncidentReadModel
from watchtower.sdnotify import Notifier, watchdog_interval
from watchtower.store import DB_NAME, AsyncStore, Store, StoreError, StoreLock, StoreLocked
from watchtower.web import app as web_app
from watchtower.web.app import STALL_AFTER, make_app

log = logging.getLogger("watchtower.daemon")


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """One line per event, ``key=value`` fields in the message, to stderr; ``json`` parses the fields
    out. Under journald no timestamps (it adds them) and a priority prefix (see watchtower/logs.py)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter(log_format))
    handler.addFilter(logs.SCRUBBER)  # secrets masked in every record, whatever logger wrote it
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # A watchdog kill (SIGABRT) or a fatal signal leaves every thread's stack in the journal.
    if not faulthandler.is_enabled():
        faulthandler.enable()
    # apscheduler logs every job run at INFO: noise at our cadence
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in logs.QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def raise_fd_limit() -> None:
    """Thousands of probes in flight need thousands of sockets; the soft limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Heartbeat:
    """Dead man's switch: ping the outside URL while healthy, ``/fail`` with the reason otherwise,
    so the service behind it pages someone when watchtower itself goes silent or blind."""

    def __init__(self, config: Config, monitor: Monitor, alerting: Alerting | None = None):
        assert config.heartbeat is not None
        self.config = config.heartbeat
        self.monitor = monitor
        self.alerting = alerting

    def problem(self) -> str | None:
        if time.monotonic() - self.monitor.scheduler.last_tick > STALL_AFTER:
            return "scheduler stalled"
        if not self.monitor.vantage_up:
            return "vantage down: the monitor cannot reach the outside"
        if self.alerting is not None:
            return self.alerting.problem()  # a channel failing for long, or the store unwritable
        return None

    async def beat(self) -> None:
        secret = self.config.secret("url")
        assert secret is not None
        url = secret.get_secret_value().rstrip("/")
        problem = self.problem()
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout)) as session,
                session.post(f"{url}/fail", data=problem) if problem else session.get(url) as response,
            ):
                ok = response.status < 400
            # The URL is a secret (it lets anyone silence the switch): never log it.
            log.log(
                logging.DEBUG if ok else logging.WARNING,
                "heartbeat sent ok=%s status=%s problem=%s",
                ok,
                response.status,
                problem,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("heartbeat failed error=%s", exc.__class__.__name__)


def status_line(monitor: Monitor, incidents: IncidentReadModel) -> str:
    """One line for ``systemctl status``: how the site looks right now."""
    states = monitor.target_states()
    up = sum(1 for s in states.values() if s is TargetState.UP)
    open_ = sum(n for _, n in incidents.open_by_scope())
    vantage = "" if monitor.vantage_up else ", BLIND (vantage down)"
    return f"{len(states)} targets, {up} up, {open_} open incidents{vantage}"


async def supervise(
    notifier: Notifier, monitor: Monitor, every: float | None, incidents: IncidentReadModel | None = None
) -> None:
    """systemd's watchdog: ``WATCHDOG=1`` every ``every`` s from the event loop, but only while the
    scheduler ticks (the rule of /healthz), so a wedged monitor is restarted instead of vouched for.
    Also keeps ``STATUS=`` current (``incidents``: the daemon's read model; else one over the
    monitor's tracker)."""
    incidents = incidents or IncidentReadModel(monitor.tracker)
    status, stalled = "", False
    while True:
        if every is not None:
            if time.monotonic() - monitor.scheduler.last_tick <= STALL_AFTER:
                notifier.watchdog()
                stalled = False
            elif not stalled:
                stalled = True
                log.error("scheduler stalled: withholding the systemd watchdog ping")
        line = status_line(monitor, incidents)
        if line != status:
            status = line
            notifier.status(line)
        await asyncio.sleep(every if every is not None else 15.0)


def lock_state(config: Config) -> StoreLock | None:
    """One daemon per ``state_dir`` (StoreLocked names the other's PID). A directory that cannot
    hold a lock file cannot hold the store either: that is reported by :func:`open_store`."""
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        return StoreLock.acquire(config.state_dir)
    except StoreLocked:
        raise
    except OSError as exc:
        log.warning("cannot lock state_dir %s: %s", config.state_dir, exc.strerror or exc)
        return None


async def open_store(config: Config) -> tuple[AsyncStore, str | None]:
    """The state store in ``state_dir``; when that cannot be opened (missing, read-only, full,
    corrupt), an in-memory one seeded with whatever can still be read of the broken file, so
    probing and alerting go on without paging again what was paged before. It is never taken
    for a working store: /healthz, the metric and the heartbeat say so until a restart finds
    the file usable (``watchtower store check|repair|reset``)."""
    try:
        return await AsyncStore.open(config.state_dir), None
    except StoreError as exc:
        from concurrent.futures import ThreadPoolExecutor

        path = config.state_dir / DB_NAME
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(executor, Store, ":memory:")
        problem = str(exc)
        if path.is_file() and path.stat().st_size > 0:
            salvage = await loop.run_in_executor(executor, store.salvage, path)
            if not salvage.complete:
                problem += "; its history is partly unreadable, so a page may repeat an earlier one"
            history = salvage.summary()
        else:
            history = "no history could be read, so a page may repeat an earlier one"
            problem += "; " + history
        log.error(
            "state store %s unusable, alerting from memory (nothing is kept across a restart; "
            "run `watchtower store check`): %s; %s",
            path, exc, history,
        )  # fmt: skip
        return AsyncStore(store, executor, durable=False), problem


async def reload_config(
    path: str,
    monitor: Monitor,
    stack: AsyncExitStack,
    alerting: Alerting | None = None,
    sink: AlertmanagerSink | None = None,
    backups: BackupWatch | None = None,
    distributor: PlanDistributor | None = None,
) -> bool:
    """SIGHUP: re-read the config. A bad new config is logged, problem by problem, and the running
    one stays in force; a good one is applied without losing the state of unchanged paths."""
    old = monitor.config
    try:
        new = await asyncio.to_thread(load_config, path)
        refused = await asyncio.to_thread(channel_problems, new.notify.channels)  # as `check` does
        if refused:
            raise ConfigError(refused)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload rejected, keeping the running config: %s", problem)
        monitor.reload_failed()
        return False
    logs.SCRUBBER.set_secrets(new.secret_values())
    if new.log_format != old.log_format:
        setup_logging(logging.getLevelName(logging.getLogger().level), new.log_format)
    if new.listen != old.listen:
        log.warning("reload: listen changed from %s to %s; restart to apply it", old.listen, new.listen)
    try:
        await open_shared(stack, new, monitor.shared)
    except OSError as exc:
        log.error("reload rejected, keeping the running config: cannot open probe sockets: %s", exc)
        monitor.reload_failed()
        return False
    gc.unfreeze()
    counts = monitor.reload(new)
    if alerting is not None:
        alerting.reload(new)
    if sink is not None:
        sink.reload(new)
    if backups is not None:
        backups.apply(new)
    if distributor is not None:
        distributor.reload(new)
    gc.collect()
    gc.freeze()
    log.info("config reloaded %s", " ".join(f"{k}={v}" for k, v in counts.items()))
    return True


async def run_daemon(
    config: Config, *, config_path: str | None = None, ready: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT (or cancellation). Startup errors (port in use) raise OSError."""
    raise_fd_limit()
    logs.SCRUBBER.set_secrets(config.secret_values())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    notifier = Notifier()
    async with AsyncExitStack() as stack:
        stack.callback(notifier.close)
        lock = lock_state(config)
        if lock is not None:
            stack.callback(lock.release)
        shared = await open_shared(stack, config)
        monitor = Monitor(config, shared=shared)
        store, store_error = await open_store(config)
        stack.push_async_callback(store.close)
        alerting = Alerting(config, store, monitor.tracker, changed=monitor.incidents_changed)
        if store_error is not None:
            alerting.store_ok, alerting.store_error = False, store_error
        stack.callback(alerting.close)
        try:
            await alerting.restore()  # open incidents keep their ids and are not paged again
        except StoreError as exc:  # a page gone bad past the check at open: loud, never a crash loop
            log.error("state store unreadable at start, alerting from memory: %s", exc)
            store.durable, store_error = False, f"{exc}; a page may repeat an earlier one"
            alerting.store_ok, alerting.store_error = False, store_error
        if store_error is not None:
            await alerting.warn(
                f"store:{int(time.time())}", f"watchtower's state store is unusable: {store_error}"
            )
        try:
            alerting.mutes = await store.call(store.store.mutes, alerting.now())  # they survive restarts
        except StoreError as exc:
            log.error("state store: mutes unreadable, none in force: %s", exc)
        # The one read model of incidents, messages and channel health: web, metrics, STATUS=.
        incidents = IncidentReadModel(monitor.tracker, alerting, store)
        sink = AlertmanagerSink(config, monitor.tracker)  # idle while `alertmanager:` is not configured
        # Warnings (issue 16): stale backups and expiring certificates open their own incidents
        backups = BackupWatch(config, monitor.tracker, shared)
        backups.changed = monitor.incidents_changed
        alerting.restore_lines = backups.restore_lines
        certificates = CertificateWatch(monitor, monitor.tracker, monitor.incidents_changed)
        distributor = PlanDistributor(config, backups)  # idle while `plan.distribute` is not set
        stack.callback(distributor.close)
        sink.muted = lambda incident: incident_muted(incident, alerting.muted(alerting.now()))
        drills = DrillRunner(store, alerting, state_dir=None if store_error is not None else config.state_dir)
        await drills.restore()
        # The config and the path table live for the whole run: move them out of the garbage
        # collector's view, so a full collection does not stall probing (seen: 100 ms at 10k paths).
        gc.collect()
        gc.freeze()

        if config.traps is not None:
            from watchtower.probes.traps import TrapReceiver

            # Bind errors (port 162 without CAP_NET_BIND_SERVICE, port in use) surface here, at start.
            await stack.enter_async_context(TrapReceiver.from_config(config.traps, monitor.on_trap))

        runner = web.AppRunner(
            make_app(monitor, store, alerting, drills, backups, incidents),
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=web_app.IDLE_TIMEOUT,  # bounds a trickled request head too
            lingering_time=web_app.LINGER,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, port = config.listen_host_port
        await web.TCPSite(runner, host, port).start()

        housekeeping = AsyncIOScheduler(event_loop=loop, job_defaults={"coalesce": True, "max_instances": 1})
        if config.heartbeat is not None:
            heartbeat = Heartbeat(config, monitor, alerting)
            housekeeping.add_job(heartbeat.beat, "interval", seconds=config.heartbeat.every, id="heartbeat")
        housekeeping.add_job(alerting.purge, "interval", hours=6, id="retention")
        housekeeping.start()
        stack.callback(housekeeping.shutdown, wait=False)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)

        log.info(
            "watchtower started version=%s site=%s targets=%d paths=%d listen=%s:%d",
            __version__, config.site, len(config.targets), len(config.paths), host, port,
        )  # fmt: skip
        async with asyncio.TaskGroup() as tg:
            scheduler_task = tg.create_task(monitor.run(), name="scheduler")
            alerting_task = tg.create_task(alerting.run(), name="alerting")
            sink_task = tg.create_task(sink.run(), name="alertmanager")
            gc_task = tg.create_task(gcpolicy.settle(), name="gc")
            warning_tasks = [
                tg.create_task(backups.run(), name="backups"),
                tg.create_task(certificates.run(), name="certificates"),
                tg.create_task(distributor.run(), name="plan"),
            ]
            drill_task = tg.create_task(drills.run(), name="drills")
            reloading = asyncio.Lock()

            async def on_hup() -> None:
                if config_path is None:
                    log.warning("SIGHUP: no config file to reload from")
                    return
                async with reloading:
                    notifier.reloading()
                    try:
                        await reload_config(config_path, monitor, stack, alerting, sink, backups, distributor)
                    finally:
                        # a rejected reload: the old config runs
                        notifier.ready(status_line(monitor, incidents))

            loop.add_signal_handler(signal.SIGHUP, lambda: tg.create_task(on_hup(), name="reload"))
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            # READY=1 once the first round of probes is scheduled (every path has its timer).
            await monitor.scheduler.armed.wait()
            notifier.ready(status_line(monitor, incidents))
            watchdog_every = watchdog_interval()
            supervise_task = None
            if notifier.enabled:
                supervise_task = tg.create_task(
                    supervise(notifier, monitor, watchdog_every, incidents), name="sdnotify"
                )
            if ready is not None:
                ready.set()
            await stop.wait()
            notifier.stopping()
            log.info("stopping")
            scheduler_task.cancel()
            alerting_task.cancel()
            sink_task.cancel()
            gc_task.cancel()
            for task in warning_tasks:
                task.cancel()
            drill_task.cancel()
            if supervise_task is not None:
                supervise_task.cancel()
    log.info("stopped")
