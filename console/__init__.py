"""The local web supervision console: `make_app(rt, token)` for an embedded Runtime, served by
`ConsoleServer` (a thread, for tests) or `serve(state)` (the `agentlibos console` command)."""

from agentlibos.console._app import CSP, ConsoleServer, EventHub, make_app, new_token, serve, visible

__all__ = ["CSP", "ConsoleServer", "EventHub", "make_app", "new_token", "serve", "visible"]
