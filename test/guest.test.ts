/**
 * The TCG test guest (test/utils/guest): build, boot, qemu-ga over a raw socket, a real fsfreeze inside
 * the guest, and a clean ACPI power-off leaving a consistent ext4 image.
 */
import { execFile } from "node:child_process"
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from "node:fs"
import { createConnection, type Socket } from "node:net"
import { join } from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Data, Duration, Effect } from "effect"
import { bootGuest } from "./utils/guest/boot.js"
import { buildGuest, READY_MARKER } from "./utils/guest/build.js"
import { checkExt4, imageInfo, makeGuestDisk } from "./utils/guest/disk.js"

class RawSocketError extends Data.TaggedError("RawSocketError")<{ readonly message: string }> {}

/** A byte-level view of a Unix socket: just enough for line-based QGA and QMP, no client library. */
interface RawConnection {
  readonly send: (data: Buffer | string) => Effect.Effect<void>
  /** The next `\n`-terminated line; with `afterDelimiter`, first discards everything up to a 0xFF byte. */
  readonly readLine: (options?: { readonly afterDelimiter?: boolean }) => Effect.Effect<string, RawSocketError>
  /** The byte that preceded the last line read with `afterDelimiter` (must be 0xFF). */
  readonly lastDelimiter: () => number | undefined
}

const connectRaw = (path: string, timeout: Duration.DurationInput = "10 seconds") =>
  Effect.gen(function*() {
    const socket = yield* Effect.acquireRelease(
      Effect.async<Socket, RawSocketError>((resume) => {
        const s = createConnection({ path })
        s.once("connect", () => resume(Effect.succeed(s)))
        s.once("error", (e) => resume(Effect.fail(new RawSocketError({ message: `connect ${path}: ${e.message}` }))))
      }),
      (s) => Effect.sync(() => s.destroy())
    )
    let buffer = Buffer.alloc(0)
    let closed = false
    let wake: (() => void) | undefined
    let delimiter: number | undefined
    socket.on("data", (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk])
      wake?.()
    })
    socket.on("close", () => {
      closed = true
      wake?.()
    })
    socket.on("error", () => {})
    const nextData = Effect.async<void>((resume) => {
      wake = () => {
        wake = undefined
        resume(Effect.void)
      }
    })
    const readLine = (options?: { readonly afterDelimiter?: boolean }) =>
      Effect.gen(function*() {
        let seenDelimiter = !(options?.afterDelimiter ?? false)
        while (true) {
          if (!seenDelimiter) {
            const at = buffer.indexOf(0xff)
            if (at >= 0) {
              delimiter = buffer[at]
              buffer = buffer.subarray(at + 1)
              seenDelimiter = true
            } else {
              buffer = Buffer.alloc(0)
            }
          }
          if (seenDelimiter) {
            const nl = buffer.indexOf(0x0a)
            if (nl >= 0) {
              const line = buffer.subarray(0, nl).toString("utf8").trim()
              buffer = buffer.subarray(nl + 1)
              if (line.length > 0) return line
              continue
            }
          }
          if (closed) return yield* new RawSocketError({ message: `${path} closed` })
          yield* nextData
        }
      }).pipe(Effect.timeoutFail({
        duration: timeout,
        onTimeout: () => new RawSocketError({ message: `no reply on ${path} within ${Duration.format(timeout)}` })
      }))
    const send = (data: Buffer | string) =>
      Effect.async<void>((resume) => {
        socket.write(data, () => resume(Effect.void))
      })
    return { send, readLine, lastDelimiter: () => delimiter } satisfies RawConnection
  })

/** One guest-agent command on an already synchronised connection; returns the parsed reply. */
const qga = (conn: RawConnection, execute: string, args?: object) =>
  Effect.gen(function*() {
    yield* conn.send(`${JSON.stringify(args === undefined ? { execute } : { execute, arguments: args })}\n`)
    return JSON.parse(yield* conn.readLine()) as { return?: unknown; error?: { class: string; desc: string } }
  })

/** A QMP command on a raw connection: skips events until the reply. */
const qmp = (conn: RawConnection, execute: string) =>
  Effect.gen(function*() {
    yield* conn.send(`${JSON.stringify({ execute })}\n`)
    while (true) {
      const reply = JSON.parse(yield* conn.readLine()) as { return?: unknown; error?: unknown; event?: string }
      if (reply.event === undefined) return reply
    }
  })

const isAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

const elapsed = (start: bigint) => Number(process.hrtime.bigint() - start) / 1e6

const hostText = (file: string, args: ReadonlyArray<string>) =>
  Effect.async<string, RawSocketError>((resume) => {
    execFile(file, [...args], { encoding: "utf8" }, (error, stdout, stderr) =>
      resume(
        error === null
          ? Effect.succeed(stdout)
          : Effect.fail(new RawSocketError({ message: `${file}: ${error.message} ${stderr}` }))
      ))
  })

describe("test guest", () => {
  it.scopedLive("builds once and reuses the cache", () =>
    Effect.gen(function*() {
      const cacheDir = mkdtempSync("/tmp/vzg-cache-")
      yield* Effect.addFinalizer(() => Effect.sync(() => rmSync(cacheDir, { recursive: true, force: true })))
      const start = process.hrtime.bigint()
      const first = yield* buildGuest(cacheDir)
      const buildMs = elapsed(start)
      const second = yield* buildGuest(cacheDir)
      assert.isFalse(first.fromCache)
      assert.isTrue(second.fromCache)
      assert.strictEqual(second.key, first.key)
      assert.strictEqual(second.initrd, first.initrd)
      assert.isTrue(existsSync(first.kernel))
      assert.isTrue(first.libraries.includes("/lib64/ld-linux-x86-64.so.2"))
      assert.isTrue(first.libraries.some((l) => l.endsWith("/libglib-2.0.so.0")))
      assert.strictEqual(first.modules.length, 15)
      // the archive holds /init, qemu-ga, its loader and the ext4 module
      const listing = yield* hostText("sh", ["-c", "gzip -dc \"$1\" | busybox cpio -t 2>/dev/null", "sh", first.initrd])
      for (const entry of ["init", "usr/sbin/qemu-ga", "lib64/ld-linux-x86-64.so.2", "lib/modules/ext4.ko"]) {
        assert.include(listing.split("\n"), entry)
      }
      yield* Effect.logInfo(
        `guest built in ${buildMs.toFixed(0)} ms: initrd ${first.initrdBytes} bytes, kernel ${first.kernelVersion}`
      )
    }), 60_000)

  it.scopedLive("makes raw and qcow2 ext4 images that fsck clean", () =>
    Effect.gen(function*() {
      const dir = mkdtempSync("/tmp/vzg-disk-")
      yield* Effect.addFinalizer(() => Effect.sync(() => rmSync(dir, { recursive: true, force: true })))
      const content = join(dir, "content")
      yield* Effect.sync(() => {
        mkdirSync(content)
        writeFileSync(join(content, "hello.txt"), "hello guest\n")
      })
      const raw = yield* makeGuestDisk({ path: join(dir, "a.raw"), sizeMiB: 16, contentDir: content })
      const qcow2 = yield* makeGuestDisk({ path: join(dir, "b.qcow2"), sizeMiB: 16, format: "qcow2" })
      const rawInfo = yield* imageInfo(raw.path)
      const qcowInfo = yield* imageInfo(qcow2.path)
      assert.strictEqual(rawInfo["format"], "raw")
      assert.strictEqual(rawInfo["virtual-size"], 16 * 1024 * 1024)
      assert.strictEqual(qcowInfo["format"], "qcow2")
      assert.strictEqual(qcowInfo["virtual-size"], 16 * 1024 * 1024)
      assert.strictEqual((yield* checkExt4(raw)).exitCode, 0)
      assert.strictEqual((yield* checkExt4(qcow2)).exitCode, 0)
      assert.strictEqual(yield* hostText("debugfs", ["-R", "cat /hello.txt", raw.path]), "hello guest\n")
      // a damaged superblock must be reported, so the check can fail
      yield* Effect.sync(() => {
        const fd = openSync(raw.path, "r+")
        writeSync(fd, Buffer.alloc(1024), 0, 1024, 1024)
        closeSync(fd)
      })
      assert.notStrictEqual((yield* checkExt4(raw)).exitCode, 0)
    }), 60_000)

  it.scopedLive("fails with QEMU's own message when QEMU cannot start", () =>
    Effect.gen(function*() {
      const image = yield* buildGuest()
      const error = yield* Effect.flip(Effect.scoped(bootGuest({ image, extraArgs: ["-device", "no-such-device"] })))
      assert.strictEqual(error.reason, "Exited")
      assert.include(error.message, "'no-such-device' is not a valid device model name")
    }), 60_000)

  it.scopedLive("kills QEMU and removes the run dir when the scope closes", () =>
    Effect.gen(function*() {
      const image = yield* buildGuest()
      const { pid, rundir, args } = yield* Effect.scoped(Effect.gen(function*() {
        const guest = yield* bootGuest({ image, paused: true })
        assert.isTrue(isAlive(guest.pid))
        assert.isTrue(existsSync(guest.qmpSocket))
        assert.isTrue(existsSync(guest.qgaSocket))
        assert.isUndefined(guest.exitStatus())
        return guest
      }))
      assert.isFalse(isAlive(pid))
      assert.isFalse(existsSync(rundir))
      assert.isTrue(rundir.length < 40)
      assert.include(args, "-S")
      assert.include(args, "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
    }), 60_000)

  it.scopedLive("boots paused, answers qemu-ga, freezes and thaws /mnt, powers off cleanly", () =>
    Effect.gen(function*() {
      const image = yield* buildGuest()
      const guest = yield* bootGuest({ image, writer: true, paused: true })

      // --- started with -S: QMP (raw socket) shows prelaunch; `cont` boots the guest
      const monitor = yield* connectRaw(guest.qmpSocket)
      assert.include(yield* monitor.readLine(), "\"QMP\"")
      assert.deepStrictEqual(yield* qmp(monitor, "qmp_capabilities"), { return: {} })
      const status = (yield* qmp(monitor, "query-status")).return as { status: string; running: boolean }
      assert.strictEqual(status.status, "prelaunch")
      assert.isFalse(status.running)
      assert.notInclude(guest.serialLog(), READY_MARKER)
      const bootStart = process.hrtime.bigint()
      assert.deepStrictEqual(yield* qmp(monitor, "cont"), { return: {} })
      yield* guest.awaitReady("90 seconds")
      const bootMs = elapsed(bootStart)

      const serial = guest.serialLog()
      assert.include(serial, READY_MARKER)
      assert.include(serial, "mounted /dev/vda on /mnt type ext4")
      assert.match(serial, /qemu-ga started pid=\d+ port=\/dev\/vport\dp\d/)
      assert.include(serial, "writer: line 1 written")

      // --- guest agent over a raw socket
      const agent = yield* connectRaw(guest.qgaSocket)
      yield* agent.send(
        Buffer.concat([Buffer.from([0xff]), Buffer.from(`{"execute":"guest-sync-delimited","arguments":{"id":7}}\n`)])
      )
      const sync = yield* agent.readLine({ afterDelimiter: true })
      assert.strictEqual(agent.lastDelimiter(), 0xff)
      assert.deepStrictEqual(JSON.parse(sync), { return: 7 })
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-status"), { return: "thawed" })

      const fsinfo = (yield* qga(agent, "guest-get-fsinfo")).return as Array<{
        mountpoint: string
        type: string
        disk: Array<{ dev?: string; "bus-type": string }>
      }>
      const mnt = fsinfo.filter((fs) => fs.mountpoint === "/mnt")
      assert.strictEqual(mnt.length, 1)
      assert.strictEqual(mnt[0]!.type, "ext4")
      assert.strictEqual(mnt[0]!.disk[0]?.dev, "/dev/vda")
      assert.strictEqual(mnt[0]!.disk[0]?.["bus-type"], "virtio")

      // --- the freeze window a backup would cause: freeze, then thaw at once
      const freezeStart = process.hrtime.bigint()
      const frozen = yield* qga(agent, "guest-fsfreeze-freeze")
      const freezeMs = elapsed(freezeStart)
      const thawStart = process.hrtime.bigint()
      const thawed = yield* qga(agent, "guest-fsfreeze-thaw")
      const thawMs = elapsed(thawStart)
      const windowMs = elapsed(freezeStart)
      assert.deepStrictEqual(frozen, { return: 1 })
      assert.deepStrictEqual(thawed, { return: 1 })
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-status"), { return: "thawed" })

      // --- a held freeze: status is frozen and the writer is blocked until the thaw
      yield* Effect.sleep("1 second")
      const holdMs = 1500
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-freeze"), { return: 1 })
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-status"), { return: "frozen" })
      yield* Effect.sleep(Duration.millis(holdMs))
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-status"), { return: "frozen" })
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-thaw"), { return: 1 })
      assert.deepStrictEqual(yield* qga(agent, "guest-fsfreeze-status"), { return: "thawed" })
      yield* Effect.sleep("1 second")

      // --- clean power-off through ACPI (QMP system_powerdown)
      assert.deepStrictEqual(yield* qmp(monitor, "system_powerdown"), { return: {} })
      const exit = yield* guest.awaitExit("60 seconds")
      assert.deepStrictEqual(exit, { code: 0, signal: null })
      assert.include(guest.serialLog(), "unmounted /mnt")

      const fsck = yield* checkExt4(guest.disk)
      assert.strictEqual(fsck.exitCode, 0, fsck.output)

      // the log the writer left on the disk: consecutive numbers, one gap spanning the held freeze
      const log = yield* hostText("debugfs", ["-R", "cat /log.txt", guest.diskPath])
      const lines = log.trim().split("\n").map((line) => line.split(" ").map(Number))
      assert.isAtLeast(lines.length, 8, log)
      lines.forEach((fields, i) => assert.strictEqual(fields[0], i + 1))
      const gaps = lines.slice(1).map((fields, i) => fields[2]! - lines[i]![2]!)
      const longest = Math.max(...gaps)
      const blocked = gaps.filter((gap) => gap >= (holdMs - 300) / 1000)
      assert.strictEqual(blocked.length, 1, `gaps of at least ${holdMs - 300} ms: ${blocked.join(", ")}\n${log}`)
      assert.isAbove(gaps.indexOf(longest), 0)
      assert.isBelow(gaps.indexOf(longest), gaps.length - 1)

      yield* Effect.logInfo(
        `boot ${bootMs.toFixed(0)} ms; freeze rpc ${freezeMs.toFixed(1)} ms, thaw rpc ${thawMs.toFixed(1)} ms, ` +
          `freeze window ${windowMs.toFixed(1)} ms; held freeze gap ${longest.toFixed(2)} s over ${lines.length} lines`
      )
    }), 180_000)
})
