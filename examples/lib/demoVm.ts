/**
 * Creates a demo VM for the examples: a config in `<work>/conf/<vmid>.conf` and two disks with data
 * and holes on the directory storage `local` (`<work>/store`): a 64 MiB qcow2 and a 32 MiB raw.
 */
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import { createReadStream } from "node:fs"
import * as Fs from "node:fs/promises"
import * as NodePath from "node:path"
import { promisify } from "node:util"

export const run = promisify(execFile)

export interface DemoDisk {
  readonly virtdev: string
  readonly file: string
  readonly format: "qcow2" | "raw"
}

export const sha256File = (path: string) =>
  Effect.promise(() =>
    new Promise<string>((resolve, reject) => {
      const hash = createHash("sha256")
      createReadStream(path).on("data", (chunk) => hash.update(chunk)).on("end", () => resolve(hash.digest("hex")))
        .on("error", reject)
    })
  )

/** sha256 of an image's guest-visible content (qcow2 converted to raw first). */
export const imageHash = (disk: DemoDisk, scratch: string) =>
  Effect.gen(function*() {
    if (disk.format === "raw") return yield* sha256File(disk.file)
    const raw = `${scratch}/hash-${NodePath.basename(disk.file)}.raw`
    yield* Effect.promise(() => run("qemu-img", ["convert", "-U", "-f", disk.format, "-O", "raw", disk.file, raw]))
    const hash = yield* sha256File(raw)
    yield* Effect.promise(() => Fs.rm(raw))
    return hash
  })

const qemuIo = (disk: DemoDisk, commands: ReadonlyArray<string>) =>
  Effect.promise(() => run("qemu-io", ["-f", disk.format, ...commands.flatMap((c) => ["-c", c]), disk.file]))

/** A short working directory (QEMU's Unix socket paths must stay below ~107 bytes), removed with the scope. */
export const workDir = Effect.acquireRelease(
  Effect.promise(() => Fs.mkdtemp("/tmp/vzdump-demo-")),
  (dir) => Effect.promise(() => Fs.rm(dir, { recursive: true, force: true }))
)

/** Writes VM `vmid`'s disks and config under `work`; returns the disks. */
export const createDemoVm = (work: string, vmid: number, name = "demo") =>
  Effect.gen(function*() {
    const images = `${work}/store/images/${vmid}`
    const disks: ReadonlyArray<DemoDisk> = [
      { virtdev: "scsi0", file: `${images}/vm-${vmid}-disk-0.qcow2`, format: "qcow2" },
      { virtdev: "virtio1", file: `${images}/vm-${vmid}-disk-1.raw`, format: "raw" }
    ]
    const random = `${work}/random-${vmid}.bin`
    yield* Effect.promise(async () => {
      await Fs.mkdir(images, { recursive: true })
      await Fs.mkdir(`${work}/conf`, { recursive: true })
      await run("qemu-img", ["create", "-q", "-f", "qcow2", disks[0]!.file, "64M"])
      await run("qemu-img", ["create", "-q", "-f", "raw", disks[1]!.file, "32M"])
      await Fs.writeFile(random, randomBytes(5 * 1024 * 1024))
    })
    // data and holes: random data, patterns, and everything else never written
    yield* qemuIo(disks[0]!, [`write -s ${random} 0 5M`, "write -P 0x17 20M 4M", "write -P 0x5a 50M 512k"])
    yield* qemuIo(disks[1]!, ["write -P 0x33 0 2M", `write -s ${random} 8M 2M`, "write -P 0x44 16M 3M"])
    yield* Effect.promise(() => Fs.rm(random))
    yield* Effect.promise(() =>
      Fs.writeFile(
        `${work}/conf/${vmid}.conf`,
        [
          `#demo VM ${vmid} of vzdump-ts`,
          "agent: 0",
          "cores: 1",
          "memory: 128",
          `name: ${name}`,
          `scsi0: local:${vmid}/vm-${vmid}-disk-0.qcow2,size=64M`,
          `virtio1: local:${vmid}/vm-${vmid}-disk-1.raw,size=32M`,
          ""
        ].join("\n")
      )
    )
    return disks
  })

/** HMP `qemu-io` writes through the VM's devices, as a busy guest would write (6 MiB in all). */
export const guestWriteCommands: ReadonlyArray<string> = [
  "qemu-io -d scsi0 \"write -P 0xaa 0 1M\"",
  "qemu-io -d scsi0 \"write -P 0xbb 30M 2M\"",
  "qemu-io -d virtio1/virtio-backend \"write -P 0xcc 0 2M\"",
  "qemu-io -d virtio1/virtio-backend \"write -P 0xdd 20M 1M\""
]
