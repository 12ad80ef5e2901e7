/**
 * Boots the test guest under QEMU TCG (specs/stock-qemu.md §2, §9.1, §9.3) in a `Scope`: QMP socket,
 * qemu-ga chardev on a virtio-serial port, an ext4 disk on virtio-blk, serial console to a file.
 * The finalizer kills QEMU by PID (SIGTERM, then SIGKILL) and removes the run directory.
 *
 * @since 0.1.0
 */
import { spawn } from "node:child_process"
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs"
import { join } from "node:path"
import type { Scope } from "effect"
import { Duration, Effect } from "effect"
import { buildGuest, type GuestImage, READY_MARKER } from "./build.js"
import { attempt, GuestError } from "./command.js"
import { type DiskFormat, type GuestDisk, makeGuestDisk } from "./disk.js"

/**
 * Options of {@link bootGuest}.
 *
 * @since 0.1.0
 * @category models
 */
export interface BootGuestOptions {
  /** Kernel + initramfs; default: {@link buildGuest} with its default cache. */
  readonly image?: GuestImage
  /** Existing disk image for `/dev/vda` (kept after the scope closes); default: a new ext4 image in the run dir. */
  readonly disk?: GuestDisk
  /** Size of the default disk in MiB (default 64). */
  readonly diskSizeMiB?: number
  /** Format of the default disk (default raw). */
  readonly diskFormat?: DiskFormat
  /** Start the guest's writer loop (`writer=1`): a numbered line to `/mnt/log.txt` every 0.2 s. */
  readonly writer?: boolean
  /** Start QEMU with `-S` (paused until QMP `cont`); then readiness is not awaited. */
  readonly paused?: boolean
  /** Wait for {@link READY_MARKER} before returning (default: `!paused`). */
  readonly awaitReady?: boolean
  /** Readiness timeout (default 90 s). */
  readonly readyTimeout?: Duration.DurationInput
  /** Guest memory in MiB (default 512). */
  readonly memoryMiB?: number
  /** Extra kernel command-line parameters. */
  readonly append?: ReadonlyArray<string>
  /** Extra QEMU arguments, appended last. */
  readonly extraArgs?: ReadonlyArray<string>
}

/**
 * How QEMU ended.
 *
 * @since 0.1.0
 * @category models
 */
export interface GuestExit {
  readonly code: number | null
  readonly signal: NodeJS.Signals | null
}

/**
 * A running test guest.
 *
 * @since 0.1.0
 * @category models
 */
export interface Guest {
  readonly pid: number
  /** Per-VM run directory (mkdtemp under /tmp), removed by the finalizer. */
  readonly rundir: string
  readonly qmpSocket: string
  readonly qgaSocket: string
  readonly diskPath: string
  readonly disk: GuestDisk
  /** The full QEMU command line (without the binary). */
  readonly args: ReadonlyArray<string>
  /** Everything the guest printed on its serial console so far. */
  readonly serialLog: () => string
  /** QEMU's own stdout/stderr so far. */
  readonly qemuLog: () => string
  /** The exit status once QEMU has exited. */
  readonly exitStatus: () => GuestExit | undefined
  /** Waits for a serial-console match; fails if QEMU exits first or on timeout. Returns the match. */
  readonly waitForSerial: (
    pattern: string | RegExp,
    timeout?: Duration.DurationInput
  ) => Effect.Effect<string, GuestError>
  /** Waits for {@link READY_MARKER}; returns milliseconds since QEMU was started. */
  readonly awaitReady: (timeout?: Duration.DurationInput) => Effect.Effect<number, GuestError>
  /** Waits for QEMU to exit by itself (e.g. after `system_powerdown`). */
  readonly awaitExit: (timeout?: Duration.DurationInput) => Effect.Effect<GuestExit, GuestError>
}

const QEMU = "qemu-system-x86_64"

/** Escapes a value for QEMU's comma-separated option syntax. */
const optValue = (value: string): string => value.replace(/,/g, ",,")

const tail = (text: string, lines = 15): string => text.trimEnd().split("\n").slice(-lines).join("\n")

/**
 * The QEMU command line for the guest (without the binary).
 *
 * @since 0.1.0
 * @category utils
 */
export const guestArgs = (params: {
  readonly image: GuestImage
  readonly disk: GuestDisk
  readonly rundir: string
  readonly writer: boolean
  readonly paused: boolean
  readonly memoryMiB: number
  readonly append: ReadonlyArray<string>
  readonly extraArgs: ReadonlyArray<string>
}): Array<string> => {
  const append = ["console=ttyS0", "panic=-1", "quiet", ...(params.writer ? ["writer=1"] : []), ...params.append]
  return [
    ...(params.paused ? ["-S"] : []),
    "-machine",
    "q35,accel=tcg",
    "-m",
    String(params.memoryMiB),
    "-smp",
    "1",
    "-nodefaults",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    params.image.kernel,
    "-initrd",
    params.image.initrd,
    "-append",
    append.join(" "),
    "-chardev",
    `file,id=serial0,path=${optValue(join(params.rundir, "serial.log"))}`,
    "-serial",
    "chardev:serial0",
    "-qmp",
    `unix:${optValue(join(params.rundir, "qmp.sock"))},server=on,wait=off`,
    "-blockdev",
    `driver=file,filename=${optValue(params.disk.path)},node-name=file-virtio0,discard=unmap`,
    "-blockdev",
    `driver=${params.disk.format},file=file-virtio0,node-name=drive-virtio0,discard=unmap`,
    "-device",
    "virtio-blk-pci,drive=drive-virtio0,id=virtio0",
    "-chardev",
    `socket,path=${optValue(join(params.rundir, "qga.sock"))},server=on,wait=off,id=qga0`,
    "-device",
    "virtio-serial-pci",
    "-device",
    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ...params.extraArgs
  ]
}

const readText = (path: string): string => {
  try {
    return readFileSync(path, "utf8")
  } catch {
    return ""
  }
}

/**
 * Boots the test guest and, unless paused, waits until it prints {@link READY_MARKER} (qemu-ga is
 * listening; with `writer` the first log line is written). QEMU lives as long as the `Scope`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const bootGuest = (options: BootGuestOptions = {}): Effect.Effect<Guest, GuestError, Scope.Scope> =>
  Effect.gen(function*() {
    const image = options.image ?? (yield* buildGuest())
    const paused = options.paused ?? false
    const rundir = yield* Effect.acquireRelease(
      attempt("Boot", "create run dir", () => mkdtempSync("/tmp/vzg-")),
      (dir) => Effect.sync(() => rmSync(dir, { recursive: true, force: true }))
    )
    const disk = options.disk ?? (yield* makeGuestDisk({
      path: join(rundir, (options.diskFormat ?? "raw") === "raw" ? "disk0.raw" : "disk0.qcow2"),
      sizeMiB: options.diskSizeMiB ?? 64,
      format: options.diskFormat ?? "raw",
      label: "vzdump-test"
    }))
    const args = guestArgs({
      image,
      disk,
      rundir,
      writer: options.writer ?? false,
      paused,
      memoryMiB: options.memoryMiB ?? 512,
      append: options.append ?? [],
      extraArgs: options.extraArgs ?? []
    })
    const serialPath = join(rundir, "serial.log")
    const qemuLogPath = join(rundir, "qemu.log")
    const qmpSocket = join(rundir, "qmp.sock")
    const qgaSocket = join(rundir, "qga.sock")

    let exitInfo: GuestExit | undefined
    const { child, exited, startedAt } = yield* Effect.acquireRelease(
      attempt("Boot", `start ${QEMU}`, () => {
        const out = openSync(qemuLogPath, "a")
        try {
          const child = spawn(QEMU, args, { cwd: rundir, stdio: ["ignore", out, out] })
          const exited = new Promise<GuestExit>((resolve) => {
            child.once("exit", (code, signal) => {
              exitInfo = { code, signal }
              resolve(exitInfo)
            })
            child.once("error", () => {
              exitInfo = { code: null, signal: null }
              resolve(exitInfo)
            })
          })
          return { child, exited, startedAt: Date.now() }
        } finally {
          closeSync(out)
        }
      }),
      ({ child, exited }) =>
        Effect.promise(async () => {
          if (exitInfo !== undefined || child.pid === undefined) return
          process.kill(child.pid, "SIGTERM")
          const grace = new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 5000).unref())
          const stopped = await Promise.race([exited, grace])
          if (stopped === undefined && exitInfo === undefined) {
            process.kill(child.pid, "SIGKILL")
            await exited
          }
        })
    )
    if (child.pid === undefined) {
      const exit = yield* Effect.promise(() => exited)
      return yield* new GuestError({ reason: "Boot", message: `${QEMU} did not start (${JSON.stringify(exit)})` })
    }
    const pid = child.pid

    const serialLog = () => readText(serialPath)
    const qemuLog = () => readText(qemuLogPath)
    const exitedError = () =>
      new GuestError({
        reason: "Exited",
        message: `${QEMU} exited (${JSON.stringify(exitInfo)})\nqemu: ${tail(qemuLog())}\nserial:\n${
          tail(serialLog())
        }`
      })

    const waitFor = <A>(
      what: string,
      check: () => A | undefined,
      timeout: Duration.DurationInput
    ): Effect.Effect<A, GuestError> =>
      Effect.gen(function*() {
        while (true) {
          const found = check()
          if (found !== undefined) return found
          if (exitInfo !== undefined) return yield* exitedError()
          yield* Effect.sleep("100 millis")
        }
      }).pipe(Effect.timeoutFail({
        duration: timeout,
        onTimeout: () =>
          new GuestError({
            reason: "Timeout",
            message: `timed out after ${Duration.format(timeout)} waiting for ${what}\nserial:\n${tail(serialLog())}`
          })
      }))

    const waitForSerial = (pattern: string | RegExp, timeout: Duration.DurationInput = "90 seconds") =>
      waitFor(`${pattern} on the serial console`, () => {
        const log = serialLog()
        if (typeof pattern === "string") return log.includes(pattern) ? pattern : undefined
        return pattern.exec(log)?.[0]
      }, timeout)

    const awaitReady = (timeout: Duration.DurationInput = options.readyTimeout ?? "90 seconds") =>
      Effect.map(waitForSerial(READY_MARKER, timeout), () => Date.now() - startedAt)

    const awaitExit = (timeout: Duration.DurationInput = "60 seconds") =>
      Effect.promise(() => exited).pipe(Effect.timeoutFail({
        duration: timeout,
        onTimeout: () =>
          new GuestError({
            reason: "Timeout",
            message: `QEMU did not exit within ${Duration.format(timeout)}\nserial:\n${tail(serialLog())}`
          })
      }))

    // the sockets exist once QEMU has parsed its options; wait for them so callers can connect at once
    const sockets = () => existsSync(qmpSocket) && existsSync(qgaSocket) || undefined
    yield* waitFor("QMP and QGA sockets", sockets, "30 seconds")

    const guest: Guest = {
      pid,
      rundir,
      qmpSocket,
      qgaSocket,
      diskPath: disk.path,
      disk,
      args,
      serialLog,
      qemuLog,
      exitStatus: () => exitInfo,
      waitForSerial,
      awaitReady,
      awaitExit
    }
    if (options.awaitReady ?? !paused) {
      const millis = yield* awaitReady()
      yield* Effect.logDebug(`test guest ready after ${millis} ms`)
    }
    return guest
  }).pipe(Effect.withSpan("guest.bootGuest"))
