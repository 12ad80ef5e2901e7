/**
 * PBS backup benchmark: `npx tsx bench/pbs.ts [--size 1G] [--runs 1] [--format raw|qcow2] [--dirty 1]
 * [--accel tcg|kvm|auto] [--upload-concurrency <n>] [--profile <dir>]`.
 *
 * The issue's goals, in one run: a full backup of a disk of `--size` (default 1 GiB, random data in 9 of
 * every 10 chunks of 4 MiB, holes in the rest) to the in-repo PBS test server must reach at least half
 * of `sha256sum`'s throughput over the same raw image; an incremental after `--dirty` % (default 1) of
 * the disk changed must take at most 10 % of the full backup's time.
 *
 * Set-up, under $BENCH_DIR (or /tmp): the raw image (node:crypto random bytes written in 4 MiB pieces),
 * for `--format qcow2` also a qcow2 converted from it (the raw copy stays for `sha256sum`); VM 900 of a
 * standalone host with that disk as scsi0 (SeaBIOS, no OS: nothing writes but us; TCG by default, as an
 * idle SeaBIOS under nested KVM burns half a core), started paused and resumed as a user would. Each
 * run gets a fresh PBS test server (HTTPS on 127.0.0.1, API token, pinned fingerprint) with a fresh
 * datastore, so each run's first backup is a full one (the VM's dirty bitmap no longer matches the
 * datastore's latest snapshot) and uploads every chunk.
 *
 * Measured per run:
 *   (a) `sha256sum` of the raw image (page cache warm, as for the backup: QEMU reads through it too);
 *   (b) the full backup: `BackupJob.backupVm` with the stock engine and `PbsTarget`;
 *   (c) after HMP `qemu-io -d scsi0 "write -s <random file> <off> 4M"` to `--dirty` % of the chunks
 *       (4 MiB-aligned, spread over the disk), the incremental backup.
 * Each backup runs in its own child process (`node --import tsx bench/pbs.ts --child …`), so its peak
 * RSS (`process.resourceUsage().maxRSS`) is the backup client's alone; the PBS test server runs in a
 * process of its own (`… --server <datastore>`, driven over Node's IPC channel), as a real server
 * would. Three times per backup:
 *   - wall: `backupVm` from call to return (config lock, fleecing, transfer, finish, log upload, cleanup).
 *     The workflow polls the job's status once a second, so this rounds up to the next poll;
 *   - polled: from the log event `started backup task` to the first progress event with status `done`
 *     (the same poll granularity: ≤ 1 s late);
 *   - transfer: from `started backup task` to the end of the archive's `complete` (the PBS `finish`
 *     answered), taken by wrapping the target's session — independent of the poll, resolution 1 ms
 *     (event times are `Date.now()`).
 * Chunk counts come from the server's stats (uploaded, duplicates), the reused bytes from the job's
 * status. CPU seconds (user + system, all threads) per backup: the child's own (`process.cpuUsage`), the
 * server's and QEMU's (/proc/<pid>/stat); sha256sum's from /proc while it runs. On a shared machine the
 * CPU ratio (sha256sum CPU / client CPU) is the steadier figure. `--profile <dir>` writes V8 CPU
 * profiles of each backup child (`--cpu-prof`) and of the server process during each backup.
 * Medians over `--runs` are printed; the process exits 0 when every step worked (goals missed are
 * reported, not failures). QEMU is stopped (and killed by PID as a backstop), children are killed by
 * PID, and the temp directory is removed at the end, also on failure or Ctrl-C.
 */
import { Cause, Effect, Exit, Fiber, Layer, Redacted } from "effect"
import { type ChildProcess, fork, spawn, spawnSync } from "node:child_process"
import { randomFillSync } from "node:crypto"
import * as fs from "node:fs"
import * as inspector from "node:inspector"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as BackupJob from "@vzdump/core/BackupJob"
import { BackupReporter } from "@vzdump/core/BackupReporter"
import { BackupTarget, type BackupTargetService } from "@vzdump/core/BackupTarget"
import * as ConfigStore from "@vzdump/core/ConfigStore"
import * as HostCommand from "@vzdump/core/HostCommand"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as PbsClient from "@vzdump/target-pbs/PbsClient"
import * as PbsTarget from "@vzdump/target-pbs/PbsTarget"
import * as PbsTestServer from "@vzdump/target-pbs/testing/PbsTestServer"
import { median, parseSize } from "./lib/numbers.js"
import { cpuSeconds, peakRssKiB } from "./lib/proc.js"

const MiB = 1024 * 1024
const CHUNK = 4 * MiB
const VMID = 900
const TOKEN_ID = "bench@pbs!vzdump"
const self = fileURLToPath(import.meta.url)
const out = (s: string) => process.stdout.write(s)

// -------------------------------------------------------------------------------------------------
// child side: one backup per process

interface ChildJob {
  readonly port: number
  readonly fingerprint: string
  readonly configDir: string
  readonly runDir: string
  readonly fleeceDir: string
  /** PbsTarget's chunk uploads in flight; its default when absent. */
  readonly uploadConcurrency: number | undefined
}

interface ChildResult {
  readonly wallSeconds: number
  /** `started backup task` → archive `complete` ended (ms resolution). */
  readonly transferSeconds: number | undefined
  /** `started backup task` → first progress event with status `done` (poll granularity). */
  readonly polledSeconds: number | undefined
  readonly total: number | undefined
  readonly dirty: number | undefined
  readonly transferred: number | undefined
  readonly reused: number | undefined
  readonly lines: ReadonlyArray<string>
  readonly rssBeforeKiB: number
  readonly peakRssKiB: number
  /** User + system CPU seconds of this process during `backupVm`. */
  readonly cpuSeconds: number
}

const childBackup = (job: ChildJob, secret: string) =>
  Effect.gen(function*() {
    const marks: { started?: number; done?: number; completed?: number } = {}
    const client = yield* PbsClient.make({
      host: "127.0.0.1",
      port: job.port,
      datastore: "bench",
      auth: { _tag: "ApiToken", tokenId: TOKEN_ID, secret: Redacted.make(secret) },
      fingerprint: job.fingerprint
    })
    const pbs = yield* PbsTarget.make(client, { id: "bench", uploadConcurrency: job.uploadConcurrency })
    // the target as the workflow sees it, with the end of the session's `complete` time-stamped
    const target: BackupTargetService = {
      name: pbs.name,
      open: (request) =>
        Effect.map(pbs.open(request), (session) =>
          session.complete === undefined ? session : {
            ...session,
            complete: Effect.tap(session.complete, () => Effect.sync(() => (marks.completed = Date.now())))
          })
    }
    const reporter = Layer.succeed(BackupReporter, {
      report: (event) =>
        Effect.sync(() => {
          if (event._tag === "Log" && event.message.startsWith("started backup task")) {
            marks.started = event.time.getTime()
          }
          if (event._tag === "Progress" && event.status.status === "done" && marks.done === undefined) {
            marks.done = event.time.getTime()
          }
        })
    })
    const layer = Layer.mergeAll(
      StandaloneHost.layer({ configDir: job.configDir, runDir: job.runDir }),
      StockEngine.layer({ fleeceDir: job.fleeceDir, socketDir: job.runDir }).pipe(Layer.provide(HostCommand.layer)),
      Layer.succeed(BackupTarget, target),
      reporter
    )
    const rssBeforeKiB = process.resourceUsage().maxRSS
    const begin = performance.now()
    const cpuBefore = process.cpuUsage()
    const result = yield* BackupJob.backupVm({ vmid: VMID }).pipe(Effect.provide(layer))
    const wallSeconds = (performance.now() - begin) / 1000
    const cpu = process.cpuUsage(cpuBefore)
    const since = (t: number | undefined) =>
      t === undefined || marks.started === undefined ? undefined : (t - marks.started) / 1000
    const childResult: ChildResult = {
      wallSeconds,
      transferSeconds: since(marks.completed),
      polledSeconds: since(marks.done),
      total: result.status.total,
      dirty: result.status.dirty,
      transferred: result.status.transferred,
      reused: result.status.reused,
      lines: result.logLines.map((line) => line.replace(/^\S+ \S+ /, "")).filter((line) =>
        /dirty-bitmap|transferred|incrementally|backup is sparse/.test(line)
      ),
      rssBeforeKiB,
      peakRssKiB: process.resourceUsage().maxRSS,
      cpuSeconds: (cpu.user + cpu.system) / 1e6
    }
    return childResult
  })

const runChild = (job: ChildJob) =>
  Effect.runPromise(Effect.scoped(childBackup(job, process.env.BENCH_PBS_SECRET ?? ""))).then(
    (result) => {
      out(`${JSON.stringify(result)}\n`)
      process.exit(0)
    },
    (error: unknown) => {
      process.stderr.write(`${error instanceof Error ? error.stack ?? error.message : String(error)}\n`)
      process.exit(1)
    }
  )

// -------------------------------------------------------------------------------------------------
// server side: the PBS test server in a process of its own, driven over the IPC channel

type ServerRequest =
  | { readonly _tag: "Stats"; readonly id: number }
  | { readonly _tag: "ProfileStart"; readonly id: number; readonly dir: string; readonly name: string }
  | { readonly _tag: "ProfileStop"; readonly id: number }

type ServerMessage =
  | { readonly _tag: "Ready"; readonly port: number; readonly fingerprint: string }
  | { readonly _tag: "Reply"; readonly id: number; readonly stats?: PbsTestServer.Stats }

const runServer = (datastore: string) => {
  const send = (message: ServerMessage) => process.send!(message)
  const program = Effect.scoped(Effect.gen(function*() {
    const server = yield* PbsTestServer.make({
      datastores: [{ name: "bench", path: datastore }],
      tokens: [{ tokenid: TOKEN_ID, secret: Redacted.make(process.env.BENCH_PBS_SECRET ?? "") }]
    })
    let stopProfile: (() => Promise<void>) | undefined
    // serves until the parent disconnects
    yield* Effect.async<void>((resume) => {
      process.on("message", (request: ServerRequest) => {
        switch (request._tag) {
          case "Stats":
            return send({ _tag: "Reply", id: request.id, stats: Effect.runSync(server.stats) })
          case "ProfileStart":
            return void profileThisProcess(request.dir, request.name).then((stop) => {
              stopProfile = stop
              send({ _tag: "Reply", id: request.id })
            })
          case "ProfileStop":
            return void (stopProfile?.() ?? Promise.resolve()).then(() => {
              stopProfile = undefined
              send({ _tag: "Reply", id: request.id })
            })
        }
      })
      process.once("disconnect", () => resume(Effect.void))
      send({ _tag: "Ready", port: server.port, fingerprint: server.fingerprint })
    })
  }))
  Effect.runPromise(program).then(
    () => process.exit(0),
    (error: unknown) => {
      process.stderr.write(`${error instanceof Error ? error.stack ?? error.message : String(error)}\n`)
      process.exit(1)
    }
  )
}

interface ServerHandle {
  readonly process: ChildProcess
  readonly port: number
  readonly fingerprint: string
  readonly stats: () => Promise<PbsTestServer.Stats>
  readonly profileStart: (dir: string, name: string) => Promise<void>
  readonly profileStop: () => Promise<void>
}

/** Starts the server process (the token secret goes by environment) and waits until it listens. */
const startServer = (datastore: string, secret: string, children: Set<ChildProcess>) =>
  new Promise<ServerHandle>((resolve, reject) => {
    const child = fork(self, ["--server", datastore], {
      execArgv: ["--import", "tsx"],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
      env: { ...process.env, BENCH_PBS_SECRET: secret }
    })
    children.add(child)
    let nextId = 0
    const pending = new Map<
      number,
      { readonly done: (message: ServerMessage & { _tag: "Reply" }) => void; readonly failed: (e: Error) => void }
    >()
    const request = (make: (id: number) => ServerRequest) =>
      new Promise<ServerMessage & { _tag: "Reply" }>((done, failed) => {
        const id = ++nextId
        pending.set(id, { done, failed })
        child.send(make(id))
      })
    child.on("message", (message: ServerMessage) => {
      if (message._tag === "Ready") {
        resolve({
          process: child,
          port: message.port,
          fingerprint: message.fingerprint,
          stats: () => request((id) => ({ _tag: "Stats", id })).then((reply) => reply.stats!),
          profileStart: (dir, name) => request((id) => ({ _tag: "ProfileStart", id, dir, name })).then(() => {}),
          profileStop: () => request((id) => ({ _tag: "ProfileStop", id })).then(() => {})
        })
      } else {
        pending.get(message.id)?.done(message)
        pending.delete(message.id)
      }
    })
    child.on("error", reject)
    child.on("exit", (code) => {
      children.delete(child)
      const error = new Error(`PBS test server process exited with ${code}`)
      reject(error)
      for (const waiter of pending.values()) waiter.failed(error)
      pending.clear()
    })
  })

// -------------------------------------------------------------------------------------------------
// parent side



const arg = (name: string, fallback: string) => {
  const i = process.argv.indexOf(name)
  return i >= 0 ? process.argv[i + 1] ?? fallback : fallback
}

/** `size` bytes; 4 MiB chunk j is a hole when j % 10 === 9, random data otherwise. Returns the data bytes. */
const makeMixed = (file: string, size: number) => {
  const fd = fs.openSync(file, "w")
  fs.ftruncateSync(fd, size)
  const block = Buffer.allocUnsafe(CHUNK)
  let data = 0
  for (let j = 0; j * CHUNK < size; j++) {
    if (j % 10 === 9) continue
    randomFillSync(block)
    fs.writeSync(fd, block, 0, block.length, j * CHUNK)
    data += block.length
  }
  fs.closeSync(fd)
  return data
}

interface Sample {
  readonly seconds: number
  readonly peakRssKiB: number
  readonly cpuSeconds: number
}

/** Runs a program to completion, polling /proc/<pid>/status for its peak RSS. */
const runTimed = (command: string, args: ReadonlyArray<string>, children: Set<ChildProcess>) =>
  new Promise<Sample & { stdout: string }>((resolve, reject) => {
    const start = process.hrtime.bigint()
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] })
    children.add(child)
    let stdout = ""
    let stderr = ""
    child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()))
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()))
    let peak = 0
    let cpu = 0
    const timer = setInterval(() => {
      peak = Math.max(peak, peakRssKiB(child.pid!) ?? 0)
      cpu = cpuSeconds(child.pid!) ?? cpu
    }, 5)
    child.on("error", reject)
    child.on("exit", (code) => {
      clearInterval(timer)
      children.delete(child)
      const seconds = Number(process.hrtime.bigint() - start) / 1e9
      if (code !== 0) reject(new Error(`${command} ${args.join(" ")} exited with ${code}: ${stderr}`))
      else resolve({ seconds, peakRssKiB: peak, cpuSeconds: cpu, stdout })
    })
  })

/** One backup in a child process (the secret goes by environment, not on the command line). */
const runBackupChild = (job: ChildJob, secret: string, profileDir: string | undefined, children: Set<ChildProcess>) =>
  new Promise<ChildResult>((resolve, reject) => {
    const profile = profileDir === undefined ? [] : ["--cpu-prof", "--cpu-prof-dir", profileDir]
    const child = spawn(process.execPath, [...profile, "--import", "tsx", self, "--child", JSON.stringify(job)], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, BENCH_PBS_SECRET: secret }
    })
    children.add(child)
    let stdout = ""
    let stderr = ""
    child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()))
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()))
    child.on("error", reject)
    child.on("exit", (code) => {
      children.delete(child)
      if (code !== 0) return reject(new Error(`backup child exited with ${code}: ${stderr}`))
      resolve(JSON.parse(stdout.trim().split("\n").pop() ?? "") as ChildResult)
    })
  })

/**
 * Starts V8's CPU profiler in this process (the PBS test server's); the returned function stops it and
 * writes `<dir>/<name>.cpuprofile` (the format `--cpu-prof` writes, for the same tools).
 */
const profileThisProcess = (dir: string, name: string) =>
  new Promise<() => Promise<void>>((resolve, reject) => {
    const session = new inspector.Session()
    session.connect()
    session.post("Profiler.enable", () =>
      session.post("Profiler.start", (error) => {
        if (error !== null) return reject(error)
        resolve(() =>
          new Promise<void>((done, failed) =>
            session.post("Profiler.stop", (stopError, result) => {
              session.disconnect()
              if (stopError !== null) return failed(stopError)
              fs.mkdirSync(dir, { recursive: true })
              fs.writeFileSync(path.join(dir, `${name}.cpuprofile`), JSON.stringify(result.profile))
              done()
            })
          )
        )
      }))
  })

/** SIGTERM, then SIGKILL after 3 s, to a child this process started. */
const killByPid = async (child: ChildProcess) => {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()))
  process.kill(child.pid, "SIGTERM")
  const timer = setTimeout(() => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      process.kill(child.pid, "SIGKILL")
    }
  }, 3000)
  await exited
  clearTimeout(timer)
}

/** The QEMU named by the VM's pid file, if it is one: SIGKILL (the backstop after `stop`). */
const killQemuByPidFile = (pidFile: string) => {
  try {
    const pid = Number(fs.readFileSync(pidFile, "utf8").trim())
    if (Number.isInteger(pid) && pid > 0 && fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("qemu")) {
      process.kill(pid, "SIGKILL")
    }
  } catch {
    // gone
  }
}

interface BackupStats {
  readonly uploads: number
  readonly bytes: number
  readonly duplicates: number
  /** CPU seconds of the PBS test server's process and of QEMU during the backup. */
  readonly serverCpu: number
  readonly qemuCpu: number
  /** The server process's peak RSS so far. */
  readonly serverPeakRssKiB: number
}

interface RunResult {
  readonly sha: Sample
  readonly full: ChildResult
  readonly inc: ChildResult
  readonly fullStats: BackupStats
  readonly incStats: BackupStats
  readonly dirtyChunks: number
}

const fmt = (n: number | undefined, digits = 2) => n === undefined ? "-" : n.toFixed(digits)
const pad = (s: string, n: number) => s.padEnd(n)
const lpad = (s: string, n: number) => s.padStart(n)

const program = Effect.gen(function*() {
  const size = parseSize(arg("--size", "1G"), CHUNK)
  const runs = Math.max(1, Number(arg("--runs", "1")))
  const format = arg("--format", "raw")
  if (format !== "raw" && format !== "qcow2") return yield* Effect.dieMessage(`--format raw|qcow2, not ${format}`)
  const dirtyPercent = Number(arg("--dirty", "1"))
  const accel = arg("--accel", "tcg")
  if (accel !== "tcg" && accel !== "kvm" && accel !== "auto") {
    return yield* Effect.dieMessage(`--accel tcg|kvm|auto, not ${accel}`)
  }
  const profileArg = process.argv.includes("--profile") ? path.resolve(arg("--profile", "prof")) : undefined
  const uploadConcurrency = process.argv.includes("--upload-concurrency")
    ? Math.max(1, Number(arg("--upload-concurrency", "8")))
    : undefined
  const chunks = size / CHUNK
  const dirtyChunks = Math.max(1, Math.round((chunks * dirtyPercent) / 100))

  // -- working directory, removed last --------------------------------------------------------------
  const base = process.env.BENCH_DIR ?? os.tmpdir()
  const dir = yield* Effect.acquireRelease(
    Effect.sync(() => fs.mkdtempSync(path.join(base, "vzb-pbs-"))),
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )
  const children = new Set<ChildProcess>()
  const configDir = path.join(dir, "conf")
  const runDir = path.join(dir, "run")
  const fleeceDir = path.join(dir, "fleece")
  for (const d of [configDir, runDir, fleeceDir]) fs.mkdirSync(d, { recursive: true })

  // -- the disk ------------------------------------------------------------------------------------
  out(
    `bench/pbs.ts: ${size / MiB} MiB ${format} disk in ${dir}, ${runs} run(s), accel ${accel}, upload concurrency ${
      uploadConcurrency ?? "default"
    }\n`
  )
  const raw = path.join(dir, "disk.raw")
  const dataBytes = makeMixed(raw, size)
  let disk = raw
  if (format === "qcow2") {
    disk = path.join(dir, "vm-900-disk-0.qcow2")
    const converted = spawnSync("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, disk], { encoding: "utf8" })
    if (converted.status !== 0) return yield* Effect.dieMessage(`qemu-img convert: ${converted.stderr}`)
  }
  spawnSync("sync", [], { stdio: "ignore" })
  fs.writeFileSync(
    path.join(configDir, `${VMID}.conf`),
    `name: pbs-bench\nagent: 0\nmemory: 128\nscsi0: ${disk},size=${size / MiB}M\n`
  )
  // one random 4 MiB source file per dirty chunk and run (`write -s` reads from the file's start;
  // equal chunks would be deduplicated and uploaded once)
  const block = Buffer.allocUnsafe(CHUNK)
  const sources = Array.from({ length: runs }, (_, r) =>
    Array.from({ length: dirtyChunks }, (_, i) => {
      const file = path.join(dir, `dirty-${r}-${i}.bin`)
      randomFillSync(block)
      fs.writeFileSync(file, block)
      return file
    }))

  // -- the VM ----------------------------------------------------------------------------------------
  // TCG by default: the guest runs no OS, and SeaBIOS idling under (nested) KVM here costs QEMU about
  // half a core, which the backup would compete with; under TCG it idles at ~1 % (QEMU's NBD export
  // and block layer do not depend on the accelerator)
  const hostContext = yield* Layer.build(StandaloneHost.layer({ configDir, runDir, accel }))
  const hypervisor = Hypervisor.pipe(Effect.provide(hostContext))
  const pidFile = StandaloneHost.vmRunPaths({ runDir }, VMID).pid
  yield* Effect.addFinalizer(() =>
    Effect.flatMap(hypervisor, (h) => Effect.ignore(h.stop(VMID))).pipe(
      Effect.andThen(Effect.sync(() => killQemuByPidFile(pidFile)))
    )
  )
  yield* Effect.gen(function*() {
    const h = yield* Hypervisor
    const store = yield* ConfigStore.ConfigStore
    yield* h.startPaused(VMID, yield* store.load(VMID))
    yield* h.resume(VMID)
  }).pipe(Effect.provide(hostContext))
  const qemuPid = Number(fs.readFileSync(pidFile, "utf8").trim())
  // registered after the VM's: runs before it, so a backup child no longer holds QEMU's monitor when
  // the VM is stopped
  yield* Effect.addFinalizer(() => Effect.promise(() => Promise.all([...children].map(killByPid))))

  const hmp = (command: string) =>
    Effect.scoped(Effect.gen(function*() {
      const h = yield* hypervisor
      const qmp = yield* h.monitor(VMID)
      const output = String(yield* qmp.execute("human-monitor-command", { "command-line": command }))
      if (output.trim() !== "") return yield* Effect.dieMessage(`${command}: ${output.trim()}`)
    }))

  // -- runs ------------------------------------------------------------------------------------------
  const results: Array<RunResult> = []
  for (let r = 0; r < runs; r++) {
    out(`\n-- run ${r + 1}/${runs}\n`)
    const sha = yield* Effect.promise(() => runTimed("sha256sum", [raw], children))
    out(`sha256sum: ${fmt(sha.seconds)} s, CPU ${fmt(sha.cpuSeconds)} s (${sha.stdout.split(" ")[0]!.slice(0, 16)}…)\n`)

    const result = yield* Effect.scoped(Effect.gen(function*() {
      const secret = `bench-${Math.random().toString(36).slice(2)}`
      const datastore = path.join(dir, `pbs-${r}`)
      yield* Effect.addFinalizer(() => Effect.sync(() => fs.rmSync(datastore, { recursive: true, force: true })))
      // the server process ends before its datastore is removed
      const server = yield* Effect.acquireRelease(
        Effect.promise(() => startServer(datastore, secret, children)),
        (server) => Effect.promise(() => killByPid(server.process))
      )
      const serverPid = server.process.pid!
      const job: ChildJob = {
        port: server.port,
        fingerprint: server.fingerprint,
        configDir,
        runDir,
        fleeceDir,
        uploadConcurrency
      }
      const backup = (label: string) => Effect.gen(function*() {
        const before = yield* Effect.promise(server.stats)
        if (profileArg !== undefined) {
          yield* Effect.promise(() => server.profileStart(profileArg, `server-run${r + 1}-${label}`))
        }
        const serverBefore = cpuSeconds(serverPid) ?? 0
        const qemuBefore = cpuSeconds(qemuPid) ?? 0
        const child = yield* Effect.promise(() => runBackupChild(job, secret, profileArg, children))
        const serverCpu = (cpuSeconds(serverPid) ?? serverBefore) - serverBefore
        const qemuCpu = (cpuSeconds(qemuPid) ?? qemuBefore) - qemuBefore
        if (profileArg !== undefined) yield* Effect.promise(server.profileStop)
        const after = yield* Effect.promise(server.stats)
        const stats: BackupStats = {
          uploads: after.chunkUploads - before.chunkUploads,
          bytes: after.chunkUploadBytes - before.chunkUploadBytes,
          duplicates: after.duplicateChunks - before.duplicateChunks,
          serverCpu,
          qemuCpu,
          serverPeakRssKiB: peakRssKiB(serverPid) ?? 0
        }
        for (const line of child.lines) out(`  ${line}\n`)
        out(
          `  wall ${fmt(child.wallSeconds)} s, polled ${fmt(child.polledSeconds)} s, transfer ${
            fmt(child.transferSeconds, 3)
          } s; ${stats.uploads} chunks uploaded (${fmt(stats.bytes / MiB, 1)} MiB), ${stats.duplicates} duplicates; ` +
            `peak RSS ${fmt(child.peakRssKiB / 1024, 0)} MiB; CPU s client ${fmt(child.cpuSeconds)}, server ${
              fmt(stats.serverCpu)
            }, QEMU ${fmt(stats.qemuCpu)}\n`
        )
        return { child, stats }
      })

      out("full backup:\n")
      const full = yield* backup("full")
      yield* Effect.sleep("1100 millis") // the next snapshot needs a newer backup time

      // --dirty % of the chunks, spread evenly, each rewritten with new random data
      const step = chunks / dirtyChunks
      for (let i = 0; i < dirtyChunks; i++) {
        const offset = Math.floor(i * step + step / 2) * CHUNK
        yield* hmp(`qemu-io -d scsi0 "write -s ${sources[r]![i]!} ${offset} ${CHUNK}"`)
      }
      yield* hmp("qemu-io -d scsi0 \"flush\"")
      out(`the guest wrote ${dirtyChunks} × 4 MiB (${fmt((dirtyChunks * 100) / chunks, 2)} % of the disk)\n`)
      out("incremental backup:\n")
      const inc = yield* backup("incremental")
      return { sha, full: full.child, inc: inc.child, fullStats: full.stats, incStats: inc.stats, dirtyChunks }
    }))
    results.push(result)
  }

  // -- the table -------------------------------------------------------------------------------------
  const med = (f: (r: RunResult) => number | undefined) => {
    const xs = results.map(f).filter((x): x is number => x !== undefined)
    return xs.length === 0 ? undefined : median(xs)
  }
  const mbps = (seconds: number | undefined) => seconds === undefined ? undefined : size / MiB / seconds
  const shaS = med((r) => r.sha.seconds)!
  const fullWall = med((r) => r.full.wallSeconds)!
  const fullTransfer = med((r) => r.full.transferSeconds)
  const fullPolled = med((r) => r.full.polledSeconds)
  const incWall = med((r) => r.inc.wallSeconds)!
  const incTransfer = med((r) => r.inc.transferSeconds)
  const incPolled = med((r) => r.inc.polledSeconds)
  const ratio = (a: number | undefined, b: number | undefined) =>
    a === undefined || b === undefined ? undefined : a / b

  out(
    `\n${size / MiB} MiB ${format} disk (${fmt((dataBytes * 100) / size, 0)} % random data, the rest holes), ` +
      `median of ${runs} run(s); MiB/s over the whole disk size\n\n`
  )
  const row = (name: string, cells: ReadonlyArray<string>) => {
    const widths = [9, 10, 12, 10, 10, 22]
    out(`${pad(name, 32)}${cells.map((cell, i) => lpad(cell, widths[i]!)).join("")}\n`)
  }
  const rss = (kib: number | undefined) => kib === undefined ? "-" : `${fmt(kib / 1024, 0)}M`
  const cpu = (child: (r: RunResult) => number, server: (r: RunResult) => number, qemu: (r: RunResult) => number) =>
    `${fmt(med(child), 1)}/${fmt(med(server), 1)}/${fmt(med(qemu), 1)}`
  row("case", ["wall s", "polled s", "transfer s", "MiB/s", "peak RSS", "CPU s client/srv/QEMU"])
  row("sha256sum (raw image)", [fmt(shaS), "", "", fmt(mbps(shaS), 0), rss(med((r) => r.sha.peakRssKiB)), fmt(
    med((r) => r.sha.cpuSeconds),
    1
  )])
  row("full backup", [
    fmt(fullWall),
    fmt(fullPolled),
    fmt(fullTransfer, 3),
    `${fmt(mbps(fullWall), 0)}/${fmt(mbps(fullTransfer), 0)}`,
    rss(med((r) => r.full.peakRssKiB)),
    cpu((r) => r.full.cpuSeconds, (r) => r.fullStats.serverCpu, (r) => r.fullStats.qemuCpu)
  ])
  row(`incremental (${results[0]!.dirtyChunks} dirty chunks)`, [
    fmt(incWall),
    fmt(incPolled),
    fmt(incTransfer, 3),
    "",
    rss(med((r) => r.inc.peakRssKiB)),
    cpu((r) => r.inc.cpuSeconds, (r) => r.incStats.serverCpu, (r) => r.incStats.qemuCpu)
  ])
  out(
    `\nchunks uploaded/duplicates (server): full ${med((r) => r.fullStats.uploads)}/${
      med((r) => r.fullStats.duplicates)
    } (${fmt(med((r) => r.fullStats.bytes)! / MiB, 1)} MiB), incremental ${med((r) => r.incStats.uploads)}/${
      med((r) => r.incStats.duplicates)
    } (${fmt(med((r) => r.incStats.bytes)! / MiB, 1)} MiB); reused by the incremental: ${
      fmt(med((r) => r.inc.reused)! / MiB, 1)
    } MiB\n`
  )
  out(
    `backup client RSS before the backup (Node, tsx, Effect): ${
      fmt(med((r) => r.full.rssBeforeKiB)! / 1024, 0)
    } MiB; PBS test server peak RSS ${fmt(med((r) => r.incStats.serverPeakRssKiB)! / 1024, 0)} MiB\n`
  )
  const shaCpu = med((r) => r.sha.cpuSeconds)!
  const clientCpu = med((r) => r.full.cpuSeconds)!
  const allCpu = med((r) => r.full.cpuSeconds + r.fullStats.serverCpu + r.fullStats.qemuCpu)!
  out(
    `CPU time of the full backup: client ${fmt(clientCpu, 1)} s (sha256sum ${fmt(shaCpu, 1)} s: ratio ${
      fmt(shaCpu / clientCpu)
    }, the throughput ratio the client alone would reach with a core of its own), client + server + QEMU ${
      fmt(allCpu, 1)
    } s on ${os.cpus().length} cores, load average ${fmt(os.loadavg()[0], 1)}\n`
  )
  const goal = (ok: boolean | undefined) => ok === undefined ? "" : ok ? "  (goal met)" : "  (goal MISSED)"
  const fullVsSha = ratio(shaS, fullWall)
  const fullVsShaT = ratio(shaS, fullTransfer)
  const incVsFull = ratio(incWall, fullWall)
  const incVsFullT = ratio(incTransfer, fullTransfer)
  out(`\nfull throughput / sha256sum throughput: wall ${fmt(fullVsSha)}${goal(fullVsSha! >= 0.5)}, transfer ${
    fmt(fullVsShaT)
  }${goal(fullVsShaT === undefined ? undefined : fullVsShaT >= 0.5)}   (goal ≥ 0.50)\n`)
  out(`incremental time / full time:           wall ${fmt(incVsFull)}${goal(incVsFull! <= 0.1)}, transfer ${
    fmt(incVsFullT)
  }${goal(incVsFullT === undefined ? undefined : incVsFullT <= 0.1)}   (goal ≤ 0.10)\n`)
  out(
    "\nwall = backupVm call to return, in the child (lock, fleecing, transfer, PBS finish, log upload, cleanup;\n" +
      "the status poll is once a second, so it rounds up to a poll). polled = 'started backup task' to the first\n" +
      "'done' status (1 s poll granularity). transfer = 'started backup task' to the end of the PBS session's\n" +
      "finish, from a wrapped target session (ms resolution, independent of the poll). MiB/s: wall/transfer.\n" +
      "CPU s: user+system of the backup child during backupVm / of the PBS test server's process / of\n" +
      "QEMU (NBD export, fleecing), each over the whole backup.\n"
  )
  if (profileArg !== undefined) {
    out(`CPU profiles of the backup children (CPU.*) and of the PBS test server (server-*): ${profileArg}\n`)
  }
})

const main = async () => {
  const fiber = Effect.runFork(Effect.scoped(program))
  // Ctrl-C / SIGTERM: interrupt the program; its scope unwinds (children killed, VM stopped, files removed)
  const onSignal = () => fiber.unsafeInterruptAsFork(fiber.id())
  process.once("SIGINT", onSignal)
  process.once("SIGTERM", onSignal)
  const exit = await Effect.runPromise(Fiber.await(fiber))
  if (Exit.isSuccess(exit)) process.exit(0)
  if (Cause.isInterruptedOnly(exit.cause)) {
    process.stderr.write("bench/pbs.ts interrupted; cleaned up\n")
    process.exit(130)
  }
  process.stderr.write(`bench/pbs.ts failed: ${Cause.pretty(exit.cause)}\n`)
  process.exit(1)
}

if (process.argv[2] === "--child") {
  void runChild(JSON.parse(process.argv[3]!) as ChildJob)
} else if (process.argv[2] === "--server") {
  runServer(process.argv[3]!)
} else {
  void main()
}
