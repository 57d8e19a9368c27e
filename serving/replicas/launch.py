"""`switchboard serve --replicas N`: start (or join) a Ray cluster, run the router and N replicas on Ray Serve's HTTP
proxy at --host:--port, and stop them all, then Ray, on SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

from switchboard.serving.config import ServeConfig

APP_NAME = "switchboard"
# A stopping replica gets this long to finish what it is generating before Ray Serve ends it.
GRACEFUL_SHUTDOWN_S = 5.0
HEALTH_CHECK_PERIOD_S = 2.0


def ray_unavailable_reason() -> str | None:
    """None when Ray Serve can be imported, else what to install."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        return f"--replicas needs Ray Serve: pip install 'switchboard[ray]' ({exc})"
    return None


def serve_replicas(config: ServeConfig) -> None:
    """Run until a signal asks to stop; then shut Ray Serve and (if this process started it) Ray down."""
    reason = ray_unavailable_reason()
    if reason is not None:
        raise ValueError(reason)
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from switchboard.serving.replicas.deployment import NAMESPACE, Replica, Router
    from switchboard.serving.replicas.metrics_board import BOARD_NAME, MetricsBoard
    from switchboard.serving.replicas.request_router import AdapterAffinityRouter

    config = _absolute(config)  # replicas may start in another directory, or on another node
    threads = config.num_threads or 1
    replicas = config.replicas or 1
    if config.ray_address is None:  # a local cluster with room for every replica's threads
        ray.init(namespace=NAMESPACE, num_cpus=max(os.cpu_count() or 1, replicas * threads))
    else:
        ray.init(address=config.ray_address, namespace=NAMESPACE)
    try:
        board = ray.remote(MetricsBoard).options(name=BOARD_NAME, num_cpus=0).remote()  # noqa: F841 - kept alive
        serve.start(http_options={"host": config.host, "port": config.port})
        replica = serve.deployment(
            Replica,
            num_replicas=replicas,
            max_ongoing_requests=config.max_num_seqs + config.max_waiting,
            ray_actor_options={"num_cpus": threads},
            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter),
        ).bind(config)
        router = serve.deployment(Router, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0}).bind(
            replica, config
        )
        serve.run(router, name=APP_NAME, route_prefix="/")
        print(
            f"switchboard: {replicas} replicas of {config.served_model_name} on Ray Serve at "
            f"http://{config.host}:{config.port}",
            flush=True,
        )
        _wait_for_signal(signal.SIGTERM, signal.SIGINT)
    finally:
        serve.shutdown()
        ray.shutdown()


def _absolute(config: ServeConfig) -> ServeConfig:
    return replace(
        config,
        model=config.model.resolve(),
        store=config.store.resolve(),
        api_keys=None if config.api_keys is None else config.api_keys.resolve(),
        import_dir=None if config.import_dir is None else config.import_dir.resolve(),
        adapters={name: path.resolve() for name, path in config.adapters.items()},
    )


def _wait_for_signal(*signals: signal.Signals) -> None:
    """Sleep until one of `signals` arrives (installed here, after Ray and Serve installed theirs)."""
    received: list[int] = []
    for sig in signals:
        signal.signal(sig, lambda number, _frame: received.append(number))
    while not received:
        time.sleep(0.2)
