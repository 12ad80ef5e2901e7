/**
 * The Proxmox-QEMU engine driven directly (engine.prepare/start, polled like vzdump) against the
 * Proxmox-QEMU EMULATOR (test/utils/pveQemu.ts: a strict QMP front over a real QEMU 7.2 that writes
 * real VMA streams). Nothing here ran against Proxmox's own QEMU build.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Layer, Scope } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as HostProcess from "@vzdump/core/HostProcess"
import * as ProxmoxEngine from "@vzdump/core/ProxmoxEngine"
import * as ProxmoxTarget from "@vzdump/core/ProxmoxTarget"
import * as HostCommand from "@vzdump/core/HostCommand"
import * as VzdumpLog from "@vzdump/core/VzdumpLog"
import * as VzdumpProgress from "@vzdump/core/VzdumpProgress"
import * as VmaInput from "@vzdump/target-vma/VmaInput"
import * as VmaReader from "@vzdump/target-vma/VmaReader"
import { exec, hasQemu, MiB, sha256, startPveVm } from "./utils/pveFixture.js"
import type { PveVm } from "./utils/pveFixture.js"
import { fullSupport } from "./utils/pveQemu.js"
import { CONFIG, encoder, engineLayers, extractArchive, job, listDir, makeEngine, makeLog, pollUntilEnd } from "./utils/pveJob.js"

const TIMEOUT = 90_000
const START = new Date("2026-11-27T09:00:00Z")
const vmaBin = fileURLToPath(new URL("../node_modules/.bin/vma", import.meta.url))

const request = (vm: PveVm, firewall?: string) => ({
  vmid: 100,
  startTime: START,
  configs: [
    { name: "qemu-server.conf", data: encoder.encode(CONFIG) },
    ...(firewall !== undefined ? [{ name: "qemu-server.fw", data: encoder.encode(firewall) }] : [])
  ],
  devices: vm.devices.map((device) => ({ name: device.qmdevice, size: device.size }))
})

/** A HostProcess whose `zstd` is replaced by a shell script (everything else runs as asked). */
const replaceCompressor = (script: string) =>
  Layer.succeed(
    HostProcess.HostProcess,
    HostProcess.HostProcess.of({
      spawn: (program, args, options) =>
        Effect.flatMap(HostProcess.HostProcess, (real) =>
          program === "zstd" ? real.spawn("sh", ["-c", script], options) : real.spawn(program, args, options)).pipe(
            Effect.provide(HostProcess.layer)
          )
    })
  )

describe.skipIf(!hasQemu)("Proxmox engine, VMA (against the emulator)", () => {
  it.scopedLive("getfd + zstd: a valid archive that extracts to the disks; vzdump's QMP calls", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const qmp = yield* vm.connect
      const engine = yield* makeEngine()
      const log = makeLog()
      const outcome = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd", timeZone: "UTC" }).open(
          request(vm, "[OPTIONS]\nenable: 1\n")
        )
        const engineJob = job({ qmp, archive: session, devices: vm.devices, log: log.log })
        yield* engine.prepare(engineJob)
        const running = yield* engine.start(engineJob)
        const tmpListing = listDir(dumpDir)
        const seen = yield* pollUntilEnd(running)
        const committed = yield* session.commit
        return { running, seen, committed, tmpListing }
      }))
      const last = outcome.seen[outcome.seen.length - 1]!
      assert.strictEqual(last.status, "done")
      assert.strictEqual(last.uuid, outcome.running.uuid)
      assert.strictEqual(last.transferred, 12 * MiB)
      assert.strictEqual(last.total, 12 * MiB)

      // the QMP conversation, argument by argument
      assert.deepStrictEqual(vm.emulator.argumentsOf("getfd"), [{ fdname: "backup" }])
      const [backupArgs] = vm.emulator.argumentsOf("backup")
      const tmpDir = Path.join(dumpDir, "vzdump-qemu-100-2026_11_27-09_00_00.tmp")
      assert.deepStrictEqual(backupArgs, {
        "backup-file": "/dev/fdname/backup",
        speed: 0,
        "config-file": Path.join(tmpDir, "qemu-server.conf"),
        devlist: "drive-scsi0,drive-virtio1",
        "firewall-file": Path.join(tmpDir, "qemu-server.fw")
      })
      const names = vm.emulator.commands.map((c) => c.command)
      assert.deepStrictEqual(names.slice(0, 4), ["query-backup", "query-proxmox-support", "getfd", "backup"])
      assert.deepStrictEqual(vm.emulator.heldFds(), [], "QEMU used the descriptor")

      // what was on disk while it ran, and after
      assert.include(outcome.tmpListing, "vzdump-qemu-100-2026_11_27-09_00_00.vma.dat")
      assert.include(outcome.tmpListing, "vzdump-qemu-100-2026_11_27-09_00_00.tmp")
      const archive = Path.join(dumpDir, "vzdump-qemu-100-2026_11_27-09_00_00.vma.zst")
      assert.deepStrictEqual(listDir(dumpDir), ["vzdump-qemu-100-2026_11_27-09_00_00.vma.zst"])
      assert.strictEqual(outcome.committed.location, archive)
      assert.deepStrictEqual(outcome.committed.logLines, [
        VzdumpLog.Messages.archiveFileSize(Fs.statSync(archive).size)
      ])
      assert.deepStrictEqual([...Fs.readFileSync(archive).subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd], "zstd frame")

      // the archive: header, configs, disks
      const extracted = yield* extractArchive(archive, Path.join(vm.dir, "x"))
      assert.strictEqual(extracted.header.uuid, outcome.running.uuid, "VMA UUID = job UUID")
      assert.deepStrictEqual(extracted.header.devices.map((d) => [d.name, d.size]), [
        ["drive-scsi0", 8 * MiB],
        ["drive-virtio1", 4 * MiB]
      ])
      assert.strictEqual(extracted.configs["qemu-server.conf"], CONFIG)
      assert.strictEqual(extracted.configs["qemu-server.fw"], "[OPTIONS]\nenable: 1\n")
      const contents = yield* vm.contents
      assert.strictEqual(extracted.disks["drive-scsi0"], sha256(contents[0]!))
      assert.strictEqual(extracted.disks["drive-virtio1"], sha256(contents[1]!))
      // and the `vma` command agrees
      const verified = yield* exec(vmaBin, ["verify", "-v", archive])
      assert.include(verified, "DEV: dev_id=1 size: 8388608 devname: drive-scsi0")
    }), TIMEOUT)

  it.scopedLive("vmaOutput 'path': QEMU opens the FIFO the compressor reads (gzip), or creates the file itself", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine({ vmaOutput: "path" })
      const contents = yield* vm.contents
      for (const compress of ["gzip", "none"] as const) {
        const dumpDir = Path.join(vm.dir, `dump-${compress}`)
        Fs.mkdirSync(dumpDir)
        const log = makeLog()
        const path = yield* Effect.scoped(Effect.gen(function*() {
          const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress, timeZone: "UTC" }).open(request(vm))
          const engineJob = job({ qmp, archive: session, devices: vm.devices, log: log.log })
          yield* engine.prepare(engineJob)
          const running = yield* engine.start(engineJob)
          const seen = yield* pollUntilEnd(running)
          assert.strictEqual(seen[seen.length - 1]!.status, "done")
          return (yield* session.commit).location
        }))
        const args = vm.emulator.argumentsOf("backup")
        const backupFile = args[args.length - 1]!["backup-file"] as string
        if (compress === "gzip") {
          assert.match(backupFile, /\/vzdump-fifo-[^/]+\/vzdump-backup$/)
          assert.isFalse(Fs.existsSync(backupFile), "the FIFO is gone")
          assert.isTrue(path.endsWith(".vma.gz"))
        } else {
          assert.strictEqual(backupFile, Path.join(dumpDir, "vzdump-qemu-100-2026_11_27-09_00_00.dat"))
          assert.isTrue(path.endsWith(".vma"))
        }
        const extracted = yield* extractArchive(path, Path.join(vm.dir, `x-${compress}`))
        assert.strictEqual(extracted.disks["drive-scsi0"], sha256(contents[0]!))
        assert.strictEqual(extracted.disks["drive-virtio1"], sha256(contents[1]!))
        assert.deepStrictEqual(listDir(dumpDir), [Path.basename(path)])
      }
      assert.deepStrictEqual(vm.emulator.argumentsOf("getfd"), [], "no descriptor passing in this mode")
    }), TIMEOUT)

  it.scopedLive("getfd without compression: QEMU writes the .dat file itself", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const path = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, timeZone: "UTC" }).open(request(vm))
        const engineJob = job({ qmp, archive: session, devices: vm.devices, log: makeLog().log, speed: 64 * MiB })
        const running = yield* engine.start(engineJob)
        yield* pollUntilEnd(running)
        return (yield* session.commit).location
      }))
      assert.deepStrictEqual(vm.emulator.argumentsOf("getfd"), [{ fdname: "backup" }])
      assert.strictEqual(vm.emulator.argumentsOf("backup")[0]!.speed, 64 * MiB)
      const extracted = yield* extractArchive(path, Path.join(vm.dir, "x"))
      const contents = yield* vm.contents
      assert.strictEqual(extracted.disks["drive-scsi0"], sha256(contents[0]!))
      assert.deepStrictEqual([...Fs.readFileSync(path).subarray(0, 4)], [0x56, 0x4d, 0x41, 0x00], "plain VMA")
    }), TIMEOUT)

  it.scopedLive("a compressor exiting 3 after reading everything fails the backup with vzdump's text; the temp file goes", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine({}, engineLayers(replaceCompressor("cat > /dev/null; exit 3")))
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const outcome = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd", timeZone: "UTC" }).open(request(vm))
        const engineJob = job({ qmp, archive: session, devices: vm.devices, log: makeLog().log })
        const running = yield* engine.start(engineJob)
        const seen = yield* pollUntilEnd(running)
        return { seen, during: listDir(dumpDir) }
      }))
      const last = outcome.seen[outcome.seen.length - 1]!
      assert.strictEqual(last.status, "error")
      assert.strictEqual(last.errmsg, "zstd --threads=1 failed - wrong exit status 3")
      assert.strictEqual(vm.emulator.status().status, "done", "QEMU itself finished")
      assert.include(outcome.during, "vzdump-qemu-100-2026_11_27-09_00_00.vma.dat")
      assert.deepStrictEqual(listDir(dumpDir), [], "temp file and config dir removed")
    }), TIMEOUT)

  it.scopedLive("a compressor dying at once: QEMU's writes fail (EPIPE), the backup fails, the temp file goes", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine({}, engineLayers(replaceCompressor("exit 0")))
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const seen = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd" }).open(request(vm))
        const running = yield* engine.start(job({ qmp, archive: session, devices: vm.devices, log: makeLog().log }))
        return yield* pollUntilEnd(running)
      }))
      const last = seen[seen.length - 1]!
      assert.strictEqual(last.status, "error")
      assert.strictEqual(last.errmsg, "job failed with err -32 - Broken pipe")
      assert.deepStrictEqual(listDir(dumpDir), [])
    }), TIMEOUT)

  it.scopedLive("cancel mid-run: backup-cancel is issued, the job ends 'backup canceled', nothing is left", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const seen = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd" }).open(request(vm))
        // 1 MiB/s over 12 MiB: still running when cancelled
        const running = yield* engine.start(
          job({ qmp, archive: session, devices: vm.devices, log: makeLog().log, speed: MiB })
        )
        let status = yield* running.status
        while ((status.transferred ?? 0) === 0) {
          yield* Effect.sleep("100 millis")
          status = yield* running.status
        }
        assert.strictEqual(status.status, "active")
        yield* running.cancel
        return yield* pollUntilEnd(running, "20 seconds")
      }))
      const last = seen[seen.length - 1]!
      assert.strictEqual(last.status, "error")
      assert.strictEqual(last.errmsg, "backup canceled")
      assert.isBelow(last.transferred!, 12 * MiB)
      assert.strictEqual(vm.emulator.argumentsOf("backup-cancel").length, 1)
      assert.deepStrictEqual(listDir(dumpDir), [])
    }), TIMEOUT)

  it.scopedLive("closing the job's scope before the end cancels it (interruption)", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd" }).open(request(vm))
        yield* engine.start(job({ qmp, archive: session, devices: vm.devices, log: makeLog().log, speed: MiB }))
      }))
      assert.strictEqual(vm.emulator.argumentsOf("backup-cancel").length, 1)
      yield* vm.emulator.awaitIdle
      assert.strictEqual(vm.emulator.status().errmsg, "backup canceled")
      assert.deepStrictEqual(listDir(dumpDir), [])
    }), TIMEOUT)

  it.scopedLive("status lifecycle: {finishing: false} before any job, finishing while the writer closes, done", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm({ finishingDelay: "1500 millis" })
      const qmp = yield* vm.connect
      assert.deepStrictEqual(yield* qmp.execute("query-backup"), { finishing: false })
      const engine = yield* makeEngine()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const seen = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "lzo" }).open(request(vm))
        const running = yield* engine.start(job({ qmp, archive: session, devices: vm.devices, log: makeLog().log }))
        const seen = yield* pollUntilEnd(running)
        yield* session.commit
        return seen
      }))
      const finishing = seen.filter((s) => s.finishing === true)
      assert.isAbove(finishing.length, 0, "finishing observed")
      for (const s of finishing) {
        assert.strictEqual(s.status, "active")
        assert.strictEqual(s.transferred, 12 * MiB)
        assert.isUndefined(s["end-time"])
      }
      const last = seen[seen.length - 1]!
      assert.strictEqual(last.status, "done")
      assert.isFalse(last.finishing)
      assert.isNumber(last["end-time"])
      assert.strictEqual(last["backup-file"], "/dev/fdname/backup")
      assert.strictEqual(last.dirty, 12 * MiB)
      assert.strictEqual(last.reused, 0)
      assert.isAbove(last["zero-bytes"]!, 0)
    }), TIMEOUT)

  it.scopedLive("one job at a time: a second backup is refused; prepare cancels a left-over job", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const leftover = yield* Scope.make()
      const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir }).open(request(vm)).pipe(Scope.extend(leftover))
      const first = yield* engine.start(job({ qmp, archive: session, devices: vm.devices, log: makeLog().log, speed: MiB }))
        .pipe(Scope.extend(leftover))
      const refused = yield* Effect.flip(
        qmp.execute("backup", { "backup-file": Path.join(vm.dir, "other.vma"), devlist: "drive-virtio1" })
      )
      assert.strictEqual(refused.message, "backup: GenericError: previous backup for target 'Proxmox' not finished")

      const log = makeLog()
      const dumpDir2 = Path.join(vm.dir, "dump2")
      Fs.mkdirSync(dumpDir2)
      yield* Effect.scoped(Effect.gen(function*() {
        const session2 = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir: dumpDir2 }).open(request(vm))
        const second = job({ qmp, archive: session2, devices: vm.devices, log: log.log })
        yield* engine.prepare(second)
        const running = yield* engine.start(second)
        const seen = yield* pollUntilEnd(running)
        assert.strictEqual(seen[seen.length - 1]!.status, "done")
        assert.notStrictEqual(running.uuid, first.uuid)
      }))
      assert.include(log.lines, `warn: ${VzdumpLog.Messages.leftOverJob}`)
      assert.strictEqual(vm.emulator.argumentsOf("backup-cancel").length, 1)
      yield* Scope.close(leftover, Exit.void)
    }), TIMEOUT)
})

/** A PBS storage whose secret files live in `<dir>/priv`. */
const pbsStorage = (dir: string, files: { readonly key?: boolean; readonly master?: boolean }) => {
  const priv = Path.join(dir, "priv")
  Fs.mkdirSync(priv, { recursive: true })
  Fs.writeFileSync(Path.join(priv, "pbs1.pw"), "s3cret-Pa55\n")
  if (files.key === true) Fs.writeFileSync(Path.join(priv, "pbs1.enc"), "{\"kdf\": null}\n")
  if (files.master === true) Fs.writeFileSync(Path.join(priv, "pbs1.master.pem"), "-----BEGIN PUBLIC KEY-----\n")
  return {
    storeId: "pbs1",
    repository: "backup@pbs@10.0.0.5:store1",
    namespace: "team/a",
    fingerprint: "aa:bb:cc",
    passwordFile: Path.join(priv, "pbs1.pw"),
    keyFile: Path.join(priv, "pbs1.enc"),
    masterKeyFile: Path.join(priv, "pbs1.master.pem")
  } satisfies ProxmoxTarget.PbsStorage
}

const runPbs = (
  vm: PveVm,
  options: {
    readonly storage: ProxmoxTarget.PbsStorage
    readonly speed?: number
    readonly extra?: ProxmoxEngine.ProxmoxJobOptions
    readonly engine?: ProxmoxEngine.ProxmoxEngineOptions
  }
) =>
  Effect.scoped(Effect.gen(function*() {
    const qmp = yield* vm.connect
    const engine = yield* makeEngine(options.engine)
    const log = makeLog()
    const session = yield* ProxmoxTarget.makePbs({ storage: options.storage, tmpDir: vm.dir }).open(request(vm))
    const engineJob = job({
      qmp,
      archive: session,
      devices: vm.devices,
      log: log.log,
      ...(options.speed !== undefined ? { speed: options.speed } : {}),
      ...(options.extra !== undefined ? { extra: options.extra } : {})
    })
    yield* engine.prepare(engineJob)
    const running = (yield* engine.start(engineJob)) as ProxmoxEngine.ProxmoxRunningBackup
    const seen = yield* pollUntilEnd(running)
    const committed = yield* session.commit
    return { running, seen, committed, log: log.lines, opened: session.openedLine }
  }))

describe.skipIf(!hasQemu)("Proxmox engine, PBS (against the emulator)", () => {
  it.scopedLive("every backup argument as vzdump passes it; bitmap info new, then used", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const storage = pbsStorage(vm.dir, { key: true, master: true })
      const first = yield* runPbs(vm, { storage, speed: 65536 * 1024, extra: { maxWorkers: 4 } })
      const tmp = Path.join(vm.dir, `vzdumptmp${process.pid}_100`)
      assert.deepStrictEqual(vm.emulator.argumentsOf("backup"), [{
        format: "pbs",
        "backup-file": "backup@pbs@10.0.0.5:store1",
        "backup-id": "100",
        "backup-time": Math.floor(START.getTime() / 1000),
        password: "s3cret-Pa55",
        devlist: "drive-scsi0,drive-virtio1",
        "config-file": Path.join(tmp, "qemu-server.conf"),
        "backup-ns": "team/a",
        speed: 65536 * 1024,
        "max-workers": 4,
        fingerprint: "aa:bb:cc",
        encrypt: true,
        keyfile: storage.keyFile,
        "master-keyfile": storage.masterKeyFile,
        "use-dirty-bitmap": true
      }])
      assert.strictEqual(first.opened, "creating Proxmox Backup Server archive 'vm/100/2026-11-27T09:00:00Z'")
      assert.strictEqual(first.committed.location, "pbs1:backup/vm/100/2026-11-27T09:00:00Z")
      assert.deepStrictEqual(first.log, ["info: enabling encryption with master key feature"])
      assert.isFalse(first.log.some((line) => line.includes("s3cret")), "the password is never logged")
      assert.isFalse(Fs.existsSync(tmp), "temp config directory removed")
      assert.strictEqual(first.seen[first.seen.length - 1]!.status, "done")
      assert.deepStrictEqual(first.running.bitmapInfo, [
        { drive: "drive-scsi0", action: "new", size: 8 * MiB, dirty: 8 * MiB },
        { drive: "drive-virtio1", action: "new", size: 4 * MiB, dirty: 4 * MiB }
      ])
      const start1 = VzdumpProgress.start({ jobUuid: first.running.uuid, now: 0, bitmapInfo: first.running.bitmapInfo })
      assert.deepStrictEqual(start1.lines, [
        "scsi0: dirty-bitmap status: created new",
        "virtio1: dirty-bitmap status: created new"
      ])

      // the guest writes 64 KiB: one 4 MiB granule of scsi0 is dirty, virtio1 is clean
      const qmp = yield* vm.connect
      yield* qmp.execute("human-monitor-command", { "command-line": "qemu-io -d scsi0 \"write -P 0x77 0 64k\"" })
      const second = yield* runPbs(vm, { storage })
      assert.deepStrictEqual(second.running.bitmapInfo, [
        { drive: "drive-scsi0", action: "used", size: 8 * MiB, dirty: 4 * MiB },
        { drive: "drive-virtio1", action: "used", size: 4 * MiB, dirty: 0 }
      ])
      const start2 = VzdumpProgress.start({ jobUuid: second.running.uuid, now: 0, bitmapInfo: second.running.bitmapInfo })
      assert.deepStrictEqual(start2.lines, [
        "scsi0: dirty-bitmap status: OK (4.0 MiB of 8.0 MiB dirty)",
        "virtio1: dirty-bitmap status: OK (drive clean)",
        "using fast incremental mode (dirty-bitmap), 4.0 MiB dirty of 12.0 MiB total"
      ])
      const last = second.seen[second.seen.length - 1]!
      assert.strictEqual(last.dirty, 4 * MiB)
      assert.strictEqual(last.reused, 8 * MiB)
      assert.strictEqual(vm.emulator.argumentsOf("query-pbs-bitmap-info").length, 2)
    }), TIMEOUT)

  it.scopedLive("no key: encrypt false and no key arguments; a template: no dirty bitmap, no speed when unlimited", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const storage = { ...pbsStorage(vm.dir, {}), namespace: undefined, fingerprint: undefined }
      const outcome = yield* runPbs(vm, { storage, extra: { template: true } })
      assert.deepStrictEqual(vm.emulator.argumentsOf("backup"), [{
        format: "pbs",
        "backup-file": "backup@pbs@10.0.0.5:store1",
        "backup-id": "100",
        "backup-time": Math.floor(START.getTime() / 1000),
        password: "s3cret-Pa55",
        devlist: "drive-scsi0,drive-virtio1",
        "config-file": Path.join(vm.dir, `vzdumptmp${process.pid}_100`, "qemu-server.conf"),
        encrypt: false
      }])
      assert.deepStrictEqual(outcome.log, [])
      assert.deepStrictEqual(outcome.running.bitmapInfo?.map((info) => info.action), ["not-used", "not-used"])
      // a template prints no bitmap lines
      const start = VzdumpProgress.start({
        jobUuid: outcome.running.uuid,
        now: 0,
        bitmapInfo: outcome.running.bitmapInfo,
        isTemplate: true
      })
      assert.deepStrictEqual(start.lines, [])
    }), TIMEOUT)

  it.scopedLive("a master key without an encryption key: vzdump's warning, unencrypted backup", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const outcome = yield* runPbs(vm, { storage: pbsStorage(vm.dir, { master: true }) })
      assert.deepStrictEqual(outcome.log, [
        "warn: backup target storage is configured with master-key, but no encryption key set! Ignoring master key " +
        "settings and creating unencrypted backup."
      ])
      const [args] = vm.emulator.argumentsOf("backup")
      assert.strictEqual(args!.encrypt, false)
      assert.notProperty(args, "master-keyfile")
    }), TIMEOUT)
})

describe.skipIf(!hasQemu)("Proxmox engine, feature detection (against the emulator)", () => {
  it.scopedLive("no query-proxmox-support: VMA goes on with vzdump's warnings, without max-workers and fleecing", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm({ support: "absent" })
      const qmp = yield* vm.connect
      const engine = yield* makeEngine({ fleecingDir: Path.join(vm.dir, "fleece") })
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const log = makeLog()
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir }).open(request(vm))
        const engineJob = job({
          qmp,
          archive: session,
          devices: vm.devices,
          log: log.log,
          extra: { maxWorkers: 8, fleecing: true }
        })
        yield* engine.prepare(engineJob)
        const seen = yield* pollUntilEnd(yield* engine.start(engineJob))
        assert.strictEqual(seen[seen.length - 1]!.status, "done")
      }))
      assert.deepStrictEqual(log.lines, [
        "warn: VM 100 qmp command 'query-proxmox-support' failed - The command query-proxmox-support has not been found",
        `warn: ${ProxmoxEngine.Messages.fleecingUnsupported}`,
        "warn: ignoring setting(s): max-workers - issue checking if supported"
      ])
      const [args] = vm.emulator.argumentsOf("backup")
      assert.notProperty(args, "max-workers")
      assert.notProperty(args, "fleecing")
    }), TIMEOUT)

  it.scopedLive("no query-proxmox-support: PBS is refused before anything starts", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm({ support: "absent" })
      const error = yield* Effect.flip(runPbs(vm, { storage: pbsStorage(vm.dir, {}) }))
      assert.strictEqual(error._tag, "BackupEngineError")
      assert.strictEqual(
        error.message,
        "PBS backups are not supported by the running QEMU version. Please make sure you've installed the latest " +
          "version and the VM has been restarted."
      )
      assert.deepStrictEqual(vm.emulator.argumentsOf("backup"), [])
    }), TIMEOUT)

  it.scopedLive("flags missing: max-workers and fleecing dropped with warnings; QEMU would refuse them", () =>
    Effect.gen(function*() {
      const { "backup-max-workers": _workers, "backup-fleecing": _fleecing, ...older } = fullSupport
      const vm = yield* startPveVm({ support: older })
      const qmp = yield* vm.connect
      const engine = yield* makeEngine({ fleecingDir: Path.join(vm.dir, "fleece") })
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const log = makeLog()
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir }).open(request(vm))
        const engineJob = job({ qmp, archive: session, devices: vm.devices, log: log.log, extra: { maxWorkers: 8, fleecing: true } })
        yield* engine.prepare(engineJob)
        yield* pollUntilEnd(yield* engine.start(engineJob))
      }))
      assert.deepStrictEqual(log.lines, [
        `warn: ${ProxmoxEngine.Messages.fleecingUnsupported}`,
        "warn: ignoring 'max-workers' setting - not supported by running QEMU"
      ])
      const [args] = vm.emulator.argumentsOf("backup")
      assert.deepStrictEqual(Object.keys(args!).sort(), ["backup-file", "config-file", "devlist", "speed"])
      const refused = yield* Effect.flip(
        qmp.execute("backup", { "backup-file": Path.join(vm.dir, "x.vma"), "max-workers": 2 })
      )
      assert.strictEqual(refused.message, "backup: GenericError: Parameter 'max-workers' is unexpected")
    }), TIMEOUT)

  it.scopedLive("all flags: max-workers passed; no pbs-masterkey: a master key is refused", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm({ support: { ...fullSupport, "pbs-masterkey": false } })
      const qmp = yield* vm.connect
      const engine = yield* makeEngine()
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir }).open(request(vm))
        const engineJob = job({ qmp, archive: session, devices: vm.devices, log: makeLog().log, extra: { maxWorkers: 8 } })
        yield* engine.prepare(engineJob)
        yield* pollUntilEnd(yield* engine.start(engineJob))
      }))
      assert.strictEqual(vm.emulator.argumentsOf("backup")[0]!["max-workers"], 8)
      const error = yield* Effect.flip(runPbs(vm, { storage: pbsStorage(vm.dir, { key: true, master: true }) }))
      assert.strictEqual(error.message, "master key configured but running QEMU version does not support master keys")
      assert.strictEqual(vm.emulator.argumentsOf("backup").length, 1)
    }), TIMEOUT)

  it.scopedLive("no pbs-dirty-bitmap / query-bitmap-info: no use-dirty-bitmap, no bitmap query", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm({
        support: { ...fullSupport, "pbs-dirty-bitmap": false, "query-bitmap-info": false }
      })
      const outcome = yield* runPbs(vm, { storage: pbsStorage(vm.dir, {}) })
      const [args] = vm.emulator.argumentsOf("backup")
      assert.notProperty(args, "use-dirty-bitmap")
      assert.isUndefined(outcome.running.bitmapInfo)
      assert.deepStrictEqual(vm.emulator.argumentsOf("query-pbs-bitmap-info"), [])
    }), TIMEOUT)
})

describe.skipIf(!hasQemu)("Proxmox engine, fleecing and diskless VMs (against the emulator)", () => {
  it.scopedLive("fleecing: qcow2 images attached as <drive>-fleecing, fleecing: true, all removed afterwards", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const fleecingDir = Path.join(vm.dir, "fleece")
      const engine = yield* makeEngine({ fleecingDir })
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const log = makeLog()
      const path = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd" }).open(request(vm))
        const engineJob = job({ qmp, archive: session, devices: vm.devices, log: log.log, extra: { fleecing: true } })
        yield* engine.prepare(engineJob)
        const seen = yield* pollUntilEnd(yield* engine.start(engineJob))
        assert.strictEqual(seen[seen.length - 1]!.status, "done")
        return (yield* session.commit).location
      }))
      assert.strictEqual(vm.emulator.argumentsOf("backup")[0]!.fleecing, true)
      const added = vm.emulator.argumentsOf("blockdev-add").map((a) => a!["node-name"])
      assert.deepStrictEqual(added, ["drive-scsi0-fleecing", "drive-virtio1-fleecing"])
      assert.deepStrictEqual(log.lines, [
        `info: drive-scsi0: attaching fleecing image ${Path.join(fleecingDir, "vm-100-fleece-0.qcow2")} to QEMU`,
        `info: drive-virtio1: attaching fleecing image ${Path.join(fleecingDir, "vm-100-fleece-1.qcow2")} to QEMU`
      ])
      const nodes = (yield* qmp.execute("query-named-block-nodes", { flat: true })) as Array<{ "node-name": string }>
      assert.isFalse(nodes.some((node) => node["node-name"].endsWith("-fleecing")), "fleecing nodes detached")
      assert.deepStrictEqual(listDir(fleecingDir), [])
      const extracted = yield* extractArchive(path, Path.join(vm.dir, "x"))
      const contents = yield* vm.contents
      assert.strictEqual(extracted.disks["drive-scsi0"], sha256(contents[0]!))
    }), TIMEOUT)

  it.scopedLive("diskless VMA: vzdump's `vma create … exec:<compressor> > <file>` (our vma tool)", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const engine = yield* makeEngine({ vmaBinary: vmaBin })
      const dumpDir = Path.join(vm.dir, "dump")
      Fs.mkdirSync(dumpDir)
      const log = makeLog()
      const path = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makeVmaDirectory({ dumpDir, compress: "zstd", timeZone: "UTC" }).open({
          ...request(vm),
          devices: []
        })
        const engineJob = job({ qmp, archive: session, devices: [], log: log.log })
        yield* engine.prepare(engineJob)
        const seen = yield* pollUntilEnd(yield* engine.start(engineJob))
        assert.strictEqual(seen[0]!.status, "done")
        return (yield* session.commit).location
      }))
      const tmp = Path.join(dumpDir, "vzdump-qemu-100-2026_11_27-09_00_00.tmp")
      assert.deepStrictEqual(log.lines, [
        "info: backup contains no disks",
        "info: starting diskless backup",
        `info: ${vmaBin} create -v -c ${tmp}/qemu-server.conf exec:zstd --threads=1 > ` +
        `${dumpDir}/vzdump-qemu-100-2026_11_27-09_00_00.vma.dat`
      ])
      assert.deepStrictEqual(vm.emulator.argumentsOf("backup"), [], "QEMU is not involved")
      const header = yield* Effect.scoped(
        Effect.flatMap(VmaInput.file(path), (input) => Effect.map(VmaReader.open(input), (archive) => archive.header))
      ).pipe(Effect.orDie)
      assert.deepStrictEqual(header.devices, [])
      assert.deepStrictEqual(header.configs.map((c) => c.name), ["qemu-server.conf"])
    }), TIMEOUT)

  it.scopedLive("diskless PBS: proxmox-backup-client with the password in the environment only", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const calls: Array<{ program: string; args: ReadonlyArray<string>; env: unknown }> = []
      const recording = Layer.succeed(HostCommand.HostCommand, {
        run: (program, args, options) =>
          Effect.sync(() => {
            calls.push({ program, args, env: options?.env })
            return { stdout: "", stderr: "" }
          })
      })
      const engine = yield* makeEngine({}, engineLayers(undefined, recording))
      const storage = pbsStorage(vm.dir, { key: true })
      const log = makeLog()
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* ProxmoxTarget.makePbs({ storage, tmpDir: vm.dir }).open({ ...request(vm), devices: [] })
        const engineJob = job({ qmp, archive: session, devices: [], log: log.log })
        yield* engine.prepare(engineJob)
        yield* pollUntilEnd(yield* engine.start(engineJob))
      }))
      const tmp = Path.join(vm.dir, `vzdumptmp${process.pid}_100`)
      const argv = [
        "backup",
        "--repository",
        "backup@pbs@10.0.0.5:store1",
        "--backup-type",
        "vm",
        "--backup-id",
        "100",
        "--backup-time",
        String(Math.floor(START.getTime() / 1000)),
        "--ns",
        "team/a",
        "--keyfile",
        storage.keyFile,
        `qemu-server.conf:${tmp}/qemu-server.conf`
      ]
      assert.deepStrictEqual(calls, [{
        program: "/usr/bin/proxmox-backup-client",
        args: argv,
        env: { PBS_PASSWORD: "s3cret-Pa55", PBS_FINGERPRINT: "aa:bb:cc" }
      }])
      assert.deepStrictEqual(log.lines, [
        "info: enabling encryption",
        "info: backup contains no disks",
        "info: starting diskless backup",
        `info: /usr/bin/proxmox-backup-client ${argv.join(" ")}`
      ])
      assert.deepStrictEqual(vm.emulator.argumentsOf("query-proxmox-support"), [], "no QEMU for diskless backups")
    }), TIMEOUT)
})
