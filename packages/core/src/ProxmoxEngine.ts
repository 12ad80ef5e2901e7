/**
 * The Proxmox-QEMU engine: the backup runs inside Proxmox VE's patched QEMU through its `backup` QMP
 * command, exactly as vzdump's `PVE::VZDump::QemuServer` drives it.
 *
 * - **VMA**: the target describes a VMA file ({@link ArchiveDestination.VmaFileDestination}). The
 *   engine opens the temp `.dat` file, starts vzdump's compressor (stdin = a pipe, stdout = that
 *   file) through `HostProcess`, hands the pipe's write end (or, uncompressed, the file itself) to
 *   QEMU with `getfd` (fdname `backup`) and starts `backup` with `backup-file: /dev/fdname/backup`,
 *   `speed`, `config-file`, `devlist` and, when present or supported, `firewall-file`, `fleecing`,
 *   `max-workers`. The compressor's exit status is checked once QEMU reports `done`; a bad one
 *   fails the backup with vzdump's text (`zstd --threads=1 failed - wrong exit status 1`). The
 *   target's `commit` renames the temp file; closing its session without `commit` removes it.
 *   `vmaOutput: "path"` passes a path instead (the spec allows a FIFO or a new file): the FIFO the
 *   compressor reads, or the temp file itself, which QEMU then creates.
 * - **PBS**: `format: pbs` with the repository, `backup-id`, `backup-time`, `password`, `devlist`,
 *   `config-file` and `backup-ns`, `speed`, `fingerprint`, `firewall-file`, `encrypt`, `keyfile`,
 *   `key-password`, `master-keyfile`, `use-dirty-bitmap`, `fleecing`, `max-workers` as vzdump sets
 *   them; a client timeout of 125 s. `query-pbs-bitmap-info` is read after the start and returned
 *   as {@link ProxmoxRunningBackup.bitmapInfo} for the progress loop's dirty-bitmap lines.
 * - `query-proxmox-support` decides `max-workers`, `fleecing`, `use-dirty-bitmap` and the master
 *   key, with vzdump's warnings and errors; `query-backup` is the status, `backup-cancel` the
 *   cancel (also issued when the job's scope closes before the job ended).
 * - TPM state (`drive-tpmstate0-backup`) is attached read-only for the backup; fleecing images are
 *   qcow2 files in `fleecingDir`, attached as `<qmdevice>-fleecing` nodes.
 * - Diskless VMs bypass QEMU as vzdump does: `vma create … exec:<compressor> > <file>` or
 *   `proxmox-backup-client backup … qemu-server.conf:<file>`, through `HostCommand`.
 *
 * @since 0.1.0
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Redacted from "effect/Redacted"
import * as Schedule from "effect/Schedule"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import { randomUUID } from "node:crypto"
import * as Fs from "node:fs"
import * as NodePath from "node:path"
import type { QmpExecuteError } from "@vzdump/qmp/QmpError"
import { destinationOf } from "./ArchiveDestination.js"
import type { ArchiveDestination, PbsDestination, VmaFileDestination } from "./ArchiveDestination.js"
import { BackupEngine, BackupEngineError } from "./BackupEngine.js"
import type { BackupEngineService, EngineDevice, EngineJob, RunningBackup } from "./BackupEngine.js"
import { BackupStatus } from "./BackupStatus.js"
import { HostCommand } from "./HostCommand.js"
import type { HostCommandService } from "./HostCommand.js"
import { HostProcess, wrongExitStatus } from "./HostProcess.js"
import type { HostProcessService, RunningProcess } from "./HostProcess.js"
import * as fifoPipe from "./internal/fifoPipe.js"
import * as VzdumpLog from "./VzdumpLog.js"

const ENGINE = "proxmox-qemu"

// ---------------------------------------------------------------------------------------------
// schemas
// ---------------------------------------------------------------------------------------------

/**
 * `query-proxmox-support`'s reply. Every member is required in current builds; older builds lack
 * some, so all are optional here and a missing flag counts as "not supported".
 *
 * @since 0.1.0
 * @category schemas
 */
export const ProxmoxSupportStatus = Schema.Struct({
  "pbs-dirty-bitmap": Schema.optional(Schema.Boolean),
  "query-bitmap-info": Schema.optional(Schema.Boolean),
  "pbs-dirty-bitmap-savevm": Schema.optional(Schema.Boolean),
  "pbs-dirty-bitmap-migration": Schema.optional(Schema.Boolean),
  "pbs-masterkey": Schema.optional(Schema.Boolean),
  "pbs-library-version": Schema.optional(Schema.String),
  "backup-access-api": Schema.optional(Schema.Boolean),
  "backup-fleecing": Schema.optional(Schema.Boolean),
  "backup-max-workers": Schema.optional(Schema.Boolean)
})

/**
 * @since 0.1.0
 * @category models
 */
export type ProxmoxSupportStatus = typeof ProxmoxSupportStatus.Type

/**
 * `PBSBitmapAction`.
 *
 * @since 0.1.0
 * @category schemas
 */
export const PbsBitmapAction = Schema.Literal(
  "not-used",
  "not-used-removed",
  "new",
  "used",
  "invalid",
  "missing-recreated"
)

/**
 * One entry of `query-pbs-bitmap-info` (`PBSBitmapInfo`).
 *
 * @since 0.1.0
 * @category schemas
 */
export const PbsBitmapInfo = Schema.Struct({
  drive: Schema.String,
  action: PbsBitmapAction,
  size: Schema.Number,
  dirty: Schema.Number
})

/**
 * @since 0.1.0
 * @category models
 */
export type PbsBitmapInfo = typeof PbsBitmapInfo.Type

/**
 * `backup`'s reply (`UuidInfo`).
 *
 * @since 0.1.0
 * @category schemas
 */
export const UuidInfo = Schema.Struct({ UUID: Schema.String })

const NamedNodes = Schema.Array(Schema.Struct({
  "node-name": Schema.optional(Schema.String),
  image: Schema.optional(Schema.Struct({ "virtual-size": Schema.Number }))
}))

// ---------------------------------------------------------------------------------------------
// options and models
// ---------------------------------------------------------------------------------------------

/**
 * vzdump's per-job options the engine reads (`performance`, `fleecing`, whether the VM is a
 * template): carried on `EngineJob`, with engine-wide defaults in `ProxmoxEngineOptions.defaults`.
 *
 * @since 0.1.0
 * @category models
 */
export type ProxmoxJobOptions = Pick<EngineJob, "template" | "maxWorkers" | "fleecing">

/**
 * The job the engine runs: `EngineJob` carries the Proxmox-only fields itself.
 *
 * @since 0.1.0
 * @category models
 */
export type ProxmoxEngineJob = EngineJob

/**
 * @since 0.1.0
 * @category models
 */
export interface ProxmoxEngineOptions {
  /**
   * How QEMU receives the VMA stream: `getfd` (default, vzdump's way; the monitor connection must
   * pass descriptors, i.e. `FdQmpTransport`) or `path` (a FIFO when compressing, else the temp file,
   * which QEMU creates).
   */
  readonly vmaOutput?: "getfd" | "path" | undefined
  /** Directory for fleecing images (`vm-<vmid>-fleece-<n>.qcow2`); without it fleecing is skipped with a warning. */
  readonly fleecingDir?: string | undefined
  /** The `vma` program for diskless VMA backups; default `vma`. */
  readonly vmaBinary?: string | undefined
  /** Default `/usr/bin/proxmox-backup-client` (diskless PBS backups). */
  readonly pbsClientBinary?: string | undefined
  /** Defaults for jobs that do not carry these fields. */
  readonly defaults?: ProxmoxJobOptions | undefined
}

/**
 * A started Proxmox job. `bitmapInfo` is `query-pbs-bitmap-info`'s reply when QEMU reports
 * `query-bitmap-info` (PBS only, as vzdump asks); pass it to `VzdumpProgress.start`.
 *
 * @since 0.1.0
 * @category models
 */
export interface ProxmoxRunningBackup extends RunningBackup {
  readonly bitmapInfo?: ReadonlyArray<PbsBitmapInfo> | undefined
}

/**
 * The fleecing node of a device.
 *
 * @since 0.1.0
 * @category names
 */
export const fleecingNodeName = (qmdevice: string): string => `${qmdevice}-fleecing`

/**
 * The node name under which the TPM state is attached for the backup.
 *
 * @since 0.1.0
 * @category names
 */
export const TPM_BACKUP_NODE = "drive-tpmstate0-backup"

/**
 * Warnings and errors of vzdump, word for word.
 *
 * @since 0.1.0
 * @category messages
 */
export const Messages = {
  maxWorkersUnsupported: "ignoring 'max-workers' setting - not supported by running QEMU",
  performanceUnchecked: (settings: ReadonlyArray<string>): string =>
    `ignoring setting(s): ${[...settings].sort().join(", ")} - issue checking if supported`,
  fleecingUnsupported: "running QEMU version does not support backup fleecing - continuing without",
  pbsUnsupported: "PBS backups are not supported by the running QEMU version. Please make sure you've installed " +
    "the latest version and the VM has been restarted.",
  supportEmpty: "query-proxmox-support returned empty value",
  supportFailed: (error: string): string => `QMP command query-proxmox-support failed - ${error}`,
  masterKeyUnsupported: "master key configured but running QEMU version does not support master keys",
  noUuid: "got no uuid for backup task",
  qmpFailed: (vmid: number, command: string, error: string): string =>
    `VM ${vmid} qmp command '${command}' failed - ${error}`
} as const

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

const engineError = (reason: BackupEngineError["reason"], detail: string) =>
  new BackupEngineError({ engine: ENGINE, reason, detail })

/** The error text of a failed QMP call, as QEMU wrote it when it answered. */
const qmpText = (error: QmpExecuteError): string => error._tag === "QmpCommandError" ? error.desc : error.message

const exec = (
  job: EngineJob,
  reason: BackupEngineError["reason"],
  command: string,
  args?: object,
  timeout?: Duration.DurationInput
) =>
  job.qmp.execute(command, args, timeout === undefined ? undefined : { timeout }).pipe(
    Effect.mapError((error) => engineError(reason, Messages.qmpFailed(job.vmid, command, qmpText(error))))
  )

const decode = <A, I>(
  schema: Schema.Schema<A, I>,
  job: EngineJob,
  reason: BackupEngineError["reason"],
  command: string
) =>
(value: unknown) =>
  Schema.decodeUnknown(schema)(value).pipe(
    Effect.mapError((error) =>
      engineError(reason, Messages.qmpFailed(job.vmid, command, `unexpected reply: ${error.message}`))
    )
  )

interface ResolvedJobOptions {
  readonly template: boolean
  readonly maxWorkers: number | undefined
  readonly fleecing: boolean
}

const jobOptions = (options: ProxmoxEngineOptions, job: EngineJob): ResolvedJobOptions => {
  return {
    template: job.template ?? options.defaults?.template ?? false,
    maxWorkers: job.maxWorkers ?? options.defaults?.maxWorkers,
    fleecing: job.fleecing ?? options.defaults?.fleecing ?? false
  }
}

const removeFile = (path: string) => Effect.promise(() => Fs.promises.rm(path, { force: true }))

const openFile = (path: string, flags: number, mode = 0o644) =>
  Effect.async<number, BackupEngineError>((resume) => {
    Fs.open(path, flags, mode, (error, fd) => {
      resume(
        error === null
          ? Effect.succeed(fd)
          : Effect.fail(engineError("Start", `unable to open file '${path}' - ${error.message}`))
      )
    })
  })

const closeFd = (fd: number) => Effect.async<void>((resume) => Fs.close(fd, () => resume(Effect.void)))

/** A descriptor closed at most once: explicitly, or when the scope closes. */
const scopedFd = (acquire: Effect.Effect<number, BackupEngineError>) =>
  Effect.gen(function*() {
    let open = true
    const fd = yield* Effect.acquireRelease(acquire, (fd) => open ? closeFd(fd) : Effect.void)
    const close = Effect.suspend(() => {
      if (!open) return Effect.void
      open = false
      return closeFd(fd)
    })
    return { fd, close }
  })

/** `devlist` as vzdump builds it: the QEMU device names, comma-separated, in disk order. */
export const devlist = (devices: ReadonlyArray<EngineDevice>): string =>
  devices.map((device) => device.qmdevice).join(",")

/**
 * Adds `max-workers` when QEMU supports it, with vzdump's warnings otherwise.
 */
const performanceOptions = (
  job: EngineJob,
  maxWorkers: number | undefined,
  support: ProxmoxSupportStatus | undefined
): Effect.Effect<Record<string, unknown>> => {
  if (maxWorkers === undefined) return Effect.succeed({})
  if (support === undefined) return Effect.as(job.log("warn", Messages.performanceUnchecked(["max-workers"])), {})
  if (support["backup-max-workers"] === true) return Effect.succeed({ "max-workers": Math.trunc(maxWorkers) })
  return Effect.as(job.log("warn", Messages.maxWorkersUnsupported), {})
}

/** `query-proxmox-support` for PBS: required, with vzdump's errors. */
const pbsSupport = (job: EngineJob) =>
  job.qmp.execute("query-proxmox-support").pipe(
    Effect.mapError((error) =>
      engineError(
        "Start",
        error._tag === "QmpCommandError" && /The command query-proxmox-support has not been found/.test(error.desc)
          ? Messages.pbsUnsupported
          : Messages.supportFailed(Messages.qmpFailed(job.vmid, "query-proxmox-support", qmpText(error)))
      )
    ),
    Effect.flatMap((value) =>
      value === null || value === undefined || (typeof value === "object" && Object.keys(value).length === 0)
        ? Effect.fail(engineError("Start", Messages.supportEmpty))
        : decode(ProxmoxSupportStatus, job, "Start", "query-proxmox-support")(value)
    )
  )

/** `query-proxmox-support` for VMA: failing is only a warning (it only gates performance settings). */
const vmaSupport = (job: EngineJob) =>
  job.qmp.execute("query-proxmox-support").pipe(
    Effect.flatMap((value) => Schema.decodeUnknown(ProxmoxSupportStatus)(value)),
    Effect.map(Option.some),
    Effect.catchAll((error) =>
      Effect.as(
        job.log(
          "warn",
          "_tag" in error && error._tag !== "ParseError"
            ? Messages.qmpFailed(job.vmid, "query-proxmox-support", qmpText(error as QmpExecuteError))
            : `query-proxmox-support: unexpected reply: ${error.message}`
        ),
        Option.none<ProxmoxSupportStatus>()
      )
    ),
    Effect.map(Option.getOrUndefined)
  )

// ---------------------------------------------------------------------------------------------
// the engine
// ---------------------------------------------------------------------------------------------

/**
 * Builds the engine.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (
  options: ProxmoxEngineOptions = {}
): Effect.Effect<BackupEngineService, never, HostCommand | HostProcess> =>
  Effect.gen(function*() {
    const command = yield* HostCommand
    const processes = yield* HostProcess
    /** Support flags read in `prepare`, consumed by `start` (per VM). */
    /** What `prepare` found and attached for a VM's job, so `start` (inside the freeze) only issues `backup`. */
    const prepared = new Map<number, Prepared>()

    const destinationFor = (job: EngineJob, reason: BackupEngineError["reason"]) => {
      const destination = destinationOf(job.archive)
      return destination === undefined
        ? Effect.fail(
          engineError(
            reason,
            "the Proxmox engine needs a target that describes its destination (a VMA file or a Proxmox Backup " +
              "Server); this target only accepts data written by our own code"
          )
        )
        : Effect.succeed(destination)
    }

    const prepare = (job: EngineJob) =>
      Effect.gen(function*() {
        prepared.delete(job.vmid)
        const destination = yield* destinationFor(job, "Prepare")
        // a left-over job of a crashed run blocks `backup` ("previous backup … not finished")
        const status = yield* exec(job, "Prepare", "query-backup").pipe(
          Effect.flatMap(decode(BackupStatus, job, "Prepare", "query-backup"))
        )
        if (status.status === "active") {
          yield* job.log("warn", VzdumpLog.Messages.leftOverJob)
          yield* exec(job, "Prepare", "backup-cancel")
          yield* awaitInactive(job)
        }
        yield* Effect.forEach(destination.messages, (entry) => job.log(entry.level, entry.message), { discard: true })
        if (job.devices.length === 0) return
        let support: ProxmoxSupportStatus | undefined
        if (destination._tag === "Pbs") {
          const pbs = yield* pbsSupport(job)
          if (pbs["pbs-masterkey"] !== true && destination.masterKeyfile !== undefined) {
            return yield* engineError("Prepare", Messages.masterKeyUnsupported)
          }
          support = pbs
        } else {
          support = yield* vmaSupport(job)
        }
        // TPM state and fleecing images are attached before the guest is frozen, as vzdump does
        const fleecing = yield* attachDevices(command, job, support, jobOptions(options, job), options)
        prepared.set(job.vmid, { support, fleecing })
      })

    const awaitInactive = (job: EngineJob) =>
      exec(job, "Prepare", "query-backup").pipe(
        Effect.flatMap(decode(BackupStatus, job, "Prepare", "query-backup")),
        Effect.repeat({ schedule: Schedule.spaced("100 millis"), until: (status) => status.status !== "active" }),
        Effect.asVoid,
        Effect.timeoutFail({
          duration: "10 seconds",
          onTimeout: () => engineError("Prepare", "left-over backup job does not end after 'backup-cancel'")
        })
      )

    const start = (job: EngineJob) =>
      Effect.gen(function*() {
        const destination = yield* destinationFor(job, "Start")
        if (job.devices.length === 0) return yield* diskless(command, options, job, destination)
        const extra = jobOptions(options, job)
        const cached = prepared.get(job.vmid)
        prepared.delete(job.vmid)
        if (destination._tag === "Pbs") {
          const support = cached?.support ?? (yield* pbsSupport(job))
          if (support["pbs-masterkey"] !== true && destination.masterKeyfile !== undefined) {
            return yield* engineError("Start", Messages.masterKeyUnsupported)
          }
          const fleecing = cached?.fleecing ?? (yield* attachDevices(command, job, support, extra, options))
          return yield* startPbs(command, job, destination, support, extra, options, fleecing)
        }
        const support = cached !== undefined ? cached.support : yield* vmaSupport(job)
        const fleecing = cached?.fleecing ?? (yield* attachDevices(command, job, support, extra, options))
        return yield* startVma(command, processes, job, destination, support, extra, options, fleecing)
      })

    return { name: ENGINE, prepare, start }
  })

/**
 * The engine as the `BackupEngine` service.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (
  options: ProxmoxEngineOptions = {}
): Layer.Layer<BackupEngine, never, HostCommand | HostProcess> =>
  Layer.effect(BackupEngine, make(options))

// ---------------------------------------------------------------------------------------------
// attach TPM state and fleecing images
// ---------------------------------------------------------------------------------------------

interface Prepared {
  readonly support: ProxmoxSupportStatus | undefined
  /** Whether fleecing images were attached. */
  readonly fleecing: boolean
}

/** Attaches the TPM state and, when asked for and supported, the fleecing images; `true` with fleecing. */
const attachDevices = (
  command: HostCommandService,
  job: EngineJob,
  support: ProxmoxSupportStatus | undefined,
  extra: ResolvedJobOptions,
  options: ProxmoxEngineOptions
): Effect.Effect<boolean, BackupEngineError, Scope.Scope> =>
  Effect.zipRight(
    attachTpm(job),
    attachFleecing(command, job, extra.fleecing && !extra.template, support, options.fleecingDir)
  )

const blockdevDel = (job: EngineJob, node: string) =>
  job.qmp.execute("blockdev-del", { "node-name": node }).pipe(Effect.asVoid)

const fileDriver = (path: string) =>
  Effect.sync(() => {
    try {
      return Fs.statSync(path).isBlockDevice() ? "host_device" : "file"
    } catch {
      return "file"
    }
  })

const attachTpm = (job: EngineJob) =>
  Effect.gen(function*() {
    const tpm = job.devices.find((device) => device.qmdevice === TPM_BACKUP_NODE)
    if (tpm === undefined) return
    // it only exists for the backup: remove a left-over one first
    yield* blockdevDel(job, TPM_BACKUP_NODE).pipe(Effect.ignore)
    yield* job.log("info", VzdumpLog.Messages.attachingTpm)
    const driver = yield* fileDriver(tpm.path)
    yield* Effect.acquireRelease(
      exec(job, "Start", "blockdev-add", {
        driver: tpm.format,
        "node-name": TPM_BACKUP_NODE,
        "read-only": true,
        file: { driver, filename: tpm.path, "read-only": true }
      }),
      () => blockdevDel(job, TPM_BACKUP_NODE).pipe(Effect.ignore)
    )
  })

const isSmallSpecialDisk = (virtdev: string) => /^(?:tpmstate|efidisk)\d$/.test(virtdev)

/** Creates and attaches one qcow2 fleecing image per disk (not EFI/TPM); `true` when fleecing is on. */
const attachFleecing = (
  command: HostCommandService,
  job: EngineJob,
  wanted: boolean,
  support: ProxmoxSupportStatus | undefined,
  fleecingDir: string | undefined
) =>
  Effect.gen(function*() {
    if (!wanted) return false
    if (support?.["backup-fleecing"] !== true) {
      yield* job.log("warn", Messages.fleecingUnsupported)
      return false
    }
    if (fleecingDir === undefined) {
      yield* job.log("warn", "fleecing requested, but the engine has no fleecing directory - continuing without")
      return false
    }
    const nodes = yield* exec(job, "Start", "query-named-block-nodes", { flat: true }).pipe(
      Effect.flatMap(decode(NamedNodes, job, "Start", "query-named-block-nodes"))
    )
    yield* Effect.promise(() => Fs.promises.mkdir(fleecingDir, { recursive: true }))
    let n = 0
    for (const device of job.devices) {
      if (isSmallSpecialDisk(device.virtdev)) continue
      const node = fleecingNodeName(device.qmdevice)
      const file = NodePath.join(fleecingDir, `vm-${job.vmid}-fleece-${n}.qcow2`)
      n++
      let size = nodes.find((info) => info["node-name"] === device.qmdevice)?.image?.["virtual-size"]
      if (size === undefined) {
        yield* job.log("info", `could not determine block node size of drive '${device.virtdev}' - using fallback`)
        size = device.size
      }
      // left-overs of an earlier attempt
      yield* blockdevDel(job, node).pipe(Effect.ignore)
      yield* removeFile(file)
      yield* Effect.acquireRelease(
        command.run("qemu-img", ["create", "-q", "-f", "qcow2", file, String(size)]).pipe(
          Effect.mapError((error) => engineError("Start", error.message))
        ),
        () => removeFile(file)
      )
      yield* job.log("info", VzdumpLog.Messages.attachingFleecing(device.qmdevice, file))
      yield* Effect.acquireRelease(
        exec(job, "Start", "blockdev-add", {
          driver: "qcow2",
          "node-name": node,
          discard: "unmap",
          file: { driver: "file", filename: file, discard: "unmap" }
        }),
        () => blockdevDel(job, node).pipe(Effect.ignore)
      )
    }
    return true
  })

// ---------------------------------------------------------------------------------------------
// the running job
// ---------------------------------------------------------------------------------------------

const queryBackup = (job: EngineJob) =>
  exec(job, "Status", "query-backup").pipe(Effect.flatMap(decode(BackupStatus, job, "Status", "query-backup")))

/**
 * The job handle: status from `query-backup` (with the compressor's exit status folded in),
 * `backup-cancel` as cancel and in the scope's finalizer when the job has not ended.
 */
const runningJob = (
  job: EngineJob,
  uuid: string,
  compressor: { readonly process: RunningProcess; readonly commandLine: string } | undefined,
  bitmapInfo: ReadonlyArray<PbsBitmapInfo> | undefined
): Effect.Effect<ProxmoxRunningBackup, never, Scope.Scope> =>
  Effect.gen(function*() {
    const state = { ended: false, cancelled: false }
    const cancelOnce = Effect.suspend(() => {
      if (state.cancelled) return Effect.void
      state.cancelled = true
      return job.qmp.execute("backup-cancel").pipe(
        Effect.asVoid,
        Effect.catchAll((error) => job.log("warn", Messages.qmpFailed(job.vmid, "backup-cancel", qmpText(error))))
      )
    })
    yield* Effect.addFinalizer(() => state.ended ? Effect.void : cancelOnce)

    const status = Effect.gen(function*() {
      const reply = yield* queryBackup(job)
      if (reply.uuid !== uuid) return reply
      if (reply.status === "done" && compressor !== undefined) {
        // QEMU closed its end of the pipe: the compressor ends as soon as it has written the rest
        const exit = yield* compressor.process.exit.pipe(Effect.timeoutOption("1 second"))
        if (Option.isNone(exit)) {
          const { "end-time": _end, ...running } = reply
          return { ...running, status: "active" as const, finishing: true }
        }
        const failure = wrongExitStatus(compressor.commandLine, exit.value)
        if (failure !== undefined) {
          state.ended = true
          return { ...reply, status: "error" as const, errmsg: failure }
        }
      }
      if (reply.status === "done" || reply.status === "error") state.ended = true
      return reply
    })
    return {
      uuid,
      status,
      cancel: cancelOnce,
      ...(bitmapInfo !== undefined ? { bitmapInfo } : {})
    }
  })

// ---------------------------------------------------------------------------------------------
// VMA
// ---------------------------------------------------------------------------------------------

const startVma = (
  command: HostCommandService,
  processes: HostProcessService,
  job: EngineJob,
  destination: VmaFileDestination,
  support: ProxmoxSupportStatus | undefined,
  extra: ResolvedJobOptions,
  options: ProxmoxEngineOptions,
  fleecing: boolean
): Effect.Effect<ProxmoxRunningBackup, BackupEngineError, Scope.Scope> =>
  Effect.gen(function*() {
    const mode = options.vmaOutput ?? "getfd"
    const compressorSpec = destination.compressor
    const temp = destination.temporaryPath
    const truncate = Fs.constants.O_WRONLY | Fs.constants.O_CREAT | Fs.constants.O_TRUNC

    let backupFile: string
    let afterStart: Effect.Effect<void> = Effect.void
    let onStartFailure: Effect.Effect<void> = Effect.void
    let compressor: { readonly process: RunningProcess; readonly commandLine: string } | undefined

    const pipe = compressorSpec === undefined
      ? undefined
      : yield* fifoPipe.make(command, "vzdump-backup").pipe(
        Effect.mapError((error) =>
          engineError("Start", error instanceof fifoPipe.PipeError ? error.detail : error.message)
        )
      )
    if (pipe !== undefined && compressorSpec !== undefined) {
      const file = yield* scopedFd(openFile(temp, truncate))
      const [program, ...args] = compressorSpec.argv
      const process = yield* processes.spawn(program!, args, { stdin: pipe.readFd, stdout: file.fd }).pipe(
        Effect.mapError((error) =>
          engineError("Start", `fork compressor '${compressorSpec.commandLine}' failed - ${error.message}`)
        )
      )
      compressor = { process, commandLine: compressorSpec.commandLine }
      // the compressor holds the read end and the file now
      yield* pipe.closeRead
      yield* file.close
    }

    if (mode === "getfd") {
      if (pipe === undefined) {
        const file = yield* scopedFd(openFile(temp, truncate))
        yield* job.qmp.execute("getfd", { fdname: "backup" }, { fds: [file.fd], timeout: "30 seconds" }).pipe(
          Effect.mapError((error) => engineError("Start", Messages.qmpFailed(job.vmid, "getfd", qmpText(error))))
        )
        yield* file.close
      } else {
        yield* job.qmp.execute("getfd", { fdname: "backup" }, { fds: [pipe.writeFd], timeout: "30 seconds" }).pipe(
          Effect.mapError((error) => engineError("Start", Messages.qmpFailed(job.vmid, "getfd", qmpText(error))))
        )
        yield* pipe.closeWrite
        yield* pipe.removePath
      }
      backupFile = "/dev/fdname/backup"
      // QEMU keeps the descriptor until `backup` takes it: drop it when `backup` fails
      onStartFailure = job.qmp.execute("closefd", { fdname: "backup" }).pipe(Effect.ignore)
    } else if (pipe !== undefined) {
      backupFile = pipe.path
      // QEMU opened its own write end during `backup`; ours must go for the compressor to see EOF
      afterStart = Effect.zipRight(pipe.closeWrite, pipe.removePath)
      onStartFailure = afterStart
    } else {
      // QEMU creates the file itself (exclusively)
      yield* removeFile(temp)
      backupFile = temp
    }

    const performance = yield* performanceOptions(job, extra.maxWorkers, support)
    const params: Record<string, unknown> = {
      "backup-file": backupFile,
      speed: job.speed,
      "config-file": destination.configFile,
      devlist: devlist(job.devices),
      ...(destination.firewallFile !== undefined ? { "firewall-file": destination.firewallFile } : {}),
      ...(fleecing ? { fleecing: true } : {}),
      ...performance
    }
    const reply = yield* exec(job, "Start", "backup", params, "30 seconds").pipe(
      Effect.flatMap(decode(UuidInfo, job, "Start", "backup")),
      Effect.tapError(() => onStartFailure)
    )
    yield* afterStart
    if (reply.UUID.length === 0) return yield* engineError("Start", Messages.noUuid)
    return yield* runningJob(job, reply.UUID, compressor, undefined)
  })

// ---------------------------------------------------------------------------------------------
// PBS
// ---------------------------------------------------------------------------------------------

/**
 * The `backup` arguments of a PBS job, as vzdump's `archive_pbs` builds them.
 *
 * @since 0.1.0
 * @category utils
 */
export const pbsBackupArguments = (options: {
  readonly destination: PbsDestination
  readonly devices: ReadonlyArray<EngineDevice>
  readonly speed: number
  readonly support: ProxmoxSupportStatus
  readonly template: boolean
  readonly fleecing: boolean
  readonly performance: Readonly<Record<string, unknown>>
}): Record<string, unknown> => {
  const d = options.destination
  return {
    format: "pbs",
    "backup-file": d.repository,
    "backup-id": d.backupId,
    "backup-time": d.backupTime,
    password: Redacted.value(d.password),
    devlist: devlist(options.devices),
    "config-file": d.configFile,
    ...(options.fleecing ? { fleecing: true } : {}),
    ...(d.namespace !== undefined ? { "backup-ns": d.namespace } : {}),
    ...(options.speed > 0 ? { speed: options.speed } : {}),
    ...options.performance,
    ...(d.fingerprint !== undefined ? { fingerprint: d.fingerprint } : {}),
    ...(d.firewallFile !== undefined ? { "firewall-file": d.firewallFile } : {}),
    encrypt: d.keyfile !== undefined,
    ...(d.keyfile !== undefined
      ? {
        keyfile: d.keyfile,
        ...(d.keyPassword !== undefined ? { "key-password": Redacted.value(d.keyPassword) } : {}),
        ...(d.masterKeyfile !== undefined ? { "master-keyfile": d.masterKeyfile } : {})
      }
      : {}),
    ...(options.support["pbs-dirty-bitmap"] === true && !options.template ? { "use-dirty-bitmap": true } : {})
  }
}

const startPbs = (
  command: HostCommandService,
  job: EngineJob,
  destination: PbsDestination,
  support: ProxmoxSupportStatus,
  extra: ResolvedJobOptions,
  options: ProxmoxEngineOptions,
  fleecing: boolean
): Effect.Effect<ProxmoxRunningBackup, BackupEngineError, Scope.Scope> =>
  Effect.gen(function*() {
    const performance = yield* performanceOptions(job, extra.maxWorkers, support)
    const params = pbsBackupArguments({
      destination,
      devices: job.devices,
      speed: job.speed,
      support,
      template: extra.template,
      fleecing,
      performance
    })
    // give QEMU time to connect to the backup server
    const reply = yield* exec(job, "Start", "backup", params, "125 seconds").pipe(
      Effect.flatMap(decode(UuidInfo, job, "Start", "backup"))
    )
    if (reply.UUID.length === 0) return yield* engineError("Start", Messages.noUuid)
    const bitmapInfo = support["query-bitmap-info"] === true
      ? yield* exec(job, "Start", "query-pbs-bitmap-info").pipe(
        Effect.flatMap(decode(Schema.Array(PbsBitmapInfo), job, "Start", "query-pbs-bitmap-info"))
      )
      : undefined
    return yield* runningJob(job, reply.UUID, undefined, bitmapInfo)
  })

// ---------------------------------------------------------------------------------------------
// diskless VMs
// ---------------------------------------------------------------------------------------------

const shellQuote = (word: string): string => /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\\''")}'`

/**
 * The command vzdump runs for a diskless VM's VMA archive:
 * `vma create -v -c <conf> [-c <fw>] exec:<compressor|cat> > <file>`.
 *
 * @since 0.1.0
 * @category utils
 */
export const disklessVmaCommand = (destination: VmaFileDestination, vmaBinary = "vma"): Array<string> => [
  vmaBinary,
  "create",
  "-v",
  "-c",
  destination.configFile,
  ...(destination.firewallFile !== undefined ? ["-c", destination.firewallFile] : []),
  `exec:${destination.compressor?.commandLine ?? "cat"} > ${shellQuote(destination.temporaryPath)}`
]

/**
 * The command and environment vzdump runs for a diskless VM on a Proxmox Backup Server. The
 * password travels in `PBS_PASSWORD` only.
 *
 * @since 0.1.0
 * @category utils
 */
export const disklessPbsCommand = (
  destination: PbsDestination,
  client = "/usr/bin/proxmox-backup-client"
): { readonly argv: Array<string>; readonly env: Record<string, string> } => ({
  argv: [
    client,
    "backup",
    "--repository",
    destination.repository,
    "--backup-type",
    "vm",
    "--backup-id",
    destination.backupId,
    "--backup-time",
    String(destination.backupTime),
    ...(destination.namespace !== undefined ? ["--ns", destination.namespace] : []),
    ...(destination.keyfile !== undefined
      ? [
        "--keyfile",
        destination.keyfile,
        ...(destination.masterKeyfile !== undefined ? ["--master-pubkey-file", destination.masterKeyfile] : [])
      ]
      : []),
    `qemu-server.conf:${destination.configFile}`,
    ...(destination.firewallFile !== undefined ? [`fw.conf:${destination.firewallFile}`] : [])
  ],
  env: {
    PBS_PASSWORD: Redacted.value(destination.password),
    ...(destination.fingerprint !== undefined ? { PBS_FINGERPRINT: destination.fingerprint } : {})
  }
})

const diskless = (
  command: HostCommandService,
  options: ProxmoxEngineOptions,
  job: EngineJob,
  destination: ArchiveDestination
): Effect.Effect<ProxmoxRunningBackup, BackupEngineError> =>
  Effect.gen(function*() {
    yield* job.log("info", VzdumpLog.Messages.backupContainsNoDisks)
    const startTime = Math.floor(Date.now() / 1000)
    if (destination._tag === "VmaFile") {
      const argv = disklessVmaCommand(destination, options.vmaBinary)
      yield* job.log("info", VzdumpLog.Messages.startingDisklessBackup)
      yield* job.log("info", argv.join(" "))
      // `exec:` makes vma run the compressor through a shell; the file must not be there yet
      yield* removeFile(destination.temporaryPath)
      yield* command.run(argv[0]!, argv.slice(1)).pipe(Effect.mapError((error) => engineError("Start", error.message)))
    } else {
      const { argv, env } = disklessPbsCommand(destination, options.pbsClientBinary)
      yield* job.log("info", VzdumpLog.Messages.startingDisklessBackup)
      yield* job.log("info", argv.join(" "))
      yield* command.run(argv[0]!, argv.slice(1), { env }).pipe(
        Effect.mapError((error) => engineError("Start", error.message))
      )
    }
    const uuid = randomUUID()
    const status: BackupStatus = {
      status: "done",
      total: 0,
      dirty: 0,
      transferred: 0,
      "zero-bytes": 0,
      reused: 0,
      "start-time": startTime,
      "end-time": Math.floor(Date.now() / 1000),
      uuid,
      finishing: false
    }
    return { uuid, status: Effect.succeed(status), cancel: Effect.void }
  })
