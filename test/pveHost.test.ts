/**
 * The Proxmox-host profile (`ProxmoxHost`): every `qm`/`pvesm`/`pvesh` invocation asserted (program,
 * arguments) through a recording `HostCommand`, including a failure of each; files under a temp
 * `root`. The QMP part runs against the Proxmox-QEMU EMULATOR (test/utils/pveQemu.ts).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Option, Redacted } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import { ConfigStore } from "@vzdump/core/ConfigStore"
import * as ConfigStoreModule from "@vzdump/core/ConfigStore"
import { CommandError, HostCommand } from "@vzdump/core/HostCommand"
import type { RunOptions } from "@vzdump/core/HostCommand"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as ProxmoxHost from "@vzdump/core/ProxmoxHost"
import * as ProxmoxTarget from "@vzdump/core/ProxmoxTarget"
import { BackupTarget } from "@vzdump/core/BackupTarget"
import { destinationOf } from "@vzdump/core/ArchiveDestination"
import { Storage } from "@vzdump/core/Storage"
import * as VmConfig from "@vzdump/core/VmConfig"
import { hasQemu, startPveVm, tempDir } from "./utils/pveFixture.js"

interface Call {
  readonly program: string
  readonly args: ReadonlyArray<string>
  readonly timeoutMs: number | undefined
}

type Reply = { readonly stdout?: string; readonly stderr?: string; readonly exit?: number }

/** A `HostCommand` that records every call and answers from `script` (exit ≠ 0 → `CommandError`). */
const recorder = (script: (program: string, args: ReadonlyArray<string>) => Reply | void) => {
  const calls: Array<Call> = []
  const layer = Layer.succeed(HostCommand, {
    run: (program: string, args: ReadonlyArray<string>, options?: RunOptions) =>
      Effect.suspend(() => {
        calls.push({ program, args: [...args], timeoutMs: options?.timeoutMs })
        const reply = script(program, args) ?? {}
        if ((reply.exit ?? 0) !== 0) {
          return Effect.fail(
            new CommandError({
              program,
              args: [...args],
              exitCode: reply.exit ?? 255,
              signal: null,
              stderr: reply.stderr ?? "",
              reason: "ExitStatus"
            })
          )
        }
        return Effect.succeed({ stdout: reply.stdout ?? "", stderr: reply.stderr ?? "" })
      })
  })
  return { calls, layer, argv: () => calls.map((call) => [call.program, ...call.args]) }
}

const CONF = "name: web\nmemory: 512\nscsi0: local-lvm:vm-100-disk-0,size=8G\n"

/** A root with `/etc/pve/qemu-server/100.conf`. */
const makeRoot = Effect.gen(function*() {
  const root = yield* tempDir("vzh-")
  const paths = ProxmoxHost.paths({ root })
  Fs.mkdirSync(paths.configDir, { recursive: true })
  Fs.mkdirSync(paths.firewallDir, { recursive: true })
  Fs.mkdirSync(paths.privStorageDir, { recursive: true })
  Fs.writeFileSync(paths.config(100), CONF)
  return { root, paths }
})

/** `qm set --lock` / `qm unlock` acting on the file, as Proxmox's would. */
const lockingQm = (config: string) => (program: string, args: ReadonlyArray<string>): Reply | void => {
  if (program !== "qm") return { exit: 2, stderr: "unexpected program" }
  const text = Fs.readFileSync(config, "utf8")
  if (args[0] === "set" && args[2] === "--lock") {
    const lock = /^lock: (\S+)$/m.exec(text)
    if (lock !== null) return { exit: 255, stderr: `VM is locked (${lock[1]})\n` }
    Fs.writeFileSync(config, `${text}lock: ${args[3]}\n`)
    return
  }
  if (args[0] === "unlock") {
    Fs.writeFileSync(config, text.replace(/^lock: \S+\n/m, ""))
    return
  }
  return { exit: 2, stderr: "unexpected qm call" }
}

describe("Proxmox host profile: ConfigStore through qm", () => {
  it.scoped("load, list, firewall from /etc/pve; lock with `qm set --lock`, unlock with `qm unlock`", () =>
    Effect.gen(function*() {
      const { paths, root } = yield* makeRoot
      Fs.writeFileSync(paths.firewall(100), "[OPTIONS]\nenable: 1\n")
      Fs.writeFileSync(paths.config(101), "memory: 256\n")
      const qm = recorder(lockingQm(paths.config(100)))
      const store = yield* ProxmoxHost.makeConfigStore({ root }).pipe(Effect.provide(qm.layer))
      assert.strictEqual(store.configPath(100), Path.join(root, "etc/pve/qemu-server/100.conf"))
      assert.deepStrictEqual(yield* store.list, [100, 101])
      assert.strictEqual(VmConfig.main(yield* store.load(100)).guestName, "web")
      assert.deepStrictEqual(yield* store.readFirewall(100), Option.some("[OPTIONS]\nenable: 1\n"))
      assert.deepStrictEqual(yield* store.readFirewall(101), Option.none())
      const missing = yield* Effect.flip(store.load(102))
      assert.strictEqual(missing._tag, "VmConfigNotFound")

      const locked = yield* store.setLock(100, "backup")
      assert.strictEqual(VmConfig.main(locked).lock, "backup")
      const again = yield* Effect.flip(store.setLock(100, "backup"))
      assert.strictEqual(again._tag, "VmLockError")
      assert.strictEqual(again.message, "VM is locked (backup)")
      const mismatch = yield* Effect.flip(store.removeLock(100, "snapshot"))
      assert.strictEqual(mismatch.message, "found lock 'backup' trying to remove 'snapshot' lock")
      const unlocked = yield* store.removeLock(100, "backup")
      assert.isUndefined(VmConfig.main(unlocked).lock)
      const notLocked = yield* Effect.flip(store.removeLock(100, "backup"))
      assert.strictEqual(notLocked._tag, "VmLockError")
      assert.deepStrictEqual(qm.argv(), [
        ["qm", "set", "100", "--lock", "backup"],
        ["qm", "set", "100", "--lock", "backup"],
        ["qm", "unlock", "100"]
      ])
    }))

  it.scoped("ConfigStore.locked (the workflow's lock) goes through qm; failures of qm set and qm unlock", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      const failing = recorder((_, args) =>
        args[0] === "set"
          ? { exit: 255, stderr: "trying to acquire cfs lock 'file-100' ... got timeout\n" }
          : { exit: 255, stderr: "unable to open file - Permission denied\n" }
      )
      const store = yield* ProxmoxHost.makeConfigStore({ root }).pipe(Effect.provide(failing.layer))
      const setError = yield* Effect.flip(
        Effect.scoped(ConfigStoreModule.locked(100)).pipe(Effect.provideService(ConfigStore, store))
      )
      assert.strictEqual(setError._tag, "ConfigStoreError")
      assert.include(setError.message, "trying to acquire cfs lock 'file-100' ... got timeout")
      Fs.appendFileSync(ProxmoxHost.paths({ root }).config(100), "lock: backup\n")
      const unlockError = yield* Effect.flip(store.removeLock(100, "backup"))
      assert.strictEqual(unlockError._tag, "ConfigStoreError")
      assert.include(unlockError.message, "unable to open file - Permission denied")
      assert.deepStrictEqual(failing.argv(), [["qm", "set", "100", "--lock", "backup"], ["qm", "unlock", "100"]])
    }))
})

const QM_STATUS_RUNNING = [
  "blockstat:",
  "\tdrive-scsi0:",
  "\t\trd_bytes: 1234",
  "cpus: 1",
  "ha:",
  "\tmanaged: 0",
  "name: web",
  "qmpstatus: paused",
  "running-machine: pc-i440fx-9.2+pve1",
  "running-qemu: 9.2.0",
  "status: running",
  "vmid: 100",
  ""
].join("\n")

describe("Proxmox host profile: Hypervisor through qm", () => {
  it.scoped("status from `qm status --verbose`", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      let reply: Reply = { stdout: QM_STATUS_RUNNING }
      const qm = recorder(() => reply)
      const hypervisor = yield* ProxmoxHost.makeHypervisor({ root }).pipe(Effect.provide(qm.layer))
      assert.deepStrictEqual(yield* hypervisor.status(100), {
        running: true,
        qmpStatus: "paused",
        qemuVersion: { major: 9, minor: 2, micro: 0 }
      })
      reply = { stdout: "cpus: 1\nname: web\nstatus: stopped\nvmid: 100\n" }
      assert.deepStrictEqual(yield* hypervisor.status(100), { running: false })
      reply = { exit: 2, stderr: "Configuration file 'nodes/pve1/qemu-server/100.conf' does not exist\n" }
      const error = yield* Effect.flip(hypervisor.status(100))
      assert.strictEqual(
        error.message,
        "VM 100: status failed - Configuration file 'nodes/pve1/qemu-server/100.conf' does not exist"
      )
      assert.deepStrictEqual(qm.argv(), [
        ["qm", "status", "100", "--verbose"],
        ["qm", "status", "100", "--verbose"],
        ["qm", "status", "100", "--verbose"]
      ])
    }))

  it.scoped("starting paused: freeze set for `qm start --skiplock`, then restored (also when the start fails)", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      let failStart = false
      const qm = recorder((_, args) =>
        args[0] === "start" && failStart ? { exit: 255, stderr: "start failed: QEMU exited with code 1\n" } : undefined
      )
      const hypervisor = yield* ProxmoxHost.makeHypervisor({ root }).pipe(Effect.provide(qm.layer))
      const config = (extra: string) => Effect.orDie(VmConfig.parse(`${CONF}${extra}`))
      yield* hypervisor.startPaused(100, yield* config(""))
      yield* hypervisor.startPaused(100, yield* config("freeze: 0\n"))
      yield* hypervisor.startPaused(100, yield* config("freeze: 1\n"))
      failStart = true
      const error = yield* Effect.flip(hypervisor.startPaused(100, yield* config("")))
      assert.strictEqual(error.message, "VM 100: start failed - start failed: QEMU exited with code 1")
      assert.deepStrictEqual(qm.argv(), [
        ["qm", "set", "100", "--freeze", "1", "--skiplock"],
        ["qm", "start", "100", "--skiplock"],
        ["qm", "set", "100", "--delete", "freeze", "--skiplock"],
        ["qm", "set", "100", "--freeze", "1", "--skiplock"],
        ["qm", "start", "100", "--skiplock"],
        ["qm", "set", "100", "--freeze", "0", "--skiplock"],
        ["qm", "start", "100", "--skiplock"],
        ["qm", "set", "100", "--freeze", "1", "--skiplock"],
        ["qm", "start", "100", "--skiplock"],
        ["qm", "set", "100", "--delete", "freeze", "--skiplock"]
      ])
      // setting freeze itself may fail: nothing is started then
      const refusing = recorder(() => ({ exit: 255, stderr: "VM is locked (migrate)\n" }))
      const other = yield* ProxmoxHost.makeHypervisor({ root }).pipe(Effect.provide(refusing.layer))
      const refused = yield* Effect.flip(other.startPaused(100, yield* config("")))
      assert.strictEqual(refused.message, "VM 100: start failed - VM is locked (migrate)")
      assert.deepStrictEqual(refusing.argv(), [["qm", "set", "100", "--freeze", "1", "--skiplock"]])
    }))

  it.scoped("shutdown, stop, suspend, resume: vzdump's qm calls and their failures", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      let fail = false
      const qm = recorder((_, args) => fail ? { exit: 255, stderr: `${args[0]}: VM 100 not running\n` } : undefined)
      const hypervisor = yield* ProxmoxHost.makeHypervisor({ root }).pipe(Effect.provide(qm.layer))
      yield* hypervisor.shutdown(100, "10 minutes")
      yield* hypervisor.stop(100)
      yield* hypervisor.suspend(100)
      yield* hypervisor.resume(100)
      assert.deepStrictEqual(qm.argv(), [
        ["qm", "shutdown", "100", "--skiplock", "--keepActive", "--timeout", "600"],
        ["qm", "stop", "100", "--skiplock"],
        ["qm", "suspend", "100", "--skiplock"],
        ["qm", "resume", "100", "--skiplock"]
      ])
      assert.strictEqual(qm.calls[0]!.timeoutMs, 660_000, "shutdown may take its timeout plus a minute")
      fail = true
      const errors = yield* Effect.all([
        Effect.flip(hypervisor.shutdown(100, "1 minute")),
        Effect.flip(hypervisor.stop(100)),
        Effect.flip(hypervisor.suspend(100)),
        Effect.flip(hypervisor.resume(100))
      ])
      assert.deepStrictEqual(errors.map((error) => [error.operation, error.message]), [
        ["shutdown", "VM 100: shutdown failed - shutdown: VM 100 not running"],
        ["stop", "VM 100: stop failed - stop: VM 100 not running"],
        ["suspend", "VM 100: suspend failed - suspend: VM 100 not running"],
        ["resume", "VM 100: resume failed - resume: VM 100 not running"]
      ])
    }))

  it.scopedLive.skipIf(!hasQemu)("QMP at /var/run/qemu-server/<vmid>.qmp: one connection per burst, fds pass", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      const paths = ProxmoxHost.paths({ root })
      const vm = yield* startPveVm({ frontPath: paths.qmp(100) })
      const qm = recorder(() => ({ exit: 2, stderr: "no qm here" }))
      const hypervisor = yield* ProxmoxHost.makeHypervisor({ root, monitorIdle: "100 millis" }).pipe(
        Effect.provide(qm.layer)
      )
      const qmp = yield* hypervisor.monitor(100)
      assert.deepStrictEqual(yield* qmp.execute("query-status"), { status: "prelaunch", running: false, singlestep: false })
      const fd = Fs.openSync(Path.join(root, "passed"), "w")
      yield* qmp.execute("getfd", { fdname: "backup" }, { fds: [fd] })
      Fs.closeSync(fd)
      assert.deepStrictEqual(vm.emulator.heldFds(), ["backup"])
      yield* Effect.sleep("400 millis")
      yield* qmp.execute("closefd", { fdname: "backup" })
      const connections = vm.emulator.commands.map((command) => command.connection)
      assert.strictEqual(connections[0], connections[1], "commands in a burst share a connection")
      assert.notStrictEqual(connections[1], connections[2], "an idle connection is closed, the next opens anew")
      assert.deepStrictEqual(qm.calls, [], "QMP needs no qm")
      const gone = yield* Effect.flip(hypervisor.monitor(101))
      assert.strictEqual(gone._tag, "HypervisorError")
      assert.strictEqual(gone.operation, "monitor")
    }), 60_000)
})

describe("Proxmox host profile: Storage through pvesm and pvesh", () => {
  const PVESM_STATUS = [
    "Name             Type     Status           Total            Used       Available        %",
    "local             dir     active        98497780        12345678        81111111   12.53%",
    "local-lvm     lvmthin     active        50000000         1000000        49000000    2.00%",
    "nfs               nfs   inactive               0               0               0    0.00%",
    ""
  ].join("\n")

  it.scoped("path, activate and info: the calls and their failures", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      const pvesm = recorder((program, args) => {
        if (program === "pvesm" && args[0] === "path") {
          return args[1] === "local-lvm:vm-100-disk-0"
            ? { stdout: "/dev/pve/vm-100-disk-0\n" }
            : { exit: 255, stderr: `unable to parse volume ID '${args[1]}'\n` }
        }
        if (program === "pvesm" && args[0] === "status") {
          const name = args[2]!
          const line = PVESM_STATUS.split("\n").find((l) => l.startsWith(`${name} `))
          return line === undefined
            ? { exit: 255, stderr: `storage '${name}' does not exist\n` }
            : { stdout: `${PVESM_STATUS.split("\n")[0]}\n${line}\n` }
        }
        if (program === "pvesh") {
          return args[1]!.endsWith("local-lvm:vm-100-disk-0")
            ? { stdout: "{\"format\":\"raw\",\"path\":\"/dev/pve/vm-100-disk-0\",\"size\":8589934592,\"used\":0}\n" }
            : { exit: 255, stderr: "no such volume\n" }
        }
        return { exit: 2 }
      })
      const storage = yield* ProxmoxHost.makeStorage({ root, node: "pve1" }).pipe(Effect.provide(pvesm.layer))
      assert.strictEqual(storage.storeId("local-lvm:vm-100-disk-0"), "local-lvm")
      assert.strictEqual(yield* storage.path("local-lvm:vm-100-disk-0", 100), "/dev/pve/vm-100-disk-0")
      assert.strictEqual(yield* storage.path("/srv/disk.raw", 100), "/srv/disk.raw")
      yield* storage.activate(["local-lvm:vm-100-disk-0", "local-lvm:vm-100-disk-1", "local:100/x.qcow2"], 100)
      assert.deepStrictEqual(yield* storage.info("local-lvm:vm-100-disk-0", 100), {
        volid: "local-lvm:vm-100-disk-0",
        path: "/dev/pve/vm-100-disk-0",
        format: "raw",
        size: 8589934592
      })
      assert.deepStrictEqual(pvesm.argv(), [
        ["pvesm", "path", "local-lvm:vm-100-disk-0"],
        ["pvesm", "status", "--storage", "local-lvm"],
        ["pvesm", "status", "--storage", "local"],
        ["pvesm", "path", "local-lvm:vm-100-disk-0"],
        ["pvesh", "get", "/nodes/pve1/storage/local-lvm/content/local-lvm:vm-100-disk-0", "--output-format", "json"]
      ])

      const badPath = yield* Effect.flip(storage.path("local-lvm:bogus", 100))
      assert.strictEqual(badPath.message, "volume 'local-lvm:bogus': unable to parse volume ID 'local-lvm:bogus'")
      const inactive = yield* Effect.flip(storage.activate(["nfs:100/vm-100-disk-0.qcow2"], 100))
      assert.strictEqual(inactive.message, "volume 'nfs:100/vm-100-disk-0.qcow2': storage 'nfs' is not active (inactive)")
      const unknown = yield* Effect.flip(storage.activate(["gone:vm-100-disk-0"], 100))
      assert.strictEqual(unknown.message, "volume 'gone:vm-100-disk-0': storage 'gone' does not exist")
      const broken = recorder((program) =>
        program === "pvesm" ? { stdout: "/dev/pve/vm-100-disk-0\n" } : { exit: 255, stderr: "no such volume\n" }
      )
      const other = yield* ProxmoxHost.makeStorage({ root, node: "pve1" }).pipe(Effect.provide(broken.layer))
      const noInfo = yield* Effect.flip(other.info("local-lvm:vm-100-disk-0", 100))
      assert.strictEqual(noInfo.message, "volume 'local-lvm:vm-100-disk-0': no such volume")
      const noStore = yield* Effect.flip(storage.path("relative/file.raw", 100))
      assert.strictEqual(noStore.reason, "UnknownStorage")
    }))
})

describe("Proxmox host profile: PBS storages", () => {
  const STORAGE_CFG = [
    "dir: local",
    "\tpath /var/lib/vz",
    "\tcontent iso,vztmpl,backup",
    "",
    "pbs: pbs1",
    "\tdatastore store1",
    "\tserver 10.0.0.5",
    "\tcontent backup",
    "\tfingerprint aa:bb:cc",
    "\tprune-backups keep-all=1",
    "\tusername backup@pbs",
    "\tnamespace team/a",
    "",
    "pbs: pbs6",
    "\tdatastore s",
    "\tserver fd00::5",
    "\tport 8008",
    "\tencryption-key 11:22:33",
    "",
    "pbs: broken",
    "\tdatastore s",
    ""
  ].join("\n")

  it.scoped("storage.cfg, repository strings, secret files; target sessions carry the destination", () =>
    Effect.gen(function*() {
      const { root, paths } = yield* makeRoot
      Fs.writeFileSync(paths.storageConfig, STORAGE_CFG)
      Fs.writeFileSync(Path.join(paths.privStorageDir, "pbs1.pw"), "pa55word\n")
      Fs.writeFileSync(Path.join(paths.privStorageDir, "pbs1.enc"), "{}")
      const storage = yield* ProxmoxHost.readPbsStorage({ root }, "pbs1")
      assert.deepStrictEqual(storage, {
        storeId: "pbs1",
        repository: "backup@pbs@10.0.0.5:store1",
        namespace: "team/a",
        fingerprint: "aa:bb:cc",
        passwordFile: Path.join(paths.privStorageDir, "pbs1.pw"),
        keyFile: Path.join(paths.privStorageDir, "pbs1.enc"),
        masterKeyFile: Path.join(paths.privStorageDir, "pbs1.master.pem"),
        encryptionKey: undefined,
        masterPubkey: false
      })
      const v6 = yield* ProxmoxHost.readPbsStorage({ root }, "pbs6")
      assert.strictEqual(v6.repository, "root@pam@[fd00::5]:8008:s")
      assert.strictEqual(v6.encryptionKey, "11:22:33")
      const errors = yield* Effect.all(
        ["local", "broken", "none"].map((id) => Effect.flip(ProxmoxHost.readPbsStorage({ root }, id)))
      )
      assert.deepStrictEqual(errors.map((error) => error.message), [
        "storage 'local': not a Proxmox Backup Server storage (type 'dir')",
        "storage 'broken': 'server' and 'datastore' are required",
        "storage 'none': storage does not exist"
      ])

      // the target built from it
      const target = yield* BackupTarget.pipe(
        Effect.provide(ProxmoxHost.layerPbsTarget({ root, storeId: "pbs1", tmpDir: root }))
      )
      const session = yield* target.open({
        vmid: 100,
        startTime: new Date("2026-11-27T09:00:00Z"),
        configs: [{ name: "qemu-server.conf", data: new TextEncoder().encode(CONF) }],
        devices: []
      })
      const destination = destinationOf(session)
      assert.strictEqual(destination?._tag, "Pbs")
      if (destination?._tag === "Pbs") {
        assert.strictEqual(Redacted.value(destination.password), "pa55word")
        assert.strictEqual(String(destination.password), "<redacted>")
        assert.strictEqual(destination.keyfile, Path.join(paths.privStorageDir, "pbs1.enc"))
        assert.isTrue(destination.encrypt)
        assert.deepStrictEqual(destination.messages, [{ level: "info", message: "enabling encryption" }])
        assert.strictEqual(Fs.readFileSync(destination.configFile, "utf8"), CONF)
      }
      // encryption configured but the key file is gone: vzdump's error
      const v6Target = ProxmoxTarget.makePbs({
        storage: { ...v6, passwordFile: Path.join(paths.privStorageDir, "pbs1.pw") },
        tmpDir: root
      })
      const refused = yield* Effect.flip(v6Target.open({
        vmid: 100,
        startTime: new Date(),
        configs: [{ name: "qemu-server.conf", data: new Uint8Array() }],
        devices: []
      }))
      assert.strictEqual(refused.message, "pbs:pbs6: encryption configured ('11:22:33') but no encryption key file found!")
      assert.deepStrictEqual(
        ProxmoxTarget.pbsEncryption({ ...storage, masterPubkey: true }, (file) => file.endsWith(".enc")),
        { _tag: "Error", message: "master public key configured but no key file found" }
      )
    }))
})

describe("Proxmox host profile: layer", () => {
  it.scoped("one layer gives ConfigStore, Storage and Hypervisor over one HostCommand", () =>
    Effect.gen(function*() {
      const { root } = yield* makeRoot
      const qm = recorder(() => ({ stdout: "status: stopped\n" }))
      const services = yield* Effect.all([ConfigStore, Storage, Hypervisor]).pipe(
        Effect.provide(ProxmoxHost.layer({ root }).pipe(Layer.provide(qm.layer)))
      )
      assert.deepStrictEqual(yield* services[2].status(100), { running: false })
      assert.deepStrictEqual(qm.argv(), [["qm", "status", "100", "--verbose"]])
    }))
})
