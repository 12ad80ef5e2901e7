/**
 * Test fixture for the Proxmox path: a real QEMU 7.2 (paused, TCG, two small disks) with a private
 * QMP monitor, and the Proxmox-QEMU EMULATOR (`pveQemu.ts`) in front of it on another socket — the
 * socket our Proxmox engine talks to, as it would to Proxmox's `/var/run/qemu-server/<vmid>.qmp`.
 *
 * Disks (bytes; every written range holds one byte value):
 * - `scsi0`: qcow2, 8 MiB, node `drive-scsi0`, scsi-hd `scsi0`; data at 0 (1 MiB, 0x5a) and 4 MiB
 *   (512 KiB, 0xa5), zeros written at 6 MiB (1 MiB), the rest unallocated;
 * - `virtio1`: sparse raw, 4 MiB, node `drive-virtio1`, virtio-blk `virtio1`; data at 0
 *   (256 KiB, 0x11) and 2 MiB (512 KiB, 0x22), the rest holes.
 *
 * Everything lives in one short temp directory; the scope kills QEMU by PID and removes it.
 */
import { Deferred, Duration, Effect } from "effect"
import type { Scope } from "effect"
import * as ChildProcess from "node:child_process"
import { createHash } from "node:crypto"
import * as Fs from "node:fs"
import * as Path from "node:path"
import type { EngineDevice } from "@vzdump/core/BackupEngine"
import * as FdQmpTransport from "@vzdump/qmp/FdQmpTransport"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import * as PveQemu from "./pveQemu.js"

export const MiB = 1024 * 1024
const KiB = 1024

const hasProgram = (name: string): boolean => {
  try {
    return ChildProcess.spawnSync(name, ["--version"], { stdio: "ignore" }).status === 0
  } catch {
    return false
  }
}

export const hasQemu: boolean = hasProgram("qemu-system-x86_64") && hasProgram("qemu-img") && hasProgram("qemu-io")

/** Runs a program to completion; a failure is a defect with its stderr. */
export const exec = (file: string, args: ReadonlyArray<string>): Effect.Effect<string> =>
  Effect.async<string, Error>((resume) => {
    ChildProcess.execFile(file, [...args], { encoding: "utf8", maxBuffer: 64 * MiB }, (error, stdout, stderr) => {
      resume(error ? Effect.fail(new Error(`${file} ${args.join(" ")}: ${error.message}\n${stderr}`)) : Effect.succeed(stdout))
    })
  }).pipe(Effect.orDie)

export const sha256 = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex")

/** A fresh short directory under /tmp, removed by the scope. */
export const tempDir = (prefix = "vzp-"): Effect.Effect<string, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => Fs.mkdtempSync(Path.join("/tmp", prefix))),
    (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
  )

export interface PveDisk {
  readonly virtdev: string
  readonly qmdevice: string
  readonly path: string
  readonly format: "qcow2" | "raw"
  readonly size: number
  /** HMP `qemu-io -d` device. */
  readonly hmp: string
}

export interface PveVm {
  readonly dir: string
  readonly pid: number
  readonly backendPath: string
  readonly emulator: PveQemu.PveQemu
  readonly disks: ReadonlyArray<PveDisk>
  /** The disks as the engine's job lists them. */
  readonly devices: ReadonlyArray<EngineDevice>
  /** A QMP client of the emulator that can pass descriptors, for the scope. */
  readonly connect: Effect.Effect<QmpClientService, never, Scope.Scope>
  /** The raw content of each disk now (read through qemu-img, `-U`: QEMU holds the lock). */
  readonly contents: Effect.Effect<ReadonlyArray<Buffer>>
}

export interface PveVmOptions {
  readonly support?: PveQemu.PveQemuOptions["support"]
  readonly finishingDelay?: Duration.DurationInput | undefined
  /** Where the emulator's socket listens (default `<dir>/pve.qmp`). */
  readonly frontPath?: string | undefined
  /** Directory to use instead of a fresh temp dir (it must exist). */
  readonly dir?: string | undefined
  readonly vmid?: number | undefined
}

/** Creates the disks in `dir`. */
export const makeDisks = (dir: string): Effect.Effect<ReadonlyArray<PveDisk>> =>
  Effect.gen(function*() {
    const scsi0: PveDisk = {
      virtdev: "scsi0",
      qmdevice: "drive-scsi0",
      path: Path.join(dir, "disk0.qcow2"),
      format: "qcow2",
      size: 8 * MiB,
      hmp: "scsi0"
    }
    const virtio1: PveDisk = {
      virtdev: "virtio1",
      qmdevice: "drive-virtio1",
      path: Path.join(dir, "disk1.raw"),
      format: "raw",
      size: 4 * MiB,
      hmp: "virtio1/virtio-backend"
    }
    yield* exec("qemu-img", ["create", "-q", "-f", "qcow2", scsi0.path, String(scsi0.size)])
    yield* exec("qemu-img", ["create", "-q", "-f", "raw", virtio1.path, String(virtio1.size)])
    yield* exec("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      `write -P 0x5a 0 ${MiB}`,
      "-c",
      `write -P 0xa5 ${4 * MiB} ${512 * KiB}`,
      "-c",
      `write -z ${6 * MiB} ${MiB}`,
      scsi0.path
    ])
    yield* exec("qemu-io", [
      "-f",
      "raw",
      "-c",
      `write -P 0x11 0 ${256 * KiB}`,
      "-c",
      `write -P 0x22 ${2 * MiB} ${512 * KiB}`,
      virtio1.path
    ])
    return [scsi0, virtio1]
  })

/** QEMU's arguments for the disks (the Proxmox naming: node `drive-<virtdev>`, device id `<virtdev>`). */
export const diskArgs = (disks: ReadonlyArray<PveDisk>): Array<string> => [
  "-device",
  "virtio-scsi-pci,id=scsihw0",
  ...disks.flatMap((disk) => [
    "-blockdev",
    `driver=file,filename=${disk.path},node-name=file-${disk.virtdev},discard=unmap`,
    "-blockdev",
    `driver=${disk.format},file=file-${disk.virtdev},node-name=${disk.qmdevice},discard=unmap`,
    "-device",
    disk.virtdev.startsWith("scsi")
      ? `scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=${disk.qmdevice},id=${disk.virtdev}`
      : `virtio-blk-pci,drive=${disk.qmdevice},id=${disk.virtdev}`
  ])
]

/** Spawns QEMU (killed by PID when the scope closes) and waits for its monitor socket. */
export const spawnQemu = (
  args: ReadonlyArray<string>,
  socket: string
): Effect.Effect<{ readonly pid: number; readonly exited: Effect.Effect<void> }, never, Scope.Scope> =>
  Effect.gen(function*() {
    const exit = yield* Deferred.make<void>()
    let stderr = ""
    let gone = false
    const child = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const child = ChildProcess.spawn("qemu-system-x86_64", [...args], { stdio: ["ignore", "ignore", "pipe"] })
        child.stderr.setEncoding("utf8")
        child.stderr.on("data", (text: string) => {
          stderr += text
        })
        child.on("exit", () => {
          gone = true
          Deferred.unsafeDone(exit, Effect.void)
        })
        child.on("error", () => {
          gone = true
          Deferred.unsafeDone(exit, Effect.void)
        })
        return child
      }),
      (child) =>
        Effect.gen(function*() {
          if (!gone && child.pid !== undefined) {
            try {
              process.kill(child.pid, "SIGKILL")
            } catch {
              // gone already
            }
          }
          yield* Deferred.await(exit).pipe(Effect.timeout("5 seconds"), Effect.ignore)
        })
    )
    const deadline = Date.now() + 15_000
    while (!Fs.existsSync(socket)) {
      if (gone) return yield* Effect.dieMessage(`qemu exited: ${stderr}`)
      if (Date.now() > deadline) return yield* Effect.dieMessage(`no QMP socket ${socket}: ${stderr}`)
      yield* Effect.sleep("25 millis")
    }
    return { pid: child.pid!, exited: Deferred.await(exit) }
  })

/** The Proxmox QEMU standing in: real QEMU + emulator. */
export const startPveVm = (options: PveVmOptions = {}): Effect.Effect<PveVm, never, Scope.Scope> =>
  Effect.gen(function*() {
    const dir = options.dir ?? (yield* tempDir())
    const disks = yield* makeDisks(dir)
    const backendPath = Path.join(dir, "real.qmp")
    const qemu = yield* spawnQemu([
      "-machine",
      "q35,accel=tcg",
      "-nodefaults",
      "-display",
      "none",
      "-S",
      "-m",
      "64",
      "-qmp",
      `unix:${backendPath},server=on,wait=off`,
      ...diskArgs(disks)
    ], backendPath)
    const frontPath = options.frontPath ?? Path.join(dir, "pve.qmp")
    Fs.mkdirSync(Path.dirname(frontPath), { recursive: true })
    const workDir = Path.join(dir, "w")
    Fs.mkdirSync(workDir, { recursive: true })
    const emulator = yield* PveQemu.make({
      backend: backendPath,
      path: frontPath,
      workDir,
      support: options.support,
      finishingDelay: options.finishingDelay,
      vmid: options.vmid
    })
    const connect = QmpClient.make({ address: frontPath, handshakeTimeout: "10 seconds" }).pipe(
      Effect.provide(FdQmpTransport.layer),
      Effect.orDie
    )
    const contents = Effect.forEach(disks, (disk) =>
      Effect.gen(function*() {
        if (disk.format === "raw") return Fs.readFileSync(disk.path)
        const out = Path.join(dir, `content-${disk.virtdev}-${Date.now()}.raw`)
        yield* exec("qemu-img", ["convert", "-U", "-f", disk.format, "-O", "raw", disk.path, out])
        const data = Fs.readFileSync(out)
        Fs.rmSync(out, { force: true })
        return data
      }))
    return {
      dir,
      pid: qemu.pid,
      backendPath,
      emulator,
      disks,
      devices: disks.map((disk) => ({
        virtdev: disk.virtdev,
        qmdevice: disk.qmdevice,
        path: disk.path,
        format: disk.format,
        size: disk.size
      })),
      connect,
      contents
    }
  })
