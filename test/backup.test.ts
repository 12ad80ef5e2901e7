/**
 * The backup workflow end to end on stock QEMU (SeaBIOS VMs without an OS, started by the standalone
 * host profile), with the in-memory target: power states, guest writes during the backup, modes,
 * interruption, leftovers of a crashed run and bad input.
 */
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Exit, Fiber, Layer } from "effect"
import * as Fs from "node:fs/promises"
import * as BackupJob from "@vzdump/core/BackupJob"
import { MemoryStore } from "@vzdump/core/BackupTarget"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as StockEngine from "@vzdump/core/StockEngine"
import {
  applyWrites,
  deviceWrite,
  engineLeftovers,
  imageBytes,
  makeRecorder,
  makeTestHost,
  memoryTarget,
  qmp,
  run,
  runState,
  sha256,
  startVm,
  stopOnExit,
  type TestHost,
  testLayer
} from "./utils/env.js"
import * as BackupReporter from "@vzdump/core/BackupReporter"
const silent = process.env.VZDUMP_TEST_LOG ? BackupReporter.layerStderr : BackupReporter.layerSilent

const MiB = 1024 * 1024
const KiB = 1024

/** Task-log lines without the `YYYY-MM-DD HH:MM:SS ` prefix of the per-guest log file. */
const untimed = (lines: ReadonlyArray<string>) => lines.map((line) => line.replace(/^\S+ \S+ /, ""))

/**
 * Two disks with data and holes: scsi0 (qcow2, 16 MiB) and virtio1 (raw, 8 MiB), and a config for them.
 * Returns the T0 content of both disks.
 */
const twoDiskVm = (host: TestHost, vmid: number, extra = "") =>
  Effect.gen(function*() {
    const disk0 = `${host.dir}/vm${vmid}-disk0.qcow2`
    const disk1 = `${host.dir}/vm${vmid}-disk1.raw`
    yield* Effect.promise(async () => {
      await run("qemu-img", ["create", "-q", "-f", "qcow2", disk0, "16M"])
      await run("qemu-img", ["create", "-q", "-f", "raw", disk1, "8M"])
    })
    yield* host.qemuIo(disk0, "qcow2", ["write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -P 0x5a 12M 512k"])
    yield* host.qemuIo(disk1, "raw", ["write -P 0x33 1M 2M", "write -P 0x44 7M 4k"])
    yield* host.writeConfig(
      vmid,
      `name: vm${vmid}\nmemory: 128\nscsi0: ${disk0},size=16M\nvirtio1: ${disk1},size=8M\n${extra}`
    )
    yield* host.killOnExit(vmid)
    const t0 = yield* Effect.promise(() =>
      Promise.all([imageBytes(disk0, "qcow2", host.dir), imageBytes(disk1, "raw", host.dir)])
    )
    return { disk0, disk1, t0 }
  })

/** Live content of both disks (read with QEMU stopped, so qcow2 metadata is on disk). */
const liveBytes = (host: TestHost, vm: { disk0: string; disk1: string }) =>
  Effect.promise(() => Promise.all([imageBytes(vm.disk0, "qcow2", host.dir), imageBytes(vm.disk1, "raw", host.dir)]))

const stopVm = (vmid: number) => Effect.flatMap(Hypervisor, (hypervisor) => hypervisor.stop(vmid))

describe("backup workflow on stock QEMU (memory target)", () => {
  it.scopedLive("a VM that is off is started paused, backed up and stopped again", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const disk0 = `${host.dir}/disk0.qcow2`
      const disk1 = `${host.dir}/disk1.raw`
      yield* Effect.promise(async () => {
        await run("qemu-img", ["create", "-q", "-f", "qcow2", disk0, "16M"])
        await run("qemu-img", ["create", "-q", "-f", "raw", disk1, "8M"])
      })
      yield* host.qemuIo(disk0, "qcow2", ["write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -z 8M 1M"])
      yield* host.qemuIo(disk1, "raw", ["write -P 0x33 1M 2M", "write -P 0x44 7M 4k"])
      yield* host.writeConfig(
        101,
        `name: demo\nmemory: 128\nscsi0: ${disk0},size=16M\nvirtio1: ${disk1},size=8M\nunused0: local:101/vm-101-disk-9.raw\n`
      )
      yield* host.killOnExit(101)
      const expected = yield* Effect.promise(() =>
        Promise.all([imageBytes(disk0, "qcow2", host.dir), imageBytes(disk1, "raw", host.dir)])
      )
      const layer = Layer.mergeAll(host.layer, memoryTarget, silent)
      const outcome = yield* Effect.gen(function*() {
        yield* stopOnExit(101)
        const result = yield* BackupJob.backupVm({ vmid: 101 })
        const store = yield* MemoryStore
        const status = yield* Effect.flatMap(Hypervisor, (h) => h.status(101))
        return { result, store, status }
      }).pipe(Effect.scoped, Effect.provide(layer))
      assert.strictEqual(outcome.status.running, false, "QEMU stopped again after the backup")
      assert.strictEqual(outcome.store.length, 1)
      const archive = outcome.store[0]!
      assert.deepStrictEqual(archive.request.devices.map((d) => [d.name, d.size]), [
        ["drive-scsi0", 16 * MiB],
        ["drive-virtio1", 8 * MiB]
      ])
      assert.strictEqual(sha256(archive.disks[0]!), sha256(expected[0]))
      assert.strictEqual(sha256(archive.disks[1]!), sha256(expected[1]))
      const conf = new TextDecoder().decode(archive.request.configs[0]!.data)
      assert.include(conf, "#qmdump#map:scsi0:drive-scsi0::qcow2:")
      assert.notInclude(conf, "unused0")
      const lines = untimed(outcome.result.logLines)
      assert.include(lines, "INFO: status = stopped")
      assert.include(lines, "INFO: backup mode: stop")
      assert.include(lines, "INFO: starting kvm to execute backup task")
      assert.include(lines, "INFO: stopping kvm after backup task")
      assert.notInclude(lines, "INFO: resuming VM again")
      assert.isTrue(lines.some((line) => /^INFO: Finished Backup of VM 101 \(\d\d:\d\d:\d\d\)$/.test(line)))
      // vzdump stops QEMU before the archive is finished: the power state is restored first
      assert.isBelow(
        lines.indexOf("INFO: stopping kvm after backup task"),
        lines.findIndex((line) => line.startsWith("INFO: Finished Backup"))
      )
      const config = yield* Effect.promise(() => Fs.readFile(`${host.configDir}/101.conf`, "utf8"))
      assert.notInclude(config, "lock:")
    }), 120_000)

  it.scopedLive("a running VM: guest writes during the backup do not reach the archive, the VM keeps running", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const vm = yield* twoDiskVm(host, 102)
      const recorder = makeRecorder()
      // right after the point in time (the workflow awaits the reporter), write through both devices
      const scsiWrites = [
        [0, MiB, 0xaa],
        [10 * MiB, MiB, 0xbb],
        [5 * MiB, 64 * KiB, 0],
        [12 * MiB, 256 * KiB, 0xee]
      ] as const
      const virtioWrites = [[MiB, 2 * MiB, 0xcc], [6 * MiB, MiB, 0xdd], [7 * MiB, 4 * KiB, 0]] as const
      const qemuIo = ([offset, length, byte]: readonly [number, number, number]) =>
        byte === 0 ? `write -z ${offset} ${length}` : `write -P ${byte} ${offset} ${length}`
      let stateDuringJob = ""
      recorder.on(
        "started backup task",
        Effect.gen(function*() {
          for (const write of scsiWrites) yield* deviceWrite(102, "scsi0", qemuIo(write))
          for (const write of virtioWrites) yield* deviceWrite(102, "virtio1/virtio-backend", qemuIo(write))
          stateDuringJob = yield* runState(102)
        })
      )
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(102)
        yield* startVm(102)
        const before = yield* runState(102)
        // 8 MiB/s over 24 MiB: the reader is still at the start of scsi0 when the writes land
        const result = yield* BackupJob.backupVm({ vmid: 102, bwlimit: 8192 })
        const after = yield* runState(102)
        const leftovers = yield* engineLeftovers(102, host)
        const store = [...(yield* MemoryStore)]
        yield* stopVm(102)
        return { before, result, after, leftovers, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))

      assert.strictEqual(out.before, "running")
      assert.strictEqual(stateDuringJob, "running")
      assert.strictEqual(out.after, "running", "the VM runs after the backup")
      assert.strictEqual(out.store.length, 1)
      const archive = out.store[0]!
      assert.strictEqual(sha256(archive.disks[0]!), sha256(vm.t0[0]), "scsi0 archived at the point in time")
      assert.strictEqual(sha256(archive.disks[1]!), sha256(vm.t0[1]), "virtio1 archived at the point in time")
      const live = yield* liveBytes(host, vm)
      assert.strictEqual(sha256(live[0]), sha256(applyWrites(vm.t0[0], scsiWrites)), "scsi0 has the new content")
      assert.strictEqual(sha256(live[1]), sha256(applyWrites(vm.t0[1], virtioWrites)), "virtio1 has the new content")
      assert.notStrictEqual(sha256(live[0]), sha256(vm.t0[0]))
      assert.deepStrictEqual(out.leftovers, { exports: [], jobs: [], nodes: [], files: [], sockets: [] })

      const lines = untimed(out.result.logLines)
      const at = (text: string) => lines.indexOf(text)
      assert.include(lines, "INFO: status = running")
      assert.include(lines, "INFO: backup mode: snapshot")
      assert.include(lines, "INFO: bandwidth limit: 8192 KiB/s")
      // no agent configured: no freeze
      assert.isFalse(lines.some((line) => line.includes("fs-freeze")))
      const startedTask = lines.findIndex((line) => /^INFO: started backup task '[0-9a-f-]{36}'$/.test(line))
      assert.isAbove(startedTask, at("INFO: starting backup via QMP command"))
      assert.strictEqual(lines[startedTask + 1], "INFO: resuming VM again")
      assert.notInclude(lines, "INFO: stopping kvm after backup task")
      assert.isTrue(lines.some((line) => /^INFO: transferred 24\.00 MiB in \d+ seconds/.test(line)))
      const config = yield* host.readConfig(102)
      assert.notInclude(config, "lock:")
    }), 60_000)

  it.scopedLive("a paused VM is backed up without resuming it", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const vm = yield* twoDiskVm(host, 103, "agent: 1\n")
      const recorder = makeRecorder()
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(103)
        yield* startVm(103)
        yield* qmp(103, "stop")
        const result = yield* BackupJob.backupVm({ vmid: 103 })
        const after = yield* runState(103)
        const store = [...(yield* MemoryStore)]
        return { result, after, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))
      assert.strictEqual(out.after, "paused", "a paused guest stays paused")
      assert.strictEqual(sha256(out.store[0]!.disks[0]!), sha256(vm.t0[0]))
      const lines = untimed(out.result.logLines)
      assert.include(lines, "INFO: status = running")
      assert.include(lines, "INFO: backup mode: snapshot")
      // paused guests are neither frozen nor resumed, even with the agent enabled
      assert.isFalse(lines.some((line) => line.includes("fs-freeze") || line.startsWith("INFO: resuming VM again")))
    }), 60_000)

  it.scopedLive("suspend mode: the VM is paused while the job starts and resumed afterwards", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const vm = yield* twoDiskVm(host, 104)
      const recorder = makeRecorder()
      let stateAtJobStart = ""
      recorder.on("started backup task", Effect.map(runState(104), (state) => (stateAtJobStart = state)))
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(104)
        yield* startVm(104)
        const result = yield* BackupJob.backupVm({ vmid: 104, mode: "suspend" })
        const after = yield* runState(104)
        const store = [...(yield* MemoryStore)]
        return { result, after, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))
      assert.strictEqual(stateAtJobStart, "paused", "suspended while the job starts")
      assert.strictEqual(out.after, "running", "resumed after the job started")
      assert.strictEqual(sha256(out.store[0]!.disks[0]!), sha256(vm.t0[0]))
      assert.strictEqual(sha256(out.store[0]!.disks[1]!), sha256(vm.t0[1]))
      const lines = untimed(out.result.logLines)
      assert.include(lines, "INFO: backup mode: suspend")
      const suspending = lines.indexOf("INFO: suspending guest")
      const resuming = lines.findIndex((line) => /^INFO: resuming VM again after \d+ seconds$/.test(line))
      const startedTask = lines.findIndex((line) => line.startsWith("INFO: started backup task"))
      assert.isAbove(suspending, 0)
      assert.isAbove(startedTask, suspending)
      assert.strictEqual(resuming, startedTask + 1)
    }), 60_000)

  it.scopedLive("stop mode: a guest that ignores the ACPI power button fails the backup after stopwait", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      yield* twoDiskVm(host, 105)
      const config = yield* host.readConfig(105)
      const recorder = makeRecorder()
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(105)
        yield* startVm(105)
        // SeaBIOS without an OS does not react to system_powerdown
        const error = yield* Effect.flip(BackupJob.backupVm({ vmid: 105, mode: "stop", stopwait: 0.05 }))
        const after = yield* runState(105)
        const store = [...(yield* MemoryStore)]
        return { error, after, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))
      assert.strictEqual(out.error._tag, "BackupFailed")
      assert.strictEqual(out.error.cause, "HypervisorError")
      assert.strictEqual(out.error.message, "VM 105: shutdown failed - got timeout after 3s")
      assert.strictEqual(out.after, "running", "the VM was never stopped")
      assert.strictEqual(out.store.length, 0)
      assert.strictEqual(yield* host.readConfig(105), config, "config unchanged, lock removed")
      const lines = recorder.lines()
      assert.include(lines, "INFO: stopping virtual guest")
      assert.include(lines, "ERROR: Backup of VM 105 failed - VM 105: shutdown failed - got timeout after 3s")
      assert.notInclude(lines, "INFO: restarting vm")
    }), 60_000)

  const interruptedBackup = (vmid: number, running: boolean) =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      yield* twoDiskVm(host, vmid)
      const config = yield* host.readConfig(vmid)
      const recorder = makeRecorder()
      const started = yield* Deferred.make<void>()
      recorder.on("started backup task", Deferred.succeed(started, undefined))
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(vmid)
        if (running) yield* startVm(vmid)
        // 1 MiB/s over 24 MiB: still polling when interrupted
        const fiber = yield* Effect.fork(BackupJob.backupVm({ vmid, bwlimit: 1024 }))
        yield* Deferred.await(started)
        yield* Effect.sleep("1500 millis")
        const during = yield* Effect.promise(() => Fs.readdir(host.fleeceDir))
        const exit = yield* Fiber.interrupt(fiber)
        const after = yield* runState(vmid)
        const leftovers = after === "off" ? undefined : yield* engineLeftovers(vmid, host)
        const files = yield* Effect.promise(() => Fs.readdir(host.fleeceDir))
        const store = [...(yield* MemoryStore)]
        return { exit, during, after, leftovers, files, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))
      assert.isTrue(Exit.isInterrupted(out.exit), "the backup fiber ends interrupted")
      assert.deepStrictEqual(out.during, [`vzdump-fleece-${vmid}-scsi0.qcow2`, `vzdump-fleece-${vmid}-virtio1.qcow2`])
      assert.deepStrictEqual(out.files, [], "fleece files removed")
      assert.strictEqual(out.store.length, 0, "nothing committed")
      assert.strictEqual(yield* host.readConfig(vmid), config, "lock removed")
      const lines = recorder.lines()
      const failed = `ERROR: Backup of VM ${vmid} failed - interrupted by signal`
      assert.include(lines, "ERROR: interrupted by signal")
      assert.isAbove(lines.indexOf("INFO: aborting backup job"), lines.indexOf("ERROR: interrupted by signal"))
      assert.strictEqual(lines.at(-2), failed)
      return { out, lines }
    })

  it.scopedLive("interrupting the backup of a running VM cancels the job and cleans up; the VM keeps running", () =>
    Effect.gen(function*() {
      const { out, lines } = yield* interruptedBackup(106, true)
      assert.strictEqual(out.after, "running")
      assert.deepStrictEqual(out.leftovers, { exports: [], jobs: [], nodes: [], files: [], sockets: [] })
      // vzdump's error path: abort the job, then resume the guest again
      assert.strictEqual(lines[lines.indexOf("INFO: aborting backup job") + 1], "INFO: resuming VM again")
    }), 60_000)

  it.scopedLive("interrupting the backup of a VM that was off stops QEMU again", () =>
    Effect.gen(function*() {
      const { out, lines } = yield* interruptedBackup(107, false)
      assert.strictEqual(out.after, "off")
      assert.include(lines, "INFO: stopping kvm after backup task")
      assert.notInclude(lines, "INFO: resuming VM again")
    }), 60_000)

  it.scopedLive("leftovers of a crashed run (fleece node, job, NBD server, export, file) are removed first", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const vm = yield* twoDiskVm(host, 108)
      const recorder = makeRecorder()
      const names = StockEngine.names({ fleeceDir: host.fleeceDir }, 108, "scsi0")
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(108)
        yield* startVm(108)
        // what a run killed after the point in time leaves behind
        yield* Effect.promise(() => run("qemu-img", ["create", "-q", "-f", "qcow2", names.file, "16M"]))
        yield* qmp(108, "blockdev-add", {
          driver: "qcow2",
          "node-name": names.node,
          file: { driver: "file", filename: names.file },
          backing: "drive-scsi0"
        })
        yield* qmp(108, "transaction", {
          actions: [{
            type: "blockdev-backup",
            data: { "job-id": names.job, device: "drive-scsi0", target: names.node, sync: "none" }
          }]
        })
        yield* qmp(108, "nbd-server-start", {
          addr: { type: "unix", data: { path: `${host.runDir}/vzdump-nbd-108.sock` } }
        })
        yield* qmp(108, "block-export-add", {
          type: "nbd",
          id: names.exportId,
          "node-name": names.node,
          name: "scsi0",
          writable: false
        })
        const before = yield* engineLeftovers(108, host)
        const result = yield* BackupJob.backupVm({ vmid: 108 })
        const after = yield* engineLeftovers(108, host)
        const state = yield* runState(108)
        const store = [...(yield* MemoryStore)]
        return { before, result, after, state, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))
      assert.deepStrictEqual(out.before, {
        exports: [names.exportId],
        jobs: [names.job],
        nodes: [names.node],
        files: ["vzdump-fleece-108-scsi0.qcow2"],
        sockets: ["vzdump-nbd-108.sock"]
      })
      assert.deepStrictEqual(out.after, { exports: [], jobs: [], nodes: [], files: [], sockets: [] })
      assert.strictEqual(out.state, "running")
      assert.strictEqual(sha256(out.store[0]!.disks[0]!), sha256(vm.t0[0]))
      assert.strictEqual(sha256(out.store[0]!.disks[1]!), sha256(vm.t0[1]))
      assert.include(
        untimed(out.result.logLines),
        "WARN: left-over backup job still running inside QEMU - canceling now"
      )
    }), 60_000)

  describe("bad input: typed errors, nothing left locked", () => {
    const failBackup = (host: TestHost, vmid: number, recorder = makeRecorder()) =>
      Effect.gen(function*() {
        const error = yield* Effect.flip(BackupJob.backupVm({ vmid }))
        const store = [...(yield* MemoryStore)]
        return { error, store, lines: recorder.lines() }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))

    it.scopedLive("an unknown VM", () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        const { error, lines } = yield* failBackup(host, 999)
        assert.strictEqual(error.cause, "VmConfigNotFound")
        assert.strictEqual(error.vmid, 999)
        assert.strictEqual(error.message, `Configuration file '${host.configDir}/999.conf' does not exist`)
        assert.strictEqual(lines[0], "INFO: Starting Backup of VM 999 (qemu)")
        assert.include(lines, `ERROR: Backup of VM 999 failed - ${error.message}`)
        assert.deepStrictEqual(yield* Effect.promise(() => Fs.readdir(host.configDir)), [])
      }), 30_000)

    it.scopedLive("malformed config lines", () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        const cases = [
          ["memory: 128\nthis is garbage\n", "line 2: unable to parse config: 'this is garbage'"],
          ["memory: lots\n", "line 1: unable to parse value of 'memory'"],
          ["scsi0: /dev/null,size=banana\n", "line 1: unable to parse value of 'scsi0' - size:"]
        ] as const
        for (const [i, [text, expected]] of cases.entries()) {
          const vmid = 200 + i
          yield* host.writeConfig(vmid, text)
          const { error, store } = yield* failBackup(host, vmid)
          assert.strictEqual(error.cause, "VmConfigParseError")
          assert.include(error.message, `${host.configDir}/${vmid}.conf ${expected}`)
          assert.strictEqual(store.length, 0)
          assert.strictEqual(yield* host.readConfig(vmid), text, "the config is left as it was")
        }
      }), 30_000)

    it.scopedLive("a missing disk file", () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        const text = `memory: 128\nscsi0: ${host.dir}/missing.qcow2,size=16M\n`
        yield* host.writeConfig(110, text)
        const { error, lines } = yield* failBackup(host, 110)
        assert.strictEqual(error.cause, "StorageError")
        assert.include(error.message, `${host.dir}/missing.qcow2`)
        assert.include(error.message, "no such file or directory")
        assert.include(lines, "INFO: status = stopped")
        assert.strictEqual(yield* host.readConfig(110), text, "lock removed again")
      }), 30_000)

    it.scopedLive("a VM that holds another lock", () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        yield* twoDiskVm(host, 111, "lock: migrate\n")
        const text = yield* host.readConfig(111)
        const { error, lines } = yield* failBackup(host, 111)
        assert.strictEqual(error.cause, "VmLockError")
        assert.strictEqual(error.message, "VM is locked (migrate)")
        assert.include(lines, "ERROR: Backup of VM 111 failed - VM is locked (migrate)")
        assert.strictEqual(yield* host.readConfig(111), text, "the other lock is kept")
      }), 30_000)

    it.scopedLive("a running VM whose QMP socket is gone", () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        yield* twoDiskVm(host, 112)
        const text = yield* host.readConfig(112)
        yield* startVm(112).pipe(Effect.provide(host.layer))
        yield* Effect.promise(() => Fs.rm(`${host.runDir}/112/qmp.sock`))
        const { error } = yield* failBackup(host, 112)
        assert.strictEqual(error.cause, "HypervisorError")
        assert.match(error.message, /^VM 112: monitor failed - .*qmp\.sock/)
        assert.strictEqual(yield* host.readConfig(112), text, "nothing locked")
      }), 30_000)

    it.scopedLive("QEMU failing to start for the backup", () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        yield* twoDiskVm(host, 113, "args: -device no-such-device\n")
        const text = yield* host.readConfig(113)
        const recorder = makeRecorder()
        const { error, store, lines } = yield* failBackup(host, 113, recorder)
        assert.strictEqual(error.cause, "HypervisorError")
        assert.match(error.message, /^VM 113: start failed - .*'no-such-device' is not a valid device model name/)
        assert.strictEqual(store.length, 0)
        assert.strictEqual(yield* host.readConfig(113), text, "lock removed again")
        const failure = lines.indexOf(`ERROR: ${error.message}`)
        assert.isAbove(failure, lines.indexOf("INFO: starting kvm to execute backup task"))
        assert.strictEqual(lines[failure + 1], "INFO: aborting backup job")
        assert.strictEqual(lines.at(-2), `ERROR: Backup of VM 113 failed - ${error.message}`)
        assert.strictEqual(yield* runState(113).pipe(Effect.provide(host.layer)), "off")
      }), 30_000)
  })
})
