"""Wiring only: build the store, the services and the gRPC server from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobbroker.v1 import broker_pb2
from jobbroker_server import ports
from jobbroker_server.clock import Clock, SystemClock
from jobbroker_server.config import Settings, check, is_loopback, tls_files
from jobbroker_server.domain import limits
from jobbroker_server.metrics import Metrics
from jobbroker_server.rpc.auth import Guard
from jobbroker_server.rpc.convert import Limits
from jobbroker_server.rpc.handlers import add_service
from jobbroker_server.rpc.lease_stream import LeaseStreams
from jobbroker_server.rpc.servicer import BrokerServicer
from jobbroker_server.services.background import DepthSampler, Reaper, Retention, Scheduler
from jobbroker_server.services.changes import Changes
from jobbroker_server.services.cron import Cron
from jobbroker_server.services.dispatcher import Dispatcher
from jobbroker_server.services.explain import Explainer
from jobbroker_server.services.health import StoreHealth
from jobbroker_server.services.jobs import Jobs
from jobbroker_server.services.keys import ApiKeys
from jobbroker_server.services.queues import Queues
from jobbroker_server.services.reports import Reports
from jobbroker_server.services.schedules import Schedules
from jobbroker_server.services.tail import EventTails
from jobbroker_server.services.watch import JobWatch
from jobbroker_server.store import Store
from jobbroker_server.store.open import open_migrated, shown

log = logging.getLogger("jobbroker")

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name


class BrokerApp:
    """One running broker: ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = Metrics(max_queues=settings.max_metric_queues)
        self.port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._server: grpc.aio.Server | None = None
        self._store: Store | None = None
        self._metrics_http: Any = None

    async def start(self) -> None:
        """Check the settings, open the store (locked, migrated), then bind the
        ports. Each failure raises one line that names what failed (SettingError,
        CannotOpenStore, CannotListen), with nothing left open or bound."""
        check(self.settings)
        store, _version = await open_migrated(self.settings.database)
        self._store = store
        try:
            await self._start(store)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, store: Store) -> None:
        s = self.settings
        watch = JobWatch(s.max_watch_streams)
        changes = Changes()
        changes.listen(self.metrics.on_moved)
        changes.listen(watch.on_moved)
        dispatcher = Dispatcher(
            store,
            self.clock,
            self.metrics,
            changes,
            lease_duration=s.lease_duration,
            poll_interval=s.poll_interval,
            max_streams=s.max_lease_streams,
            max_payload_bytes=s.max_payload_bytes,
        )
        scheduler = Scheduler(store, self.clock, changes, s.poll_interval, dispatcher.wake)
        dispatcher.on_rate_spent = scheduler.poke
        reaper = Reaper(store, self.clock, changes, s.reap_interval)
        retention = Retention(store, self.clock, changes, s.retention, s.retention_interval)
        depths = DepthSampler(store, self.metrics, interval=s.poll_interval * 5)
        self.cron = Cron(store, self.clock, changes, s.dedup_window, s.poll_interval)
        jobs = Jobs(
            store,
            dispatcher,
            changes,
            self.clock,
            watch,
            dedup_window=s.dedup_window,
            poll_interval=s.poll_interval,
        )
        reports = Reports(store, dispatcher, self.clock, changes)
        queues = Queues(store, self.clock, dispatcher, refresh=s.poll_interval)
        await queues.refresh()
        keys = ApiKeys(store, self.clock, required=s.auth, refresh=s.poll_interval)
        if s.auth:
            await keys.load()
        self.keys = keys
        # A notice says a queue has ready jobs, not how many: one stream looks,
        # and one that fills its batch wakes the next.
        await store.listen(lambda queue: dispatcher.wake_some({queue: 1}))
        self._dispatcher = dispatcher
        tails = EventTails(store, s.poll_interval)
        changes.listen(tails.on_moved)
        servicer = BrokerServicer(
            jobs,
            LeaseStreams(dispatcher, reports, s.max_payload_bytes),
            keys,
            self.clock,
            Limits(s.max_payload_bytes, s.retry),
            s.max_batch,
            tails,
            Explainer(store, self.clock, dispatcher, queues),
            Schedules(store, self.clock, self.cron),
            queues,
        )
        message_limit = limits.MAX_MESSAGE_BYTES  # what the SDK accepts, too
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                # gRPC's default lets a second broker share the port and take
                # half the calls into its own database.
                ("grpc.so_reuseport", 0),
            ]
        )
        service = broker_pb2.DESCRIPTOR.services_by_name["Broker"]
        add_service(service, servicer, Guard(keys), server)
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lag
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
        ports.ensure_free(s.host, s.port, ports.GRPC_PORT)
        metrics_host = s.metrics_host or s.host
        if s.metrics_port:
            ports.ensure_free(metrics_host, s.metrics_port, ports.METRICS_PORT)
            self._metrics_http = ports.serve_metrics(
                metrics_host, s.metrics_port, self.metrics.registry
            )
            self.metrics_port = self._metrics_http.server_port
        self.port = ports.bind_grpc(server, s.host, s.port, tls_files(s))
        await server.start()
        self._server = server
        await self._set_serving(True)
        health_probe = StoreHealth(store, self.clock, self._set_serving)
        loops = (
            scheduler,
            reaper,
            retention,
            depths,
            dispatcher,
            health_probe,
            keys,
            self.cron,
            queues,
        )
        for loop in loops:
            self._tasks.append(asyncio.create_task(loop.run()))
        log.info(
            "jobbroker listening on %s:%d (%s, %s), database %s",
            s.host,
            self.port,
            "TLS" if s.tls_cert else "plaintext",
            "API keys required" if s.auth else "no API keys",
            shown(s.database),
        )
        if s.insecure and not s.auth and not is_loopback(s.host):
            log.warning(
                "--insecure: anyone who reaches %s:%d may submit, read and cancel every job",
                s.host,
                self.port,
            )

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self) -> None:
        """Stop leasing, refuse new calls, let open streams report, close the store."""
        if self._server is not None:
            self._dispatcher.drain()
            await self._health.enter_graceful_shutdown()
            await self._server.stop(self.settings.shutdown_grace.total_seconds())
            self._server = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._store is not None:
            await self._store.close()
            self._store = None


async def serve(settings: Settings) -> None:
    """Run a broker until SIGINT or SIGTERM."""
    app = BrokerApp(settings)
    await app.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("shutting down: letting workers report for up to %s", settings.shutdown_grace)
    finally:
        await app.stop()
    log.info("jobbroker stopped")
