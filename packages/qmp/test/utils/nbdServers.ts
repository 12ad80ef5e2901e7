/**
 * Test helpers: temporary directories, running tools (qemu-img, qemu-io, nbdinfo, sha256sum), and NBD
 * servers (qemu-nbd, qemu-storage-daemon, nbdkit) as scoped processes killed by PID.
 */
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { Duration, Effect, Schedule } from "effect"
import type { Scope } from "effect"
import type { Extent } from "../../src/NbdClient.js"

export const hasTool = (name: string): boolean =>
  ChildProcess.spawnSync("sh", ["-c", `command -v ${name}`], { stdio: "ignore" }).status === 0

/** A short temporary directory (Unix socket paths must stay short), removed with the scope. */
export const tempDir: Effect.Effect<string, never, Scope.Scope> = Effect.acquireRelease(
  Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "nbd-"))),
  (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
)

export class ToolError extends Error {}

/** Runs a program to completion; stdout as a Buffer. */
export const run = (cmd: string, args: ReadonlyArray<string>): Effect.Effect<Buffer, ToolError> =>
  Effect.async<Buffer, ToolError>((resume) => {
    const child = ChildProcess.execFile(
      cmd,
      args,
      { encoding: "buffer", maxBuffer: 512 * 1024 * 1024 },
      (error, stdout, stderr) => {
        if (error) resume(Effect.fail(new ToolError(`${cmd} ${args.join(" ")}: ${error.message} ${stderr}`)))
        else resume(Effect.succeed(stdout))
      }
    )
    return Effect.sync(() => {
      if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, "SIGKILL")
    })
  })

export const sha256File = (path: string) =>
  Effect.map(run("sha256sum", [path]), (out) => out.toString("utf8").split(" ")[0])

export type Listen = string | { readonly host: string; readonly port: number }

const canConnect = (listen: Listen) =>
  Effect.async<void, Error>((resume) => {
    const socket = Net.createConnection(typeof listen === "string" ? { path: listen } : listen)
    socket.once("connect", () => {
      socket.destroy()
      resume(Effect.void)
    })
    socket.once("error", (e) => {
      socket.destroy()
      resume(Effect.fail(e))
    })
  })

/**
 * Starts a long-running server and waits until its Unix socket accepts connections. The finalizer
 * sends SIGTERM to that PID, then SIGKILL if it has not exited within 3 seconds.
 */
export const spawnServer = (
  cmd: string,
  args: ReadonlyArray<string>,
  listen: Listen
): Effect.Effect<{ readonly pid: number; readonly stderr: () => string }, ToolError, Scope.Scope> =>
  Effect.gen(function*() {
    const proc = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const child = ChildProcess.spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] })
        let stderr = ""
        let exited = false
        child.stderr.on("data", (d: Buffer) => {
          stderr += d.toString("utf8")
        })
        child.on("exit", () => {
          exited = true
        })
        child.on("error", (e) => {
          stderr += String(e)
          exited = true
        })
        return { child, stderr: () => stderr, exited: () => exited }
      }),
      ({ child, exited }) =>
        Effect.gen(function*() {
          const pid = child.pid
          if (pid === undefined || exited()) return
          process.kill(pid, "SIGTERM")
          const gone = yield* Effect.async<boolean>((resume) => {
            if (exited()) return resume(Effect.succeed(true))
            child.once("exit", () => resume(Effect.succeed(true)))
          }).pipe(Effect.timeoutTo({ duration: "3 seconds", onSuccess: () => true, onTimeout: () => false }))
          if (!gone && !exited()) process.kill(pid, "SIGKILL")
        })
    )
    yield* canConnect(listen).pipe(
      Effect.retry({
        schedule: Schedule.spaced(Duration.millis(25)),
        while: () => !proc.exited()
      }),
      Effect.timeoutFail({
        duration: "10 seconds",
        onTimeout: () => new ToolError(`${cmd} did not listen on ${JSON.stringify(listen)}: ${proc.stderr()}`)
      }),
      Effect.mapError((e) => e instanceof ToolError ? e : new ToolError(`${cmd} failed: ${proc.stderr()} ${e}`))
    )
    return { pid: proc.child.pid!, stderr: proc.stderr }
  })

/** qemu-nbd serving one image read-only (persistent, so several clients may connect). */
export const qemuNbd = (options: {
  readonly image: string
  readonly format: "qcow2" | "raw"
  readonly socket: string
  readonly exportName: string
  readonly bitmap?: string
}) =>
  spawnServer(
    "qemu-nbd",
    [
      "--persistent",
      "--shared=8",
      `--socket=${options.socket}`,
      `--format=${options.format}`,
      "--read-only",
      `--export-name=${options.exportName}`,
      ...(options.bitmap === undefined ? [] : ["-B", options.bitmap]),
      options.image
    ],
    options.socket
  )

/** qemu-storage-daemon exporting a qcow2 image (same QAPI as QMP nbd-server-start / block-export-add). */
export const storageDaemon = (options: {
  readonly image: string
  readonly socket: string
  readonly exportName: string
  readonly bitmaps?: ReadonlyArray<string>
}) =>
  spawnServer(
    "qemu-storage-daemon",
    [
      "--blockdev",
      `driver=file,filename=${options.image},node-name=file0,read-only=on`,
      "--blockdev",
      "driver=qcow2,file=file0,node-name=disk0,read-only=on",
      "--nbd-server",
      `addr.type=unix,addr.path=${options.socket}`,
      "--export",
      [
        "type=nbd,id=exp0,node-name=disk0",
        `name=${options.exportName}`,
        "writable=off",
        ...(options.bitmaps ?? []).map((b, i) => `bitmaps.${i}=${b}`)
      ].join(",")
    ],
    options.socket
  )

/** nbdkit in the foreground on a Unix socket: `nbdkit --unix SOCK -f [filters] PLUGIN args`. */
export const nbdkit = (socket: string, args: ReadonlyArray<string>) =>
  spawnServer("nbdkit", ["--unix", socket, "--foreground", ...args], socket)

/** nbdkit on 127.0.0.1:port (TCP). */
export const nbdkitTcp = (port: number, args: ReadonlyArray<string>) =>
  spawnServer("nbdkit", ["--ipaddr", "127.0.0.1", "--port", String(port), "--foreground", ...args], {
    host: "127.0.0.1",
    port
  })

/** A TCP port that was free a moment ago. */
export const freePort = Effect.async<number, Error>((resume) => {
  const server = Net.createServer()
  server.once("error", (e) => resume(Effect.fail(e)))
  server.listen(0, "127.0.0.1", () => {
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    server.close(() => resume(Effect.succeed(port)))
  })
})

export const nbdUri = (socket: string, exportName: string) =>
  `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`

/** Merges adjacent extents with the same flags. */
export const coalesce = (extents: ReadonlyArray<Extent>): Array<Extent> => {
  const out: Array<Extent> = []
  for (const e of extents) {
    const last = out[out.length - 1]
    if (last !== undefined && last.flags === e.flags && last.offset + last.length === e.offset) {
      out[out.length - 1] = { offset: last.offset, length: last.length + e.length, flags: e.flags }
    } else {
      out.push({ offset: e.offset, length: e.length, flags: e.flags })
    }
  }
  return out
}

/** `nbdinfo --map[=CONTEXT] --json URI`, as coalesced extents. */
export const nbdinfoMap = (uri: string, context?: string) =>
  Effect.map(
    run("nbdinfo", [context === undefined ? "--map" : `--map=${context}`, "--json", uri]),
    (out) =>
      coalesce(
        (JSON.parse(out.toString("utf8")) as Array<{ offset: number; length: number; type: number }>).map((e) => ({
          offset: e.offset,
          length: e.length,
          flags: e.type
        }))
      )
  )

/** Random bytes written to a file (input for `qemu-io write -s`). */
export const randomFile = (path: string, size: number) =>
  Effect.sync(() => {
    Fs.writeFileSync(path, Crypto.randomBytes(size))
    return path
  })
