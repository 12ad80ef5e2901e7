/**
 * An orchestrator embedding the workflow: backs up several VMs with bounded concurrency and consumes
 * the typed progress events of all of them as one Stream (here: a live status table, then a summary).
 *
 *   npx tsx examples/orchestrator.ts [count=3] [concurrency=2] [dumpdir=./dumps]
 *
 * It creates `count` demo VMs on a standalone host, starts them, and backs them up to `.vma.zst`.
 * vzdump itself processes guests one after the other on a node; an orchestrator may choose more,
 * as long as each VM has its own QMP socket, fleece images and lock (all of which this library keeps
 * per VM). A failing VM does not stop the others; every VM ends unlocked.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Fiber, Layer, Queue, Stream } from "effect"
import * as NodePath from "node:path"
import { fileURLToPath } from "node:url"
import * as BackupJob from "@vzdump/core/BackupJob"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import type { BackupEvent } from "@vzdump/core/BackupReporter"
import * as ConfigStore from "@vzdump/core/ConfigStore"
import * as HostCommand from "@vzdump/core/HostCommand"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as VmaTarget from "@vzdump/target-vma/VmaTarget"
import { createDemoVm, workDir } from "./lib/demoVm.js"

const repo = NodePath.resolve(NodePath.dirname(fileURLToPath(import.meta.url)), "..")
const count = Number(process.argv[2] ?? 3)
const concurrency = Number(process.argv[3] ?? 2)
const dumpdir = NodePath.resolve(process.argv[4] ?? NodePath.join(repo, "dumps"))

const program = Effect.gen(function*() {
  const work = yield* workDir
  const vmids = Array.from({ length: count }, (_, i) => 200 + i)
  yield* Effect.forEach(vmids, (vmid) => createDemoVm(work, vmid, `app-${vmid}`), { discard: true })

  const host = yield* Layer.build(StandaloneHost.layer({
    configDir: `${work}/conf`,
    runDir: `${work}/run`,
    storages: { local: `${work}/store` }
  }))
  const hypervisor = yield* Effect.provide(Hypervisor, host)
  const store = yield* Effect.provide(ConfigStore.ConfigStore, host)
  for (const vmid of vmids) {
    yield* Effect.addFinalizer(() => Effect.ignore(hypervisor.stop(vmid)))
    yield* hypervisor.startPaused(vmid, yield* store.load(vmid))
    yield* hypervisor.resume(vmid)
  }

  // every VM's events go to one queue; the orchestrator reads them as a Stream
  const events = yield* Queue.unbounded<BackupEvent>()
  const consumer = yield* Stream.fromQueue(events).pipe(
    Stream.filter((event) => event._tag === "Progress" || event.level !== "info" || event.message.startsWith("Finished")),
    Stream.runForEach((event) =>
      Effect.sync(() => {
        if (event._tag === "Progress") {
          const { total = 0, transferred = 0 } = event.status
          const percent = total > 0 ? Math.floor((transferred * 100) / total) : 100
          process.stdout.write(`VM ${event.vmid}: ${percent}% of ${(total / 1048576).toFixed(0)} MiB\n`)
        } else {
          process.stdout.write(`VM ${event.vmid}: ${event.level.toUpperCase()}: ${event.message}\n`)
        }
      })
    ),
    Effect.fork
  )

  const layer = Layer.mergeAll(
    StockEngine.layer({ fleeceDir: `${work}/fleece`, socketDir: `${work}/run` }).pipe(Layer.provide(HostCommand.layer)),
    VmaTarget.layer({ dumpdir, compress: "zstd" }),
    BackupReporter.layerQueue(events)
  )
  const results = yield* Effect.forEach(
    vmids,
    (vmid) => BackupJob.backupVm({ vmid }).pipe(Effect.either),
    { concurrency }
  ).pipe(Effect.provide(host), Effect.provide(layer))

  yield* Queue.shutdown(events)
  yield* Fiber.await(consumer)
  process.stdout.write("\nsummary:\n")
  for (const [i, result] of results.entries()) {
    process.stdout.write(
      result._tag === "Right"
        ? `  VM ${vmids[i]}: ok   ${result.right.archive.location}\n`
        : `  VM ${vmids[i]}: FAILED ${result.left.message}\n`
    )
  }
  if (results.some((result) => result._tag === "Left")) process.exitCode = 1
})

NodeRuntime.runMain(Effect.scoped(program))
