"""The HTTP API: Consul's endpoints and corral's own, on one aiohttp application."""

from __future__ import annotations

import logging

from aiohttp import web

from corral.agent.agent import Agent
from corral.api import agent as agent_api
from corral.api import agents as agents_api
from corral.api import catalog, event, jobs, kv, logs, scheduler, session, txn
from corral.api import executor as executor_api
from corral.api import metrics as metrics_api
from corral.api.catalog import SERVER_INFO_KEY
from corral.api.common import STATE_KEY, text_error
from corral.master.agents import AgentMonitor
from corral.master.master import Master
from corral.metrics import Metrics
from corral.state import State
from corral.state.sessions import SessionManager
from corral.store import StoreError

log = logging.getLogger(__name__)

# Room beyond the biggest KV value, for the largest job definition or session body.
_BODY_HEADROOM = 64 * 1024


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except StoreError as exc:
        log.error("request failed method=%s path=%s: store error: %s", request.method, request.path, exc)
        raise text_error(500, f"store error: {exc}") from None
    except Exception:
        log.exception("request failed unexpectedly method=%s path=%s", request.method, request.path)
        raise text_error(500, "internal error; see the server log") from None


def build_app(
    state: State,
    node: str,
    rpc_addr: str,
    agent: Agent | None = None,
    kv_max_value_size: int = kv.MAX_VALUE_SIZE,
    metrics: Metrics | None = None,
    agent_monitor: AgentMonitor | None = None,
    master: Master | None = None,
) -> web.Application:
    """Build the application serving `state`; `node` is the local agent's node name.

    With `agent`, the application also serves that agent's /v1/agent endpoints and
    the executor API of its custom executors.
    With `agent_monitor`, it serves /v1/agents, the endpoints of agent processes.
    With `master`, it serves Mesos's scheduler API, /v1/frameworks and /v1/roles.
    Requests are counted into `metrics` (a new Metrics when None), which
    /v1/agent/metrics serves with the catalog's sizes.
    """
    # The metrics middleware comes first, so that it records the status that _errors chose.
    app = web.Application(
        middlewares=[metrics_api.record_metrics, _errors], client_max_size=kv_max_value_size + _BODY_HEADROOM
    )
    metrics = metrics if metrics is not None else Metrics()
    metrics.catalog = state
    metrics_api.add_routes(app, metrics)
    app[STATE_KEY] = state
    app[kv.MAX_VALUE_SIZE_KEY] = kv_max_value_size
    app[SERVER_INFO_KEY] = {"node": node, "rpc_addr": rpc_addr}
    kv.add_routes(app)
    sessions = SessionManager(state)
    session.add_routes(app, sessions)
    app.on_startup.append(lambda _: sessions.start())
    app.on_cleanup.append(lambda _: sessions.stop())
    catalog.add_routes(app)
    event.add_routes(app)
    jobs.add_routes(app)
    logs.add_routes(app, agent)
    txn.add_routes(app)
    if agent is not None:
        agent_api.add_routes(app, agent)
        executor_api.add_routes(app, agent.executors)
    if agent_monitor is not None:
        agents_api.add_routes(app, agent_monitor)
    if master is not None:
        scheduler.add_routes(app, master)
    return app
