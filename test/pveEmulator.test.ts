/**
 * The Proxmox-QEMU EMULATOR itself (test/utils/pveQemu.ts): strict to /work/shared/specs/pve-qmp.md
 * for argument names, types and error texts, and a transparent QMP proxy to the real QEMU behind it.
 * These tests keep the emulator honest; they say nothing about Proxmox's real build.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import type { QmpExecuteError } from "@vzdump/qmp/QmpError"
import { hasQemu, MiB, startPveVm } from "./utils/pveFixture.js"

const TIMEOUT = 60_000

/** Sends raw lines to a QMP socket and collects the lines that come back. */
const rawSession = (path: string, lines: ReadonlyArray<string>, expect: number) =>
  Effect.async<Array<unknown>, Error>((resume) => {
    const socket = Net.connect(path)
    const received: Array<unknown> = []
    let buffer = ""
    socket.on("data", (chunk) => {
      buffer += chunk.toString("utf8")
      let newline = buffer.indexOf("\n")
      while (newline >= 0) {
        received.push(JSON.parse(buffer.slice(0, newline)))
        buffer = buffer.slice(newline + 1)
        newline = buffer.indexOf("\n")
        if (received.length === 1) for (const line of lines) socket.write(`${line}\n`)
        if (received.length === expect) {
          socket.end()
          resume(Effect.succeed(received))
        }
      }
    })
    socket.on("error", (error) => resume(Effect.fail(error)))
    return Effect.sync(() => socket.destroy())
  }).pipe(Effect.timeout("10 seconds"), Effect.orDie)

const descOf = (effect: Effect.Effect<unknown, QmpExecuteError>) =>
  Effect.map(Effect.flip(effect), (error) =>
    error._tag === "QmpCommandError"
      ? { class: error.errorClass, desc: error.desc }
      : { class: error._tag, desc: error.message })

describe.skipIf(!hasQemu)("Proxmox-QEMU emulator", () => {
  it.scopedLive("speaks QMP: greeting, negotiation, ids; proxies to the real QEMU and forwards its events", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const path = Path.join(vm.dir, "pve.qmp")
      const raw = yield* rawSession(path, [
        "{\"execute\": \"query-status\", \"id\": 1}",
        "{\"execute\": \"qmp_capabilities\", \"id\": 2}",
        "{\"execute\": \"qmp_capabilities\", \"id\": 3}",
        "{\"execute\": \"query-backup\", \"id\": \"x\"}"
      ], 5)
      assert.property(raw[0], "QMP")
      assert.deepStrictEqual(raw.slice(1), [
        { error: { class: "CommandNotFound", desc: "Expecting capabilities negotiation with 'qmp_capabilities'" }, id: 1 },
        { return: {}, id: 2 },
        { error: { class: "CommandNotFound", desc: "Capabilities negotiation is already complete, command ignored" }, id: 3 },
        { return: { finishing: false }, id: "x" }
      ])
      const qmp = yield* vm.connect
      const events = yield* qmp.subscribe
      yield* qmp.execute("cont")
      yield* QmpClient.awaitEvent(events, QmpClient.isEvent("RESUME"), "10 seconds")
      assert.strictEqual(((yield* qmp.execute("query-status")) as { status: string }).status, "running")
      const names = ((yield* qmp.execute("query-commands")) as Array<{ name: string }>).map((c) => c.name)
      for (const name of ["backup", "query-backup", "backup-cancel", "query-proxmox-support", "query-pbs-bitmap-info"]) {
        assert.include(names, name)
      }
      const unknown = yield* descOf(qmp.execute("no-such-command"))
      assert.deepStrictEqual(unknown, { class: "CommandNotFound", desc: "The command no-such-command has not been found" })
    }), TIMEOUT)

  it.scopedLive("`backup` arguments: QAPI names and types, PBS's required ones, devices, one job at a time", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      const out = Path.join(vm.dir, "out.vma")
      const check = (args: object) => descOf(qmp.execute("backup", args))
      assert.deepStrictEqual(yield* check({}), { class: "GenericError", desc: "Parameter 'backup-file' is missing" })
      assert.deepStrictEqual(yield* check({ "backup-file": out, speed: "1" }), {
        class: "GenericError",
        desc: "Invalid parameter type for 'speed', expected: integer"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": out, fleecing: 1 }), {
        class: "GenericError",
        desc: "Invalid parameter type for 'fleecing', expected: boolean"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": out, "backup_file": out }), {
        class: "GenericError",
        desc: "Parameter 'backup_file' is unexpected"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": out, format: "dir" }), {
        class: "GenericError",
        desc: "Parameter 'format' does not accept value 'dir'"
      })
      const pbs = { "backup-file": "root@pam@host:store", format: "pbs", "backup-id": "100", "backup-time": 1 }
      assert.deepStrictEqual(yield* check(pbs), { class: "GenericError", desc: "missing parameter 'password'" })
      assert.deepStrictEqual(yield* check({ ...pbs, password: "x", "backup-id": undefined }), {
        class: "GenericError",
        desc: "missing parameter 'backup-id'"
      })
      assert.deepStrictEqual(yield* check({ ...pbs, password: "x", "backup-time": undefined }), {
        class: "GenericError",
        desc: "missing parameter 'backup-time'"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": out, devlist: "drive-scsi0,drive-nope" }), {
        class: "DeviceNotFound",
        desc: "Device 'drive-nope' not found"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": out, fleecing: true }), {
        class: "GenericError",
        desc: "fleecing node for device 'drive-scsi0' not found"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": "/dev/fdname/backup" }), {
        class: "GenericError",
        desc: "File descriptor named 'backup' has not been found"
      })
      assert.deepStrictEqual(yield* check({ "backup-file": out, "config-file": Path.join(vm.dir, "nope.conf") }), {
        class: "GenericError",
        desc: `unable to read file '${Path.join(vm.dir, "nope.conf")}'`
      })
      assert.isFalse(Fs.existsSync(out), "the file created for a failed setup is removed")
      Fs.writeFileSync(out, "")
      assert.deepStrictEqual(yield* check({ "backup-file": out }), {
        class: "GenericError",
        desc: `can't open file ${out} - File exists`
      })
      Fs.rmSync(out)
      assert.deepStrictEqual(yield* descOf(qmp.execute("query-backup", { verbose: true })), {
        class: "GenericError",
        desc: "Parameter 'verbose' is unexpected"
      })
      assert.deepStrictEqual(yield* qmp.execute("backup-cancel"), {}, "cancel succeeds with nothing running")
      assert.deepStrictEqual(yield* qmp.execute("query-pbs-bitmap-info"), [])

      // a real job (no devlist: every writable device), then a second one is refused
      const started = (yield* qmp.execute("backup", { "backup-file": out, speed: MiB })) as { UUID: string }
      assert.match(started.UUID, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/)
      assert.deepStrictEqual(yield* check({ "backup-file": `${out}.2` }), {
        class: "GenericError",
        desc: "previous backup for target 'Proxmox' not finished"
      })
      const status = (yield* qmp.execute("query-backup")) as Record<string, unknown>
      assert.strictEqual(status.status, "active")
      assert.strictEqual(status.uuid, started.UUID)
      assert.strictEqual(status["backup-file"], out)
      assert.strictEqual(status.total, 12 * MiB)
      yield* qmp.execute("backup-cancel")
      yield* vm.emulator.awaitIdle
      const ended = (yield* qmp.execute("query-backup")) as Record<string, unknown>
      assert.strictEqual(ended.status, "error")
      assert.strictEqual(ended.errmsg, "backup canceled")
      assert.isNumber(ended["end-time"])
    }), TIMEOUT)

  it.scopedLive("getfd/closefd: a descriptor must come with the command; names are replaced and closed", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm()
      const qmp = yield* vm.connect
      assert.deepStrictEqual(yield* descOf(qmp.execute("getfd", { fdname: "backup" })), {
        class: "GenericError",
        desc: "No file descriptor supplied via SCM_RIGHTS"
      })
      const fd = Fs.openSync(Path.join(vm.dir, "f"), "w")
      yield* qmp.execute("getfd", { fdname: "backup" }, { fds: [fd] })
      yield* qmp.execute("getfd", { fdname: "backup" }, { fds: [fd] })
      Fs.closeSync(fd)
      assert.deepStrictEqual(vm.emulator.heldFds(), ["backup"])
      yield* qmp.execute("closefd", { fdname: "backup" })
      assert.deepStrictEqual(yield* descOf(qmp.execute("closefd", { fdname: "backup" })), {
        class: "GenericError",
        desc: "File descriptor named 'backup' not found"
      })
    }), TIMEOUT)

  it.scopedLive("an old build: no query-proxmox-support, no PBS, no PBS arguments", () =>
    Effect.gen(function*() {
      const vm = yield* startPveVm({ support: "absent" })
      const qmp = yield* vm.connect
      assert.deepStrictEqual(yield* descOf(qmp.execute("query-proxmox-support")), {
        class: "CommandNotFound",
        desc: "The command query-proxmox-support has not been found"
      })
      assert.deepStrictEqual(yield* descOf(qmp.execute("backup", { "backup-file": "x", format: "pbs" })), {
        class: "GenericError",
        desc: "Parameter 'format' does not accept value 'pbs'"
      })
      assert.deepStrictEqual(yield* descOf(qmp.execute("backup", { "backup-file": "x", password: "p" })), {
        class: "GenericError",
        desc: "Parameter 'password' is unexpected"
      })
    }), TIMEOUT)
})
