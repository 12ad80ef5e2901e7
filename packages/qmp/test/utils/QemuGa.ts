/**
 * Test fixture: a real qemu-ga running **on the host**, listening on a Unix socket, for protocol tests.
 *
 * Safety: qemu-ga on a host acts on the host (freeze would freeze the host's filesystems). It is therefore only
 * ever started with `-b` blocking every RPC that `qemu-ga -b help` lists except the read-only ones in
 * {@link allowedCommands} (stock-qemu.md §9.2); the block list is checked to contain the freeze, thaw,
 * shutdown, exec, file and set RPCs before the process is spawned. Its PID, state and log files live in a
 * temporary directory; the scope kills it by PID and removes the directory.
 */
import { Effect } from "effect"
import type { Scope } from "effect"
import * as Path from "node:path"
import { hasProgram, makeTempDir, run, spawnScoped, waitForPath } from "./Qemu.js"

/** The RPCs left enabled. */
export const allowedCommands: ReadonlyArray<string> = [
  "guest-sync",
  "guest-sync-delimited",
  "guest-ping",
  "guest-info",
  "guest-fsfreeze-status",
  "guest-get-osinfo",
  "guest-get-host-name",
  "guest-get-time"
]

/** RPCs that must be in the block list, or the fixture refuses to start qemu-ga. */
const mustBlock = [
  "guest-fsfreeze-freeze",
  "guest-fsfreeze-freeze-list",
  "guest-fsfreeze-thaw",
  "guest-fstrim",
  "guest-shutdown",
  "guest-suspend-disk",
  "guest-suspend-ram",
  "guest-suspend-hybrid",
  "guest-exec",
  "guest-file-open",
  "guest-file-write",
  "guest-set-time",
  "guest-set-user-password",
  "guest-set-vcpus",
  "guest-set-memory-blocks",
  "guest-ssh-add-authorized-keys"
]

/** qemu-ga is installed. */
export const hasQemuGa: boolean = hasProgram("qemu-ga")

/** Every RPC of `qemu-ga -b help` except {@link allowedCommands}; dies unless the dangerous ones are in it. */
export const blockList: Effect.Effect<ReadonlyArray<string>> = Effect.gen(function*() {
  const listed = (yield* run("qemu-ga", ["-b", "help"])).split("\n").map((line) => line.trim()).filter((line) =>
    line.length > 0
  )
  const blocked = listed.filter((name) => !allowedCommands.includes(name))
  const missing = mustBlock.filter((name) => !blocked.includes(name))
  if (missing.length > 0) return yield* Effect.dieMessage(`refusing to start qemu-ga: ${missing.join(",")} not blocked`)
  return blocked
})

/** A running host qemu-ga. */
export interface RunningQemuGa {
  readonly pid: number
  readonly dir: string
  readonly socketPath: string
  readonly blocked: ReadonlyArray<string>
  readonly log: string
  /** Sends a signal to qemu-ga by PID. */
  readonly signal: (signal: NodeJS.Signals) => Effect.Effect<void>
}

/** Starts `qemu-ga -m unix-listen -p <sock> -f <pid> -t <state> -b <block list> -l <log>` in the foreground. */
export const startQemuGa: Effect.Effect<RunningQemuGa, never, Scope.Scope> = Effect.gen(function*() {
  const dir = yield* makeTempDir("vzqga-")
  const blocked = yield* blockList
  const socketPath = Path.join(dir, "qga.sock")
  const stateDir = Path.join(dir, "state")
  const log = Path.join(dir, "qga.log")
  yield* run("mkdir", ["-p", stateDir])
  const child = yield* spawnScoped("qemu-ga", [
    "-m",
    "unix-listen",
    "-p",
    socketPath,
    "-f",
    Path.join(dir, "qga.pid"),
    "-t",
    stateDir,
    "-b",
    blocked.join(","),
    "-l",
    log
  ], { cwd: dir })
  yield* waitForPath(socketPath, "10 seconds", child.exitInfo)
  return {
    pid: child.pid,
    dir,
    socketPath,
    blocked,
    log,
    signal: (signal) =>
      Effect.sync(() => {
        if (child.exitInfo() === undefined) process.kill(child.pid, signal)
      })
  }
})
