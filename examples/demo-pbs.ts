/**
 * Backups of a running demo VM to a Proxmox Backup Server: full, then incremental.
 *
 *   npm run demo:pbs [-- <dir>]        (default datastore directory: ./pbs-datastore)
 *
 * 1. starts this project's PBS-compatible test server (HTTPS on 127.0.0.1, a self-signed certificate
 *    pinned by fingerprint, API-token login) with its datastore `demo` in <dir>, in PBS's on-disk layout;
 * 2. creates VM 100 (a 64 MiB qcow2 and a 32 MiB raw disk with data and holes) and starts it on stock QEMU;
 * 3. backs it up with the full workflow (fleecing point in time, NBD pull, 4 MiB chunks, dedup) as
 *    snapshot `vm/100/<time>`, printing vzdump's log lines; the log goes up as `client.log.blob`; a
 *    dirty bitmap per disk starts recording the guest's writes (persistent in the qcow2 image);
 * 4. the guest writes 6 MiB through its disk devices; then a second backup, which reads only the
 *    chunks the bitmaps mark dirty and takes the rest from the first snapshot (`dirty-bitmap status`,
 *    `backup was done incrementally, reused …`); right after its point in time the guest writes
 *    again, as a busy guest would;
 * 5. restores the second snapshot through the reader protocol and proves each disk equals the VM's
 *    disk at that snapshot's point in time (not the content written afterwards);
 * 6. stops the VM and removes its working files; the datastore stays in <dir>.
 *
 * Ctrl-C at any point unwinds: job cancelled, unfinished snapshot discarded by the server, VM unlocked
 * and stopped, server stopped.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Clock, Effect, Layer, Redacted } from "effect"
import * as NodePath from "node:path"
import { fileURLToPath } from "node:url"
import * as BackupJob from "@vzdump/core/BackupJob"
import { BackupReporter } from "@vzdump/core/BackupReporter"
import { BackupTarget } from "@vzdump/core/BackupTarget"
import * as ConfigStore from "@vzdump/core/ConfigStore"
import * as HostCommand from "@vzdump/core/HostCommand"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as VzdumpLog from "@vzdump/core/VzdumpLog"
import * as PbsClient from "@vzdump/target-pbs/PbsClient"
import * as PbsTarget from "@vzdump/target-pbs/PbsTarget"
import * as PbsVmRestore from "@vzdump/target-pbs/PbsVmRestore"
import * as PbsTestServer from "@vzdump/target-pbs/testing/PbsTestServer"
import { createDemoVm, guestWriteCommands, imageHash, sha256File, workDir } from "./lib/demoVm.js"

const repo = NodePath.resolve(NodePath.dirname(fileURLToPath(import.meta.url)), "..")
const datastoreDir = NodePath.resolve(process.argv[2] ?? NodePath.join(repo, "pbs-datastore"))
const VMID = 100
const TOKEN_ID = "demo@pbs!vzdump"
// a throw-away secret for the local demo server; it never leaves this process
const TOKEN_SECRET = Redacted.make(`demo-${Math.random().toString(36).slice(2)}`)

const say = (line: string) => Effect.sync(() => process.stdout.write(`${line}\n`))

const program = Effect.gen(function*() {
  // -- the server ------------------------------------------------------------------------------------
  const server = yield* PbsTestServer.make({
    datastores: [{ name: "demo", path: datastoreDir }],
    tokens: [{ tokenid: TOKEN_ID, secret: TOKEN_SECRET }]
  })
  yield* say(`PBS test server on https://127.0.0.1:${server.port}, datastore 'demo' in ${datastoreDir}`)
  yield* say(`certificate fingerprint ${server.fingerprint}`)
  const client = yield* PbsClient.make({
    host: "127.0.0.1",
    port: server.port,
    datastore: "demo",
    auth: { _tag: "ApiToken", tokenId: TOKEN_ID, secret: TOKEN_SECRET },
    fingerprint: server.fingerprint
  })
  const target = yield* PbsTarget.make(client)

  // -- the VM ----------------------------------------------------------------------------------------
  const work = yield* workDir
  const disks = yield* createDemoVm(work, VMID)
  const hostContext = yield* Layer.build(StandaloneHost.layer({
    configDir: `${work}/conf`,
    runDir: `${work}/run`,
    storages: { local: `${work}/store` }
  }))
  const hypervisor = yield* Effect.provide(Hypervisor, hostContext)
  yield* Effect.addFinalizer(() => Effect.ignore(hypervisor.stop(VMID)))
  yield* say(`starting VM ${VMID} on stock QEMU`)
  yield* Effect.gen(function*() {
    const store = yield* ConfigStore.ConfigStore
    yield* hypervisor.startPaused(VMID, yield* store.load(VMID))
    yield* hypervisor.resume(VMID)
  }).pipe(Effect.provide(hostContext))

  const hmp = (commands: ReadonlyArray<string>) =>
    Effect.scoped(Effect.flatMap(hypervisor.monitor(VMID), (qmp) =>
      Effect.forEach(commands, (command) =>
        qmp.execute("human-monitor-command", { "command-line": command }), { discard: true }))).pipe(Effect.orDie)
  // a guest flush: QEMU writes its qcow2 metadata, so the image file can be read beside the running VM
  const flush = hmp(["qemu-io -d scsi0 \"flush\"", "qemu-io -d virtio1/virtio-backend \"flush\""])

  // -- a backup: vzdump's lines on stdout, an optional write right after the point in time ------------
  let afterPointInTime: ReadonlyArray<string> = []
  const reporter = Layer.succeed(BackupReporter, {
    report: (event) =>
      Effect.gen(function*() {
        if (event._tag !== "Log") return
        for (const line of VzdumpLog.formatTaskLines(event)) process.stdout.write(`${line}\n`)
        if (event.message.startsWith("started backup task") && afterPointInTime.length > 0) {
          yield* hmp(afterPointInTime)
          afterPointInTime = []
          process.stdout.write("demo: the guest wrote 2 MiB right after the point in time\n")
        }
      })
  })
  const backup = Effect.gen(function*() {
    const before = yield* server.stats
    const result = yield* BackupJob.backupVm({ vmid: VMID }).pipe(
      Effect.provide(hostContext),
      Effect.provide(Layer.mergeAll(
        StockEngine.layer({ fleeceDir: `${work}/fleece`, socketDir: `${work}/run` }).pipe(
          Layer.provide(HostCommand.layer)
        ),
        Layer.succeed(BackupTarget, target),
        reporter
      ))
    )
    const after = yield* server.stats
    return {
      result,
      uploaded: after.chunkUploads - before.chunkUploads,
      bytes: after.chunkUploadBytes - before.chunkUploadBytes
    }
  })

  yield* say("\n== backup 1: full ==")
  const first = yield* backup

  yield* say("\n== the guest writes 6 MiB through its disk devices ==")
  yield* hmp(guestWriteCommands)
  yield* flush
  const t1 = yield* Effect.forEach(disks, (disk) => imageHash(disk, work))

  // PBS requires each snapshot of a group to be newer, in whole seconds, than the last: start the second
  // backup in a later second than the first (they can now be less than a second apart)
  yield* Effect.flatMap(Clock.currentTimeMillis, (now) => Effect.sleep(1000 - (now % 1000) + 10))

  yield* say("\n== backup 2: incremental ==")
  afterPointInTime = [
    "qemu-io -d scsi0 \"write -P 0xee 40M 1M\"",
    "qemu-io -d virtio1/virtio-backend \"write -P 0xef 12M 1M\""
  ]
  const second = yield* backup
  yield* flush
  const now = yield* Effect.forEach(disks, (disk) => imageHash(disk, work))

  // -- restore and prove ------------------------------------------------------------------------------
  const restored = yield* PbsVmRestore.restoreVm(client, {
    vmid: VMID,
    backupTime: (yield* target.committed).at(-1)!.snapshot.backupTime,
    directory: `${work}/restore`
  })
  yield* say(`\nrestored ${restored.snapshotPath} to ${work}/restore (raw, sparse)`)
  let ok = true
  for (const [i, disk] of disks.entries()) {
    const file = restored.disks.find((d) => d.virtdev === disk.virtdev)
    const got = file === undefined ? "missing" : yield* sha256File(file.path)
    const match = got === t1[i]
    ok &&= match && now[i] !== t1[i]
    yield* say(
      `${disk.virtdev}: restored ${got.slice(0, 16)}  at snapshot ${t1[i]!.slice(0, 16)}  live now ${
        now[i]!.slice(0, 16)
      }  ${match ? "MATCH" : "MISMATCH"}`
    )
  }
  const mib = (bytes: number) => `${(bytes / 1048576).toFixed(2)} MiB`
  yield* say(`\nbackup 1 (${first.result.archive.location}): ${first.uploaded} chunks uploaded (${mib(first.bytes)})`)
  yield* say(`backup 2 (${second.result.archive.location}): ${second.uploaded} chunks uploaded (${mib(second.bytes)})`)
  const reuse = second.result.logLines.map((line) => line.replace(/^\S+ \S+ /, "")).find((line) =>
    line.startsWith("INFO: backup was done incrementally")
  )
  if (reuse !== undefined) yield* say(`backup 2: ${reuse.replace(/^INFO: /, "")}`)
  if (!ok) return yield* Effect.dieMessage("the restored snapshot does not hold the VM's disks at its point in time")
  yield* say("demo: the restored second snapshot equals the VM's disks at its point in time")
})

NodeRuntime.runMain(Effect.scoped(program))
