/**
 * The workflow (`BackupJob.backupVm`, the same code the stock engine runs under) with the Proxmox
 * engine, the Proxmox-host profile and the VMA-directory target for it, on an EMULATED Proxmox VE
 * node (test/utils/pveNode.ts: `qm`/`pvesm`/`pvesh` answered over temp files, QEMU 7.2 behind the
 * Proxmox-QEMU emulator). Every `qm`/`pvesm`/`pvesh` call is asserted.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber, Layer } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as BackupJob from "@vzdump/core/BackupJob"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import { HostCommand } from "@vzdump/core/HostCommand"
import * as HostProcess from "@vzdump/core/HostProcess"
import * as ProxmoxEngine from "@vzdump/core/ProxmoxEngine"
import * as ProxmoxHost from "@vzdump/core/ProxmoxHost"
import * as ProxmoxTarget from "@vzdump/core/ProxmoxTarget"
import { exec, hasQemu, MiB, sha256 } from "./utils/pveFixture.js"
import { extractArchive, listDir } from "./utils/pveJob.js"
import { makePveNode } from "./utils/pveNode.js"
import type { PveNode } from "./utils/pveNode.js"

const TIMEOUT = 120_000
const reporter = process.env.VZDUMP_TEST_LOG ? BackupReporter.layerStderr : BackupReporter.layerSilent

const layers = (node: PveNode, process: Layer.Layer<HostProcess.HostProcess> = HostProcess.layer) =>
  Layer.mergeAll(
    ProxmoxHost.layer({ root: node.root, node: node.nodeName, monitorIdle: "100 millis" }),
    ProxmoxEngine.layer(),
    ProxmoxTarget.layerVmaDirectory({ dumpDir: node.dumpDir, compress: "zstd", timeZone: "UTC" }),
    reporter
  ).pipe(Layer.provide(Layer.merge(node.layer, process)))

const contents = (node: PveNode) =>
  Effect.forEach(node.disks, (disk) =>
    Effect.gen(function*() {
      if (disk.format === "raw") return Fs.readFileSync(disk.path)
      const out = Path.join(node.root, `c-${disk.virtdev}.raw`)
      yield* exec("qemu-img", ["convert", "-U", "-f", disk.format, "-O", "raw", disk.path, out])
      const data = Fs.readFileSync(out)
      Fs.rmSync(out)
      return data
    }))

const strip = (lines: ReadonlyArray<string>) => lines.map((line) => line.replace(/^\S+ \S+ /, ""))

describe.skipIf(!hasQemu)("workflow + Proxmox engine + Proxmox-host profile (emulated node)", () => {
  it.scopedLive("a stopped VM: qm starts it paused (freeze), QEMU writes the VMA through zstd, qm stops it", () =>
    Effect.gen(function*() {
      const node = yield* makePveNode()
      const result = yield* BackupJob.backupVm({ vmid: 100, timeZone: "UTC" }).pipe(Effect.provide(layers(node)))
      const vol = (n: number, ext: string) => `local:100/vm-100-disk-${n}.${ext}`
      // vzdump's order: power state, lock, volumes, (stopped) start paused, back up, power state, stop, unlock
      assert.deepStrictEqual(node.argv(), [
        ["qm", "status", "100", "--verbose"],
        ["qm", "set", "100", "--lock", "backup"],
        ["pvesm", "status", "--storage", "local"],
        ["pvesm", "path", vol(0, "qcow2")],
        ["pvesh", "get", `/nodes/pve1/storage/local/content/${vol(0, "qcow2")}`, "--output-format", "json"],
        ["pvesm", "path", vol(1, "raw")],
        ["pvesh", "get", `/nodes/pve1/storage/local/content/${vol(1, "raw")}`, "--output-format", "json"],
        ["qm", "status", "100", "--verbose"],
        ["qm", "set", "100", "--freeze", "1", "--skiplock"],
        ["qm", "start", "100", "--skiplock"],
        ["qm", "set", "100", "--delete", "freeze", "--skiplock"],
        ["qm", "status", "100", "--verbose"],
        ["qm", "stop", "100", "--skiplock"],
        ["qm", "unlock", "100"]
      ])
      const config = Fs.readFileSync(node.paths.config(100), "utf8")
      assert.notInclude(config, "lock:")
      assert.notInclude(config, "freeze:")

      const archive = result.archive.location
      assert.strictEqual(Path.dirname(archive), node.dumpDir)
      assert.match(Path.basename(archive), /^vzdump-qemu-100-\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d\.vma\.zst$/)
      assert.deepStrictEqual(
        listDir(node.dumpDir),
        [Path.basename(archive), Path.basename(archive).replace(/\.vma\.zst$/, ".log")].sort()
      )
      const extracted = yield* extractArchive(archive, Path.join(node.root, "x"))
      const disks = yield* contents(node)
      assert.strictEqual(extracted.disks["drive-scsi0"], sha256(disks[0]!))
      assert.strictEqual(extracted.disks["drive-virtio1"], sha256(disks[1]!))
      assert.include(extracted.configs["qemu-server.conf"], "#qmdump#map:scsi0:drive-scsi0:local:qcow2:")
      assert.notInclude(extracted.configs["qemu-server.conf"], "lock:")

      const lines = strip(result.logLines)
      for (
        const expected of [
          "INFO: status = stopped",
          "INFO: backup mode: stop",
          `INFO: creating vzdump archive '${archive}'`,
          "INFO: starting kvm to execute backup task",
          "INFO: starting backup via QMP command",
          `INFO: started backup task '${result.status.uuid}'`,
          "INFO: stopping kvm after backup task"
        ]
      ) assert.include(lines, expected)
      assert.isTrue(lines.some((line) => /^INFO: transferred 12\.00 MiB in \d+ seconds? \(/.test(line)), lines.join("\n"))
      assert.isTrue(lines.some((line) => line.startsWith("INFO: archive file size: ")))
      assert.strictEqual(result.status.status, "done")
    }), TIMEOUT)

  it.scopedLive("a running VM, interrupted mid-backup: backup-cancel, VM left running, lock released, nothing left", () =>
    Effect.gen(function*() {
      const node = yield* makePveNode()
      // start the VM as a user would (not paused)
      yield* Effect.flatMap(HostCommand, (command) => command.run("qm", ["start", "100"])).pipe(
        Effect.provide(node.layer),
        Effect.orDie
      )
      node.calls.length = 0
      const fiber = yield* BackupJob.backupVm({ vmid: 100, bwlimit: 1024 }).pipe(
        Effect.provide(layers(node)),
        Effect.fork
      )
      // wait until QEMU's job has copied something
      while (((node.emulator()?.status().transferred) ?? 0) === 0) yield* Effect.sleep("100 millis")
      yield* Fiber.interrupt(fiber)
      const emulator = node.emulator()!
      assert.strictEqual(emulator.argumentsOf("backup-cancel").length >= 1, true, "backup-cancel issued")
      yield* emulator.awaitIdle
      assert.strictEqual(emulator.status().status, "error")
      assert.strictEqual(emulator.status().errmsg, "backup canceled")
      assert.isBelow(emulator.status().transferred!, 12 * MiB)
      const argv = node.argv()
      assert.deepStrictEqual(argv.slice(0, 2), [["qm", "status", "100", "--verbose"], ["qm", "set", "100", "--lock", "backup"]])
      assert.deepStrictEqual(argv[argv.length - 1], ["qm", "unlock", "100"])
      assert.isFalse(argv.some((call) => call[1] === "stop" || call[1] === "start"), "the running VM is left alone")
      assert.deepStrictEqual(emulator.argumentsOf("backup")[0]!.speed, 1024 * 1024)
      assert.notInclude(Fs.readFileSync(node.paths.config(100), "utf8"), "lock:")
      assert.isFalse(listDir(node.dumpDir).some((name) => name.endsWith(".dat") || name.endsWith(".zst")))
      assert.isDefined(node.emulator(), "QEMU still runs")
      assert.strictEqual(
        ((yield* Effect.flatMap(HostCommand, (command) => command.run("qm", ["status", "100", "--verbose"])).pipe(
          Effect.provide(node.layer),
          Effect.orDie
        )).stdout.match(/^qmpstatus: (.*)$/m) ?? [])[1],
        "running"
      )
    }), TIMEOUT)

  it.scopedLive("PBS storage from storage.cfg: the workflow's backup goes to QEMU with vzdump's arguments", () =>
    Effect.gen(function*() {
      const node = yield* makePveNode()
      Fs.writeFileSync(
        node.paths.storageConfig,
        "pbs: pbs1\n\tdatastore store1\n\tserver 10.0.0.5\n\tusername backup@pbs\n\tfingerprint aa:bb\n"
      )
      Fs.writeFileSync(Path.join(node.paths.privStorageDir, "pbs1.pw"), "pw-1\n")
      const layer = Layer.mergeAll(
        ProxmoxHost.layer({ root: node.root, node: node.nodeName, monitorIdle: "100 millis" }),
        ProxmoxEngine.layer(),
        ProxmoxHost.layerPbsTarget({ root: node.root, storeId: "pbs1", tmpDir: node.root }),
        reporter
      ).pipe(Layer.provide(Layer.merge(node.layer, HostProcess.layer)))
      const result = yield* BackupJob.backupVm({ vmid: 100, timeZone: "UTC" }).pipe(Effect.provide(layer))
      const startTime = Date.parse(result.archive.location.replace(/^pbs1:backup\/vm\/100\//, "")) / 1000
      assert.deepStrictEqual(node.lastEmulator()!.argumentsOf("backup"), [{
        format: "pbs",
        "backup-file": "backup@pbs@10.0.0.5:store1",
        "backup-id": "100",
        "backup-time": startTime,
        password: "pw-1",
        devlist: "drive-scsi0,drive-virtio1",
        "config-file": Path.join(node.root, `vzdumptmp${process.pid}_100`, "qemu-server.conf"),
        fingerprint: "aa:bb",
        encrypt: false,
        "use-dirty-bitmap": true
      }])
      assert.match(result.archive.location, /^pbs1:backup\/vm\/100\/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/)
      const lines = strip(result.logLines)
      assert.isTrue(lines.some((line) => line.startsWith("INFO: creating Proxmox Backup Server archive 'vm/100/")))
      assert.isFalse(lines.some((line) => line.includes("pw-1")), "the password is never logged")
      // query-pbs-bitmap-info reaches the workflow's progress loop
      assert.include(lines, "INFO: scsi0: dirty-bitmap status: created new")
      assert.include(lines, "INFO: virtio1: dirty-bitmap status: created new")
      assert.strictEqual(result.status.status, "done")
      assert.isTrue(node.argv().some((call) => call[1] === "stop"))
    }), TIMEOUT)

  it.scopedLive("a failing compressor fails the backup with vzdump's text; the VM is stopped again, unlocked", () =>
    Effect.gen(function*() {
      const node = yield* makePveNode()
      const failing = Layer.succeed(
        HostProcess.HostProcess,
        HostProcess.HostProcess.of({
          spawn: (program, args, options) =>
            Effect.flatMap(HostProcess.HostProcess, (real) =>
              program === "zstd"
                ? real.spawn("sh", ["-c", "cat > /dev/null; exit 7"], options)
                : real.spawn(program, args, options)).pipe(Effect.provide(HostProcess.layer))
        })
      )
      const error = yield* Effect.flip(BackupJob.backupVm({ vmid: 100 }).pipe(Effect.provide(layers(node, failing))))
      assert.strictEqual(error._tag, "BackupFailed")
      assert.strictEqual(error.message, "zstd --threads=1 failed - wrong exit status 7")
      const argv = node.argv()
      assert.deepStrictEqual(argv.slice(-3), [
        ["qm", "status", "100", "--verbose"],
        ["qm", "stop", "100", "--skiplock"],
        ["qm", "unlock", "100"]
      ])
      assert.isFalse(listDir(node.dumpDir).some((name) => name.endsWith(".dat") || name.endsWith(".zst")))
    }), TIMEOUT)
})
