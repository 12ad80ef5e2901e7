/**
 * The backup workflow of one VM, after Proxmox's `PVE/VZDump.pm` and `PVE/VZDump/QemuServer.pm`, as
 * scoped Effects:
 *
 * check the config, report the power state → lock the config → plan and activate volumes →
 * (stop | suspend) → open the archive → start QEMU paused if it is off → fs-freeze → start the backup
 * command → thaw → resume → poll the status once a second with vzdump's progress lines → restore the
 * power state → commit the archive → unlock.
 *
 * Every step that changes the VM is undone on failure and interruption (SIGINT, SIGTERM, a timeout, a
 * parent fiber's interrupt), in vzdump's order: the guest is thawed; the error is logged, the job
 * cancelled (`aborting backup job`) and its resources removed; a guest that ran before is resumed; a
 * QEMU started only for the backup is stopped again; the temp archive is deleted; a guest shut down
 * for a `stop` backup is started again (`restarting vm`); the `lock: backup` line is removed.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import * as Schema from "effect/Schema"
import * as Schedule from "effect/Schedule"
import * as Scope from "effect/Scope"
import * as Fs from "node:fs/promises"
import * as NodePath from "node:path"
import type { GuestAgentService } from "@vzdump/qmp/GuestAgent"
import { BackupEngine, BackupEngineError } from "./BackupEngine.js"
import type { EngineDevice, RunningBackup } from "./BackupEngine.js"
import { BackupReporter } from "./BackupReporter.js"
import { awaitJob } from "./internal/awaitJob.js"
import type { BackupStatus } from "./BackupStatus.js"
import { BackupTarget } from "./BackupTarget.js"
import type { ArchiveResult } from "./BackupTarget.js"
import * as ConfigStore from "./ConfigStore.js"
import { compareVersion, Hypervisor } from "./Hypervisor.js"
import { Storage } from "./Storage.js"
import * as VmArchiveConfig from "./VmArchiveConfig.js"
import * as VmConfig from "./VmConfig.js"
import * as VmVolumes from "./VmVolumes.js"
import * as VzdumpLog from "./VzdumpLog.js"

/**
 * vzdump's backup modes for VMs.
 *
 * @since 0.1.0
 * @category models
 */
export type BackupMode = "snapshot" | "suspend" | "stop"

/**
 * @since 0.1.0
 * @category models
 */
export interface BackupOptions {
  readonly vmid: number
  /** Default `snapshot`. */
  readonly mode?: BackupMode | undefined
  /** KiB/s; 0 or absent = unlimited (passed to the engine as bytes/s). */
  readonly bwlimit?: number | undefined
  /** Minutes to wait for an orderly shutdown in `stop` mode; default 10. */
  readonly stopwait?: number | undefined
  /** Logged like vzdump (`ionice priority: N`); default 7. */
  readonly ionice?: number | undefined
  /** IANA time zone for log-file timestamps and archive names; default the process's. */
  readonly timeZone?: string | undefined
  /** How long to wait for the guest agent's answers (sync, freeze, thaw); default 60 seconds. */
  readonly agentTimeout?: Duration.DurationInput | undefined
  /** vzdump's `performance: max-workers=N` (passed to engines that support it). */
  readonly maxWorkers?: number | undefined
  /** vzdump's `fleecing: enabled=1` (Proxmox engine; the stock engine always fleeces). */
  readonly fleecing?: boolean | undefined
}

/**
 * A VM's backup failed. `message` is the text vzdump prints after `Backup of VM <id> failed - `.
 *
 * @since 0.1.0
 * @category errors
 */
export class BackupFailed extends Schema.TaggedError<BackupFailed>("@vzdump/core/BackupFailed")("BackupFailed", {
  vmid: Schema.Number,
  /** The tag of the underlying error (`VmConfigNotFound`, `VmLockError`, `BackupEngineError`, …). */
  cause: Schema.String,
  detail: Schema.String
}) {
  override get message(): string {
    return this.detail
  }
}

/**
 * What a successful backup produced.
 *
 * @since 0.1.0
 * @category models
 */
export interface BackupResult {
  readonly vmid: number
  readonly archive: ArchiveResult
  /** The last status the engine reported. */
  readonly status: BackupStatus
  /** Seconds between the freeze and the thaw, when the guest was frozen. */
  readonly freezeSeconds: number | undefined
  /** Every log line of this VM's backup, as the per-guest log file holds it. */
  readonly logLines: ReadonlyArray<string>
}

/** An internal failure with vzdump's message text. */
class StepError extends Schema.TaggedError<StepError>("@vzdump/core/BackupJob/StepError")("StepError", {
  detail: Schema.String
}) {
  override get message(): string {
    return this.detail
  }
}

const messageOf = (error: unknown): string =>
  typeof error === "object" && error !== null && "message" in error && typeof error.message === "string"
    ? error.message
    : String(error)

const tagOf = (error: unknown): string =>
  typeof error === "object" && error !== null && "_tag" in error && typeof error._tag === "string"
    ? error._tag
    : "Unknown"

/** Why a step failed, in vzdump's words: the error's message, or `interrupted by signal`. */
const reasonOf = (cause: Cause.Cause<unknown>): string => {
  const failure = Cause.failureOption(cause)
  if (Option.isSome(failure)) return messageOf(failure.value)
  if (Cause.isInterruptedOnly(cause)) return "interrupted by signal"
  const defect = Cause.dieOption(cause)
  if (Option.isSome(defect)) return messageOf(defect.value)
  return Cause.pretty(cause)
}

/** The per-VM log: reports every line and keeps the per-guest log file lines. */
const makeLog = (vmid: number, timeZone: string | undefined) =>
  Effect.map(BackupReporter, (reporter) => {
    const fileLines: Array<string> = []
    const write = (level: VzdumpLog.LogLevel, message: string, toFile: boolean) =>
      Effect.flatMap(Clock.currentTimeMillis, (millis) => {
        const time = new Date(millis)
        if (toFile) fileLines.push(...VzdumpLog.formatLogFileLines({ level, message }, time, timeZone))
        return reporter.report({ _tag: "Log", vmid, level, message, time })
      })
    return {
      fileLines,
      info: (message: string) => write("info", message, true),
      warn: (message: string) => write("warn", message, true),
      err: (message: string) => write("err", message, true),
      /** A line of the task log only, not of the per-guest log file (`Backup started at …`). */
      taskInfo: (message: string) => write("info", message, false),
      entries: (entries: ReadonlyArray<VzdumpLog.LogEntry>) =>
        Effect.forEach(entries, (entry) => write(entry.level, entry.message, true), { discard: true }),
      progress: (status: BackupStatus) =>
        Effect.flatMap(Clock.currentTimeMillis, (millis) =>
          reporter.report({ _tag: "Progress", vmid, status, time: new Date(millis) }))
    }
  })

type JobLog = Effect.Effect.Success<ReturnType<typeof makeLog>>

const unixSeconds = Effect.map(Clock.currentTimeMillis, (millis) => millis / 1000)
/** vzdump's `time()`: whole seconds. */
const wholeSeconds = Effect.map(unixSeconds, Math.floor)

/** How qemu-server words a failed monitor or agent command. */
const commandFailed = (vmid: number, command: string, error: unknown) =>
  `VM ${vmid} qmp command '${command}' failed - ${messageOf(error)}`

/**
 * Freezes the guest's filesystems for the scope, as vzdump does: a failed freeze is logged and the
 * backup goes on; the thaw runs on success, failure and interruption (also after a failed freeze),
 * with retries. `window` receives the seconds between the freeze request and the completed thaw.
 */
const frozen = (
  vmid: number,
  agent: GuestAgentService,
  log: JobLog,
  timeout: Duration.DurationInput,
  window: { seconds?: number | undefined }
) =>
  Effect.acquireRelease(
    Effect.gen(function*() {
      yield* log.info(VzdumpLog.Messages.issuingFsFreeze)
      const started = yield* unixSeconds
      const result = yield* agent.execute("guest-fsfreeze-freeze", undefined, { timeout }).pipe(Effect.either)
      if (result._tag === "Left") yield* log.err(commandFailed(vmid, "guest-fsfreeze-freeze", result.left))
      return { started, ok: result._tag === "Right" }
    }),
    ({ ok, started }) =>
      Effect.gen(function*() {
        yield* log.info(VzdumpLog.Messages.issuingFsThaw)
        const thawed = yield* agent.execute("guest-fsfreeze-thaw", undefined, { timeout }).pipe(
          Effect.retry(Schedule.spaced("1 second").pipe(Schedule.intersect(Schedule.recurs(5)))),
          Effect.as(true),
          Effect.catchAll((error) => Effect.as(log.err(commandFailed(vmid, "guest-fsfreeze-thaw", error)), false))
        )
        if (ok && thawed) window.seconds = (yield* unixSeconds) - started
      })
  )

const QEMU_IOTHREAD_BACKUP = { major: 4, minor: 0, micro: 1 }

/** What the workflow keeps of the archive session for after its scope: where the log goes. */
interface OpenedArchive {
  logPath?: string | undefined
  uploadLog?: ((log: string) => Effect.Effect<void, unknown>) | undefined
}

/** The scoped body: everything between the config check and the committed archive. */
const run = (options: BackupOptions, log: JobLog, startTime: Date, opened: OpenedArchive) =>
  Effect.gen(function*() {
    const vmid = options.vmid
    const store = yield* ConfigStore.ConfigStore
    const hypervisor = yield* Hypervisor
    const storage = yield* Storage
    const engine = yield* BackupEngine
    const target = yield* BackupTarget

    // vzdump reports the power state before it locks the config; a missing or broken config fails first
    yield* store.load(vmid)
    const initial = yield* hypervisor.status(vmid)
    yield* log.info(VzdumpLog.Messages.status(initial.running))
    const config = yield* ConfigStore.locked(vmid, "backup")
    const main = VmConfig.main(config)

    // -- prepare ------------------------------------------------------------------------------
    // qemu-server: a QEMU process counts as running, `paused` and `prelaunch` as paused (a guest
    // suspended to RAM does not); paused guests are never suspended, frozen or resumed
    const wasRunning = initial.running
    const wasPaused = initial.running && (initial.qmpStatus === "paused" || initial.qmpStatus === "prelaunch")
    if (main.guestName !== undefined) yield* log.info(VzdumpLog.Messages.vmName(main.guestName))

    const selection = VmVolumes.select(config)
    const volids = selection.volumes.map((volume) => volume.volid)
    if (initial.running && initial.qemuVersion !== undefined &&
      compareVersion(initial.qemuVersion, QEMU_IOTHREAD_BACKUP) < 0) {
      const iothread = selection.volumes.find((volume) =>
        volume.drive.options.some(([key, value]) => key === "iothread" && value === "1")
      )
      if (iothread !== undefined) {
        return yield* new StepError({
          detail: `disk '${iothread.virtdev}' '${iothread.volid}' (iothread=on) can't use backup feature with ` +
            `running QEMU version < 4.0.1! Please stop and start the VM to upgrade to a newer QEMU version.`
        })
      }
    }
    yield* storage.activate(volids, vmid)
    const devices: Array<EngineDevice> = []
    for (const volume of selection.volumes) {
      const info = yield* storage.info(volume.volid, vmid)
      devices.push({
        virtdev: volume.virtdev,
        qmdevice: volume.qmdevice,
        path: info.path,
        format: info.format,
        size: info.size
      })
    }
    const sizes = new Map(devices.map((device) => [device.virtdev, device.size]))
    for (const decision of selection.decisions) {
      yield* log.info(
        decision.included
          ? VzdumpLog.Messages.includeDisk(decision.virtdev, decision.volid, sizes.get(decision.virtdev))
          : VzdumpLog.Messages.excludeDisk(decision.virtdev, decision.volid, decision.reason)
      )
    }

    const requested = options.mode ?? "snapshot"
    const mode: BackupMode = wasRunning ? requested : "stop"
    yield* log.info(VzdumpLog.Messages.backupMode(mode))
    const bwlimit = options.bwlimit ?? 0
    if (bwlimit > 0) yield* log.info(VzdumpLog.Messages.bandwidthLimit(bwlimit))
    yield* log.info(VzdumpLog.Messages.ionicePriority(options.ionice ?? 7))

    // -- stop / suspend ------------------------------------------------------------------------
    // vzdump's `vmstoptime`: set when the guest is stopped or suspended, cleared once it runs again
    const power: { stopTime?: number | undefined } = {}
    const onlineAgain = Effect.gen(function*() {
      if (power.stopTime === undefined) return
      const delay = (yield* wholeSeconds) - power.stopTime
      power.stopTime = undefined
      yield* log.info(VzdumpLog.Messages.guestOnlineAgain(delay))
    })
    if (mode === "stop" && wasRunning) {
      yield* log.info(VzdumpLog.Messages.stoppingGuest)
      power.stopTime = yield* wholeSeconds
      // the guest ran before: once it is down, a failed backup starts it again (fix #3369). The
      // shutdown itself stays interruptible: it may wait `stopwait` minutes.
      let stopped = false
      yield* Effect.addFinalizer(() =>
        !stopped ? Effect.void : Effect.gen(function*() {
          const now = yield* hypervisor.status(vmid)
          if (!now.running) {
            yield* log.info("restarting vm")
            yield* hypervisor.startPaused(vmid, config)
            yield* hypervisor.resume(vmid)
          }
          yield* onlineAgain
        }).pipe(Effect.catchAll((error) => log.warn(error.message)))
      )
      yield* hypervisor.shutdown(vmid, Duration.minutes(options.stopwait ?? 10))
      stopped = true
    } else if (mode === "suspend") {
      yield* log.info(VzdumpLog.Messages.suspendingGuest)
      power.stopTime = yield* wholeSeconds
      if (!wasPaused) {
        yield* Effect.acquireRelease(hypervisor.suspend(vmid), () =>
          power.stopTime === undefined ? Effect.void : Effect.gen(function*() {
            yield* log.info("resume vm")
            yield* hypervisor.resume(vmid)
            yield* onlineAgain
          }).pipe(Effect.catchAll((error) => log.warn(error.message))))
      }
    }

    // -- config for the archive ----------------------------------------------------------------
    const firewall = yield* store.readFirewall(vmid)
    const assembled = VmArchiveConfig.assemble(
      config,
      selection.volumes.map((volume) => ({
        virtdev: volume.virtdev,
        qmdevice: volume.qmdevice,
        storeid: volume.storeid,
        format: devices.find((device) => device.virtdev === volume.virtdev)?.format ?? volume.format
      })),
      { firewall: Option.getOrUndefined(firewall) }
    )
    yield* log.entries(assembled.log)
    const encoder = new TextEncoder()
    const archive = yield* target.open({
      vmid,
      startTime,
      configs: [
        { name: VmArchiveConfig.configName, data: encoder.encode(assembled.config) },
        ...(assembled.firewall !== undefined
          ? [{ name: VmArchiveConfig.firewallName, data: encoder.encode(assembled.firewall) }]
          : [])
      ],
      devices: devices.map((device) => ({ name: device.qmdevice, size: device.size }))
    })
    opened.logPath = archive.logPath
    opened.uploadLog = archive.uploadLog
    yield* log.info(archive.openedLine)

    // -- the QEMU part (qemu-server's `archive`) --------------------------------------------------
    /** qemu-server's `resume_vm_after_job_start`: `cont` a guest that ran before (a no-op if it runs). */
    const resumeAfterJobStart = Effect.gen(function*() {
      if (!wasRunning || wasPaused) return
      if (power.stopTime !== undefined) {
        const delay = (yield* wholeSeconds) - power.stopTime
        power.stopTime = undefined
        yield* log.info(VzdumpLog.Messages.resumingVm(delay))
      } else {
        yield* log.info(VzdumpLog.Messages.resumingVm())
      }
      yield* hypervisor.resume(vmid)
    })
    /** qemu-server's `restore_vm_power_state`: stop QEMU started for the backup, unless the guest was started. */
    const restorePowerState = Effect.gen(function*() {
      if (wasRunning) return
      const after = yield* hypervisor.status(vmid)
      if (!after.running) return
      if (after.qmpStatus === "prelaunch") {
        yield* log.info(VzdumpLog.Messages.stoppingKvm)
        yield* hypervisor.stop(vmid)
      } else {
        yield* log.info(VzdumpLog.Messages.kvmStatusChanged(after.qmpStatus ?? "unknown"))
      }
    }).pipe(Effect.catchAll((error) => log.warn(error.message)))

    const freezeWindow: { seconds?: number | undefined } = {}
    let running: RunningBackup | undefined
    const backup = Effect.gen(function*() {
      const current = yield* hypervisor.status(vmid)
      if (!current.running) {
        yield* log.info(VzdumpLog.Messages.startingKvm)
        yield* hypervisor.startPaused(vmid, config)
      }
      const qmp = yield* hypervisor.monitor(vmid)
      const job = {
        vmid,
        devices,
        qmp,
        archive,
        speed: bwlimit * 1024,
        log: (level: "info" | "warn", message: string) => level === "warn" ? log.warn(message) : log.info(message),
        template: VmConfig.isTemplate(config),
        maxWorkers: options.maxWorkers,
        fleecing: options.fleecing
      }
      yield* engine.prepare(job)

      // -- freeze, start, thaw -------------------------------------------------------------------
      const jobScope = yield* Effect.scope
      // a VM without disks: vzdump writes the configs only, with no QMP job and no freeze
      const diskless = devices.length === 0
      const startJob = Effect.zipRight(
        log.info(diskless ? VzdumpLog.Messages.startingDisklessBackup : VzdumpLog.Messages.startingBackupViaQmp),
        engine.start(job)
      )
      const freeze = !diskless && main.agent?.enabled === true && mode !== "stop" && wasRunning && !wasPaused
      running = yield* Effect.gen(function*() {
        if (!freeze) return yield* startJob
        const agent = yield* hypervisor.guestAgent(vmid).pipe(
          Effect.tap((agent) => agent.execute("guest-ping", undefined, { timeout: "3 seconds" })),
          Effect.option
        )
        if (Option.isNone(agent)) {
          yield* log.info("skipping guest-agent 'fs-freeze', agent configured but not running?")
          return yield* startJob
        }
        if (!VmConfig.shouldFreezeFs(main.agent)) {
          yield* log.info("skipping guest-agent 'fs-freeze', disabled in VM options")
          return yield* startJob
        }
        // the freeze lives in an inner scope: thaw right after the job has started
        const agentTimeout = options.agentTimeout ?? Duration.seconds(60)
        const started = yield* Effect.scoped(
          Effect.zipRight(frozen(vmid, agent.value, log, agentTimeout, freezeWindow), Scope.extend(startJob, jobScope))
        )
        if (freezeWindow.seconds !== undefined) {
          yield* log.info(
            `guest filesystems were frozen for ${VzdumpLog.formatFixed(freezeWindow.seconds, 3)} seconds`
          )
        }
        return started
      })
      if (!diskless) yield* log.info(VzdumpLog.Messages.startedBackupTask(running.uuid))
      yield* resumeAfterJobStart
      if (diskless) {
        const status = yield* running.status
        if (status.status !== "done") {
          return yield* new BackupEngineError({
            engine: engine.name,
            reason: "Transfer",
            detail: status.errmsg ?? `got unexpected status '${status.status ?? "unknown"}'`
          })
        }
        return status
      }
      return yield* awaitJob(running, engine.name, log, job.template)
    })

    const last = yield* Effect.scoped(backup.pipe(
      // vzdump: log the error, cancel the job (its resources go with this scope) …
      Effect.onError((cause) =>
        Effect.gen(function*() {
          yield* log.err(reasonOf(cause))
          yield* log.info(VzdumpLog.Messages.abortingBackupJob)
          if (running !== undefined) yield* running.cancel
        })
      )
    )).pipe(
      // … then bring a guest that ran before back (after the engine's cleanup, which resumes a
      // guest paused by a full fleece) …
      Effect.onError(() =>
        Effect.gen(function*() {
          if ((yield* hypervisor.status(vmid)).running) yield* resumeAfterJobStart
        }).pipe(Effect.catchAll((error) => log.warn(error.message)))
      ),
      // … and stop QEMU again if it was started for the backup
      Effect.ensuring(restorePowerState)
    )
    const result = yield* archive.commit
    yield* log.entries(result.logLines.map(VzdumpLog.info))
    return { archive: result, status: last, freezeSeconds: freezeWindow.seconds }
  })

const writeLogFile = (path: string | undefined, log: JobLog) =>
  path === undefined ? Effect.void : Effect.tryPromise(() => Fs.writeFile(path, `${log.fileLines.join("\n")}\n`)).pipe(
    Effect.catchAll((error) => log.warn(`unable to write log file ${NodePath.basename(path)} - ${messageOf(error)}`))
  )

/**
 * Backs up one VM. Requires the host profile's services (`ConfigStore`, `Storage`, `Hypervisor`),
 * an engine (`BackupEngine`), a target (`BackupTarget`) and a `BackupReporter`. Fails with
 * `BackupFailed` after logging vzdump's `ERROR: Backup of VM <id> failed - <reason>` line; every
 * step has been unwound by then. An interruption unwinds the same way, logs the failure as
 * `interrupted by signal` and ends the fiber as interrupted.
 *
 * @since 0.1.0
 * @category workflow
 */
export const backupVm = (
  options: BackupOptions
): Effect.Effect<
  BackupResult,
  BackupFailed,
  ConfigStore.ConfigStore | Storage | Hypervisor | BackupEngine | BackupTarget | BackupReporter
> =>
  Effect.uninterruptibleMask((restore) =>
    Effect.gen(function*() {
      const vmid = options.vmid
      const log = yield* makeLog(vmid, options.timeZone)
      const startMillis = yield* Clock.currentTimeMillis
      const startTime = new Date(startMillis)
      yield* log.info(VzdumpLog.Messages.startingBackup(vmid))
      yield* log.taskInfo(VzdumpLog.Messages.backupStartedAt(startTime, options.timeZone))
      // the per-guest log file goes beside the archive, on success and on failure
      const opened: OpenedArchive = {}
      const outcome = yield* restore(Effect.scoped(run(options, log, startTime, opened))).pipe(Effect.exit)
      const endMillis = yield* Clock.currentTimeMillis
      const elapsed = Math.floor(endMillis / 1000) - Math.floor(startMillis / 1000)
      if (Exit.isSuccess(outcome)) {
        yield* log.info(VzdumpLog.Messages.finishedBackup(vmid, elapsed))
        yield* log.taskInfo(VzdumpLog.Messages.backupFinishedAt(new Date(endMillis), options.timeZone))
        yield* writeLogFile(opened.logPath, log)
        if (opened.uploadLog !== undefined) {
          // vzdump's `upload-log` of a PBS backup: a failure is a warning, the backup stands
          const text = `${log.fileLines.join("\n")}\n`
          yield* opened.uploadLog(text).pipe(
            Effect.catchAll((error) => log.warn(`unable to upload the backup log - ${messageOf(error)}`))
          )
        }
        return {
          vmid,
          archive: outcome.value.archive,
          status: outcome.value.status,
          freezeSeconds: outcome.value.freezeSeconds,
          logLines: [...log.fileLines]
        }
      }
      const reason = reasonOf(outcome.cause)
      yield* log.err(VzdumpLog.Messages.backupFailed(vmid, reason))
      yield* log.taskInfo(VzdumpLog.Messages.failedAt(new Date(endMillis), options.timeZone))
      yield* writeLogFile(opened.logPath, log)
      const error = Option.getOrUndefined(Cause.failureOption(outcome.cause))
      if (error === undefined) return yield* Effect.failCause(outcome.cause as Cause.Cause<never>)
      return yield* new BackupFailed({ vmid, cause: tagOf(error), detail: reason })
    })
  ).pipe(Effect.withSpan("BackupJob.backupVm", { attributes: { vmid: options.vmid } }))
