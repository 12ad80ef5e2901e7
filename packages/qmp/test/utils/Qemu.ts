/**
 * Test fixture: a real, paused QEMU 7.2 VM (`-S`, TCG, 64 MiB RAM, no firmware run) with two small disks and a
 * QMP socket, optionally a guest-agent chardev (with no agent behind it) and a second QMP monitor on TCP.
 *
 * `startQemu(options)` creates a short temporary directory under /tmp, writes the disks with `qemu-img` and
 * `qemu-io`, starts QEMU, waits for the QMP socket and returns a `RunningQemu`. Finalizers of the surrounding
 * scope kill the process by its PID (SIGKILL, then wait for the exit) and delete the directory.
 *
 * Disk layout (offsets and lengths in bytes, every written range is filled with one byte `pattern`):
 * - `scsi0`: qcow2, 8 MiB, node `drive-scsi0` on `file-scsi0`, on virtio-scsi + scsi-hd `scsi0`;
 *   data at 0 (1 MiB, 0x5a) and 4 MiB (512 KiB, 0xa5), the rest unallocated.
 * - `virtio1`: sparse raw, 4 MiB, node `drive-virtio1` on `file-virtio1`, on virtio-blk `virtio1`;
 *   data at 0 (256 KiB, 0x11), 2 MiB (512 KiB, 0x22) and 4 MiB - 64 KiB (64 KiB, 0x33), the rest holes.
 */
import { Deferred, Duration, Effect } from "effect"
import type { Scope } from "effect"
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"

const MiB = 1024 * 1024
const KiB = 1024

/** Whether a program runs here (`<name> --version` exits 0). */
export const hasProgram = (name: string): boolean => {
  try {
    return ChildProcess.spawnSync(name, ["--version"], { stdio: "ignore" }).status === 0
  } catch {
    return false
  }
}

/** QEMU, qemu-img and qemu-io are installed. */
export const hasQemu: boolean = hasProgram("qemu-system-x86_64") && hasProgram("qemu-img") && hasProgram("qemu-io")

/** A fresh directory under /tmp (short, for Unix socket paths), removed with everything in it by the scope. */
export const makeTempDir = (prefix = "vzq-"): Effect.Effect<string, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => Fs.mkdtempSync(Path.join("/tmp", prefix))),
    (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
  )

/** Runs a program to completion; a non-zero exit is a defect carrying its stderr. */
export const run = (file: string, args: ReadonlyArray<string>): Effect.Effect<string> =>
  Effect.async<string, Error>((resume) => {
    const child = ChildProcess.execFile(file, [...args], { encoding: "utf8" }, (error, stdout, stderr) => {
      resume(
        error
          ? Effect.fail(new Error(`${file} ${args.join(" ")} failed: ${error.message}\n${stderr}`))
          : Effect.succeed(stdout)
      )
    })
    return Effect.sync(() => {
      if (child.exitCode === null && child.pid !== undefined) process.kill(child.pid, "SIGKILL")
    })
  }).pipe(Effect.orDie)

/** A free TCP port on 127.0.0.1 (closed again before returning, so it may race; fine for tests). */
export const freePort: Effect.Effect<number> = Effect.async<number>((resume) => {
  const server = Net.createServer()
  server.listen(0, "127.0.0.1", () => {
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    server.close(() => resume(Effect.succeed(port)))
  })
})

/** A range written with one byte value. */
export interface DiskExtent {
  readonly offset: number
  readonly length: number
  readonly pattern: number
}

/** One test disk and the names QEMU knows it by. */
export interface TestDisk {
  readonly path: string
  readonly format: "qcow2" | "raw"
  readonly size: number
  /** The format node (`drive-scsi0`): the handle for block commands. */
  readonly nodeName: string
  /** The protocol (file) node under it. */
  readonly fileNodeName: string
  /** The `-device` id. */
  readonly deviceId: string
  /** `qdev` as reported by `query-block`. */
  readonly qdev: string
  /** What HMP `qemu-io -d` needs to write through the device. */
  readonly hmpDevice: string
  readonly extents: ReadonlyArray<DiskExtent>
}

/** Options of {@link startQemu}. */
export interface QemuOptions {
  /** Adds `-chardev socket` + virtio-serial + `virtserialport name=org.qemu.guest_agent.0` (no agent behind it). */
  readonly guestAgentChardev?: boolean
  /** Adds a second QMP monitor on `tcp:127.0.0.1:<free port>`. */
  readonly tcpQmp?: boolean
  /** More command-line arguments. */
  readonly extraArgs?: ReadonlyArray<string>
  /** How long to wait for the QMP socket. Default 15 seconds. */
  readonly startTimeout?: Duration.DurationInput
}

/** A started QEMU. */
export interface RunningQemu {
  readonly pid: number
  readonly dir: string
  readonly qmpPath: string
  readonly qmpTcpPort: number | undefined
  /** The guest-agent chardev socket, when asked for. */
  readonly qgaPath: string | undefined
  readonly disks: { readonly scsi0: TestDisk; readonly virtio1: TestDisk }
  /** Sends a signal to QEMU by PID (e.g. SIGSTOP/SIGCONT to freeze it, SIGKILL). */
  readonly signal: (signal: NodeJS.Signals) => Effect.Effect<void>
  /** Waits for QEMU to exit; the exit code, or the signal name. */
  readonly exited: Effect.Effect<number | string>
  /** What QEMU wrote to stderr so far. */
  readonly stderr: () => string
}

const qemuIo = (format: string, image: string, extents: ReadonlyArray<DiskExtent>) =>
  run("qemu-io", [
    "-f",
    format,
    ...extents.flatMap((e) => ["-c", `write -P 0x${e.pattern.toString(16)} ${e.offset} ${e.length}`]),
    image
  ])

/** Creates the two disks of the layout above in `dir`. */
export const makeTestDisks = (dir: string): Effect.Effect<{ readonly scsi0: TestDisk; readonly virtio1: TestDisk }> =>
  Effect.gen(function*() {
    const scsi0: TestDisk = {
      path: Path.join(dir, "disk0.qcow2"),
      format: "qcow2",
      size: 8 * MiB,
      nodeName: "drive-scsi0",
      fileNodeName: "file-scsi0",
      deviceId: "scsi0",
      qdev: "scsi0",
      hmpDevice: "scsi0",
      extents: [
        { offset: 0, length: MiB, pattern: 0x5a },
        { offset: 4 * MiB, length: 512 * KiB, pattern: 0xa5 }
      ]
    }
    const virtio1: TestDisk = {
      path: Path.join(dir, "disk1.raw"),
      format: "raw",
      size: 4 * MiB,
      nodeName: "drive-virtio1",
      fileNodeName: "file-virtio1",
      deviceId: "virtio1",
      qdev: "/machine/peripheral/virtio1/virtio-backend",
      hmpDevice: "virtio1/virtio-backend",
      extents: [
        { offset: 0, length: 256 * KiB, pattern: 0x11 },
        { offset: 2 * MiB, length: 512 * KiB, pattern: 0x22 },
        { offset: 4 * MiB - 64 * KiB, length: 64 * KiB, pattern: 0x33 }
      ]
    }
    yield* run("qemu-img", ["create", "-q", "-f", "qcow2", scsi0.path, String(scsi0.size)])
    yield* run("qemu-img", ["create", "-q", "-f", "raw", virtio1.path, String(virtio1.size)])
    yield* qemuIo("qcow2", scsi0.path, scsi0.extents)
    yield* qemuIo("raw", virtio1.path, virtio1.extents)
    return { scsi0, virtio1 }
  })

/** Polls until `path` exists, or dies after `timeout` (or when `failed` reports an early exit). */
export const waitForPath = (
  path: string,
  timeout: Duration.DurationInput,
  failed: () => string | undefined
): Effect.Effect<void> =>
  Effect.gen(function*() {
    const deadline = Date.now() + Duration.toMillis(Duration.decode(timeout))
    while (!Fs.existsSync(path)) {
      const reason = failed()
      if (reason !== undefined) return yield* Effect.dieMessage(reason)
      if (Date.now() > deadline) {
        return yield* Effect.dieMessage(`${path} did not appear within ${Duration.format(timeout)}`)
      }
      yield* Effect.sleep("25 millis")
    }
  })

/**
 * Spawns `file args` and returns the child; the scope's finalizer kills it by PID (SIGKILL) unless it has
 * exited, and waits for its exit.
 */
export const spawnScoped = (
  file: string,
  args: ReadonlyArray<string>,
  options: { readonly cwd?: string } = {}
): Effect.Effect<
  {
    readonly pid: number
    readonly exited: Effect.Effect<number | string>
    readonly exitInfo: () => string | undefined
    readonly stderr: () => string
  },
  never,
  Scope.Scope
> =>
  Effect.gen(function*() {
    const exit = yield* Deferred.make<number | string>()
    let stderr = ""
    let exitInfo: string | undefined
    const child = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const child = ChildProcess.spawn(file, [...args], {
          stdio: ["ignore", "ignore", "pipe"],
          ...(options.cwd !== undefined ? { cwd: options.cwd } : {})
        })
        child.stderr.setEncoding("utf8")
        child.stderr.on("data", (text: string) => {
          if (stderr.length < 64 * 1024) stderr += text
        })
        child.on("error", (error) => {
          exitInfo = `${file} failed to start: ${error.message}`
          Deferred.unsafeDone(exit, Effect.succeed(-1))
        })
        child.on("exit", (code, signal) => {
          exitInfo = `${file} exited (${code ?? signal}): ${stderr}`
          Deferred.unsafeDone(exit, Effect.succeed(code ?? signal ?? -1))
        })
        return child
      }),
      (child) =>
        Effect.gen(function*() {
          if (child.pid !== undefined && exitInfo === undefined) {
            try {
              process.kill(child.pid, "SIGKILL")
            } catch {
              // already gone
            }
          }
          yield* Deferred.await(exit).pipe(Effect.timeout("5 seconds"), Effect.ignore)
        })
    )
    if (child.pid === undefined) {
      yield* Deferred.await(exit)
      return yield* Effect.dieMessage(exitInfo ?? `${file} did not start`)
    }
    return {
      pid: child.pid,
      exited: Deferred.await(exit),
      exitInfo: () => exitInfo,
      stderr: () => stderr
    }
  })

/**
 * Starts QEMU paused (`-S`) with the disks of {@link makeTestDisks}; see the module comment. Never fails:
 * setup problems are defects, so a test using it shows them as errors.
 */
export const startQemu = (options: QemuOptions = {}): Effect.Effect<RunningQemu, never, Scope.Scope> =>
  Effect.gen(function*() {
    const dir = yield* makeTempDir("vzqemu-")
    const disks = yield* makeTestDisks(dir)
    const qmpPath = Path.join(dir, "qmp.sock")
    const qgaPath = options.guestAgentChardev ? Path.join(dir, "qga.sock") : undefined
    const qmpTcpPort = options.tcpQmp ? yield* freePort : undefined
    const { scsi0, virtio1 } = disks
    const args = [
      "-S",
      "-nodefaults",
      "-display",
      "none",
      "-machine",
      "q35,accel=tcg",
      "-m",
      "64",
      // The TCP monitor comes first: once the Unix socket exists, it listens too.
      ...(qmpTcpPort !== undefined ? ["-qmp", `tcp:127.0.0.1:${qmpTcpPort},server=on,wait=off`] : []),
      "-qmp",
      `unix:${qmpPath},server=on,wait=off`,
      "-blockdev",
      `driver=file,filename=${scsi0.path},node-name=${scsi0.fileNodeName},discard=unmap`,
      "-blockdev",
      `driver=qcow2,file=${scsi0.fileNodeName},node-name=${scsi0.nodeName},discard=unmap`,
      "-blockdev",
      `driver=file,filename=${virtio1.path},node-name=${virtio1.fileNodeName},discard=unmap`,
      "-blockdev",
      `driver=raw,file=${virtio1.fileNodeName},node-name=${virtio1.nodeName},discard=unmap`,
      "-device",
      "virtio-scsi-pci,id=scsihw0",
      "-device",
      `scsi-hd,bus=scsihw0.0,scsi-id=0,drive=${scsi0.nodeName},id=${scsi0.deviceId}`,
      "-device",
      `virtio-blk-pci,drive=${virtio1.nodeName},id=${virtio1.deviceId}`,
      ...(qgaPath !== undefined
        ? [
          "-chardev",
          `socket,path=${qgaPath},server=on,wait=off,id=qga0`,
          "-device",
          "virtio-serial-pci",
          "-device",
          "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"
        ]
        : []),
      ...(options.extraArgs ?? [])
    ]
    const child = yield* spawnScoped("qemu-system-x86_64", args, { cwd: dir })
    const startTimeout = options.startTimeout ?? "15 seconds"
    yield* waitForPath(qmpPath, startTimeout, child.exitInfo)
    if (qgaPath !== undefined) yield* waitForPath(qgaPath, startTimeout, child.exitInfo)
    return {
      pid: child.pid,
      dir,
      qmpPath,
      qmpTcpPort,
      qgaPath,
      disks,
      signal: (signal) =>
        Effect.sync(() => {
          if (child.exitInfo() === undefined) process.kill(child.pid, signal)
        }),
      exited: child.exited,
      stderr: child.stderr
    } satisfies RunningQemu
  })
