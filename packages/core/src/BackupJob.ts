/**
 * The backup workflow of one VM, after Proxmox's `PVE/VZDump/QemuServer.pm`, as scoped Effects:
 *
 * lock the config → plan and activate volumes → (stop | suspend) → start QEMU paused if it is off →
 * fs-freeze → start the backup command → thaw → resume → poll the status once a second with vzdump's
 * progress lines → commit the archive → restore the power state → unlock.
 *
 * Every step that changes the VM is an `acquireRelease`, so a failure or an interruption (SIGINT,
 * SIGTERM, a timeout, a parent fiber's interrupt) unwinds all of them in reverse order: the guest is
 * thawed, the job cancelled and its resources removed, the temp archive deleted, a VM started only
 * for the backup stopped again, a stopped or suspended VM resumed, and the `lock: backup` line
 * removed.
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
import { BackupEngine } from "./BackupEngine.js"
import type { EngineDevice, RunningBackup } from "./BackupEngine.js"
import { BackupReporter } from "./BackupReporter.js"
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
import * as VzdumpProgress from "./VzdumpProgress.js"

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

/** The per-VM log: reports every line and keeps the per-guest log file lines. */
const makeLog = (vmid: number, timeZone: string | undefined) =>
  Effect.map(BackupReporter, (reporter) => {
    const fileLines: Array<string> = []
    const write = (level: VzdumpLog.LogLevel, message: string) =>
      Effect.flatMap(Clock.currentTimeMillis, (millis) => {
        const time = new Date(millis)
        fileLines.push(...VzdumpLog.formatLogFileLines({ level, message }, time, timeZone))
        return reporter.report({ _tag: "Log", vmid, level, message, time })
      })
    return {
      fileLines,
      info: (message: string) => write("info", message),
      warn: (message: string) => write("warn", message),
      err: (message: string) => write("err", message),
      entries: (entries: ReadonlyArray<VzdumpLog.LogEntry>) =>
        Effect.forEach(entries, (entry) => write(entry.level, entry.message), { discard: true }),
      progress: (status: BackupStatus) =>
        Effect.flatMap(Clock.currentTimeMillis, (millis) =>
          reporter.report({ _tag: "Progress", vmid, status, time: new Date(millis) }))
    }
  })

type JobLog = Effect.Effect.Success<ReturnType<typeof makeLog>>

const unixSeconds = Effect.map(Clock.currentTimeMillis, (millis) => millis / 1000)
/** vzdump's `time()`: whole seconds. */
const wholeSeconds = Effect.map(unixSeconds, Math.floor)

/**
 * Freezes the guest's filesystems for the scope, as vzdump does: only when the agent answers;
 * a failed freeze is logged and the backup goes on; the thaw runs on success, failure and
 * interruption, with retries.
 */
const frozen = (agent: GuestAgentService, log: JobLog, timeout: Duration.DurationInput) =>
  Effect.acquireRelease(
    Effect.gen(function*() {
      yield* log.info(VzdumpLog.Messages.issuingFsFreeze)
      const started = yield* unixSeconds
      const result = yield* agent.execute("guest-fsfreeze-freeze", undefined, { timeout }).pipe(Effect.either)
      if (result._tag === "Left") yield* log.warn(`unable to freeze guest fs - ${messageOf(result.left)}`)
      return started
    }),
    () =>
      Effect.gen(function*() {
        yield* log.info(VzdumpLog.Messages.issuingFsThaw)
        yield* agent.execute("guest-fsfreeze-thaw", undefined, { timeout }).pipe(
          Effect.retry(Schedule.spaced("1 second").pipe(Schedule.intersect(Schedule.recurs(5)))),
          Effect.catchAll((error) => log.err(`unable to thaw guest fs - ${messageOf(error)}`))
        )
      })
  )

/**
 * Polls the job once a second and logs vzdump's progress lines until it is done; fails with the
 * job's error message.
 */
const awaitJob = (job: RunningBackup, log: JobLog) =>
  Effect.gen(function*() {
    const begin = VzdumpProgress.start({ jobUuid: job.uuid, now: yield* wholeSeconds })
    yield* log.entries(begin.lines.map(VzdumpLog.info))
    let state = begin.state
    let last: BackupStatus = { finishing: false }
    while (true) {
      yield* Effect.sleep("1 second")
      last = yield* job.status
      yield* log.progress(last)
      const step = VzdumpProgress.step(state, last, yield* wholeSeconds)
      state = step.state
      yield* log.entries(step.lines.map(VzdumpLog.info))
      if (step.outcome._tag === "Failed") return yield* Effect.fail(new StepError({ detail: step.outcome.message }))
      if (step.outcome._tag === "Done") break
    }
    const summary = VzdumpProgress.finish(state, yield* wholeSeconds)
    yield* log.entries(summary.lines.map(VzdumpLog.info))
    return last
  })

const QEMU_IOTHREAD_BACKUP = { major: 4, minor: 0, micro: 1 }

/** The scoped body: everything between the lock and the committed archive. */
const run = (options: BackupOptions, log: JobLog, startTime: Date, opened: { logPath?: string | undefined }) =>
  Effect.gen(function*() {
    const vmid = options.vmid
    const store = yield* ConfigStore.ConfigStore
    const hypervisor = yield* Hypervisor
    const storage = yield* Storage
    const engine = yield* BackupEngine
    const target = yield* BackupTarget

    const config = yield* ConfigStore.locked(vmid, "backup")
    const main = VmConfig.main(config)

    // -- prepare ------------------------------------------------------------------------------
    const initial = yield* hypervisor.status(vmid)
    const wasRunning = initial.running && initial.qmpStatus !== "prelaunch"
    const wasPaused = initial.running && initial.qmpStatus !== "running" && initial.qmpStatus !== "prelaunch"
    yield* log.info(VzdumpLog.Messages.status(initial.running))
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
    const mode: BackupMode = initial.running ? requested : "stop"
    yield* log.info(VzdumpLog.Messages.backupMode(mode))
    const bwlimit = options.bwlimit ?? 0
    if (bwlimit > 0) yield* log.info(VzdumpLog.Messages.bandwidthLimit(bwlimit))
    yield* log.info(VzdumpLog.Messages.ionicePriority(options.ionice ?? 7))

    // -- stop / suspend ------------------------------------------------------------------------
    let stoppedAt: number | undefined
    let resumed = false
    if (mode === "stop" && wasRunning) {
      yield* log.info(VzdumpLog.Messages.stoppingGuest)
      stoppedAt = yield* unixSeconds
      yield* Effect.acquireRelease(
        hypervisor.shutdown(vmid, Duration.minutes(options.stopwait ?? 10)),
        // the VM ran before: if the backup failed before resuming it, bring it back (fix #3369)
        () =>
          resumed ? Effect.void : Effect.gen(function*() {
            const now = yield* hypervisor.status(vmid)
            if (!now.running) yield* hypervisor.startPaused(vmid, config)
            yield* hypervisor.resume(vmid)
          }).pipe(Effect.catchAll((error) => log.err(`unable to restart VM ${vmid} - ${error.message}`)))
      )
    } else if (mode === "suspend" && wasRunning && !wasPaused) {
      yield* log.info(VzdumpLog.Messages.suspendingGuest)
      yield* Effect.acquireRelease(hypervisor.suspend(vmid), () =>
        resumed ? Effect.void : hypervisor.resume(vmid).pipe(
          Effect.catchAll((error) => log.err(`unable to resume VM ${vmid} - ${error.message}`))
        ))
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
    yield* log.info(archive.openedLine)

    // -- QEMU for the backup ---------------------------------------------------------------------
    const current = yield* hypervisor.status(vmid)
    if (!current.running) {
      yield* log.info(VzdumpLog.Messages.startingKvm)
      yield* Effect.acquireRelease(hypervisor.startPaused(vmid, config), () =>
        wasRunning ? Effect.void : Effect.gen(function*() {
          // restore the power state: stop QEMU only if nobody started the guest meanwhile
          const after = yield* hypervisor.status(vmid)
          if (!after.running) return
          if (after.qmpStatus === "prelaunch") {
            yield* log.info(VzdumpLog.Messages.stoppingKvm)
            yield* hypervisor.stop(vmid)
          } else {
            yield* log.info(VzdumpLog.Messages.kvmStatusChanged(after.qmpStatus ?? "unknown"))
          }
        }).pipe(Effect.catchAll((error) => log.err(error.message))))
    }
    const qmp = yield* hypervisor.monitor(vmid)
    const job = {
      vmid,
      devices,
      qmp,
      archive,
      speed: bwlimit * 1024,
      log: (level: "info" | "warn", message: string) => level === "warn" ? log.warn(message) : log.info(message)
    }
    yield* engine.prepare(job)

    // -- freeze, start, thaw -----------------------------------------------------------------------
    const freeze = mode === "snapshot" && wasRunning && !wasPaused && VmConfig.shouldFreezeFs(main.agent)
    const agentTimeout = options.agentTimeout ?? Duration.seconds(60)
    let freezeSeconds: number | undefined
    const startJob = Effect.zipRight(log.info(VzdumpLog.Messages.startingBackupViaQmp), engine.start(job))
    const running: RunningBackup = yield* Effect.gen(function*() {
      if (!freeze) return yield* startJob
      const agent = yield* hypervisor.guestAgent(vmid).pipe(
        Effect.tap((agent) => agent.sync({ timeout: "5 seconds" })),
        Effect.option
      )
      if (Option.isNone(agent)) {
        yield* log.info("skipping guest-agent 'fs-freeze', agent configured but not running?")
        return yield* startJob
      }
      // the freeze lives in an inner scope: thaw right after the job has started
      const outer = yield* Effect.scope
      return yield* Effect.scoped(Effect.gen(function*() {
        const frozenAt = yield* frozen(agent.value, log, agentTimeout)
        const started = yield* Scope.extend(startJob, outer)
        yield* Effect.addFinalizer(() =>
          Effect.map(unixSeconds, (now) => {
            freezeSeconds = now - frozenAt
          })
        )
        return started
      })).pipe(Effect.tap(() =>
        freezeSeconds !== undefined
          ? log.info(`guest filesystems were frozen for ${freezeSeconds.toFixed(3)} seconds`)
          : Effect.void
      ))
    })
    yield* log.info(VzdumpLog.Messages.startedBackupTask(running.uuid))

    // -- resume ------------------------------------------------------------------------------------
    if (mode === "stop" && wasRunning) {
      yield* hypervisor.resume(vmid)
      resumed = true
      const after = Math.round((yield* unixSeconds) - (stoppedAt ?? 0))
      yield* log.info(VzdumpLog.Messages.resumingVm(after))
    } else if (mode === "suspend" && wasRunning && !wasPaused) {
      yield* log.info(VzdumpLog.Messages.resumingVm())
      yield* hypervisor.resume(vmid)
      resumed = true
    }

    // -- poll --------------------------------------------------------------------------------------
    const last = yield* awaitJob(running, log).pipe(
      Effect.onError((cause) =>
        Exit.isInterrupted(Exit.failCause(cause)) ? running.cancel : Effect.zipRight(
          log.info(VzdumpLog.Messages.abortingBackupJob),
          running.cancel
        )
      )
    )
    const result = yield* archive.commit
    yield* log.entries(result.logLines.map(VzdumpLog.info))
    return { archive: result, status: last, freezeSeconds }
  })

const writeLogFile = (path: string | undefined, log: JobLog) =>
  path === undefined ? Effect.void : Effect.tryPromise(() => Fs.writeFile(path, `${log.fileLines.join("\n")}\n`)).pipe(
    Effect.catchAll((error) => log.warn(`unable to write log file ${NodePath.basename(path)} - ${messageOf(error)}`))
  )

/**
 * Backs up one VM. Requires the host profile's services (`ConfigStore`, `Storage`, `Hypervisor`),
 * an engine (`BackupEngine`), a target (`BackupTarget`) and a `BackupReporter`. Fails with
 * `BackupFailed` after logging vzdump's `ERROR: Backup of VM <id> failed - <reason>` line; every
 * step has been unwound by then.
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
  Effect.gen(function*() {
    const vmid = options.vmid
    const log = yield* makeLog(vmid, options.timeZone)
    const startMillis = yield* Clock.currentTimeMillis
    const startTime = new Date(startMillis)
    yield* log.info(VzdumpLog.Messages.startingBackup(vmid))
    yield* log.info(VzdumpLog.Messages.backupStartedAt(startTime, options.timeZone))
    // the per-guest log file goes beside the archive, on success and on failure
    const opened: { logPath?: string | undefined } = {}
    const outcome = yield* Effect.scoped(run(options, log, startTime, opened)).pipe(Effect.exit)
    const elapsed = ((yield* Clock.currentTimeMillis) - startMillis) / 1000
    if (Exit.isSuccess(outcome)) {
      yield* log.info(VzdumpLog.Messages.finishedBackup(vmid, elapsed))
      yield* writeLogFile(opened.logPath, log)
      return {
        vmid,
        archive: outcome.value.archive,
        status: outcome.value.status,
        freezeSeconds: outcome.value.freezeSeconds,
        logLines: [...log.fileLines]
      }
    }
    const error = Option.getOrUndefined(Cause.failureOption(outcome.cause))
    const reason = error !== undefined
      ? messageOf(error)
      : Cause.isInterruptedOnly(outcome.cause)
      ? "interrupted by signal"
      : Cause.pretty(outcome.cause)
    yield* log.err(VzdumpLog.Messages.backupFailed(vmid, reason))
    yield* writeLogFile(opened.logPath, log)
    if (error === undefined) return yield* Effect.failCause(outcome.cause as Cause.Cause<never>)
    return yield* new BackupFailed({ vmid, cause: tagOf(error), detail: reason })
  }).pipe(Effect.withSpan("BackupJob.backupVm", { attributes: { vmid: options.vmid } }))

