/**
 * The main job: a real backup of a demo VM on stock QEMU.
 *
 *   npm run demo [-- <dumpdir>]        (default dump directory: ./dumps)
 *
 * 1. creates VM 100 in a standalone config directory: a 64 MiB qcow2 and a 32 MiB sparse raw disk with
 *    data and holes, on a directory storage `local`;
 * 2. starts it on stock QEMU (TCG when there is no KVM) and lets it run;
 * 3. backs it up with the full workflow (lock, fleecing point in time, NBD pull, thaw/resume, progress)
 *    to `<dumpdir>/vzdump-qemu-100-<time>.vma.zst`, printing vzdump's log lines; right after the point in
 *    time it writes new data through the VM's disk devices, as a busy guest would;
 * 4. extracts the archive with this project's VMA reader and proves each disk equals its content at the
 *    point in time (not the content written afterwards);
 * 5. stops the VM and removes its working files; the archive and its .log stay in the dump directory.
 *
 * Ctrl-C at any point unwinds the backup: job cancelled, temp archive removed, VM unlocked and stopped.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import * as NodePath from "node:path"
import { fileURLToPath } from "node:url"
import * as BackupJob from "@vzdump/core/BackupJob"
import * as ConfigStore from "@vzdump/core/ConfigStore"
import { BackupReporter } from "@vzdump/core/BackupReporter"
import * as HostCommand from "@vzdump/core/HostCommand"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as VzdumpLog from "@vzdump/core/VzdumpLog"
import * as VmaInput from "@vzdump/target-vma/VmaInput"
import * as VmaReader from "@vzdump/target-vma/VmaReader"
import * as VmaTarget from "@vzdump/target-vma/VmaTarget"
import { createDemoVm, guestWriteCommands, imageHash, sha256File, workDir } from "./lib/demoVm.js"

const repo = NodePath.resolve(NodePath.dirname(fileURLToPath(import.meta.url)), "..")
const dumpdir = NodePath.resolve(process.argv[2] ?? NodePath.join(repo, "dumps"))
const VMID = 100

const program = Effect.gen(function*() {
  const work = yield* workDir
  const disks = yield* createDemoVm(work, VMID)

  const host = StandaloneHost.layer({
    configDir: `${work}/conf`,
    runDir: `${work}/run`,
    storages: { local: `${work}/store` }
  })
  // built once for the whole program: the hypervisor's monitor connections live in this scope
  const hostContext = yield* Layer.build(host)
  const hypervisor = yield* Effect.provide(Hypervisor, hostContext)
  yield* Effect.addFinalizer(() => Effect.ignore(hypervisor.stop(VMID)))

  // point-in-time content, before the VM runs (SeaBIOS finds nothing to boot and never writes)
  const t0 = yield* Effect.forEach(disks, (disk) => imageHash(disk, work))
  process.stdout.write(`starting VM ${VMID} on stock QEMU\n`)
  yield* Effect.gen(function*() {
    const store = yield* ConfigStore.ConfigStore
    const vm = yield* store.load(VMID)
    yield* hypervisor.startPaused(VMID, vm)
    yield* hypervisor.resume(VMID)
  }).pipe(Effect.provide(hostContext))

  // the reporter prints vzdump's lines and, once the job runs, writes through the disk devices
  const guestWrites = (qmp: { execute: (c: string, a?: object) => Effect.Effect<unknown, unknown> }) =>
    Effect.forEach(
      guestWriteCommands,
      (command) => qmp.execute("human-monitor-command", { "command-line": command }),
      { discard: true }
    )
  let wrote = false
  const reporter = Layer.succeed(BackupReporter, {
    report: (event) =>
      Effect.gen(function*() {
        if (event._tag !== "Log") return
        for (const line of VzdumpLog.formatTaskLines(event)) process.stdout.write(`${line}\n`)
        if (event.message.startsWith("started backup task")) {
          yield* Effect.scoped(Effect.flatMap(hypervisor.monitor(VMID), guestWrites)).pipe(Effect.orDie)
          wrote = true
          process.stdout.write("demo: the guest wrote 6 MiB to its disks right after the point in time\n")
        }
      })
  })

  const result = yield* BackupJob.backupVm({ vmid: VMID }).pipe(
    Effect.provide(hostContext),
    Effect.provide(Layer.mergeAll(
      StockEngine.layer({ fleeceDir: `${work}/fleece`, socketDir: `${work}/run` }).pipe(
        Layer.provide(HostCommand.layer)
      ),
      VmaTarget.layer({ dumpdir, compress: "zstd" }),
      reporter
    ))
  )
  if (!wrote) return yield* Effect.dieMessage("the guest writes did not run")

  // prove the archive holds the point-in-time content
  const extractDir = `${work}/extract`
  const extracted = yield* Effect.scoped(Effect.gen(function*() {
    const input = yield* VmaInput.file(result.archive.location)
    const archive = yield* VmaReader.open(input)
    return yield* VmaReader.extract(archive, { directory: extractDir })
  }))
  const now = yield* Effect.forEach(disks, (disk) => imageHash(disk, work))
  let ok = true
  process.stdout.write(`\narchive: ${result.archive.location}\n`)
  for (const [i, disk] of disks.entries()) {
    const file = extracted.disks.find((d) => d.device.name === `drive-${disk.virtdev}`)
    const got = file === undefined ? "missing" : yield* sha256File(file.path)
    const match = got === t0[i]
    ok &&= match && now[i] !== t0[i]
    process.stdout.write(
      `${disk.virtdev}: archive ${got.slice(0, 16)}  point in time ${t0[i]!.slice(0, 16)}  ` +
        `live now ${now[i]!.slice(0, 16)}  ${match ? "MATCH" : "MISMATCH"}\n`
    )
  }
  if (!ok) return yield* Effect.dieMessage("the archive does not hold the point-in-time content")
  process.stdout.write("demo: every disk in the archive equals the VM's disks at the point in time\n")
})

NodeRuntime.runMain(Effect.scoped(program))
