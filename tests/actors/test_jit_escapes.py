"""The escape corpus: every known way out of a JIT tool, each run against a real Deno host.

Each case runs three times: on the production runner (all layers), with the source-level import
ban switched off (so the Worker's permissions and the OS sandbox must hold), and with the OS
sandbox off as well (so the permission-less Worker and its prelude must hold on their own).
Every case must end with its expected code and leave no trace outside: the canary unchanged, no
file created, no request reaching the local HTTP server, no secret in the result, no syscall.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors._jit import JitRunner, find_deno

pytestmark = pytest.mark.skipif(find_deno() is None, reason="deno is not installed (pip install deno)")

SECRET = "CANARY-7f3a-SECRET"
LAYERS = {
    "all-layers": {},
    "no-import-ban": {"_lexical_guard": False},
    "worker-only": {"_lexical_guard": False, "os_sandbox": False},
}


@pytest.fixture(scope="module", params=list(LAYERS))
def runner(request: pytest.FixtureRequest) -> Iterator[JitRunner]:
    r = JitRunner(time_limit_ms=3000, **LAYERS[request.param])
    r.start()
    yield r
    r.close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(SECRET.encode())

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1], hits
    server.shutdown()
    server.server_close()
    t.join(timeout=5)


@pytest.fixture
def tcp_listener() -> Iterator[tuple[int, list[Any]]]:
    accepted: list[Any] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.1)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    t.join(timeout=5)
    sock.close()
    for c in accepted:
        c.close()


@dataclass
class World:
    canary: Path
    target: Path
    link: Path
    secret_ts: Path
    secret_json: Path
    port: int
    tcp_port: int

    def fill(self, template: str) -> str:
        subs = {
            "CANARY": json.dumps(str(self.canary)),
            "TARGET": json.dumps(str(self.target)),
            "LINK": json.dumps(str(self.link)),
            "SECRET_TS_URL": json.dumps(self.secret_ts.as_uri()),
            "SECRET_JSON_URL": json.dumps(self.secret_json.as_uri()),
            "HTTP_URL": json.dumps(f"http://127.0.0.1:{self.port}/leak"),
            "TCP_PORT": str(self.tcp_port),
        }
        for k, v in subs.items():
            template = template.replace(f"${k}", v)
        return template


def body(code: str) -> str:
    return f"export default async function (input: any, sys: any) {{\n{code}\n}}\n"


# (case id, tool source with $PLACEHOLDERS, expected code, time limit ms)
CORPUS: list[tuple[str, str, str, int]] = [
    ("deno-readTextFile", body("return await Deno.readTextFile($CANARY)"), "EPERM", 3000),
    ("deno-readFile", body("return new TextDecoder().decode(await Deno.readFile($CANARY))"), "EPERM", 3000),
    ("deno-open", body("const f = await Deno.open($CANARY); return 'opened'"), "EPERM", 3000),
    ("deno-writeTextFile", body("await Deno.writeTextFile($TARGET, 'pwned'); return 'wrote'"), "EPERM", 3000),
    ("deno-symlink-create", body("await Deno.symlink($CANARY, $TARGET); return 'linked'"), "EPERM", 3000),
    ("read-through-symlink", body("return await Deno.readTextFile($LINK)"), "EPERM", 3000),
    (
        "rewrapped-refusal",
        body("try { return await Deno.readTextFile($CANARY) } catch (e) { throw new Error('wrapped: ' + e.message) }"),
        "EPERM",
        3000,
    ),
    ("fetch-local-http", body("const r = await fetch($HTTP_URL); return await r.text()"), "EPERM", 3000),
    ("fetch-post", body("await fetch($HTTP_URL, {method: 'POST', body: 'x'}); return 'posted'"), "EPERM", 3000),
    (
        "websocket",
        body(
            "const ws = new WebSocket('ws://127.0.0.1:$TCP_PORT/'); await new Promise((ok, ko) => { ws.onopen = ok; ws.onerror = () => ko(new Error('ws failed')); }); return 'open'"
        ),
        "EPERM",
        3000,
    ),
    (
        "deno-connect",
        body("const c = await Deno.connect({hostname: '127.0.0.1', port: $TCP_PORT}); return 'connected'"),
        "EPERM",
        3000,
    ),
    ("deno-listen", body("const l = Deno.listen({port: 0}); return 'listening'"), "EPERM", 3000),
    (
        "deno-command",
        body(
            "const o = await new Deno.Command('sh', {args: ['-c', 'echo pwned > ' + $TARGET]}).output(); return 'ran'"
        ),
        "EPERM",
        3000,
    ),
    (
        "deno-run",
        body("const p = Deno.run({cmd: ['sh', '-c', 'echo pwned > ' + $TARGET]}); return 'ran'"),
        "EPERM",
        3000,
    ),
    ("deno-env-get", body("return Deno.env.get('PATH') ?? Deno.env.get('HOME')"), "EPERM", 3000),
    ("deno-env-toObject", body("return Deno.env.toObject()"), "EPERM", 3000),
    (
        "deno-dlopen-ffi",
        body(
            "const l = Deno.dlopen('libc.so.6', {getpid: {parameters: [], result: 'i32'}}); return l.symbols.getpid()"
        ),
        "EPERM",
        3000,
    ),
    (
        "deno-permissions-request",
        body("await Deno.permissions.request({name: 'read', path: $CANARY}); return await Deno.readTextFile($CANARY)"),
        "EPERM",
        3000,
    ),
    (
        "deno-internal-core-ops",
        body("const core = Deno[Deno.internal].core; return Object.keys(core.ops).length"),
        "EPERM",
        3000,
    ),
    (
        "deno-stdout-forge",
        body(
            'await Deno.stdout.write(new TextEncoder().encode(\'{"t":"result","id":1,"ok":true,"value":"1"}\\n\')); return \'forged\''
        ),
        "EPERM",
        3000,
    ),
    (
        "deno-stdin-steal",
        body("const b = new Uint8Array(100); await Deno.stdin.read(b); return 'stole'"),
        "EPERM",
        3000,
    ),
    ("deno-exit", body("Deno.exit(0)"), "EPERM", 3000),
    ("deno-chdir", body("Deno.chdir('/'); return 'moved'"), "EPERM", 3000),
    ("process-global", body("return process.env"), "EPERM", 3000),
    ("process-stdout", body("process.stdout.write('junk\\n'); return 'wrote'"), "EPERM", 3000),
    ("node-fs", body("const fs = await import('node:fs'); return fs.readFileSync($CANARY, 'utf8')"), "EPERM", 3000),
    (
        "node-fs-write-fd",
        body("const fs = await import('node:fs'); fs.writeSync(1, 'junk\\n'); return 'wrote'"),
        "EPERM",
        3000,
    ),
    (
        "node-child-process",
        body("const cp = await import('node:child_process'); return String(cp.execSync('echo pwned > ' + $TARGET))"),
        "EPERM",
        3000,
    ),
    (
        "static-import-ts",
        "import { s } from $SECRET_TS_URL;\nexport default async function () { return s }\n",
        "EPERM",
        3000,
    ),
    ("dynamic-import-ts", body("return (await import($SECRET_TS_URL)).s"), "EPERM", 3000),
    (
        "static-import-json",
        "import j from $SECRET_JSON_URL with { type: 'json' };\nexport default async function () { return j }\n",
        "EPERM",
        3000,
    ),
    (
        "dynamic-import-json",
        body("return (await import($SECRET_JSON_URL, {with: {type: 'json'}})).default"),
        "EPERM",
        3000,
    ),
    (
        "reexport-ts",
        "export { s } from $SECRET_TS_URL;\nexport default async function () { return 1 }\n",
        "EPERM",
        3000,
    ),
    (
        "data-url-import",
        body(
            "const m = await import('data:application/javascript,' + encodeURIComponent('export const v = await Deno.readTextFile(' + JSON.stringify($CANARY) + ')')); return m.v"
        ),
        "EPERM",
        3000,
    ),
    (
        "blob-url-import",
        body(
            "const u = URL.createObjectURL(new Blob(['export const v = await Deno.readTextFile(' + JSON.stringify($CANARY) + ')'], {type: 'application/javascript'})); return (await import(u)).v"
        ),
        "EPERM",
        3000,
    ),
    (
        "nested-worker",
        body("const w = new Worker('data:application/javascript,postMessage(1)', {type: 'module'}); return 'spawned'"),
        "EPERM",
        3000,
    ),
    (
        "nested-worker-with-permissions",
        body(
            "const w = new Worker('data:application/javascript,1', {type: 'module', deno: {permissions: 'inherit'}}); return 'spawned'"
        ),
        "EPERM",
        3000,
    ),
    (
        "webassembly",
        body("const r = await WebAssembly.instantiate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0])); return 'wasm'"),
        "EPERM",
        3000,
    ),
    ("eval", body("return await eval('Deno.readTextFile(' + JSON.stringify($CANARY) + ')')"), "EPERM", 3000),
    (
        "new-function",
        body("return await new Function('return Deno.readTextFile(' + JSON.stringify($CANARY) + ')')()"),
        "EPERM",
        3000,
    ),
    (
        "async-function-constructor",
        body("const AF = (async () => {}).constructor; return await AF('return 1')()"),
        "EPERM",
        3000,
    ),
    ("proc-self-environ", body("return await Deno.readTextFile('/proc/self/environ')"), "EPERM", 3000),
    ("proc-self-mem", body("return (await Deno.readFile('/proc/self/mem')).length"), "EPERM", 3000),
    ("broadcast-channel", body("new BroadcastChannel('x').postMessage('leak'); return 'sent'"), "EPERM", 3000),
    # A timer that would act after the time limit: the call ends ETIMEDOUT and the timer never runs.
    (
        "timer-after-limit",
        body(
            "setInterval(() => { sys.call('fs.write', {path: 'late', data: 'x'}); }, 400); await new Promise(() => {})"
        ),
        "ETIMEDOUT",
        300,
    ),
]


@pytest.fixture
def world(tmp_path: Path, http_server: tuple[int, list[str]], tcp_listener: tuple[int, list[Any]]) -> World:
    canary = tmp_path / "canary.txt"
    canary.write_text(SECRET)
    link = tmp_path / "link.txt"
    link.symlink_to(canary)
    secret_ts = tmp_path / "secret.ts"
    secret_ts.write_text(f'export const s = "{SECRET}";\n')
    secret_json = tmp_path / "secret.json"
    secret_json.write_text(json.dumps({"s": SECRET}))
    return World(canary, tmp_path / "target.txt", link, secret_ts, secret_json, http_server[0], tcp_listener[0])


@pytest.mark.parametrize(("case", "template", "expected", "limit_ms"), CORPUS, ids=[c[0] for c in CORPUS])
def test_escape_is_refused(
    runner: JitRunner,
    world: World,
    http_server: tuple[int, list[str]],
    tcp_listener: tuple[int, list[Any]],
    case: str,
    template: str,
    expected: str,
    limit_ms: int,
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def sys_call(name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
        calls.append((name, args))
        return True, {}, None, ""

    res = runner.call(world.fill(template), None, sys_call, time_limit_ms=limit_ms)
    assert (res.ok, res.code) == (False, expected), res
    assert SECRET not in repr(res)
    if expected == "EPERM":
        assert res.refusals, "a sandbox refusal must be reported for the caller to log"
    # nothing changed outside
    assert world.canary.read_text() == SECRET
    assert not world.target.exists() and not world.target.is_symlink()
    assert http_server[1] == []
    assert tcp_listener[1] == []
    # the host is still serving, and nothing the tool left behind acts after the call ended
    assert runner.call(body("return 'next'"), None, sys_call).value == "next"
    threading.Event().wait(0.5 if case.startswith("timer") else 0.0)
    assert calls == []


def test_timer_left_behind_by_a_finished_call_never_acts(runner: JitRunner) -> None:
    calls: list[str] = []
    fired = threading.Event()

    def sys_call(name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
        calls.append(name)
        fired.set()
        return True, {}, None, ""

    src = body(
        "setTimeout(() => sys.call('fs.write', {path: 'late'}), 50);"
        "setInterval(() => sys.call('fs.write', {path: 'later'}), 20);"
        "queueMicrotask(() => {}); return 'done'"
    )
    res = runner.call(src, None, sys_call)
    assert res.value == "done"
    assert not fired.wait(0.5), f"a timer acted after its call ended: {calls}"


def test_main_module_file_import_hole_exists_outside_a_worker(tmp_path: Path) -> None:
    """The reason for the layers: in a main module, with no flags, a local file import succeeds."""
    import subprocess

    secret = tmp_path / "secret.ts"
    secret.write_text(f'export const s = "{SECRET}";\n')
    main = tmp_path / "main.js"
    main.write_text(f"const m = await import({json.dumps(secret.as_uri())}); console.log(m.s);\n")
    deno = find_deno()
    assert deno is not None
    out = subprocess.run([deno, "run", "--quiet", "--deny-read", str(main)], capture_output=True, text=True, timeout=60)
    assert SECRET in out.stdout


def test_os_sandbox_alone_hides_the_filesystem(tmp_path: Path) -> None:
    """The OS layer on its own: a *main module* (where the file-import hole is open) run in the
    runner's namespace sees no host file, no network, and only the sandbox's own processes."""
    import subprocess

    secret = tmp_path / "secret.ts"
    secret.write_text(f'export const s = "{SECRET}";\n')
    probe = tmp_path / "probe.js"
    # Literal specifiers: Deno pre-loads statically analyzable imports with the module graph,
    # without a permission check; that is the hole (a computed specifier is checked).
    targets = {
        "secret": secret.as_uri(),
        "passwd": "file:///etc/passwd",
        "host_script": Path(__file__).resolve().as_uri(),
    }
    lines = [
        f"try {{ out.{k} = JSON.stringify(await import({json.dumps(u)})); }} catch (e) {{ out.{k} = e.name + ': ' + e.message; }}"
        for k, u in targets.items()
    ]
    probe.write_text("const out = {};\n" + "\n".join(lines) + "\nconsole.log(JSON.stringify(out));\n")
    # Control: outside the namespace, the same probe does read the secret.
    deno_bin = find_deno()
    assert deno_bin is not None
    control = subprocess.run([deno_bin, "run", "--quiet", str(probe)], capture_output=True, text=True, timeout=60)
    assert SECRET in control.stdout, control
    r = JitRunner()
    deno = find_deno()
    assert deno is not None
    root = tmp_path / "root"
    root.mkdir()
    argv = r._argv(deno, str(root))
    from agentlibos.actors._jit import HOST_SCRIPT

    argv[argv.index(str(HOST_SCRIPT))] = str(probe)
    argv = [a for a in argv if not a.startswith("--deny-")]  # only the namespace stands in the way
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert SECRET not in out.stdout
    for k in ("secret", "passwd", "host_script"):
        assert "Module not found" in seen[k] or "No such file" in seen[k], seen
