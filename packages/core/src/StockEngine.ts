/**
 * The stock-QEMU engine (any QEMU ≥ 7.2, no Proxmox patches): classic fleecing + NBD pull.
 *
 * Per disk a qcow2 fleece image whose backing is the live node; one atomic QMP `transaction` of
 * `blockdev-backup sync=none` for all disks is the point in time; each fleece node is exported
 * read-only over NBD on a Unix socket and read in order by our NBD client, holes (from
 * `base:allocation`) written to the archive as zeros without reading. Status counters follow
 * Proxmox's `BackupStatus`. A `BLOCK_IO_ERROR` with `nospace` (the fleece ran full, which pauses the
 * guest) aborts the backup, and the cleanup resumes the guest. Cleanup runs in the spec's order:
 * exports (awaiting `BLOCK_EXPORT_DELETED`) → NBD server → jobs → fleece nodes → fleece files.
 *
 * Names are deterministic per VM and disk (`vzdump-fleece-<virtdev>`, `vzdump-fleece-job-<virtdev>`,
 * `vzdump-exp-<virtdev>`, `<fleeceDir>/vzdump-fleece-<vmid>-<virtdev>.qcow2`), so `prepare` can
 * remove what a crashed run left behind.
 *
 * @since 0.1.0
 */
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Schema from "effect/Schema"
import * as Stream from "effect/Stream"
import { randomUUID } from "node:crypto"
import * as Fs from "node:fs/promises"
import * as NodePath from "node:path"
import * as NbdClient from "@vzdump/qmp/NbdClient"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import * as QmpSchema from "@vzdump/qmp/QmpSchema"
import { BackupEngine, BackupEngineError } from "./BackupEngine.js"
import type { BackupEngineService, EngineDevice, EngineJob, RunningBackup } from "./BackupEngine.js"
import type { BackupStatus } from "./BackupStatus.js"
import { HostCommand } from "./HostCommand.js"
import * as VzdumpLog from "./VzdumpLog.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface StockEngineOptions {
  /** Where fleece images are created. It needs room for everything the guest overwrites during the backup. */
  readonly fleeceDir: string
  /** Directory of the NBD socket (`<socketDir>/vzdump-nbd-<vmid>.sock`); keep it short. Default `fleeceDir`. */
  readonly socketDir?: string | undefined
  /** Bytes per NBD read, default 4 MiB. */
  readonly chunkSize?: number | undefined
  /** NBD reads in flight, default 4. Memory stays near `chunkSize × concurrency`. */
  readonly concurrency?: number | undefined
}

const ENGINE = "stock-qemu"

/**
 * Deterministic names of one disk's backup resources.
 *
 * @since 0.1.0
 * @category names
 */
export const names = (options: StockEngineOptions, vmid: number, virtdev: string) => ({
  node: `vzdump-fleece-${virtdev}`,
  job: `vzdump-fleece-job-${virtdev}`,
  exportId: `vzdump-exp-${virtdev}`,
  exportName: virtdev,
  file: NodePath.join(options.fleeceDir, `vzdump-fleece-${vmid}-${virtdev}.qcow2`)
})

const socketPath = (options: StockEngineOptions, vmid: number) =>
  NodePath.join(options.socketDir ?? options.fleeceDir, `vzdump-nbd-${vmid}.sock`)

const engineError = (reason: BackupEngineError["reason"], detail: string) =>
  new BackupEngineError({ engine: ENGINE, reason, detail })

const decode = <A, I>(schema: Schema.Schema<A, I>, command: string) => (value: unknown) =>
  Schema.decodeUnknown(schema)(value).pipe(
    Effect.mapError((error) => engineError("Prepare", `${command}: unexpected reply: ${error.message}`))
  )

const exec = (qmp: QmpClientService, reason: BackupEngineError["reason"], command: string, args?: object) =>
  qmp.execute(command, args).pipe(Effect.mapError((error) => engineError(reason, error.message)))

/** The format node a device reads from, found through `query-block`. */
const liveNodes = (qmp: QmpClientService, devices: ReadonlyArray<EngineDevice>) =>
  Effect.gen(function*() {
    const blocks = yield* exec(qmp, "Start", "query-block").pipe(
      Effect.flatMap(decode(Schema.Array(QmpSchema.BlockInfo), "query-block"))
    )
    return yield* Effect.forEach(devices, (device) => {
      const info = blocks.find((block) =>
        block.qdev === device.virtdev || block.qdev?.startsWith(`/machine/peripheral/${device.virtdev}/`) === true ||
        block.device === device.qmdevice
      )
      const node = info?.inserted?.["node-name"]
      return node === undefined
        ? Effect.fail(engineError("Start", `${device.qmdevice}: no block device '${device.virtdev}' in QEMU`))
        : Effect.succeed(node)
    })
  })

/** Waits for an event after running `trigger`, subscribed before it. */
const triggerAndAwait = (
  qmp: QmpClientService,
  trigger: Effect.Effect<unknown, BackupEngineError>,
  predicate: (event: QmpSchema.QmpEvent) => boolean,
  timeout: Duration.DurationInput,
  what: string
) =>
  Effect.scoped(Effect.gen(function*() {
    const events = yield* qmp.subscribe
    yield* trigger
    yield* QmpClient.awaitEvent(events, predicate, timeout, what).pipe(
      Effect.mapError((error) => engineError("Cleanup", error.message))
    )
  }))

const removeFile = (file: string) => Effect.promise(() => Fs.rm(file, { force: true }))

const deleteExport = (qmp: QmpClientService, id: string) =>
  triggerAndAwait(
    qmp,
    exec(qmp, "Cleanup", "block-export-del", { id }),
    (event) => event.event === "BLOCK_EXPORT_DELETED" && (event.data as { id?: unknown } | undefined)?.id === id,
    "30 seconds",
    `BLOCK_EXPORT_DELETED ${id}`
  )

const cancelJob = (qmp: QmpClientService, job: string) =>
  triggerAndAwait(
    qmp,
    exec(qmp, "Cleanup", "block-job-cancel", { device: job, force: true }),
    (event) =>
      (event.event === "BLOCK_JOB_CANCELLED" || event.event === "BLOCK_JOB_COMPLETED") &&
      (event.data as { device?: unknown } | undefined)?.device === job,
    "30 seconds",
    `BLOCK_JOB_CANCELLED ${job}`
  )

/** What `prepare` set up for a VM's job: live node names, resource names, and whether the fleece ran full. */
interface PreparedDisks {
  readonly nodes: ReadonlyArray<string>
  readonly names: ReadonlyArray<ReturnType<typeof names>>
  noSpace: boolean
}

/** Logs a failed cleanup step instead of failing: later steps must still run. */
const bestEffort = (job: EngineJob, effect: Effect.Effect<unknown, BackupEngineError>) =>
  effect.pipe(Effect.asVoid, Effect.catchAll((error) => job.log("warn", `cleanup: ${error.message}`)))

/**
 * Builds the engine.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (options: StockEngineOptions) =>
  Effect.map(HostCommand, (command): BackupEngineService => {
    const chunkSize = options.chunkSize ?? 4 * 1024 * 1024
    const concurrency = options.concurrency ?? 4

    const prepared = new Map<number, PreparedDisks>()

    const prepare = (job: EngineJob) =>
      Effect.gen(function*() {
        if (job.devices.length === 0) return
        const qmp = job.qmp
        const wanted = job.devices.map((device) => names(options, job.vmid, device.virtdev))
        const socket = socketPath(options, job.vmid)
        const exports = yield* exec(qmp, "Prepare", "query-block-exports").pipe(
          Effect.flatMap(decode(Schema.Array(QmpSchema.BlockExportInfo), "query-block-exports"))
        )
        const jobs = yield* exec(qmp, "Prepare", "query-jobs").pipe(
          Effect.flatMap(decode(Schema.Array(QmpSchema.JobInfo), "query-jobs"))
        )
        const nodes = yield* exec(qmp, "Prepare", "query-named-block-nodes", { flat: true }).pipe(
          Effect.flatMap(decode(Schema.Array(Schema.Struct({ "node-name": Schema.String })), "query-named-block-nodes"))
        )
        const staleExports = exports.filter((info) => info.id.startsWith("vzdump-exp-"))
        const staleJobs = jobs.filter((info) => info.id.startsWith("vzdump-fleece-job-"))
        const staleNodes = nodes.filter((node) => node["node-name"].startsWith("vzdump-fleece-"))
        // our NBD server listens on a deterministic socket: if the file is there, a crashed run left it
        const staleServer = yield* Effect.promise(() =>
          Fs.stat(socket).then(() => true, () => false)
        )
        if (staleExports.length + staleJobs.length + staleNodes.length > 0) {
          yield* job.log("warn", VzdumpLog.Messages.leftOverJob)
        }
        // the spec's order: exports → NBD server → jobs → fleece nodes → files
        for (const info of staleExports) yield* deleteExport(qmp, info.id)
        if (staleExports.length > 0 || staleServer) {
          // stopping a server that is not running fails harmlessly
          yield* exec(qmp, "Prepare", "nbd-server-stop").pipe(Effect.ignore)
        }
        for (const info of staleJobs) yield* cancelJob(qmp, info.id)
        for (const node of staleNodes) {
          yield* exec(qmp, "Prepare", "blockdev-del", { "node-name": node["node-name"] })
        }
        yield* Effect.forEach(wanted, (name) => removeFile(name.file), { discard: true })
        yield* removeFile(socket)

        // fleece images and nodes: prepared before the freeze, so the freeze only covers the transaction
        const disks: PreparedDisks = { nodes: yield* liveNodes(qmp, job.devices), names: wanted, noSpace: false }
        // a guest paused by a full fleece is resumed once everything else is cleaned up (runs last)
        yield* Effect.addFinalizer(() =>
          Effect.zipRight(
            Effect.sync(() => prepared.delete(job.vmid)),
            disks.noSpace
              ? exec(qmp, "Cleanup", "cont").pipe(
                Effect.zipRight(job.log("info", "resumed the guest after the fleece ran out of space")),
                Effect.catchAll((error) => job.log("warn", `unable to resume the guest: ${error.message}`))
              )
              : Effect.void
          )
        )
        yield* Effect.promise(() => Fs.mkdir(options.fleeceDir, { recursive: true }))
        for (const [i, device] of job.devices.entries()) {
          const name = wanted[i]!
          yield* Effect.acquireRelease(
            command.run("qemu-img", ["create", "-q", "-f", "qcow2", name.file, String(device.size)]).pipe(
              Effect.mapError((error) => engineError("Prepare", error.message))
            ),
            () => removeFile(name.file)
          )
          yield* Effect.acquireRelease(
            exec(qmp, "Prepare", "blockdev-add", {
              driver: "qcow2",
              "node-name": name.node,
              discard: "unmap",
              file: { driver: "file", filename: name.file },
              backing: disks.nodes[i]
            }),
            () => bestEffort(job, exec(qmp, "Cleanup", "blockdev-del", { "node-name": name.node }))
          )
        }
        prepared.set(job.vmid, disks)
      })

    const start = (job: EngineJob) =>
      Effect.gen(function*() {
        const qmp = job.qmp
        const uuid = randomUUID()
        if (job.devices.length === 0) {
          // nothing to read: the archive holds the configs only
          const now = Math.floor(Date.now() / 1000)
          const done: BackupStatus = {
            status: "done", total: 0, dirty: 0, transferred: 0, "zero-bytes": 0, reused: 0,
            "start-time": now, "end-time": now, uuid, finishing: false
          }
          return { uuid, status: Effect.succeed(done), cancel: Effect.void } satisfies RunningBackup
        }
        const startTime = Math.floor(Date.now() / 1000)
        const total = job.devices.reduce((sum, device) => sum + device.size, 0)
        const counters = { transferred: 0, zero: 0 }
        let outcome: { status: "done" } | { status: "error"; errmsg: string } | undefined
        let endTime: number | undefined
        const fail = (errmsg: string) => {
          if (outcome === undefined) {
            outcome = { status: "error", errmsg }
            endTime = Math.floor(Date.now() / 1000)
          }
        }

        const disks = prepared.get(job.vmid)
        if (disks === undefined) {
          return yield* Effect.fail(engineError("Start", `VM ${job.vmid}: the engine was not prepared for this job`))
        }
        const nodes = disks.nodes
        const perDisk = disks.names

        // watch the whole backup for a full fleece (subscribed before the point in time)
        const events = yield* qmp.subscribe
        const transferFailed = yield* Deferred.make<never, BackupEngineError>()
        yield* events.pipe(
          Stream.filter((event) => event.event === "BLOCK_IO_ERROR"),
          Stream.runForEach((event) => {
            const data = event.data as { nospace?: boolean; reason?: string; "node-name"?: string } | undefined
            if (data?.nospace !== true) return Effect.void
            disks.noSpace = true
            const message = `fleece image ran out of space (${data.reason ?? "No space left on device"}) - ` +
              `put fleece images on storage with enough room`
            fail(message)
            return Deferred.fail(transferFailed, engineError("NoSpace", message))
          }),
          Effect.interruptible,
          Effect.forkScoped
        )

        // THE point in time, atomic over all disks
        yield* Effect.acquireRelease(
          exec(qmp, "Start", "transaction", {
            actions: job.devices.map((_, i) => ({
              type: "blockdev-backup",
              data: { "job-id": perDisk[i]!.job, device: nodes[i], target: perDisk[i]!.node, sync: "none" }
            }))
          }),
          () => Effect.forEach(perDisk, (name) => bestEffort(job, cancelJob(qmp, name.job)), { discard: true })
        )

        const socket = socketPath(options, job.vmid)
        yield* Effect.acquireRelease(
          exec(qmp, "Start", "nbd-server-start", { addr: { type: "unix", data: { path: socket } } }),
          () => Effect.zipRight(bestEffort(job, exec(qmp, "Cleanup", "nbd-server-stop")), removeFile(socket))
        )
        for (const name of perDisk) {
          yield* Effect.acquireRelease(
            exec(qmp, "Start", "block-export-add", {
              type: "nbd",
              id: name.exportId,
              "node-name": name.node,
              name: name.exportName,
              writable: false
            }),
            () => bestEffort(job, deleteExport(qmp, name.exportId))
          )
        }

        // the transfer, in order, disk by disk, with bounded memory
        const throttle = (bytes: number, since: number) => {
          if (job.speed <= 0) return Effect.void
          const due = since + (bytes / job.speed) * 1000
          const wait = due - Date.now()
          return wait > 0 ? Effect.sleep(Duration.millis(wait)) : Effect.void
        }
        const transfer = Effect.gen(function*() {
          const began = Date.now()
          for (const [i, name] of perDisk.entries()) {
            yield* Effect.scoped(Effect.gen(function*() {
              const nbd = yield* NbdClient.make({ path: socket, exportName: name.exportName, maxInFlight: concurrency })
              yield* nbd.stream({ chunkSize, concurrency }).pipe(
                Stream.runForEach((chunk) => {
                  const write = chunk._tag === "Data"
                    ? job.archive.writeData(i, chunk.offset, chunk.data).pipe(
                      Effect.tap(() =>
                        Effect.sync(() => {
                          for (const piece of chunk.pieces) {
                            if ("hole" in piece) counters.zero += piece.length
                          }
                        })
                      )
                    )
                    : job.archive.writeZeros(i, chunk.offset, chunk.length).pipe(
                      Effect.tap(() => Effect.sync(() => (counters.zero += chunk.length)))
                    )
                  return write.pipe(
                    Effect.tap(() => Effect.sync(() => (counters.transferred += chunk.length))),
                    Effect.zipRight(Effect.suspend(() => throttle(counters.transferred, began)))
                  )
                })
              )
            }))
          }
        }).pipe(
          Effect.mapError((error) => engineError("Transfer", error.message)),
          Effect.raceFirst(Deferred.await(transferFailed)),
          Effect.tapBoth({
            onFailure: (error) => Effect.sync(() => fail(error.message)),
            onSuccess: () =>
              Effect.sync(() => {
                if (outcome === undefined) {
                  outcome = { status: "done" }
                  endTime = Math.floor(Date.now() / 1000)
                }
              })
          }),
          Effect.onInterrupt(() => Effect.sync(() => fail("backup canceled")))
        )
        const fiber = yield* Effect.forkScoped(Effect.interruptible(Effect.ignore(transfer)))

        const status: Effect.Effect<BackupStatus> = Effect.sync(() => ({
          status: outcome?.status ?? "active",
          ...(outcome?.status === "error" ? { errmsg: outcome.errmsg } : {}),
          total,
          dirty: total,
          transferred: counters.transferred,
          "zero-bytes": counters.zero,
          reused: 0,
          "start-time": startTime,
          ...(endTime !== undefined ? { "end-time": endTime } : {}),
          uuid,
          finishing: false
        }))
        const running: RunningBackup = {
          uuid,
          status,
          cancel: Effect.zipRight(Effect.sync(() => fail("backup canceled")), Fiber.interrupt(fiber))
        }
        return running
      })

    return { name: ENGINE, prepare, start }
  })

/**
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: StockEngineOptions): Layer.Layer<BackupEngine, never, HostCommand> =>
  Layer.effect(BackupEngine, make(options))

