// The JIT tool host: a long-lived Deno program (run with no --allow-* flag, inside an empty
// mount namespace) that runs each tool call in a fresh permission-less Worker, speaking JSON lines.
//
// stdin  <- {t:"call", id, src, input, limit_ms} | {t:"reply", id, n, ok, value, code, message}
// stdout -> {t:"ready"} | {t:"sys", id, n, name, args} | {t:"result", id, ok, value, code, message, refusals}
//
// Workers share this process's file descriptors, so the prelude withholds every way to reach them
// (Deno.stdin/stdout/stderr, Deno's internals, `process`, console) before the tool module loads.
//
// Started with the argument `--unsandboxed` (and --allow-all) only for the benchmark's `jit-sandbox`
// ablation: Workers inherit every permission and the prelude withholds only what would break this
// protocol (stdio, console, exit), so a tool can reach the host directly, as it could without the sandbox.

"use strict";

// The code each Worker starts with. It must stay plain ASCII JavaScript: it travels as a data: URL.
async function prelude(opts) {
  const open = !!(opts && opts.unsandboxed);
  const g = globalThis;
  const post = g.postMessage.bind(g);
  const addListener = g.addEventListener.bind(g);
  const JSONstringify = JSON.stringify;
  const JSONparse = JSON.parse;
  const DenoOrig = g.Deno;
  const NotCapable = DenoOrig.errors.NotCapable;
  const PermissionDenied = DenoOrig.errors.PermissionDenied;
  const refusals = [];
  const WITHHELD = "is withheld by the JIT sandbox";
  const CODES = new Set(["EPERM", "EREVOKED", "EEXPIRED", "EBUDGET", "EDENIED", "EINVAL", "ENOENT",
    "EEXIST", "ETIMEDOUT", "EIO", "ENOSYS", "ECONFLICT"]);
  const GLOBALS = open ? [] : ["Worker", "SharedWorker", "WebAssembly", "BroadcastChannel", "process", "Buffer",
    "global", "require", "close", "caches", "CacheStorage", "Cache", "navigator", "importScripts"];
  // Unsandboxed, only what would corrupt or end the host's protocol stays out of reach.
  const DENO_WITHHELD = open ? ["stdin", "stdout", "stderr", "exit", "exitCode"] : ["stdin", "stdout", "stderr",
    "exit", "exitCode", "internal", "isatty", "consoleSize",
    "inspect", "test", "bench", "jupyter", "lint", "telemetry", "permissions", "addSignalListener",
    "removeSignalListener", "chdir", "execPath", "Command", "ChildProcess", "Process", "run", "spawn",
    "spawnAndWait", "spawnAndWaitSync", "kill", "dlopen", "UnsafeCallback", "UnsafePointer", "UnsafePointerView",
    "UnsafeFnPointer"];

  class SyscallError extends Error {
    constructor(code, message) {
      super(message || code);
      this.name = "SyscallError";
      this.code = code;
    }
  }

  const refuse = (what) => {
    refusals.push(what);
    return new ReferenceError(what + " " + WITHHELD);
  };

  // Withheld globals throw (rather than vanish) so a tool's failure names what it reached for.
  for (const name of GLOBALS) {
    try {
      Object.defineProperty(g, name, {
        get() { throw refuse(name); },
        set() { throw refuse(name); },
        configurable: false,
      });
    } catch (_) {
      try { delete g[name]; } catch (_) { /* keep going: the OS layer still holds */ }
    }
  }

  // A curated Deno: permission-checked APIs stay (they throw NotCapable and we record it);
  // everything that reaches fds, internals (core ops) or the process is withheld.
  const isRefusal = (e) => e instanceof NotCapable || e instanceof PermissionDenied ||
    (e && typeof e.message === "string" && /Requires \S+ access/.test(e.message));
  const record = (name, e) => {
    if (isRefusal(e)) refusals.push("Deno." + name + ": " + e.message);
    return e;
  };
  const Deno = {};
  for (const key of Object.getOwnPropertyNames(DenoOrig)) {
    if (DENO_WITHHELD.includes(key)) {
      Object.defineProperty(Deno, key, { get() { throw refuse("Deno." + key); }, enumerable: false });
      continue;
    }
    const v = DenoOrig[key];
    if (typeof v === "function" && !/^[A-Z]/.test(key)) {
      Deno[key] = function (...args) {
        let r;
        try { r = v.apply(DenoOrig, args); } catch (e) { throw record(key, e); }
        if (r && typeof r.then === "function") return r.then(undefined, (e) => { throw record(key, e); });
        return r;
      };
    } else {
      Deno[key] = v;
    }
  }
  Object.freeze(Deno);
  Object.defineProperty(g, "Deno", { value: Deno, writable: false, configurable: false, enumerable: true });

  const origFetch = g.fetch;
  Object.defineProperty(g, "fetch", {
    value: (...args) => origFetch(...args).then(undefined, (e) => { throw record("fetch", e); }),
    writable: false, configurable: false,
  });

  // console writes straight to the host's stdout (the protocol channel): keep it silent.
  const noop = () => {};
  const quiet = {};
  for (const k of ["log", "info", "warn", "error", "debug", "trace", "dir", "dirxml", "table", "group",
    "groupCollapsed", "groupEnd", "time", "timeEnd", "timeLog", "count", "countReset", "assert", "clear"]) quiet[k] = noop;
  Object.defineProperty(g, "console", { value: Object.freeze(quiet), writable: false, configurable: false });
  Object.defineProperty(g, "SyscallError", { value: SyscallError, writable: false, configurable: false });

  const toWire = (value) => JSONstringify(value === undefined ? null : value, (_k, v) => {
    if (v instanceof ArrayBuffer) v = new Uint8Array(v);
    if (ArrayBuffer.isView(v)) {
      const bytes = new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
      let s = "";
      for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
      return { __bytes__: btoa(s) };
    }
    if (typeof v === "bigint") throw new TypeError("a BigInt cannot cross the syscall boundary");
    return v;
  });
  const fromWire = (text) => JSONparse(text, (_k, v) => {
    if (v && typeof v === "object" && !Array.isArray(v) && typeof v.__bytes__ === "string" &&
      Object.keys(v).length === 1) {
      const s = atob(v.__bytes__);
      const out = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
      return out;
    }
    return v;
  });

  const pending = new Map();
  let nextN = 1;
  const sys = Object.freeze({
    SyscallError,
    call(name, args) {
      if (typeof name !== "string") return Promise.reject(new SyscallError("EINVAL", "syscall name must be a string"));
      let wire;
      try { wire = toWire(args === undefined ? {} : args); } catch (e) {
        return Promise.reject(new SyscallError("EINVAL", "syscall args must be JSON-able: " + e.message));
      }
      const n = nextN++;
      return new Promise((resolve, reject) => {
        pending.set(n, { resolve, reject });
        post({ t: "sys", n, name, args: wire });
      });
    },
  });

  const classify = (e, depth = 0) => {
    if (depth > 8 || e === null || e === undefined) return null;
    if (e instanceof SyscallError) return CODES.has(e.code) ? e.code : "EIO";
    if (isRefusal(e) || e instanceof EvalError) return "EPERM";
    if (typeof e === "object" && typeof e.message === "string") {
      if (e.message.includes(WITHHELD)) return "EPERM";
      if (/Code generation from strings disallowed/.test(e.message)) return "EPERM";
      if ((e instanceof ReferenceError || e instanceof TypeError) &&
        /\b(Worker|SharedWorker|WebAssembly|Deno|process|BroadcastChannel|require)\b/.test(e.message)) return "EPERM";
      if (/^(NotCapable|PermissionDenied)$/.test(String(e.name))) return "EPERM";
    }
    const inner = [];
    if (typeof e === "object") {
      if ("cause" in e) inner.push(e.cause);
      if (Array.isArray(e.errors)) inner.push(...e.errors);
    }
    for (const c of inner) {
      const code = classify(c, depth + 1);
      if (code === "EPERM") return code;
    }
    return null;
  };
  const describe = (e) => {
    try {
      if (e instanceof Error) return (e.name || "Error") + ": " + e.message;
      return "thrown: " + String(e);
    } catch (_) {
      return "thrown: (unprintable)";
    }
  };
  const fail = (e) => {
    const code = classify(e) || "EIO";
    const message = describe(e);
    if (code === "EPERM" && !(e instanceof SyscallError)) refusals.push(message);
    post({ t: "result", ok: false, code, message, refusals });
  };

  let started = false;
  addListener("message", async (ev) => {
    const m = ev.data;
    if (m.t === "reply") {
      const p = pending.get(m.n);
      if (!p) return;
      pending.delete(m.n);
      if (m.ok) {
        let value;
        try { value = fromWire(m.value); } catch (e) { p.reject(new SyscallError("EIO", "bad reply")); return; }
        p.resolve(value);
      } else {
        p.reject(new SyscallError(m.code, m.message));
      }
      return;
    }
    if (m.t !== "run" || started) return;
    started = true;
    let mod;
    try {
      mod = await import("data:application/typescript," + encodeURIComponent(m.src));
    } catch (e) {
      fail(e);
      return;
    }
    if (typeof mod.default !== "function") {
      post({ t: "result", ok: false, code: "EINVAL", message: "the tool module must default-export a function", refusals });
      return;
    }
    try {
      const value = await mod.default(fromWire(m.input), sys);
      let wire;
      try { wire = toWire(value); } catch (e) {
        post({ t: "result", ok: false, code: "EIO", message: "the tool's value is not JSON-able: " + describe(e), refusals });
        return;
      }
      post({ t: "result", ok: true, value: wire, refusals });
    } catch (e) {
      fail(e);
    }
  });
  post({ t: "ready" });
}

const UNSANDBOXED = Deno.args.includes("--unsandboxed");
const PRELUDE_URL = "data:text/javascript;base64," +
  btoa("(" + prelude.toString() + ")(" + JSON.stringify({ unsandboxed: UNSANDBOXED }) + ");\n");
const POOL = 3;

const encoder = new TextEncoder();
const out = Deno.stdout.writable.getWriter();
let writeChain = Promise.resolve();
function send(msg) {
  const line = encoder.encode(JSON.stringify(msg) + "\n");
  writeChain = writeChain.then(() => out.write(line));
  return writeChain;
}

// Fresh workers are made ahead of time (a new isolate per call, never reused) so a call does not
// wait for isolate start-up.
const idle = [];
function spawnWorker() {
  const w = new Worker(PRELUDE_URL, { type: "module", deno: { permissions: UNSANDBOXED ? "inherit" : "none" } });
  const slot = { w, ready: null, call: null };
  slot.ready = new Promise((resolve) => { slot.onReady = resolve; });
  w.onmessage = (ev) => onWorkerMessage(slot, ev.data);
  w.onerror = (ev) => {
    ev.preventDefault();
    if (slot.call) finish(slot, { ok: false, code: "EIO", message: "worker error: " + ev.message, refusals: [] });
  };
  w.onmessageerror = () => {
    if (slot.call) finish(slot, { ok: false, code: "EIO", message: "unreadable message from the tool", refusals: [] });
  };
  return slot;
}
function refill() {
  while (idle.length < POOL) idle.push(spawnWorker());
}

const calls = new Map(); // id -> slot

function finish(slot, result) {
  const call = slot.call;
  if (!call || call.done) return;
  call.done = true;
  clearTimeout(call.timer);
  calls.delete(call.id);
  // The call is over (`done` stops every message from the worker); a runaway worker dies at once,
  // a finished one right after its result is written, so the write is not delayed by the teardown.
  if (!result.ok && result.code === "ETIMEDOUT") slot.w.terminate();
  const refusals = Array.isArray(result.refusals) ? result.refusals.slice(0, 100).map((r) => String(r).slice(0, 500)) : [];
  send({ t: "result", id: call.id, ok: !!result.ok, value: result.ok ? result.value : null,
    code: result.ok ? null : String(result.code || "EIO"), message: result.ok ? "" : String(result.message || "").slice(0, 2000), refusals })
    .finally(() => slot.w.terminate());
  // Replacements are made after the result is out: spawning an isolate competes with the call.
  setTimeout(refill, 0);
}

function onWorkerMessage(slot, m) {
  if (!m || typeof m !== "object") return;
  if (m.t === "ready") { slot.onReady(); return; }
  const call = slot.call;
  if (!call || call.done) return; // nothing may act after its call ended
  if (m.t === "sys" && typeof m.n === "number" && typeof m.name === "string" && typeof m.args === "string") {
    send({ t: "sys", id: call.id, n: m.n, name: m.name, args: m.args });
  } else if (m.t === "result") {
    finish(slot, m);
  }
}

async function startCall(msg) {
  const slot = idle.shift() || spawnWorker();
  const call = { id: msg.id, done: false, timer: 0 };
  slot.call = call;
  calls.set(msg.id, slot);
  const limit = Math.max(1, Number(msg.limit_ms) || 5000);
  call.timer = setTimeout(() => finish(slot, { ok: false, code: "ETIMEDOUT", message: `the tool ran past its ${limit} ms limit`, refusals: [] }), limit);
  await slot.ready;
  if (call.done) return;
  slot.w.postMessage({ t: "run", src: String(msg.src), input: JSON.stringify(msg.input ?? null) });
}

function onLine(line) {
  let msg;
  try { msg = JSON.parse(line); } catch (_) { return; }
  if (msg.t === "call") {
    startCall(msg);
  } else if (msg.t === "reply") {
    const slot = calls.get(msg.id);
    if (!slot || !slot.call || slot.call.done) return;
    slot.w.postMessage({ t: "reply", n: msg.n, ok: !!msg.ok, value: msg.ok ? JSON.stringify(msg.value ?? null) : null,
      code: msg.code, message: msg.message });
  } else if (msg.t === "cancel") {
    const slot = calls.get(msg.id);
    if (slot) finish(slot, { ok: false, code: "ETIMEDOUT", message: "cancelled", refusals: [] });
  }
}

refill();
await idle[0].ready;
await send({ t: "ready" });
const decoder = new TextDecoder();
let buf = "";
for await (const chunk of Deno.stdin.readable) {
  buf += decoder.decode(chunk, { stream: true });
  let i;
  while ((i = buf.indexOf("\n")) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (line) onLine(line);
  }
}
Deno.exit(0);
