/**
 * A throw-away standalone host for end-to-end tests: a config directory, disk images written with
 * qemu-io, a short run directory (Unix socket paths stay short), and the layers of the standalone
 * profile + stock engine. Everything lives in one temp directory removed by the scope's finalizer,
 * after any QEMU the test started has been stopped.
 */
import { Effect, Layer } from "effect"
import { execFile } from "node:child_process"
import { createHash } from "node:crypto"
import { createReadStream, readFileSync } from "node:fs"
import * as Fs from "node:fs/promises"
import { promisify } from "node:util"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import * as BackupTarget from "@vzdump/core/BackupTarget"
import * as ConfigStore from "@vzdump/core/ConfigStore"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as VzdumpLog from "@vzdump/core/VzdumpLog"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as HostCommand from "@vzdump/core/HostCommand"

export const run = promisify(execFile)

export const sha256File = (path: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const hash = createHash("sha256")
    createReadStream(path).on("data", (chunk) => hash.update(chunk)).on("end", () => resolve(hash.digest("hex"))).on(
      "error",
      reject
    )
  })

export const sha256 = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex")

/** Raw content of an image (qcow2 converted), as bytes. */
export const imageBytes = async (path: string, format: string, dir: string): Promise<Buffer> => {
  if (format === "raw") return Fs.readFile(path)
  const out = `${dir}/convert-${Date.now()}-${Math.random().toString(16).slice(2)}.raw`
  await run("qemu-img", ["convert", "-U", "-f", format, "-O", "raw", path, out])
  const data = await Fs.readFile(out)
  await Fs.rm(out, { force: true })
  return data
}

/** A temp standalone host; `fleeceDir` may point elsewhere (e.g. a tiny filesystem). */
export const makeTestHost = (options: { readonly fleeceDir?: string } = {}) =>
  Effect.gen(function*() {
    const dir = yield* Effect.acquireRelease(
      Effect.promise(() => Fs.mkdtemp("/tmp/vzt-")),
      (dir) => Effect.promise(() => Fs.rm(dir, { recursive: true, force: true }))
    )
    const configDir = `${dir}/conf`
    const runDir = `${dir}/run`
    const fleeceDir = options.fleeceDir ?? `${dir}/fleece`
    yield* Effect.promise(() => Promise.all([configDir, runDir, fleeceDir].map((d) => Fs.mkdir(d, { recursive: true }))))
    const hostOptions = { configDir, runDir, storages: { local: `${dir}/store` }, accel: "tcg" as const }
    const layer = Layer.mergeAll(
      StandaloneHost.layer(hostOptions),
      StockEngine.layer({ fleeceDir, socketDir: runDir }).pipe(Layer.provide(HostCommand.layer))
    )
    /** Kills the VM's QEMU by the PID in its pid file when the scope closes (a backstop to `stopOnExit`). */
    const killOnExit = (vmid: number) =>
      Effect.addFinalizer(() => Effect.promise(() => killQemu(`${runDir}/${vmid}/qemu.pid`)))
    return {
      dir,
      configDir,
      runDir,
      fleeceDir,
      layer,
      killOnExit,
      readConfig: (vmid: number) => Effect.promise(() => Fs.readFile(`${configDir}/${vmid}.conf`, "utf8")),
      writeConfig: (vmid: number, text: string) => Effect.promise(() => Fs.writeFile(`${configDir}/${vmid}.conf`, text)),
      qemuIo: (path: string, format: string, commands: ReadonlyArray<string>) =>
        Effect.promise(() => run("qemu-io", ["-f", format, ...commands.flatMap((c) => ["-c", c]), path])).pipe(
          Effect.asVoid
        )
    }
  })

export type TestHost = Effect.Effect.Success<ReturnType<typeof makeTestHost>>

const qemuPid = (pidFile: string): number | undefined => {
  try {
    const pid = Number(readFileSync(pidFile, "utf8").trim())
    return Number.isInteger(pid) && pid > 0 && readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("qemu")
      ? pid
      : undefined
  } catch {
    return undefined
  }
}

/** SIGTERM, then SIGKILL after 5 s, to the QEMU named by a pid file (only if it is a live QEMU). */
export const killQemu = async (pidFile: string): Promise<void> => {
  const pid = qemuPid(pidFile)
  if (pid === undefined) return
  process.kill(pid, "SIGTERM")
  for (let i = 0; i < 50; i++) {
    if (qemuPid(pidFile) === undefined) return
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  if (qemuPid(pidFile) !== undefined) process.kill(pid, "SIGKILL")
}

/**
 * Stops the VM when the scope closes, whatever state the test left it in. Register it inside the scope that
 * provides the host layer (`Effect.scoped` before `Effect.provide`): the hypervisor is gone after that.
 */
export const stopOnExit = (vmid: number) =>
  Effect.flatMap(Hypervisor, (hypervisor) => Effect.addFinalizer(() => Effect.ignore(hypervisor.stop(vmid))))

export const memoryTarget = BackupTarget.layerMemory
export const silent = BackupReporter.layerSilent

/**
 * A `BackupReporter` for tests: records every event, prints the task-log lines with `VZDUMP_TEST_LOG=1`,
 * and runs hooks when a log message matches: the workflow awaits `report`, so a hook runs at that exact
 * point of the backup (e.g. right after the point in time). A failing hook dies, failing the backup.
 */
export const makeRecorder = () => {
  const events: Array<BackupReporter.BackupEvent> = []
  const hooks: Array<{
    readonly when: string | RegExp
    readonly effect: Effect.Effect<unknown, unknown, Hypervisor>
    fired: boolean
  }> = []
  const print = process.env.VZDUMP_TEST_LOG !== undefined && process.env.VZDUMP_TEST_LOG !== ""
  const matches = (when: string | RegExp, message: string) =>
    typeof when === "string" ? message.startsWith(when) : when.test(message)
  const layer = Layer.effect(
    BackupReporter.BackupReporter,
    Effect.map(Effect.context<Hypervisor>(), (context) =>
      BackupReporter.BackupReporter.of({
        report: (event) =>
          Effect.gen(function*() {
            events.push(event)
            if (event._tag !== "Log") return
            if (print) for (const line of VzdumpLog.formatTaskLines(event)) process.stderr.write(`${line}\n`)
            for (const hook of hooks) {
              if (hook.fired || !matches(hook.when, event.message)) continue
              hook.fired = true
              yield* hook.effect.pipe(Effect.provide(context), Effect.orDie)
            }
          })
      }))
  )
  return {
    events,
    /** The task-log lines reported so far (`INFO: …`, `WARN: …`, `ERROR: …`). */
    lines: (): Array<string> =>
      events.flatMap((event) => event._tag === "Log" ? VzdumpLog.formatTaskLines(event) : []),
    /** Runs `effect` once, when a log message starting with `when` (or matching it) is reported. */
    on: (when: string | RegExp, effect: Effect.Effect<unknown, unknown, Hypervisor>) => {
      hooks.push({ when, effect, fired: false })
    },
    fired: (when: string | RegExp): boolean => hooks.some((hook) => hook.when === when && hook.fired),
    layer
  }
}

export type Recorder = ReturnType<typeof makeRecorder>

/** Host services + stock engine + recorder + in-memory target, sharing one hypervisor (one QMP client per VM). */
export const testLayer = (host: TestHost, recorder: Recorder) =>
  Layer.mergeAll(Layer.provideMerge(recorder.layer, host.layer), BackupTarget.layerMemory)

/** A QMP command on the VM's shared monitor connection. */
export const qmp = (vmid: number, command: string, args?: object) =>
  Effect.scoped(
    Effect.flatMap(Hypervisor, (hypervisor) =>
      Effect.flatMap(hypervisor.monitor(vmid), (monitor) => monitor.execute(command, args)))
  )

/** An HMP command line through QMP `human-monitor-command`; returns its output text. */
export const hmp = (vmid: number, commandLine: string) =>
  Effect.map(qmp(vmid, "human-monitor-command", { "command-line": commandLine }), String)

/**
 * Writes through a guest device with HMP `qemu-io -d <device>` (specs/stock-qemu.md §2): `scsi0`, or the
 * QOM path `virtio1/virtio-backend` for virtio-blk. qemu-io's own report goes to QEMU's stdout (here
 * /dev/null); the monitor only answers with errors (`Error: Device … not found`), so any output fails.
 * Callers check the written content on the disk afterwards.
 */
export const deviceWrite = (vmid: number, device: string, command: string) =>
  Effect.flatMap(hmp(vmid, `qemu-io -d ${device} "${command}"`), (output) =>
    output.trim() === ""
      ? Effect.void
      : Effect.dieMessage(`qemu-io -d ${device} "${command}" failed: ${output.trim()}`))

/** `query-status`'s status of a running VM (`running`, `paused`, `prelaunch`, `io-error`, …), or `off`. */
export const runState = (vmid: number) =>
  Effect.flatMap(Hypervisor, (hypervisor) => hypervisor.status(vmid)).pipe(
    Effect.map((state) => state.running ? state.qmpStatus ?? "unknown" : "off")
  )

/** Starts the VM from its config as a user would (paused start, then `cont`). */
export const startVm = (vmid: number) =>
  Effect.gen(function*() {
    const store = yield* ConfigStore.ConfigStore
    const hypervisor = yield* Hypervisor
    yield* hypervisor.startPaused(vmid, yield* store.load(vmid))
    yield* hypervisor.resume(vmid)
  })

/** What the stock engine may have left in QEMU and on disk. */
export const engineLeftovers = (vmid: number, host: TestHost) =>
  Effect.gen(function*() {
    const exports = (yield* qmp(vmid, "query-block-exports")) as Array<{ id: string }>
    const jobs = (yield* qmp(vmid, "query-jobs")) as Array<{ id: string }>
    const nodes = (yield* qmp(vmid, "query-named-block-nodes", { flat: true })) as Array<{ "node-name": string }>
    const files = yield* Effect.promise(() => Fs.readdir(host.fleeceDir))
    const sockets = (yield* Effect.promise(() => Fs.readdir(host.runDir))).filter((name) =>
      name.startsWith("vzdump-nbd")
    )
    return {
      exports: exports.map((e) => e.id),
      jobs: jobs.map((j) => j.id),
      nodes: nodes.map((n) => n["node-name"]).filter((name) => name.startsWith("vzdump-")),
      files: files.filter((name) => name.startsWith("vzdump-")),
      sockets
    }
  })

/** A copy of `data` with qemu-io style writes applied: `[offset, length, byte]` (byte 0 = `write -z`). */
export const applyWrites = (data: Uint8Array, writes: ReadonlyArray<readonly [number, number, number]>) => {
  const out = Uint8Array.from(data)
  for (const [offset, length, byte] of writes) out.fill(byte, offset, offset + length)
  return out
}
