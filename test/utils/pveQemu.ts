/**
 * AN EMULATOR of Proxmox VE's patched QEMU, for tests — not Proxmox's code. Proxmox's QEMU build
 * cannot run here, so this module puts a QMP front (`pveQmpServer.ts`) before a real stock QEMU
 * 7.2 and adds the commands of Proxmox's backup patches, strictly as `/work/shared/specs/pve-qmp.md`
 * describes them:
 *
 * - `backup` with the exact argument names and QAPI types (missing, mistyped and unexpected
 *   arguments are refused with QEMU's texts), PBS's required `password`/`backup-id`/`backup-time`
 *   (`missing parameter '…'`), one job at a time (`previous backup for target 'Proxmox' not
 *   finished`), `devlist` resolution (`Device '…' not found`), fleecing nodes checked, and the reply
 *   `{"UUID": …}` once the jobs exist;
 * - `query-backup` with the status lifecycle (`{"finishing": false}` before any job, `active`,
 *   `finishing: true` while the writer closes, `done`/`error` with `end-time`, the first error
 *   winning), `backup-cancel` (`backup canceled`), `query-proxmox-support` (configurable, or absent
 *   like a QEMU without PBS support; features it does not report are also refused as arguments, as
 *   an older build would), `query-pbs-bitmap-info`;
 * - `getfd`/`closefd` with real descriptor passing (`SCM_RIGHTS`); `backup-file` may be
 *   `/dev/fdname/<name>`, a FIFO or a new file (created exclusively).
 *
 * Every other command goes to the real QEMU, and its events come back. The data is real: a VMA
 * job reads the disks through our stock engine (blockdev-backup + NBD) and writes a real VMA stream
 * with our `VmaWriter` into the received descriptor / FIFO / file, with the job's UUID as the
 * archive UUID. A PBS job reads the disks the same way but uploads nothing (the data is discarded);
 * its dirty bitmap is a real QEMU dirty bitmap `pbs-incremental-dirty-bitmap` (granularity 4 MiB)
 * and the `check_incremental` rules of §8 are approximated from what this emulator saw (same
 * repository, backup-id, namespace, encryption mode and key file as the last successful backup of
 * the drive); the bitmap is cleared after a successful job (writes made during the job are not kept
 * dirty, unlike Proxmox's "sync on success").
 *
 * Not emulated: `exec:` and `/dev/fdset/` outputs, `compress`, `max-workers` semantics (accepted and
 * recorded), devices that are only block nodes (e.g. `drive-tpmstate0-backup`), the backup-access
 * API.
 */
import { Cause, Deferred, Duration, Effect, Exit, FiberId, Runtime, Scope, Stream } from "effect"
import { randomUUID } from "node:crypto"
import * as Fs from "node:fs"
import { constants as OsConstants } from "node:os"
import type { EngineDevice, EngineJob, RunningBackup } from "@vzdump/core/BackupEngine"
import type { BackupStatus } from "@vzdump/core/BackupStatus"
import { BackupTargetError } from "@vzdump/core/BackupTarget"
import type { ArchiveSession } from "@vzdump/core/BackupTarget"
import * as HostCommand from "@vzdump/core/HostCommand"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as NodeQmpTransport from "@vzdump/qmp/NodeQmpTransport"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import { VmaIoError } from "@vzdump/target-vma/VmaError"
import type { VmaOutput } from "@vzdump/target-vma/VmaOutput"
import * as VmaWriter from "@vzdump/target-vma/VmaWriter"
import { genericError, QmpReplyError, startQmpServer } from "./pveQmpServer.js"

// ---------------------------------------------------------------------------------------------
// QAPI argument checking
// ---------------------------------------------------------------------------------------------

type QType = "str" | "int" | "bool" | ReadonlyArray<string>

interface Member {
  readonly name: string
  readonly type: QType
  readonly required?: boolean
  /** Only known to builds whose `query-proxmox-support` reports this flag (`pbs` = any PBS build). */
  readonly feature?: string
}

const typeName = (type: QType): string =>
  typeof type === "string" ? { str: "string", int: "integer", bool: "boolean" }[type] : "string"

/** Checks arguments as QEMU's QAPI input visitor does; returns the error text. */
const checkArguments = (
  members: ReadonlyArray<Member>,
  args: Record<string, unknown> | undefined
): string | undefined => {
  const given = args ?? {}
  for (const member of members) {
    const value = given[member.name]
    if (value === undefined) {
      if (member.required === true) return `Parameter '${member.name}' is missing`
      continue
    }
    const ok = member.type === "str"
      ? typeof value === "string"
      : member.type === "int"
      ? typeof value === "number" && Number.isInteger(value)
      : member.type === "bool"
      ? typeof value === "boolean"
      : typeof value === "string"
    if (!ok) return `Invalid parameter type for '${member.name}', expected: ${typeName(member.type)}`
    if (typeof member.type !== "string" && !member.type.includes(value as string)) {
      return `Parameter '${member.name}' does not accept value '${String(value)}'`
    }
  }
  for (const key of Object.keys(given)) {
    if (!members.some((member) => member.name === key)) return `Parameter '${key}' is unexpected`
  }
  return undefined
}

const BACKUP_MEMBERS: ReadonlyArray<Member> = [
  { name: "backup-file", type: "str", required: true },
  { name: "format", type: ["vma", "pbs"] },
  { name: "config-file", type: "str" },
  { name: "firewall-file", type: "str" },
  { name: "devlist", type: "str" },
  { name: "speed", type: "int" },
  { name: "max-workers", type: "int", feature: "backup-max-workers" },
  { name: "fleecing", type: "bool", feature: "backup-fleecing" },
  { name: "password", type: "str", feature: "pbs" },
  { name: "backup-id", type: "str", feature: "pbs" },
  { name: "backup-time", type: "int", feature: "pbs" },
  { name: "backup-ns", type: "str", feature: "pbs" },
  { name: "keyfile", type: "str", feature: "pbs" },
  { name: "key-password", type: "str", feature: "pbs" },
  { name: "master-keyfile", type: "str", feature: "pbs-masterkey" },
  { name: "fingerprint", type: "str", feature: "pbs" },
  { name: "compress", type: "bool", feature: "pbs" },
  { name: "encrypt", type: "bool", feature: "pbs" },
  { name: "use-dirty-bitmap", type: "bool", feature: "pbs-dirty-bitmap" }
]

// ---------------------------------------------------------------------------------------------
// options and state
// ---------------------------------------------------------------------------------------------

/** `query-proxmox-support` of current builds (all flags set). */
export const fullSupport: Readonly<Record<string, boolean | string>> = {
  "pbs-dirty-bitmap": true,
  "query-bitmap-info": true,
  "pbs-dirty-bitmap-savevm": true,
  "pbs-dirty-bitmap-migration": true,
  "pbs-masterkey": true,
  "pbs-library-version": "1.5.2 (emulated)",
  "backup-access-api": true,
  "backup-fleecing": true,
  "backup-max-workers": true
}

export interface PveQemuOptions {
  /** QMP socket of the real QEMU behind the emulator (a monitor the emulator has for itself). */
  readonly backend: string
  /** Where the emulator's QMP socket listens. */
  readonly path: string
  /** Scratch directory for the stock engine (fleece images, NBD socket); keep it short. */
  readonly workDir: string
  /** `query-proxmox-support`'s reply, or `absent` for a QEMU without the command. Default {@link fullSupport}. */
  readonly support?: Readonly<Record<string, boolean | string>> | "absent" | undefined
  /** How long a VMA job stays `finishing` before the writer is closed (to observe the flag). */
  readonly finishingDelay?: Duration.DurationInput | undefined
  /** VMID used to name the stock engine's scratch files. Default 100. */
  readonly vmid?: number | undefined
}

export interface RecordedCommand {
  readonly connection: number
  readonly command: string
  readonly arguments: Record<string, unknown> | undefined
}

export interface PbsBitmapInfoEntry {
  readonly drive: string
  readonly action: string
  readonly size: number
  readonly dirty: number
}

export interface PveQemu {
  readonly path: string
  /** Every command received after negotiation, in order (proxied ones included). */
  readonly commands: ReadonlyArray<RecordedCommand>
  /** The arguments of every received `name` command. */
  readonly argumentsOf: (name: string) => ReadonlyArray<Record<string, unknown> | undefined>
  /** The status `query-backup` would report now. */
  readonly status: () => BackupStatus
  /** Named descriptors held (from `getfd`, not yet used or closed). */
  readonly heldFds: () => ReadonlyArray<string>
  /** Completes when the current job (if any) has ended. */
  readonly awaitIdle: Effect.Effect<void>
}

interface Job {
  readonly uuid: string
  readonly backupFile: string
  readonly format: "vma" | "pbs"
  readonly startTime: number
  endTime: number | undefined
  status: "active" | "done" | "error"
  errmsg: string | undefined
  /** The first error; the job reports it once its jobs have ended and been cleaned up. */
  stopping: string | undefined
  finishing: boolean
  readonly total: number
  readonly dirty: number
  readonly reused: number
  counters: () => { readonly transferred: number; readonly zero: number }
  /** Stops the job with this error (first error wins). */
  fail: (errmsg: string) => Effect.Effect<void>
  readonly ended: Deferred.Deferred<void>
}

interface ResolvedDevice {
  readonly name: string
  readonly virtdev: string
  readonly node: string
  readonly size: number
  readonly format: string
  readonly path: string
}

const BITMAP = "pbs-incremental-dirty-bitmap"
const GRANULARITY = 4 * 1024 * 1024

const targetError = (error: { readonly message: string }) =>
  new BackupTargetError({ target: "emulated VMA writer", reason: "Write", detail: error.message })

/** QEMU's text for a failed job: `job failed with err -32 - Broken pipe`. */
const errnoText = (code: string | undefined, detail: string): string => {
  const errno = code === undefined ? undefined : (OsConstants.errno as Record<string, number | undefined>)[code]
  const text = code === undefined ? detail : STRERROR_TEXT(code) ?? detail
  return errno === undefined ? detail : `job failed with err -${errno} - ${text}`
}

const STRERROR_TEXT = (code: string): string | undefined => STRERROR[code]

const STRERROR: Readonly<Record<string, string>> = {
  EEXIST: "File exists",
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  ENXIO: "No such device or address",
  EISDIR: "Is a directory",
  EPIPE: "Broken pipe",
  EIO: "Input/output error",
  ENOSPC: "No space left on device",
  EBADF: "Bad file descriptor"
}

const strerror = (error: unknown): string => {
  const code = (error as NodeJS.ErrnoException).code
  return (code !== undefined ? STRERROR[code] : undefined) ?? (error as Error).message
}

// ---------------------------------------------------------------------------------------------
// a descriptor as VMA output: writes tracked until the kernel returned, so it is closed only idle
// ---------------------------------------------------------------------------------------------

const fdOutput = (fd: number, name: string) => {
  let inFlight = 0
  let closed = false
  const idle: Array<() => void> = []
  const settle = () => {
    if (inFlight === 0) for (const resolve of idle.splice(0)) resolve()
  }
  const write = (chunks: ReadonlyArray<Uint8Array>) =>
    Effect.async<void, VmaIoError>((resume) => {
      if (closed) {
        resume(Effect.fail(new VmaIoError({ operation: "write", path: name, code: "EBADF", detail: "Bad file descriptor" })))
        return
      }
      let rest = chunks.filter((chunk) => chunk.byteLength > 0)
      inFlight++
      const done = (effect: Effect.Effect<void, VmaIoError>) => {
        inFlight--
        settle()
        resume(effect)
      }
      const step = () => {
        if (rest.length === 0) return done(Effect.void)
        const batch = rest.slice(0, 512)
        Fs.writev(fd, batch, (error, written) => {
          if (error !== null) {
            if (error.code === "EAGAIN") return void setTimeout(step, 2)
            return done(Effect.fail(
              new VmaIoError({ operation: "write", path: name, detail: error.message, ...(error.code ? { code: error.code } : {}) })
            ))
          }
          let n = written
          while (n > 0 && rest.length > 0) {
            const head = rest[0]!
            if (n >= head.byteLength) {
              n -= head.byteLength
              rest = rest.slice(1)
            } else {
              rest = [head.subarray(n), ...rest.slice(1)]
              n = 0
            }
          }
          step()
        })
      }
      step()
    })
  const closeFd = Effect.promise(() =>
    new Promise<void>((resolve) => {
      const finish = () => {
        if (closed) return resolve()
        closed = true
        Fs.close(fd, () => resolve())
      }
      if (inFlight === 0) finish()
      else idle.push(finish)
    })
  )
  const output: VmaOutput = { write, close: Effect.void }
  return { output, closeFd }
}

// ---------------------------------------------------------------------------------------------
// the emulator
// ---------------------------------------------------------------------------------------------

const shortQdev = (qdev: string | undefined): string | undefined => {
  if (qdev === undefined) return undefined
  const m = /^\/machine\/peripheral\/([^/]+)/.exec(qdev)
  return m !== null ? m[1] : qdev
}

/** Starts the emulator in front of a running QEMU; everything stops when the scope closes. */
export const make = (options: PveQemuOptions): Effect.Effect<PveQemu, never, Scope.Scope> =>
  Effect.gen(function*() {
    const emulatorScope = yield* Effect.scope
    const runtime = yield* Effect.runtime<never>()
    const run = <A, E>(effect: Effect.Effect<A, E>): Promise<A> => Runtime.runPromise(runtime)(effect)
    const backend: QmpClientService = yield* QmpClient.make({
      address: options.backend,
      handshakeTimeout: "10 seconds",
      commandTimeout: "60 seconds"
    }).pipe(Effect.provide(NodeQmpTransport.layer), Effect.orDie)
    const stock = yield* StockEngine.make({ fleeceDir: options.workDir, socketDir: options.workDir }).pipe(
      Effect.provide(HostCommand.layer)
    )
    const support = options.support ?? fullSupport
    const supports = (feature: string | undefined) =>
      feature === undefined ||
      (support !== "absent" && (feature === "pbs" || support[feature] === true))
    const backupMembers = BACKUP_MEMBERS.filter((member) => supports(member.feature))
      .map((member) =>
        member.name === "format" && support === "absent" ? { ...member, type: ["vma"] as ReadonlyArray<string> } : member
      )

    const commands: Array<RecordedCommand> = []
    const fds = new Map<string, number>()
    let job: Job | undefined
    let bitmapInfo: Array<PbsBitmapInfoEntry> = []
    const bitmaps = new Set<string>()
    const lastGood = new Map<string, string>()

    const call = (name: string, args?: object) =>
      run(
        backend.execute(name, args).pipe(
          Effect.mapError((error) =>
            error._tag === "QmpCommandError" ? new QmpReplyError(error.errorClass, error.desc) : genericError(error.message)
          ),
          Effect.either
        )
      ).then((either) => {
        if (either._tag === "Left") throw either.left
        return either.right
      })

    const statusOf = (): BackupStatus => {
      if (job === undefined) return { finishing: false }
      const counters = job.counters()
      return {
        status: job.status,
        ...(job.errmsg !== undefined ? { errmsg: job.errmsg } : {}),
        total: job.total,
        dirty: job.dirty,
        transferred: counters.transferred,
        "zero-bytes": counters.zero,
        reused: job.reused,
        "start-time": job.startTime,
        ...(job.endTime !== undefined ? { "end-time": job.endTime } : {}),
        "backup-file": job.backupFile,
        uuid: job.uuid,
        finishing: job.status === "active" && job.finishing
      }
    }

    // -- devices ---------------------------------------------------------------------------------

    const resolveDevices = async (devlist: string | undefined): Promise<Array<ResolvedDevice>> => {
      const blocks = await call("query-block") as Array<Record<string, any>>
      const describe = (block: Record<string, any>, name: string): ResolvedDevice => ({
        name,
        virtdev: shortQdev(block.qdev) ?? name,
        node: block.inserted["node-name"],
        size: block.inserted.image["virtual-size"],
        format: block.inserted.drv,
        path: block.inserted.file
      })
      if (devlist === undefined) {
        return blocks.filter((block) => block.inserted !== undefined && block.inserted.ro !== true).map((block) =>
          describe(block, block.device !== "" ? block.device : block.inserted["node-name"])
        )
      }
      const names = devlist.split(/[,;:]/).filter((name) => name.length > 0)
      return names.map((name) => {
        const block = blocks.find((b) =>
          b.inserted !== undefined &&
          (b.device === name || b.inserted["node-name"] === name || shortQdev(b.qdev) === name)
        )
        if (block === undefined) throw new QmpReplyError("DeviceNotFound", `Device '${name}' not found`)
        return describe(block, name)
      })
    }

    const checkFleecing = async (devices: ReadonlyArray<ResolvedDevice>) => {
      const nodes = await call("query-named-block-nodes", { flat: true }) as Array<Record<string, any>>
      for (const device of devices) {
        if (/^drive-(?:efidisk|tpmstate)/.test(device.name)) continue
        const fleece = nodes.find((node) => node["node-name"] === `${device.name}-fleecing`)
        if (fleece === undefined) throw genericError(`fleecing node for device '${device.name}' not found`)
        if (fleece.image?.["virtual-size"] !== device.size) {
          throw genericError(
            `size of fleecing node '${device.name}-fleecing' (${fleece.image?.["virtual-size"]}) does not match ` +
              `device '${device.name}' (${device.size})`
          )
        }
      }
    }

    const bitmapCount = async (node: string): Promise<number> => {
      const nodes = await call("query-named-block-nodes", { flat: true }) as Array<Record<string, any>>
      const entry = nodes.find((n) => n["node-name"] === node)
      const bitmap = (entry?.["dirty-bitmaps"] as Array<Record<string, any>> | undefined)?.find((b) => b.name === BITMAP)
      if (bitmap !== undefined) return bitmap.count as number
      const blocks = await call("query-block") as Array<Record<string, any>>
      const block = blocks.find((b) => b.inserted?.["node-name"] === node)
      const other = (block?.inserted?.["dirty-bitmaps"] as Array<Record<string, any>> | undefined)?.find((b) =>
        b.name === BITMAP
      )
      return (other?.count as number | undefined) ?? 0
    }

    // -- outputs -------------------------------------------------------------------------------

    const openOutput = (backupFile: string): { fd: number; created: string | undefined } => {
      const fdname = /^\/dev\/fdname\/(.+)$/.exec(backupFile)
      if (fdname !== null) {
        const fd = fds.get(fdname[1]!)
        if (fd === undefined) throw genericError(`File descriptor named '${fdname[1]}' has not been found`)
        fds.delete(fdname[1]!)
        return { fd, created: undefined }
      }
      if (backupFile.startsWith("exec:") || backupFile.startsWith("/dev/fdset/")) {
        throw genericError(`emulator: backup-file '${backupFile}' is not emulated`)
      }
      let isFifo = false
      try {
        isFifo = Fs.statSync(backupFile).isFIFO()
      } catch {
        isFifo = false
      }
      try {
        if (isFifo) return { fd: Fs.openSync(backupFile, Fs.constants.O_WRONLY | Fs.constants.O_NONBLOCK), created: undefined }
        const fd = Fs.openSync(
          backupFile,
          Fs.constants.O_WRONLY | Fs.constants.O_CREAT | Fs.constants.O_EXCL | Fs.constants.O_NONBLOCK,
          0o644
        )
        return { fd, created: backupFile }
      } catch (error) {
        throw genericError(`can't open file ${backupFile} - ${strerror(error)}`)
      }
    }

    // -- starting a job --------------------------------------------------------------------------

    const startStock = async (
      devices: ReadonlyArray<ResolvedDevice>,
      speed: number,
      session: ArchiveSession
    ): Promise<{ running: RunningBackup; scope: Scope.CloseableScope }> => {
      const scope = await run(Scope.make())
      const engineDevices: Array<EngineDevice> = devices.map((device) => ({
        virtdev: device.virtdev,
        qmdevice: device.name,
        path: device.path,
        format: device.format,
        size: device.size
      }))
      const engineJob: EngineJob = {
        vmid: options.vmid ?? 100,
        devices: engineDevices,
        qmp: backend,
        archive: session,
        speed: speed > 0 ? speed : 0,
        log: () => Effect.void
      }
      const exit = await run(
        Effect.exit(Scope.extend(Effect.zipRight(stock.prepare(engineJob), stock.start(engineJob)), scope))
      )
      if (Exit.isFailure(exit)) {
        await run(Scope.close(scope, exit))
        throw genericError(`emulator: starting the jobs failed - ${Cause.pretty(exit.cause).split("\n")[0]}`)
      }
      return { running: exit.value, scope }
    }

    /** Polls the stock job until it ends; then finishes the job through `complete`. */
    const supervise = (
      current: Job,
      running: RunningBackup,
      scope: Scope.CloseableScope,
      complete: Effect.Effect<void, string>,
      cleanup: Effect.Effect<void>
    ) =>
      Effect.gen(function*() {
        let stockStatus: BackupStatus = yield* running.status.pipe(Effect.orDie)
        while (stockStatus.status === "active" && current.stopping === undefined) {
          yield* Effect.sleep("50 millis")
          stockStatus = yield* running.status.pipe(Effect.orDie)
        }
        if (current.stopping === undefined && stockStatus.status === "done") {
          const result = yield* Effect.either(complete)
          if (result._tag === "Left") yield* current.fail(result.left)
        } else if (current.stopping === undefined) {
          yield* current.fail(stockStatus.errmsg ?? "unknown error")
        }
        yield* cleanup
        yield* Scope.close(scope, Exit.void)
        // the end is visible only now, after the jobs and their nodes are gone
        current.status = current.stopping === undefined ? "done" : "error"
        current.errmsg = current.stopping
        current.endTime = Math.floor(Date.now() / 1000)
        yield* Deferred.succeed(current.ended, undefined)
      }).pipe(Effect.forkIn(emulatorScope))

    const newJob = (fields: {
      uuid: string
      backupFile: string
      format: "vma" | "pbs"
      total: number
      dirty: number
      reused: number
    }): Job => {
      const ended = Deferred.unsafeMake<void>(FiberId.none)
      const current: Job = {
        ...fields,
        startTime: Math.floor(Date.now() / 1000),
        endTime: undefined,
        status: "active",
        errmsg: undefined,
        stopping: undefined,
        finishing: false,
        counters: () => ({ transferred: 0, zero: 0 }),
        ended,
        fail: (errmsg) =>
          Effect.sync(() => {
            if (current.status === "active" && current.stopping === undefined) current.stopping = errmsg
          })
      }
      return current
    }

    const backupVma = async (args: Record<string, unknown>, devices: ReadonlyArray<ResolvedDevice>) => {
      const uuid = randomUUID()
      const backupFile = args["backup-file"] as string
      const { fd, created } = openOutput(backupFile)
      const sink = fdOutput(fd, backupFile)
      const abortSetup = async (error: unknown): Promise<never> => {
        await run(sink.closeFd)
        if (created !== undefined) Fs.rmSync(created, { force: true })
        throw error
      }
      const configs: Array<VmaWriter.VmaConfigInput> = []
      for (const [key, name] of [["config-file", "qemu-server.conf"], ["firewall-file", "qemu-server.fw"]] as const) {
        const file = args[key] as string | undefined
        if (file === undefined) continue
        try {
          configs.push({ name, data: Fs.readFileSync(file) })
        } catch {
          return abortSetup(genericError(`unable to read file '${file}'`))
        }
      }
      const writerExit = await run(Effect.exit(VmaWriter.make({
        output: sink.output,
        uuid,
        configs,
        devices: devices.map((device) => ({ name: device.name, size: device.size }))
      })))
      if (Exit.isFailure(writerExit)) return abortSetup(genericError("emulator: cannot create the VMA writer"))
      const writer = writerExit.value
      const total = devices.reduce((sum, device) => sum + device.size, 0)
      const current = newJob({ uuid, backupFile, format: "vma", total, dirty: total, reused: 0 })
      let firstWriteError: string | undefined
      const recordError = (error: { readonly message: string; readonly code?: string | undefined; readonly detail?: string }) =>
        Effect.sync(() => {
          firstWriteError ??= errnoText(error.code, error.detail ?? error.message)
        })
      const session: ArchiveSession = {
        openedLine: "emulated QEMU VMA writer",
        writeData: (device, offset, data) =>
          writer.writeData(device + 1, offset, data).pipe(
            Effect.tapError(recordError),
            Effect.mapError(targetError)
          ),
        writeZeros: (device, offset, length) =>
          writer.writeZeros(device + 1, offset, length).pipe(
            Effect.tapError(recordError),
            Effect.mapError(targetError)
          ),
        commit: Effect.die("not used")
      }
      current.counters = () => {
        const stats = Effect.runSync(writer.stats)
        return {
          transferred: stats.devices.reduce((sum, d) => sum + d.transferred, 0),
          zero: stats.devices.reduce((sum, d) => sum + d.zeroBytes, 0)
        }
      }
      let cancelStock: Effect.Effect<void> = Effect.void
      const stop = current.fail
      // first error wins; the transfer stops, then the writer's descriptor closes (the reader sees EOF)
      current.fail = (errmsg) =>
        Effect.suspend(() =>
          current.status !== "active" || current.stopping !== undefined
            ? Effect.void
            : Effect.zipRight(stop(firstWriteError ?? errmsg), Effect.zipRight(cancelStock, sink.closeFd))
        )
      let started: { running: RunningBackup; scope: Scope.CloseableScope }
      try {
        started = await startStock(devices, (args.speed as number | undefined) ?? 0, session)
      } catch (error) {
        return abortSetup(error)
      }
      job = current
      bitmapInfo = []
      const complete = Effect.gen(function*() {
        current.finishing = true
        if (options.finishingDelay !== undefined) yield* Effect.sleep(options.finishingDelay)
        yield* writer.finish.pipe(
          Effect.mapError((error) =>
            "code" in error ? errnoText(error.code as string | undefined, (error as VmaIoError).detail) : error.message
          )
        )
      })
      cancelStock = started.running.cancel
      yield_(supervise(current, started.running, started.scope, complete, sink.closeFd))
      return { UUID: uuid }
    }

    const backupPbs = async (args: Record<string, unknown>, devices: ReadonlyArray<ResolvedDevice>) => {
      for (const name of ["password", "backup-id", "backup-time"]) {
        if (args[name] === undefined) throw genericError(`missing parameter '${name}'`)
      }
      const useBitmap = args["use-dirty-bitmap"] === true
      const identity = JSON.stringify([
        args["backup-file"],
        args["backup-ns"] ?? null,
        args["backup-id"],
        args.encrypt ?? args.keyfile !== undefined,
        args.keyfile ?? null
      ])
      const info: Array<PbsBitmapInfoEntry> = []
      for (const device of devices) {
        const exists = bitmaps.has(device.node)
        if (!useBitmap) {
          if (exists) {
            await call("block-dirty-bitmap-remove", { node: device.node, name: BITMAP })
            bitmaps.delete(device.node)
            lastGood.delete(device.name)
          }
          info.push({ drive: device.name, action: exists ? "not-used-removed" : "not-used", size: device.size, dirty: device.size })
        } else if (!exists) {
          await call("block-dirty-bitmap-add", { node: device.node, name: BITMAP, granularity: GRANULARITY })
          bitmaps.add(device.node)
          info.push({ drive: device.name, action: "new", size: device.size, dirty: device.size })
        } else if (lastGood.get(device.name) === identity) {
          const count = await bitmapCount(device.node)
          info.push({ drive: device.name, action: "used", size: device.size, dirty: Math.min(count, device.size) })
        } else {
          info.push({ drive: device.name, action: "invalid", size: device.size, dirty: device.size })
        }
      }
      const uuid = randomUUID()
      const total = devices.reduce((sum, device) => sum + device.size, 0)
      const dirty = info.reduce((sum, entry) => sum + entry.dirty, 0)
      const current = newJob({
        uuid,
        backupFile: args["backup-file"] as string,
        format: "pbs",
        total,
        dirty,
        reused: total - dirty
      })
      const session: ArchiveSession = {
        openedLine: "emulated PBS upload (data discarded)",
        writeData: () => Effect.void,
        writeZeros: () => Effect.void,
        commit: Effect.die("not used")
      }
      const started = await startStock(devices, (args.speed as number | undefined) ?? 0, session)
      const ratio = total === 0 ? 1 : dirty / total
      current.counters = () => {
        const s = Effect.runSync(started.running.status.pipe(Effect.orDie))
        return {
          transferred: Math.floor((s.transferred ?? 0) * ratio),
          zero: Math.floor((s["zero-bytes"] ?? 0) * ratio)
        }
      }
      job = current
      bitmapInfo = info
      const complete = Effect.gen(function*() {
        current.finishing = true
        if (options.finishingDelay !== undefined) yield* Effect.sleep(options.finishingDelay)
        for (const entry of info) {
          if (entry.action === "not-used" || entry.action === "not-used-removed") continue
          const device = devices.find((d) => d.name === entry.drive)!
          yield* Effect.promise(() =>
            call("block-dirty-bitmap-clear", { node: device.node, name: BITMAP }).then(() => undefined, () => undefined)
          )
          lastGood.set(entry.drive, identity)
        }
      })
      const stop = current.fail
      current.fail = (errmsg) =>
        Effect.suspend(() =>
          current.status !== "active" || current.stopping !== undefined
            ? Effect.void
            : Effect.zipRight(stop(errmsg), started.running.cancel)
        )
      yield_(supervise(current, started.running, started.scope, complete, Effect.void))
      return { UUID: uuid }
    }

    const pending: Array<Promise<unknown>> = []
    const yield_ = (effect: Effect.Effect<unknown>) => {
      pending.push(run(effect))
    }

    // -- commands --------------------------------------------------------------------------------

    const commandsWithoutArguments = (name: string, args: Record<string, unknown> | undefined) => {
      const error = checkArguments([], args)
      if (error !== undefined) throw genericError(error)
      return name
    }

    const handle = async (connection: { readonly takeFd: () => number | undefined }, name: string, args: Record<string, unknown> | undefined) => {
      switch (name) {
        case "getfd": {
          const error = checkArguments([{ name: "fdname", type: "str", required: true }], args)
          if (error !== undefined) throw genericError(error)
          const fd = connection.takeFd()
          if (fd === undefined) throw genericError("No file descriptor supplied via SCM_RIGHTS")
          const fdname = args!.fdname as string
          if (/^\d/.test(fdname)) {
            Fs.closeSync(fd)
            throw genericError("Parameter 'fdname' expects a name not starting with a digit")
          }
          const old = fds.get(fdname)
          if (old !== undefined) Fs.closeSync(old)
          fds.set(fdname, fd)
          return {}
        }
        case "closefd": {
          const error = checkArguments([{ name: "fdname", type: "str", required: true }], args)
          if (error !== undefined) throw genericError(error)
          const fdname = args!.fdname as string
          const fd = fds.get(fdname)
          if (fd === undefined) throw genericError(`File descriptor named '${fdname}' not found`)
          fds.delete(fdname)
          Fs.closeSync(fd)
          return {}
        }
        case "query-proxmox-support": {
          if (support === "absent") {
            throw new QmpReplyError("CommandNotFound", "The command query-proxmox-support has not been found")
          }
          commandsWithoutArguments(name, args)
          return { ...support }
        }
        case "query-pbs-bitmap-info": {
          if (support === "absent" || support["query-bitmap-info"] !== true) {
            throw new QmpReplyError("CommandNotFound", "The command query-pbs-bitmap-info has not been found")
          }
          commandsWithoutArguments(name, args)
          return bitmapInfo
        }
        case "query-backup":
          commandsWithoutArguments(name, args)
          return statusOf()
        case "backup-cancel": {
          commandsWithoutArguments(name, args)
          if (job !== undefined && job.status === "active") await run(job.fail("backup canceled"))
          return {}
        }
        case "backup": {
          const error = checkArguments(backupMembers, args)
          if (error !== undefined) throw genericError(error)
          const given = args!
          if (job !== undefined && job.status === "active") {
            throw genericError("previous backup for target 'Proxmox' not finished")
          }
          const format = (given.format as "vma" | "pbs" | undefined) ?? "vma"
          if (format === "pbs") {
            for (const required of ["password", "backup-id", "backup-time"]) {
              if (given[required] === undefined) throw genericError(`missing parameter '${required}'`)
            }
          }
          const devices = await resolveDevices(given.devlist as string | undefined)
          if (given.fleecing === true) await checkFleecing(devices)
          return format === "pbs" ? backupPbs(given, devices) : backupVma(given, devices)
        }
        case "query-commands": {
          const list = await call("query-commands") as Array<{ name: string }>
          const added = ["backup", "query-backup", "backup-cancel", "query-pbs-bitmap-info"]
          if (support !== "absent") added.push("query-proxmox-support")
          return [...list, ...added.map((added) => ({ name: added }))]
        }
        default:
          return call(name, args)
      }
    }

    const server = yield* startQmpServer(options.path, {
      greeting: () => backend.greeting,
      command: (connection, name, args) => {
        commands.push({ connection: connection.id, command: name, arguments: args })
        return handle(connection, name, args)
      }
    })

    // events of the real QEMU reach our clients; when it goes away, so do they
    const events = yield* backend.subscribe
    yield* events.pipe(Stream.runForEach((event) => Effect.sync(() => server.broadcast(event))), Effect.forkScoped)
    yield* backend.closed.pipe(Effect.zipRight(Effect.sync(() => server.closeAll())), Effect.forkScoped)

    yield* Effect.addFinalizer(() =>
      Effect.gen(function*() {
        if (job !== undefined && job.status === "active") yield* job.fail("backup canceled")
        yield* Effect.promise(() => Promise.allSettled(pending))
        for (const fd of fds.values()) Fs.close(fd, () => {})
        fds.clear()
      })
    )

    return {
      path: options.path,
      commands,
      argumentsOf: (name) => commands.filter((c) => c.command === name).map((c) => c.arguments),
      status: statusOf,
      heldFds: () => [...fds.keys()],
      awaitIdle: Effect.suspend(() => job === undefined ? Effect.void : Deferred.await(job.ended))
    }
  })
