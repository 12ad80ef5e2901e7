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
 * Dirty-bitmap incrementals, when the archive offers them (`ArchiveSession.incremental`, e.g. a PBS
 * target; never for templates): the target names, per disk, the bitmap that records the changes
 * since the archive it builds on. `prepare` checks it (it must exist, be consistent and recording;
 * otherwise the disk is read in full and the target's stale bitmaps are removed); the point-in-time
 * `transaction` also disables that bitmap (frozen: exactly the changes up to now) and adds the next
 * one (persistent on qcow2, so it survives a QEMU restart; in memory on other formats), which from
 * then on records the changes since this archive. The frozen bitmap is exported with the fleece and
 * chunks without dirty bits go to `writeReused` unread. On success the frozen bitmap is removed; on
 * failure the next one is merged back into it, which records again, so no change is lost. A frozen
 * bitmap left by a crashed run is merged back the same way by `prepare`. The outcome per disk is
 * reported as `bitmapInfo` (vzdump's `dirty-bitmap status` lines).
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
import { type ArchiveIncremental, RetainedBuffers } from "./BackupTarget.js"
import { HostCommand } from "./HostCommand.js"
import type { BitmapInfo } from "./VzdumpProgress.js"
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
  /** Bytes per chunk read from NBD and written to the archive, default 4 MiB. */
  readonly chunkSize?: number | undefined
  /**
   * Chunks read ahead (in flight, or read and waiting for the archive), default 4. Memory stays near
   * `chunkSize × (concurrency + 4)` plus what the archive retains (`bufferRetention`).
   */
  readonly concurrency?: number | undefined
  /**
   * NBD connections per disk, default 1. QEMU's NBD server accepts several; on a 2-core host one was
   * as fast as two or four (bench/engine.ts).
   */
  readonly connections?: number | undefined
  /**
   * Largest NBD read request, default 2 MiB. QEMU 7.2's NBD server spends much more CPU on larger
   * reads (about 0.7 instead of 0.4 CPU-seconds per GiB at 4 MiB in bench/engine.ts).
   */
  readonly requestSize?: number | undefined
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

/** One disk's dirty-bitmap decision. */
interface BitmapPlan {
  /** `used`: read only what `base` marks dirty; `new`: no bitmap yet; `invalid`: stale or unusable ones removed. */
  readonly action: "used" | "new" | "invalid"
  /** The base archive's bitmap, when used. */
  readonly base: string | undefined
  /** qcow2 keeps bitmaps in the image. */
  readonly persistent: boolean
}

/** What `prepare` set up for a VM's job: live node names, resource names, and whether the fleece ran full. */
interface PreparedDisks {
  readonly nodes: ReadonlyArray<string>
  readonly names: ReadonlyArray<ReturnType<typeof names>>
  noSpace: boolean
  /** Set when the archive takes dirty-bitmap incrementals. */
  readonly bitmaps: { readonly incremental: ArchiveIncremental; readonly plans: ReadonlyArray<BitmapPlan> } | undefined
}

/** Named dirty bitmaps of block nodes (anonymous internal ones are left out). */
const nodeBitmaps = (qmp: QmpClientService, reason: BackupEngineError["reason"]) =>
  exec(qmp, reason, "query-named-block-nodes", { flat: true }).pipe(
    Effect.flatMap(decode(
      Schema.Array(Schema.Struct({
        "node-name": Schema.String,
        "dirty-bitmaps": Schema.optional(Schema.Array(QmpSchema.BlockDirtyInfo))
      })),
      "query-named-block-nodes"
    )),
    Effect.map((nodes) =>
      new Map(nodes.map((node) => [
        node["node-name"],
        (node["dirty-bitmaps"] ?? []).flatMap((bitmap) =>
          bitmap.name === undefined ? [] : [{ ...bitmap, name: bitmap.name }]
        )
      ]))
    )
  )

/** `<prefix><backup time>` of a bitmap name: the prefix and the time. */
const BITMAP_NAME = /^(vzdump-.*-)(\d+)$/

const isPowerOfTwo = (n: number) => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0

/**
 * Merges frozen (disabled) bitmaps left by a crashed run back: each takes the bits of the later
 * bitmaps of its prefix, records again, and the later ones are removed.
 */
const recoverBitmaps = (job: EngineJob, nodes: ReadonlyArray<string>) =>
  Effect.gen(function*() {
    const all = yield* nodeBitmaps(job.qmp, "Prepare")
    for (const node of nodes) {
      const bitmaps = (all.get(node) ?? []).filter((bitmap) => BITMAP_NAME.test(bitmap.name))
      for (const frozen of bitmaps.filter((bitmap) => !bitmap.recording && bitmap.inconsistent !== true)) {
        const [, prefix, time] = BITMAP_NAME.exec(frozen.name)!
        const later = bitmaps.filter((bitmap) => {
          const m = BITMAP_NAME.exec(bitmap.name)!
          return bitmap.recording && m[1] === prefix && Number(m[2]) > Number(time)
        })
        yield* job.log("warn", `merging left-over dirty bitmap '${frozen.name}' back (node ${node})`)
        const actions: Array<QmpSchema.TransactionAction> = [
          ...(later.length > 0
            ? [{
              type: "block-dirty-bitmap-merge" as const,
              data: { node, target: frozen.name, bitmaps: later.map((bitmap) => bitmap.name) }
            }]
            : []),
          { type: "block-dirty-bitmap-enable", data: { node, name: frozen.name } },
          ...later.map((bitmap) => ({
            type: "block-dirty-bitmap-remove" as const,
            data: { node, name: bitmap.name }
          }))
        ]
        yield* exec(job.qmp, "Prepare", "transaction", { actions })
      }
    }
  })

/** Decides per disk whether the target's base bitmap can be used; removes the target's other bitmaps. */
const planBitmaps = (job: EngineJob, nodes: ReadonlyArray<string>, incremental: ArchiveIncremental) =>
  Effect.gen(function*() {
    const all = yield* nodeBitmaps(job.qmp, "Prepare")
    return yield* Effect.forEach(job.devices, (device, i) =>
      Effect.gen(function*() {
        const node = nodes[i]!
        const ours = (all.get(node) ?? []).filter((bitmap) => bitmap.name.startsWith(incremental.prefix))
        const base = incremental.base[i]
        const found = base === undefined ? undefined : ours.find((bitmap) => bitmap.name === base)
        const usable = found !== undefined && found.inconsistent !== true && found.recording && !found.busy &&
          isPowerOfTwo(found.granularity) && found.granularity <= incremental.chunkSize
        for (const stale of ours.filter((bitmap) => !(usable && bitmap.name === base))) {
          yield* exec(job.qmp, "Prepare", "block-dirty-bitmap-remove", { node, name: stale.name })
        }
        return {
          action: usable ? "used" : ours.length > 0 ? "invalid" : "new",
          base: usable ? base : undefined,
          persistent: device.format === "qcow2"
        } satisfies BitmapPlan
      }))
  })

/** Bytes of a Data chunk that the server reported as holes. */
const holeBytes = (chunk: NbdClient.DataChunk): number => {
  let n = 0
  for (const piece of chunk.pieces) {
    if ("hole" in piece) n += piece.length
  }
  return n
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
    const connections = options.connections ?? 1
    const requestSize = options.requestSize ?? 2 * 1024 * 1024

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
        const live = yield* liveNodes(qmp, job.devices)
        yield* recoverBitmaps(job, live)
        const incremental = job.template === true || job.archive.writeReused === undefined
          ? undefined
          : job.archive.incremental
        if (incremental !== undefined && !isPowerOfTwo(incremental.chunkSize)) {
          return yield* Effect.fail(
            engineError("Prepare", `archive chunk size ${incremental.chunkSize} is not a power of two`)
          )
        }
        const disks: PreparedDisks = {
          nodes: live,
          names: wanted,
          noSpace: false,
          bitmaps: incremental === undefined
            ? undefined
            : { incremental, plans: yield* planBitmaps(job, live, incremental) }
        }
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
        const counters = { transferred: 0, zero: 0, clean: 0 }
        let finishing = false
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

        // THE point in time, atomic over all disks: fleece jobs, and the bitmaps (freeze the base, start the next)
        const bitmaps = disks.bitmaps
        const bitmapActions = (i: number): Array<QmpSchema.TransactionAction> => {
          if (bitmaps === undefined) return []
          const plan = bitmaps.plans[i]!
          const node = nodes[i]!
          return [
            {
              type: "block-dirty-bitmap-add",
              data: {
                node,
                name: bitmaps.incremental.next,
                persistent: plan.persistent,
                granularity: bitmaps.incremental.chunkSize
              }
            },
            ...(plan.base !== undefined
              ? [{ type: "block-dirty-bitmap-disable" as const, data: { node, name: plan.base } }]
              : [])
          ]
        }
        /** Success: the frozen bitmaps are spent. Failure: fold the next ones back into them (or drop them). */
        const settleBitmaps = (success: boolean) => {
          if (bitmaps === undefined) return Effect.void
          const next = bitmaps.incremental.next
          const actions = bitmaps.plans.flatMap((plan, i): Array<QmpSchema.TransactionAction> => {
            const node = nodes[i]!
            if (success) {
              return plan.base === undefined
                ? []
                : [{ type: "block-dirty-bitmap-remove", data: { node, name: plan.base } }]
            }
            return plan.base === undefined
              ? [{ type: "block-dirty-bitmap-remove", data: { node, name: next } }]
              : [
                { type: "block-dirty-bitmap-merge", data: { node, target: plan.base, bitmaps: [next] } },
                { type: "block-dirty-bitmap-enable", data: { node, name: plan.base } },
                { type: "block-dirty-bitmap-remove", data: { node, name: next } }
              ]
          })
          return actions.length === 0 ? Effect.void : bestEffort(job, exec(qmp, "Cleanup", "transaction", { actions }))
        }
        yield* Effect.acquireRelease(
          exec(qmp, "Start", "transaction", {
            actions: job.devices.flatMap((_, i): Array<QmpSchema.TransactionAction> => [
              ...bitmapActions(i),
              {
                type: "blockdev-backup",
                data: { "job-id": perDisk[i]!.job, device: nodes[i]!, target: perDisk[i]!.node, sync: "none" }
              }
            ])
          }),
          // the exports (which hold the frozen bitmaps) are gone by now: they were set up later
          (_, exit) =>
            Effect.zipRight(
              Effect.forEach(perDisk, (name) => bestEffort(job, cancelJob(qmp, name.job)), { discard: true }),
              settleBitmaps(exit._tag === "Success")
            )
        )
        // what the frozen bitmaps mark dirty, for the log and the progress target
        let bitmapInfo: ReadonlyArray<BitmapInfo> | undefined
        if (bitmaps !== undefined) {
          const now = yield* nodeBitmaps(qmp, "Start")
          bitmapInfo = job.devices.map((device, i) => {
            const plan = bitmaps.plans[i]!
            const frozen = plan.base === undefined
              ? undefined
              : now.get(nodes[i]!)?.find((bitmap) => bitmap.name === plan.base)
            return {
              drive: device.qmdevice,
              action: plan.action,
              size: device.size,
              dirty: frozen === undefined ? device.size : Math.min(frozen.count, device.size)
            }
          })
        }
        const dirtyTotal = bitmapInfo === undefined ? total : bitmapInfo.reduce((sum, info) => sum + info.dirty, 0)

        const socket = socketPath(options, job.vmid)
        yield* Effect.acquireRelease(
          exec(qmp, "Start", "nbd-server-start", { addr: { type: "unix", data: { path: socket } } }),
          () => Effect.zipRight(bestEffort(job, exec(qmp, "Cleanup", "nbd-server-stop")), removeFile(socket))
        )
        const baseOf = (i: number) => bitmaps?.plans[i]!.base
        for (const [i, name] of perDisk.entries()) {
          const base = baseOf(i)
          yield* Effect.acquireRelease(
            exec(qmp, "Start", "block-export-add", {
              type: "nbd",
              id: name.exportId,
              "node-name": name.node,
              name: name.exportName,
              writable: false,
              // a plain name is looked up along the fleece's backing chain: the live node
              ...(base !== undefined ? { bitmaps: [base] } : {})
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
            const base = baseOf(i)
            yield* Effect.scoped(Effect.gen(function*() {
              const nbd = yield* NbdClient.make({
                path: socket,
                exportName: name.exportName,
                connections,
                maxRequestSize: requestSize,
                ...(base !== undefined ? { dirtyBitmap: base } : {})
              })
              // read buffers go back to the client's pool once the archive no longer reads them
              const retention = job.archive.bufferRetention
              const retained = retention === undefined ? undefined : new RetainedBuffers<NbdClient.DataChunk>(retention)
              // every write counts, reused ranges too (see ArchiveSession.bufferRetention)
              const recycle = (length: number, data?: NbdClient.DataChunk) => {
                if (retained === undefined) return
                for (const free of retained.written(length, data)) free.release()
              }
              // one effect per chunk: the write, then the counters and the buffer bookkeeping
              const written = (chunk: NbdClient.DataChunk | NbdClient.ZeroChunk, zeroBytes: number) =>
                Effect.sync(() => {
                  counters.zero += zeroBytes
                  counters.transferred += chunk.length
                  recycle(chunk.length, chunk._tag === "Data" ? chunk : undefined)
                })
              const paced = job.speed > 0
              const stream = base !== undefined
                ? nbd.stream({ chunkSize: bitmaps!.incremental.chunkSize, concurrency, dirtyBitmap: base })
                : nbd.stream({ chunkSize, concurrency })
              yield* stream.pipe(
                Stream.runForEach((chunk) => {
                  if (chunk._tag === "Clean") {
                    // unchanged since the base archive: not read, taken from the base
                    return Effect.zipRight(
                      job.archive.writeReused!(i, chunk.offset, chunk.length),
                      Effect.sync(() => {
                        counters.clean += chunk.length
                        recycle(chunk.length)
                      })
                    )
                  }
                  const step = chunk._tag === "Data"
                    ? Effect.zipRight(
                      job.archive.writeData(i, chunk.offset, chunk.data),
                      written(chunk, holeBytes(chunk))
                    )
                    : Effect.zipRight(
                      job.archive.writeZeros(i, chunk.offset, chunk.length),
                      written(chunk, chunk.length)
                    )
                  return paced
                    ? Effect.zipRight(step, Effect.suspend(() => throttle(counters.transferred, began)))
                    : step
                })
              )
            }))
          }
          // the archive's own finish (PBS: indexes, manifest, the server's finish) is part of the job
          if (job.archive.complete !== undefined) {
            finishing = true
            yield* job.archive.complete.pipe(Effect.ensuring(Effect.sync(() => (finishing = false))))
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

        const reused = job.archive.reused ?? Effect.sync(() => counters.clean)
        const status: Effect.Effect<BackupStatus> = Effect.map(reused, (reused) => ({
          status: outcome?.status ?? "active",
          ...(outcome?.status === "error" ? { errmsg: outcome.errmsg } : {}),
          total,
          dirty: dirtyTotal,
          transferred: counters.transferred,
          "zero-bytes": counters.zero,
          reused,
          "start-time": startTime,
          ...(endTime !== undefined ? { "end-time": endTime } : {}),
          uuid,
          finishing: outcome === undefined && finishing
        }))
        const running: RunningBackup = {
          uuid,
          status,
          bitmapInfo,
          cancel: Effect.zipRight(Effect.sync(() => fail("backup canceled")), Fiber.interrupt(fiber)),
          // the outcome is recorded before the transfer fiber ends
          settled: Effect.asVoid(Fiber.await(fiber))
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

