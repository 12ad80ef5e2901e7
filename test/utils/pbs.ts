/**
 * Shared fixtures of the PBS end-to-end tests: the in-repo PBS test server with its datastore in the
 * test host's directory, a small running VM with known content, guest writes through its devices,
 * and restores.
 */
import { Effect, Layer, Redacted } from "effect"
import * as Fs from "node:fs/promises"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import { BackupTarget } from "@vzdump/core/BackupTarget"
import * as PbsClient from "@vzdump/target-pbs/PbsClient"
import type * as PbsTarget from "@vzdump/target-pbs/PbsTarget"
import * as PbsVmRestore from "@vzdump/target-pbs/PbsVmRestore"
import * as PbsTestServer from "@vzdump/target-pbs/testing/PbsTestServer"
import { deviceWrite, imageBytes, run, startVm, stopOnExit, type TestHost } from "./env.js"

export const reporter = process.env.VZDUMP_TEST_LOG ? BackupReporter.layerStderr : BackupReporter.layerSilent
export const MiB = 1024 * 1024
export const CS = 4 * MiB
const TOKEN = "backup@pbs!e2e"
const SECRET = "e2e-s3cret"

/** A PBS test server with its datastore in the host's temp dir, and a pinned client. */
export const startPbs = (host: TestHost, options: Partial<PbsTestServer.PbsTestServerOptions> = {}) =>
  Effect.gen(function*() {
    const store = `${host.dir}/pbs`
    const server = yield* PbsTestServer.make({
      datastores: [{ name: "store1", path: store }],
      tokens: [{ tokenid: TOKEN, secret: Redacted.make(SECRET) }],
      ...options
    })
    const client = yield* PbsClient.make({
      host: "127.0.0.1",
      port: server.port,
      datastore: "store1",
      auth: { _tag: "ApiToken", tokenId: TOKEN, secret: Redacted.make(SECRET) },
      fingerprint: server.fingerprint
    })
    return { server, client, store }
  })

/**
 * VM `vmid`: a 16 MiB qcow2 (chunks: pattern, pattern, hole, hole) and an 8 MiB raw (pattern, hole),
 * patterns unique to the VM; started and running (SeaBIOS finds nothing to boot and never writes).
 */
export const createVm = (host: TestHost, vmid: number) =>
  Effect.gen(function*() {
    const disk0 = `${host.dir}/vm-${vmid}-disk-0.qcow2`
    const disk1 = `${host.dir}/vm-${vmid}-disk-1.raw`
    yield* Effect.promise(async () => {
      await run("qemu-img", ["create", "-q", "-f", "qcow2", disk0, "16M"])
      await run("qemu-img", ["create", "-q", "-f", "raw", disk1, "8M"])
    })
    const p = (n: number) => `0x${((vmid * 7 + n) & 0xff).toString(16)}`
    yield* host.qemuIo(disk0, "qcow2", [`write -P ${p(1)} 0 3M`, `write -P ${p(2)} 5M 1M`])
    yield* host.qemuIo(disk1, "raw", [`write -P ${p(3)} 1M 2M`])
    yield* host.writeConfig(
      vmid,
      `name: pbs-e2e\nagent: 0\nmemory: 128\nscsi0: ${disk0},size=16M\nvirtio1: ${disk1},size=8M\n`
    )
    const content = yield* Effect.promise(() =>
      Promise.all([imageBytes(disk0, "qcow2", host.dir), imageBytes(disk1, "raw", host.dir)])
    )
    yield* host.killOnExit(vmid)
    yield* stopOnExit(vmid)
    yield* startVm(vmid)
    return { disk0, disk1, content }
  })

/** HMP `qemu-io` through the VM's devices (a guest write, seen by the backup filter and the disk). */
export const guestWrite = (
  vmid: number,
  device: "scsi0" | "virtio1",
  pattern: number,
  offset: number,
  length: number
) =>
  deviceWrite(
    vmid,
    device === "virtio1" ? "virtio1/virtio-backend" : device,
    `write -P 0x${pattern.toString(16)} ${offset} ${length}`
  )

export const withTarget = (target: PbsTarget.PbsTargetService) =>
  Layer.mergeAll(Layer.succeed(BackupTarget, target), reporter)

/** The task-log lines without their time stamps. */
export const untimed = (lines: ReadonlyArray<string>) => lines.map((line) => line.replace(/^\S+ \S+ /, ""))

export const restored = (
  client: PbsClient.PbsClientService,
  options: Omit<PbsVmRestore.RestoreVmOptions, "directory">,
  dir: string
) =>
  Effect.gen(function*() {
    const vm = yield* PbsVmRestore.restoreVm(client, { ...options, directory: dir })
    const disks = yield* Effect.promise(() => Promise.all(vm.disks.map((d) => Fs.readFile(d.path))))
    return { vm, disks }
  })

export const lineOf = (lines: ReadonlyArray<string>, prefix: string) =>
  untimed(lines).find((line) => line.startsWith(prefix))

/** Seconds pass between backups: a group's snapshots need strictly newer backup times. */
export const nextSecond = Effect.sleep("1100 millis")
