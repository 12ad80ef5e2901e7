/**
 * The backup workflow with a real guest: the TCG test guest (kernel + busybox initramfs + qemu-ga, an
 * ext4 disk on virtio-blk) started by the standalone host profile through the config's `args:` line.
 * Real fs-freeze/thaw, a real ACPI shutdown for `stop` mode, and a guest that fills the fleece.
 */
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, Fiber } from "effect"
import { mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { randomBytes } from "node:crypto"
import * as Fs from "node:fs/promises"
import * as BackupJob from "@vzdump/core/BackupJob"
import { MemoryStore } from "@vzdump/core/BackupTarget"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import {
  engineLeftovers,
  makeRecorder,
  makeTestHost,
  run,
  runState,
  startVm,
  stopOnExit,
  type TestHost,
  testLayer
} from "./utils/env.js"
import { buildGuest, READY_MARKER } from "./utils/guest/build.js"
import { checkExt4, makeGuestDisk } from "./utils/guest/disk.js"

/** Task-log lines without the `YYYY-MM-DD HH:MM:SS ` prefix of the per-guest log file. */
const untimed = (lines: ReadonlyArray<string>) => lines.map((line) => line.replace(/^\S+ \S+ /, ""))

/** A VM config that boots the test guest: kernel and initramfs through `args:`, the agent, an ext4 virtio0. */
const guestVm = (
  host: TestHost,
  vmid: number,
  options: { readonly writer?: boolean; readonly contentDir?: string; readonly sizeMiB?: number } = {}
) =>
  Effect.gen(function*() {
    const image = yield* buildGuest()
    const sizeMiB = options.sizeMiB ?? 32
    const disk = yield* makeGuestDisk({
      path: `${host.dir}/vm${vmid}-disk0.raw`,
      sizeMiB,
      label: "vzdump-test",
      ...(options.contentDir !== undefined ? { contentDir: options.contentDir } : {})
    })
    const append = ["console=ttyS0", "panic=-1", "quiet", ...(options.writer === true ? ["writer=1"] : [])].join(" ")
    yield* host.writeConfig(
      vmid,
      [
        `name: guest${vmid}`,
        "memory: 256",
        "agent: 1",
        `virtio0: ${disk.path},size=${sizeMiB}M`,
        `args: -kernel ${image.kernel} -initrd ${image.initrd} -append "${append}" -no-reboot`,
        ""
      ].join("\n")
    )
    yield* host.killOnExit(vmid)
    return disk
  })

const serialLog = (host: TestHost, vmid: number) => {
  try {
    return readFileSync(`${host.runDir}/${vmid}/serial.log`, "utf8")
  } catch {
    return ""
  }
}

/** Waits for the guest's ready marker (qemu-ga listening) on the serial console. */
const awaitReady = (host: TestHost, vmid: number) =>
  Effect.gen(function*() {
    while (!serialLog(host, vmid).includes(READY_MARKER)) yield* Effect.sleep("200 millis")
  })

/** One guest-agent command on the VM's shared agent connection. */
const agent = (vmid: number, command: string, args?: object) =>
  Effect.scoped(
    Effect.flatMap(Hypervisor, (hypervisor) =>
      Effect.flatMap(hypervisor.guestAgent(vmid), (qga) => qga.execute(command, args, { timeout: "20 seconds" })))
  )

/** Starts `sh -c script` in the guest (`guest-exec`); returns the guest PID. */
const guestSpawn = (vmid: number, script: string) =>
  Effect.map(
    agent(vmid, "guest-exec", { path: "/bin/sh", arg: ["-c", script], "capture-output": true }),
    (reply) => (reply as { pid: number }).pid
  )

/** Waits for a `guest-exec` process; returns its exit code and standard output. */
const guestWait = (vmid: number, pid: number, timeout: Duration.DurationInput = "60 seconds") =>
  Effect.gen(function*() {
    while (true) {
      const status = (yield* agent(vmid, "guest-exec-status", { pid })) as {
        exited: boolean
        exitcode?: number
        "out-data"?: string
      }
      if (status.exited) {
        return { exitcode: status.exitcode, out: Buffer.from(status["out-data"] ?? "", "base64").toString("utf8") }
      }
      yield* Effect.sleep("200 millis")
    }
  }).pipe(Effect.timeoutFail({ duration: timeout, onTimeout: () => new Error(`guest process ${pid} still running`) }))

/** Writes an archived disk to a file and runs `e2fsck -fn` on it. */
const fsckArchived = (host: TestHost, name: string, data: Uint8Array) =>
  Effect.gen(function*() {
    const path = `${host.dir}/${name}`
    yield* Effect.promise(() => Fs.writeFile(path, data))
    return { path, fsck: yield* checkExt4({ path, format: "raw" }) }
  })

/** The writer's `/mnt/log.txt` lines: `<n> <epoch> <uptime>`. */
const logLines = (text: string) =>
  text.trim().split("\n").filter((line) => line.length > 0).map((line) => line.split(" ").map(Number))

describe("backup workflow with the TCG test guest (memory target)", () => {
  it.scopedLive("snapshot mode freezes the guest's filesystems around the job start and thaws them", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      yield* guestVm(host, 301, { writer: true })
      const recorder = makeRecorder()
      let duringJobStart: unknown
      // logged after the freeze and before the job starts: the freeze window
      recorder.on(
        "starting backup via QMP command",
        Effect.map(agent(301, "guest-fsfreeze-status"), (status) => (duringJobStart = status))
      )
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(301)
        yield* startVm(301)
        yield* awaitReady(host, 301).pipe(Effect.timeout("90 seconds"))
        const before = yield* agent(301, "guest-fsfreeze-status")
        const result = yield* BackupJob.backupVm({ vmid: 301 })
        const after = yield* agent(301, "guest-fsfreeze-status")
        const state = yield* runState(301)
        yield* Effect.sleep("1 second")
        const live = yield* guestSpawn(301, "cat /mnt/log.txt").pipe(Effect.flatMap((pid) => guestWait(301, pid)))
        const store = [...(yield* MemoryStore)]
        return { before, result, after, state, live, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))

      assert.strictEqual(out.before, "thawed")
      assert.strictEqual(duringJobStart, "frozen", "frozen while the job starts")
      assert.strictEqual(out.after, "thawed", "thawed after the backup")
      assert.strictEqual(out.state, "running")

      const lines = untimed(out.result.logLines)
      const at = (text: string) => lines.indexOf(text)
      const windowLine = /^INFO: guest filesystems were frozen for \d+\.\d{3} seconds$/
      const window = lines.findIndex((line) => windowLine.test(line))
      const startedTask = lines.findIndex((line) => line.startsWith("INFO: started backup task"))
      assert.isAbove(at("INFO: issuing guest-agent 'fs-freeze' command"), 0)
      assert.isAbove(at("INFO: starting backup via QMP command"), at("INFO: issuing guest-agent 'fs-freeze' command"))
      assert.isAbove(at("INFO: issuing guest-agent 'fs-thaw' command"), at("INFO: starting backup via QMP command"))
      assert.strictEqual(window, at("INFO: issuing guest-agent 'fs-thaw' command") + 1)
      assert.strictEqual(startedTask, window + 1)
      assert.strictEqual(lines[startedTask + 1], "INFO: resuming VM again")
      const seconds = out.result.freezeSeconds
      assert.isDefined(seconds)
      assert.isAbove(seconds!, 0)
      assert.isBelow(seconds!, 10)

      // the archive is a consistent ext4 image holding a prefix of the log the guest kept writing
      const archived = yield* fsckArchived(host, "archived-301.raw", out.store[0]!.disks[0]!)
      assert.strictEqual(archived.fsck.exitCode, 0, archived.fsck.output)
      const { stdout } = yield* Effect.promise(() => run("debugfs", ["-R", "cat /log.txt", archived.path]))
      const frozenLog = logLines(stdout)
      const liveLog = logLines(out.live.out)
      assert.strictEqual(out.live.exitcode, 0)
      assert.isAtLeast(frozenLog.length, 1)
      frozenLog.forEach((fields, i) => assert.strictEqual(fields[0], i + 1))
      assert.isAbove(liveLog.length, frozenLog.length, "the guest kept writing after the thaw")
      assert.deepStrictEqual(liveLog.slice(0, frozenLog.length), frozenLog)
      yield* Effect.logInfo(
        `freeze window: ${seconds!.toFixed(3)} s (log: ${lines[window]}); archived log has ${frozenLog.length} ` +
          `of ${liveLog.length} lines`
      )
    }), 180_000)

  it.scopedLive("stop mode: ACPI shutdown, backup, guest started again; also after a failed backup", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      yield* guestVm(host, 302, { writer: true })
      const recorder = makeRecorder()
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(302)
        yield* startVm(302)
        yield* awaitReady(host, 302).pipe(Effect.timeout("90 seconds"))
        const result = yield* BackupJob.backupVm({ vmid: 302, mode: "stop", stopwait: 1 })
        const state = yield* runState(302)
        // the guest boots again (the serial log starts afresh with the new QEMU)
        yield* awaitReady(host, 302).pipe(Effect.timeout("90 seconds"))
        const agentAgain = yield* agent(302, "guest-fsfreeze-status")
        const store = [...(yield* MemoryStore)]
        // a second stop-mode backup, interrupted once the guest is down: it is started again (fix #3369)
        const reached = yield* Deferred.make<void>()
        recorder.on(
          "starting kvm to execute backup task",
          Effect.zipRight(Deferred.succeed(reached, undefined), Effect.never)
        )
        const mark = recorder.lines().length
        const fiber = yield* Effect.fork(BackupJob.backupVm({ vmid: 302, mode: "stop", stopwait: 1 }))
        yield* Deferred.await(reached)
        const exit = yield* Fiber.interrupt(fiber)
        const restarted = yield* runState(302)
        const second = recorder.lines().slice(mark)
        return { result, state, agentAgain, store, exit, restarted, second }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))

      assert.strictEqual(out.state, "running")
      assert.strictEqual(out.agentAgain, "thawed")
      const lines = untimed(out.result.logLines)
      const at = (text: string) => lines.indexOf(text)
      assert.include(lines, "INFO: status = running")
      assert.include(lines, "INFO: backup mode: stop")
      assert.isAbove(at("INFO: starting kvm to execute backup task"), at("INFO: stopping virtual guest"))
      const startedTask = lines.findIndex((line) => line.startsWith("INFO: started backup task"))
      assert.match(lines[startedTask + 1]!, /^INFO: resuming VM again after \d+ seconds$/)
      // no freeze in stop mode, and QEMU keeps running (the guest ran before)
      assert.isFalse(lines.some((line) => line.includes("fs-freeze")))
      assert.notInclude(lines, "INFO: stopping kvm after backup task")
      // the guest unmounted /mnt on the power button: the archive is clean
      const archived = yield* fsckArchived(host, "archived-302.raw", out.store[0]!.disks[0]!)
      assert.strictEqual(archived.fsck.exitCode, 0, archived.fsck.output)

      assert.isTrue(Exit.isInterrupted(out.exit))
      assert.strictEqual(out.restarted, "running", "restarted after the failed stop-mode backup")
      const restart = out.second.indexOf("INFO: restarting vm")
      assert.isAbove(restart, out.second.indexOf("INFO: aborting backup job"))
      assert.match(out.second[restart + 1]!, /^INFO: guest is online again after (<1|\d+) seconds$/)
      assert.strictEqual(out.second.at(-2), "ERROR: Backup of VM 302 failed - interrupted by signal")
      assert.notInclude(yield* host.readConfig(302), "lock:")
    }), 180_000)

  it.scopedLive("a full fleece fails the backup with a clear error and the guest runs on, not paused", () =>
    Effect.gen(function*() {
      // the fleece directory: a 2 MiB tmpfs
      const fleeceDir = yield* Effect.acquireRelease(
        Effect.promise(async () => {
          const dir = await Fs.mkdtemp("/tmp/vzf-")
          await run("mount", ["-t", "tmpfs", "-o", "size=2m", "tmpfs", dir])
          return dir
        }),
        (dir) =>
          Effect.promise(async () => {
            await run("umount", [dir])
            await Fs.rmdir(dir)
          })
      )
      const host = yield* makeTestHost({ fleeceDir })
      // an 8 MiB file the guest overwrites in place: copy-before-write needs 8 MiB of fleece
      const content = `${host.dir}/content`
      mkdirSync(content)
      writeFileSync(`${content}/big.bin`, randomBytes(8 * 1024 * 1024))
      yield* guestVm(host, 303, { contentDir: content })
      const recorder = makeRecorder()
      let writer: number | undefined
      recorder.on(
        "started backup task",
        Effect.map(
          guestSpawn(
            303,
            "dd if=/dev/urandom of=/mnt/big.bin bs=1M count=8 conv=notrunc 2>/dev/null && sync && echo done"
          ),
          (pid) => (writer = pid)
        )
      )
      const out = yield* Effect.gen(function*() {
        yield* stopOnExit(303)
        yield* startVm(303)
        yield* awaitReady(host, 303).pipe(Effect.timeout("90 seconds"))
        // 2 MiB/s over 32 MiB: the guest's writes hit the fleece long before the reader is done
        const error = yield* Effect.flip(BackupJob.backupVm({ vmid: 303, bwlimit: 2048 }))
        const state = yield* runState(303)
        const leftovers = yield* engineLeftovers(303, host)
        // the guest's write was held while QEMU was stopped; after `cont` it completes
        const written = yield* guestWait(303, writer!)
        const stateLater = yield* runState(303)
        const store = [...(yield* MemoryStore)]
        return { error, state, leftovers, written, stateLater, store }
      }).pipe(Effect.scoped, Effect.provide(testLayer(host, recorder)))

      assert.strictEqual(out.error._tag, "BackupFailed")
      assert.strictEqual(out.error.cause, "BackupEngineError")
      assert.match(out.error.message, /^fleece image ran out of space \(No space left on device\)/)
      assert.strictEqual(out.state, "running", "resumed, not left in io-error")
      assert.strictEqual(out.stateLater, "running")
      assert.deepStrictEqual(out.leftovers, { exports: [], jobs: [], nodes: [], files: [], sockets: [] })
      assert.deepStrictEqual(out.written, { exitcode: 0, out: "done\n" })
      assert.strictEqual(out.store.length, 0)
      const lines = recorder.lines()
      const failure = lines.indexOf(`ERROR: ${out.error.message}`)
      assert.isAbove(failure, 0)
      assert.strictEqual(lines[failure + 1], "INFO: aborting backup job")
      assert.include(lines, `ERROR: Backup of VM 303 failed - ${out.error.message}`)
      assert.include(yield* host.readConfig(303), "agent: 1")
      assert.notInclude(yield* host.readConfig(303), "lock:")
    }), 180_000)
})
