import { assert, describe, it } from "@effect/vitest"
import { Chunk, Config, ConfigProvider, Duration, Effect, Exit, Fiber, Layer, Scope, Stream } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as FdQmpTransport from "../src/FdQmpTransport.js"
import * as NodeQmpTransport from "../src/NodeQmpTransport.js"
import * as QmpClient from "../src/QmpClient.js"
import * as QmpSchema from "../src/QmpSchema.js"
import * as QmpTransport from "../src/QmpTransport.js"
import { commandOf, fakePeer, idOf, qemuGreeting } from "./utils/FakePeer.js"
import { hasQemu, makeTempDir, run, startQemu } from "./utils/Qemu.js"

const TIMEOUT = 60_000

const connect = (address: string | QmpTransport.QmpAddress, options: Partial<QmpClient.QmpClientOptions> = {}) =>
  QmpClient.make({ address, ...options }).pipe(Effect.provide(NodeQmpTransport.layer))

const connectFd = (address: string | QmpTransport.QmpAddress, options: Partial<QmpClient.QmpClientOptions> = {}) =>
  QmpClient.make({ address, ...options }).pipe(Effect.provide(FdQmpTransport.layer))

const withClient = (client: QmpClient.QmpClientService) => Effect.provideService(QmpClient.QmpClient, client)

const elapsed = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const start = Date.now()
    const result = yield* effect
    return [result, Date.now() - start] as const
  })

describe.skipIf(!hasQemu)("QmpClient against QEMU 7.2", () => {
  it.scopedLive("reads the greeting and negotiates capabilities", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const version = client.greeting.QMP.version
      assert.strictEqual(version.qemu.major, 7)
      assert.strictEqual(version.qemu.minor, 2)
      assert.isTrue(client.greeting.QMP.capabilities.includes("oob"))
      assert.deepStrictEqual(client.address, QmpTransport.unix(qemu.qmpPath))
      const queried = yield* QmpClient.queryVersion().pipe(withClient(client))
      assert.deepStrictEqual(queried, version)
      // Before capabilities negotiation QEMU would answer CommandNotFound; a command working proves it happened.
      const hmp = yield* QmpClient.humanMonitorCommand("info version").pipe(withClient(client))
      assert.include(hmp, `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`)
    }), TIMEOUT)

  it.scopedLive("query-status reports prelaunch for a VM started with -S", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const status = yield* QmpClient.queryStatus().pipe(withClient(client))
      assert.strictEqual(status.status, "prelaunch")
      assert.isFalse(status.running)
    }), TIMEOUT)

  it.scopedLive("query-block maps devices to node names", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const blocks = yield* QmpClient.queryBlock().pipe(withClient(client))
      assert.strictEqual(blocks.length, 2)
      for (const disk of [qemu.disks.scsi0, qemu.disks.virtio1]) {
        const block = blocks.find((b) => b.qdev === disk.qdev)
        assert.isDefined(block, `no block device with qdev ${disk.qdev}`)
        assert.strictEqual(block!.device, "")
        assert.strictEqual(block!.inserted?.["node-name"], disk.nodeName)
        assert.strictEqual(block!.inserted?.drv, disk.format)
        assert.strictEqual(block!.inserted?.image["virtual-size"], disk.size)
        assert.strictEqual(block!.inserted?.ro, false)
      }
      const nodes = yield* QmpClient.queryNamedBlockNodes({ flat: true }).pipe(withClient(client))
      assert.sameMembers(
        nodes.map((n) => n["node-name"]),
        ["drive-scsi0", "file-scsi0", "drive-virtio1", "file-virtio1"]
      )
      assert.deepStrictEqual(yield* QmpClient.queryJobs().pipe(withClient(client)), [])
      assert.deepStrictEqual(yield* QmpClient.queryBlockExports().pipe(withClient(client)), [])
    }), TIMEOUT)

  it.scopedLive("cont and stop publish RESUME and STOP to a subscriber", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const events = yield* client.subscribe
      yield* QmpClient.cont().pipe(withClient(client))
      const resume = yield* QmpClient.awaitEvent(events, QmpClient.isEvent("RESUME"), "10 seconds")
      assert.strictEqual(resume.event, "RESUME")
      assert.isAbove(resume.timestamp.seconds, 0)
      assert.strictEqual((yield* QmpClient.queryStatus().pipe(withClient(client))).status, "running")
      yield* QmpClient.stop().pipe(withClient(client))
      const stop = yield* QmpClient.awaitEvent(events, QmpClient.isEvent("STOP"), "10 seconds")
      assert.strictEqual(stop.event, "STOP")
      const status = yield* QmpClient.queryStatus().pipe(withClient(client))
      assert.strictEqual(status.status, "paused")
      assert.isFalse(status.running)
    }), TIMEOUT)

  it.scopedLive("two subscribers each see every event", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const first = yield* client.subscribe
      const second = yield* client.subscribe
      yield* QmpClient.cont().pipe(withClient(client))
      yield* QmpClient.stop().pipe(withClient(client))
      const names = (stream: Stream.Stream<QmpSchema.QmpEvent>) =>
        Stream.runCollect(Stream.take(Stream.map(stream, (e) => e.event), 2)).pipe(
          Effect.map(Chunk.toReadonlyArray),
          Effect.timeout("10 seconds")
        )
      assert.deepStrictEqual(yield* names(first), ["RESUME", "STOP"])
      assert.deepStrictEqual(yield* names(second), ["RESUME", "STOP"])
    }), TIMEOUT)

  it.scopedLive("blockdev-add and blockdev-del a qcow2 overlay", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const overlay = Path.join(qemu.dir, "fleece.qcow2")
      yield* run("qemu-img", ["create", "-q", "-f", "qcow2", overlay, String(qemu.disks.scsi0.size)])
      yield* QmpClient.blockdevAdd({
        driver: "qcow2",
        "node-name": "fleece-scsi0",
        file: { driver: "file", filename: overlay },
        backing: qemu.disks.scsi0.nodeName
      }).pipe(withClient(client))
      const nodes = yield* QmpClient.queryNamedBlockNodes().pipe(withClient(client))
      const fleece = nodes.find((n) => n["node-name"] === "fleece-scsi0")
      assert.isDefined(fleece)
      assert.strictEqual(fleece!.drv, "qcow2")
      assert.strictEqual(fleece!["backing_file_depth"], 1)
      assert.strictEqual(fleece!.image["backing-image"]?.format, "qcow2")
      yield* QmpClient.blockdevDel("fleece-scsi0").pipe(withClient(client))
      const after = yield* QmpClient.queryNamedBlockNodes().pipe(withClient(client))
      assert.isUndefined(after.find((n) => n["node-name"] === "fleece-scsi0"))
      const again = yield* Effect.flip(QmpClient.blockdevDel("fleece-scsi0").pipe(withClient(client)))
      assert.strictEqual(again._tag, "QmpCommandError")
      if (again._tag === "QmpCommandError") {
        assert.strictEqual(again.command, "blockdev-del")
        assert.strictEqual(again.errorClass, "GenericError")
        assert.include(again.desc, "fleece-scsi0")
      }
    }), TIMEOUT)

  it.scopedLive("transaction adds two dirty bitmaps atomically", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const node = qemu.disks.scsi0.nodeName
      const bitmapNames = Effect.map(
        QmpClient.queryNamedBlockNodes().pipe(withClient(client)),
        (nodes) =>
          (nodes.find((n) => n["node-name"] === node)?.["dirty-bitmaps"] ?? []).flatMap((b) =>
            b.name === undefined ? [] : [b.name]
          )
      )
      yield* QmpClient.transaction([
        { type: "block-dirty-bitmap-add", data: { node, name: "pbs-inc" } },
        { type: "block-dirty-bitmap-add", data: { node, name: "backup-1", disabled: true } }
      ]).pipe(withClient(client))
      assert.sameMembers(yield* bitmapNames, ["pbs-inc", "backup-1"])
      const nodes = yield* QmpClient.queryNamedBlockNodes().pipe(withClient(client))
      const bitmaps = nodes.find((n) => n["node-name"] === node)?.["dirty-bitmaps"] ?? []
      assert.isTrue(bitmaps.find((b) => b.name === "pbs-inc")?.recording)
      assert.isFalse(bitmaps.find((b) => b.name === "backup-1")?.recording)

      // The second action fails (the name exists), so the first must not take effect either.
      const failed = yield* Effect.flip(
        QmpClient.transaction([
          { type: "block-dirty-bitmap-add", data: { node, name: "extra" } },
          { type: "block-dirty-bitmap-add", data: { node, name: "pbs-inc" } }
        ]).pipe(withClient(client))
      )
      assert.strictEqual(failed._tag, "QmpCommandError")
      assert.sameMembers(yield* bitmapNames, ["pbs-inc", "backup-1"])

      yield* QmpClient.blockDirtyBitmapMerge({ node, target: "backup-1", bitmaps: ["pbs-inc"] }).pipe(
        withClient(client)
      )
      yield* QmpClient.blockDirtyBitmapRemove({ node, name: "pbs-inc" }).pipe(withClient(client))
      yield* QmpClient.blockDirtyBitmapRemove({ node, name: "backup-1" }).pipe(withClient(client))
      assert.deepStrictEqual(yield* bitmapNames, [])
    }), TIMEOUT)

  it.scopedLive("a fleecing round trip: backup job, NBD export, job and export events", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const provide = withClient(client)
      const disk = qemu.disks.scsi0
      const events = yield* client.subscribe
      const overlay = Path.join(qemu.dir, "fleece.qcow2")
      yield* run("qemu-img", ["create", "-q", "-f", "qcow2", overlay, String(disk.size)])
      yield* QmpClient.blockdevAdd({
        driver: "qcow2",
        "node-name": "fleece-scsi0",
        file: { driver: "file", filename: overlay },
        backing: disk.nodeName
      }).pipe(provide)
      yield* QmpClient.transaction([
        { type: "block-dirty-bitmap-add", data: { node: disk.nodeName, name: "pbs-inc" } },
        {
          type: "blockdev-backup",
          data: { "job-id": "fleece-job-scsi0", device: disk.nodeName, target: "fleece-scsi0", sync: "none" }
        }
      ]).pipe(provide)
      const jobs = yield* QmpClient.queryJobs().pipe(provide)
      assert.strictEqual(jobs.length, 1)
      assert.strictEqual(jobs[0]!.id, "fleece-job-scsi0")
      assert.strictEqual(jobs[0]!.type, "backup")
      assert.strictEqual(jobs[0]!.status, "running")
      const blockJobs = yield* QmpClient.queryBlockJobs().pipe(provide)
      assert.strictEqual(blockJobs[0]?.device, "fleece-job-scsi0")
      assert.strictEqual(blockJobs[0]?.len, disk.size)

      const nbdPath = Path.join(qemu.dir, "nbd.sock")
      yield* QmpClient.nbdServerStart({ addr: { type: "unix", data: { path: nbdPath } } }).pipe(provide)
      yield* QmpClient.blockExportAdd({ type: "nbd", id: "exp-scsi0", "node-name": "fleece-scsi0", writable: false })
        .pipe(provide)
      assert.deepStrictEqual(yield* QmpClient.queryBlockExports().pipe(provide), [
        { id: "exp-scsi0", type: "nbd", "node-name": "fleece-scsi0", "shutting-down": false }
      ])
      assert.isTrue(Fs.existsSync(nbdPath))
      yield* QmpClient.blockExportDel("exp-scsi0").pipe(provide)
      const deleted = yield* QmpClient.awaitEvent(events, QmpClient.isEvent("BLOCK_EXPORT_DELETED"), "10 seconds")
      assert.deepStrictEqual(
        yield* QmpClient.decodeEventData(QmpSchema.BlockExportDeletedData)(deleted),
        { id: "exp-scsi0" }
      )
      yield* QmpClient.nbdServerStop().pipe(provide)

      yield* QmpClient.blockJobCancel("fleece-job-scsi0").pipe(provide)
      const cancelled = yield* QmpClient.awaitEvent(events, QmpClient.isEvent("BLOCK_JOB_CANCELLED"), "10 seconds")
      const data = yield* QmpClient.decodeEventData(QmpSchema.BlockJobEventData)(cancelled)
      assert.strictEqual(data.device, "fleece-job-scsi0")
      assert.strictEqual(data.type, "backup")
      const gone = yield* QmpClient.awaitEvent(
        events,
        (e) => e.event === "JOB_STATUS_CHANGE" && e.data?.status === "null",
        "10 seconds"
      )
      assert.deepStrictEqual(
        yield* QmpClient.decodeEventData(QmpSchema.JobStatusChangeData)(gone),
        { id: "fleece-job-scsi0", status: "null" }
      )
      assert.deepStrictEqual(yield* QmpClient.queryJobs().pipe(provide), [])
      yield* QmpClient.blockdevDel("fleece-scsi0").pipe(provide)
      yield* QmpClient.blockDirtyBitmapRemove({ node: disk.nodeName, name: "pbs-inc" }).pipe(provide)
    }), TIMEOUT)

  it.scopedLive("system_powerdown emits POWERDOWN", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const events = yield* client.subscribe
      yield* QmpClient.systemPowerdown().pipe(withClient(client))
      const event = yield* QmpClient.awaitEvent(events, QmpClient.isEvent("POWERDOWN"), "10 seconds")
      assert.strictEqual(event.event, "POWERDOWN")
    }), TIMEOUT)

  it.scopedLive("an unknown command fails with CommandNotFound", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const error = yield* Effect.flip(client.execute("no-such-command"))
      assert.strictEqual(error._tag, "QmpCommandError")
      if (error._tag === "QmpCommandError") {
        assert.strictEqual(error.command, "no-such-command")
        assert.strictEqual(error.errorClass, "CommandNotFound")
        assert.strictEqual(error.desc, "The command no-such-command has not been found")
        assert.strictEqual(
          error.message,
          "no-such-command: CommandNotFound: The command no-such-command has not been found"
        )
      }
    }), TIMEOUT)

  it.scopedLive("a bad argument fails with GenericError", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const error = yield* Effect.flip(client.execute("query-status", { bogus: 1 }))
      assert.strictEqual(error._tag, "QmpCommandError")
      if (error._tag === "QmpCommandError") {
        assert.strictEqual(error.errorClass, "GenericError")
        assert.strictEqual(error.desc, "Parameter 'bogus' is unexpected")
      }
    }), TIMEOUT)

  it.scopedLive("executeSchema fails with QmpDecodeError when the reply does not match", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const error = yield* Effect.flip(
        QmpClient.executeSchema("query-status", undefined, QmpSchema.VersionInfo).pipe(withClient(client))
      )
      assert.strictEqual(error._tag, "QmpDecodeError")
      if (error._tag === "QmpDecodeError") assert.strictEqual(error.command, "query-status")
    }), TIMEOUT)

  it.scopedLive("concurrent commands each get their own reply", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const calls = Array.from({ length: 30 }, (_, i) => {
        switch (i % 3) {
          case 0:
            return Effect.map(QmpClient.queryStatus().pipe(withClient(client)), (s) => `status:${s.status}`)
          case 1:
            return Effect.map(QmpClient.queryVersion().pipe(withClient(client)), (v) => `major:${v.qemu.major}`)
          default:
            return Effect.map(
              Effect.flip(client.execute(`missing-${i}`)),
              (e) => e._tag === "QmpCommandError" ? `missing:${e.desc}` : `other:${e._tag}`
            )
        }
      })
      const results = yield* Effect.all(calls, { concurrency: "unbounded" })
      results.forEach((result, i) => {
        const expected = i % 3 === 0
          ? "status:prelaunch"
          : i % 3 === 1
          ? "major:7"
          : `missing:The command missing-${i} has not been found`
        assert.strictEqual(result, expected)
      })
    }), TIMEOUT)

  it.scopedLive("a command times out, and its late reply does not reach the next command", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      yield* qemu.signal("SIGSTOP")
      const [error, ms] = yield* elapsed(
        Effect.flip(QmpClient.queryStatus({ timeout: "300 millis" }).pipe(withClient(client)))
      )
      assert.strictEqual(error._tag, "QmpTimeoutError")
      if (error._tag === "QmpTimeoutError") {
        assert.strictEqual(error.command, "query-status")
        assert.isTrue(Duration.equals(error.timeout, Duration.millis(300)))
      }
      assert.isAtLeast(ms, 250)
      assert.isBelow(ms, 5000)
      yield* qemu.signal("SIGCONT")
      // QEMU now answers the abandoned query-status first; matching by order would hand that reply to this call.
      const version = yield* QmpClient.queryVersion().pipe(withClient(client))
      assert.strictEqual(version.qemu.major, 7)
      assert.strictEqual((yield* QmpClient.queryStatus().pipe(withClient(client))).status, "prelaunch")
    }), TIMEOUT)

  it.scopedLive("QEMU killed mid-command fails the pending command with QmpClosedError", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const events = yield* client.subscribe
      yield* qemu.signal("SIGSTOP")
      const pending = yield* Effect.fork(QmpClient.queryStatus().pipe(withClient(client)))
      yield* Effect.sleep("200 millis")
      yield* qemu.signal("SIGKILL")
      const [error, ms] = yield* elapsed(Effect.flip(Fiber.join(pending)))
      assert.strictEqual(error._tag, "QmpClosedError")
      if (error._tag === "QmpClosedError") assert.strictEqual(error.reason, "PeerClosed")
      assert.isBelow(ms, 5000)
      assert.strictEqual(yield* qemu.exited, "SIGKILL")
      const later = yield* Effect.flip(client.execute("query-status"))
      assert.strictEqual(later._tag, "QmpClosedError")
      const closed = yield* client.closed
      assert.strictEqual(closed._tag, "QmpClosedError")
      // The event stream ends with the connection, and waiting for an event reports the closed connection.
      assert.deepStrictEqual(Chunk.toReadonlyArray(yield* Stream.runCollect(events)), [])
      const awaited = yield* Effect.flip(QmpClient.awaitEvent(client, QmpClient.isEvent("RESUME"), "5 seconds"))
      assert.strictEqual(awaited._tag, "QmpClosedError")
    }), TIMEOUT)

  it.scopedLive("quit: QEMU replies, exits, and the client sees the connection close", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      yield* QmpClient.quit().pipe(withClient(client))
      const closed = yield* client.closed.pipe(Effect.timeout("10 seconds"))
      assert.strictEqual(closed._tag, "QmpClosedError")
      if (closed._tag === "QmpClosedError") assert.strictEqual(closed.reason, "PeerClosed")
      assert.strictEqual(yield* qemu.exited.pipe(Effect.timeout("10 seconds")), 0)
    }), TIMEOUT)

  it.scopedLive("a second client times out while the first holds the socket (one client per socket)", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      yield* Effect.scoped(Effect.gen(function*() {
        yield* connect(qemu.qmpPath)
        const [error, ms] = yield* elapsed(Effect.flip(connect(qemu.qmpPath, { handshakeTimeout: "1 second" })))
        assert.strictEqual(error.reason, "Timeout")
        assert.include(error.message, "one QMP client per socket")
        assert.isAtLeast(ms, 900)
      }))
      // Once the first client's scope has closed, the socket serves a new client.
      const client = yield* connect(qemu.qmpPath, { handshakeTimeout: "5 seconds" })
      assert.strictEqual((yield* QmpClient.queryStatus().pipe(withClient(client))).status, "prelaunch")
    }), TIMEOUT)

  it.scopedLive("closing the client's scope fails a pending command with ClientClosed", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const scope = yield* Scope.make()
      const client = yield* connect(qemu.qmpPath).pipe(Scope.extend(scope))
      yield* qemu.signal("SIGSTOP")
      const pending = yield* Effect.fork(client.execute("query-status"))
      yield* Effect.sleep("100 millis")
      yield* Scope.close(scope, Exit.void)
      const error = yield* Effect.flip(Fiber.join(pending)).pipe(Effect.timeout("5 seconds"))
      assert.strictEqual(error._tag, "QmpClosedError")
      if (error._tag === "QmpClosedError") assert.strictEqual(error.reason, "ClientClosed")
      yield* qemu.signal("SIGCONT")
    }), TIMEOUT)

  it.scopedLive("connects over TCP", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu({ tcpQmp: true })
      const client = yield* connect(QmpTransport.tcp("127.0.0.1", qemu.qmpTcpPort!))
      assert.strictEqual(client.greeting.QMP.version.qemu.major, 7)
      assert.strictEqual((yield* QmpClient.queryStatus().pipe(withClient(client))).status, "prelaunch")
    }), TIMEOUT)

  it.scopedLive("layerConfig reads its options from Config", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const layer = QmpClient.layerConfig({
        address: Config.string("QMP_SOCKET"),
        commandTimeout: Config.duration("QMP_TIMEOUT")
      }).pipe(Layer.provide(NodeQmpTransport.layer))
      const status = yield* QmpClient.queryStatus().pipe(
        Effect.provide(layer),
        Effect.withConfigProvider(
          ConfigProvider.fromMap(new Map([["QMP_SOCKET", qemu.qmpPath], ["QMP_TIMEOUT", "10 seconds"]]))
        )
      )
      assert.strictEqual(status.status, "prelaunch")
    }), TIMEOUT)

  it.scopedLive("awaitEvent fails with QmpEventTimeoutError when nothing matches", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const [error, ms] = yield* elapsed(
        Effect.flip(QmpClient.awaitEvent(client, QmpClient.isEvent("SHUTDOWN"), "300 millis", "SHUTDOWN event"))
      )
      assert.strictEqual(error._tag, "QmpEventTimeoutError")
      assert.include(error.message, "SHUTDOWN event")
      assert.isAtLeast(ms, 250)
    }), TIMEOUT)

  it.scopedLive("a missing socket path fails with QmpConnectError (Open)", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const error = yield* Effect.flip(connect(Path.join(dir, "absent.sock")))
      assert.strictEqual(error._tag, "QmpConnectError")
      assert.strictEqual(error.reason, "Open")
      assert.include(error.detail, "ENOENT")
    }), TIMEOUT)
})

describe.skipIf(!hasQemu)("QmpClient file-descriptor passing", () => {
  it.scopedLive("getfd and add-fd pass a descriptor with SCM_RIGHTS (FdQmpTransport)", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connectFd(qemu.qmpPath)
      const file = Path.join(qemu.dir, "passed.bin")
      Fs.writeFileSync(file, "x")
      const fd = yield* Effect.acquireRelease(Effect.sync(() => Fs.openSync(file, "r+")), (fd) =>
        Effect.sync(() => Fs.closeSync(fd)))

      yield* QmpClient.getfd("backup", fd).pipe(withClient(client))
      yield* QmpClient.closefd("backup").pipe(withClient(client))
      const missing = yield* Effect.flip(QmpClient.closefd("backup").pipe(withClient(client)))
      assert.strictEqual(missing._tag, "QmpCommandError")
      if (missing._tag === "QmpCommandError") {
        assert.strictEqual(missing.errorClass, "GenericError")
        assert.include(missing.desc, "backup")
      }

      // add-fd tells which descriptor number QEMU got: it must point at our file.
      const added = yield* QmpClient.addFd(fd, { opaque: "vzdump-test" }).pipe(withClient(client))
      assert.strictEqual(Fs.readlinkSync(`/proc/${qemu.pid}/fd/${added.fd}`), file)
      const sets = yield* QmpClient.queryFdsets().pipe(withClient(client))
      const set = sets.find((s) => s["fdset-id"] === added["fdset-id"])
      assert.deepStrictEqual(set?.fds, [{ fd: added.fd, opaque: "vzdump-test" }])
      yield* QmpClient.removeFd(added["fdset-id"]).pipe(withClient(client))

      // Ordinary commands and events work over this transport too.
      const events = yield* client.subscribe
      yield* QmpClient.cont().pipe(withClient(client))
      yield* QmpClient.awaitEvent(events, QmpClient.isEvent("RESUME"), "10 seconds")
      assert.strictEqual((yield* QmpClient.queryStatus().pipe(withClient(client))).status, "running")

      // And the end of the connection is seen as with the plain transport.
      yield* QmpClient.quit().pipe(withClient(client))
      const closed = yield* client.closed.pipe(Effect.timeout("10 seconds"))
      assert.strictEqual(closed._tag, "QmpClosedError")
      if (closed._tag === "QmpClosedError") assert.strictEqual(closed.reason, "PeerClosed")
      assert.strictEqual((yield* Effect.flip(client.execute("query-status")))._tag, "QmpClosedError")
    }), TIMEOUT)

  it.scopedLive("getfd without a descriptor: No file descriptor supplied via SCM_RIGHTS", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connectFd(qemu.qmpPath)
      const error = yield* Effect.flip(client.execute("getfd", { fdname: "backup" }))
      assert.strictEqual(error._tag, "QmpCommandError")
      if (error._tag === "QmpCommandError") {
        assert.strictEqual(error.errorClass, "GenericError")
        assert.strictEqual(error.desc, "No file descriptor supplied via SCM_RIGHTS")
      }
    }), TIMEOUT)

  it.scopedLive("the plain transport refuses to send descriptors with a typed error", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu()
      const client = yield* connect(qemu.qmpPath)
      const error = yield* Effect.flip(QmpClient.getfd("backup", 0).pipe(withClient(client)))
      assert.strictEqual(error._tag, "QmpTransportError")
      if (error._tag === "QmpTransportError") assert.strictEqual(error.reason, "FdPassingUnsupported")
      // The connection is still fine.
      assert.strictEqual((yield* QmpClient.queryStatus().pipe(withClient(client))).status, "prelaunch")
    }), TIMEOUT)

  it.scopedLive("FdQmpTransport: missing path and TCP addresses fail with QmpConnectError", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const missing = yield* Effect.flip(connectFd(Path.join(dir, "absent.sock")))
      assert.strictEqual(missing.reason, "Open")
      const tcp = yield* Effect.flip(connectFd(QmpTransport.tcp("127.0.0.1", 1)))
      assert.strictEqual(tcp.reason, "Unsupported")
    }), TIMEOUT)
})

describe("QmpClient against misbehaving peers", () => {
  const answerCapabilities = (line: string, connection: { write: (text: string) => void }) => {
    if (commandOf(line) === "qmp_capabilities") {
      connection.write(`{"return": {}, "id": ${JSON.stringify(idOf(line))}}\r\n`)
      return true
    }
    return false
  }

  it.scopedLive("malformed JSON fails pending and later commands with QmpProtocolError and closes", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const peer = yield* fakePeer(Path.join(dir, "qmp.sock"), {
        greeting: qemuGreeting,
        onLine: (line, connection) => {
          if (!answerCapabilities(line, connection)) connection.write("{\"return\": {oops}}\r\n")
        }
      })
      const client = yield* connect(peer.path)
      const error = yield* Effect.flip(client.execute("query-status"))
      assert.strictEqual(error._tag, "QmpProtocolError")
      if (error._tag === "QmpProtocolError") assert.strictEqual(error.reason, "MalformedJson")
      const later = yield* Effect.flip(client.execute("query-version"))
      assert.strictEqual(later._tag, "QmpProtocolError")
      assert.strictEqual((yield* client.closed)._tag, "QmpProtocolError")
      // The client dropped the connection.
      yield* Effect.sleep("100 millis").pipe(Effect.repeat({ until: () => peer.stats.closed === 1, times: 50 }))
      assert.strictEqual(peer.stats.closed, 1)
    }), TIMEOUT)

  it.scopedLive("a connection closed in the middle of a reply fails the command with QmpClosedError", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const peer = yield* fakePeer(Path.join(dir, "qmp.sock"), {
        greeting: qemuGreeting,
        onLine: (line, connection) => {
          if (answerCapabilities(line, connection)) return
          connection.write(`{"return": {"status": "running", "running": true}, "id": ${idOf(line)}`)
          connection.close()
        }
      })
      const client = yield* connect(peer.path)
      const error = yield* Effect.flip(client.execute("query-status"))
      assert.strictEqual(error._tag, "QmpClosedError")
      if (error._tag === "QmpClosedError") {
        assert.strictEqual(error.reason, "PeerClosed")
        assert.include(error.detail, "middle of a message")
      }
    }), TIMEOUT)

  it.scopedLive("a peer that never greets fails the handshake with a timeout", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const peer = yield* fakePeer(Path.join(dir, "qmp.sock"), {})
      const [error, ms] = yield* elapsed(Effect.flip(connect(peer.path, { handshakeTimeout: "500 millis" })))
      assert.strictEqual(error.reason, "Timeout")
      assert.isAtLeast(ms, 450)
      assert.isBelow(ms, 5000)
    }), TIMEOUT)

  it.scopedLive("a peer that is not QMP fails the handshake", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const peer = yield* fakePeer(Path.join(dir, "qmp.sock"), { greeting: "SSH-2.0-OpenSSH_9.2\r\n" })
      const error = yield* Effect.flip(connect(peer.path))
      assert.strictEqual(error.reason, "Handshake")
      assert.include(error.detail, "MalformedJson")
    }), TIMEOUT)

  it.scopedLive("a line longer than maxLineBytes breaks the connection", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const peer = yield* fakePeer(Path.join(dir, "qmp.sock"), {
        greeting: qemuGreeting,
        onLine: (line, connection) => {
          if (!answerCapabilities(line, connection)) connection.write(`{"return": "${"x".repeat(4096)}`)
        }
      })
      const client = yield* connect(peer.path, { maxLineBytes: 1024 })
      const error = yield* Effect.flip(client.execute("query-status"))
      assert.strictEqual(error._tag, "QmpProtocolError")
      if (error._tag === "QmpProtocolError") assert.strictEqual(error.reason, "LineTooLong")
    }), TIMEOUT)
})
