import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { randomBytes } from "node:crypto"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber } from "effect"
import {
  allocated,
  bin,
  cli,
  CLUSTER,
  clusterOps,
  encodeBytes,
  makeImage,
  sha256,
  sha256File,
  tempDir,
  writeSparseFile
} from "./utils.js"

const conf = "name: vm\nmemory: 512\n" +
  "#qmdump#map:scsi0:drive-scsi0:local:raw:\n#qmdump#map:scsi1:drive-scsi1:local:raw:\n"
const fw = "[OPTIONS]\nenable: 1\n"
const ctime = 1_700_000_000
const disk1 = makeImage(2 * 1024 * 1024, 41)
const disk2 = makeImage(200_000, 42)

/** ctime(3) of a timestamp, from date(1). */
const ctimeOf = (seconds: number) => execFileSync("date", ["-d", `@${seconds}`, "+%a %b %e %H:%M:%S %Y"]).toString()

/** An archive file made by the writer, plus the disks as files. */
const fixture = Effect.gen(function*() {
  const dir = yield* tempDir
  const bytes = yield* encodeBytes(clusterOps([disk1, disk2]), {
    ctime,
    configs: [{ name: "qemu-server.conf", data: conf }, { name: "qemu-server.fw", data: fw }],
    devices: [{ name: "drive-scsi0", size: disk1.length }, { name: "drive-scsi1", size: disk2.length }]
  })
  const archive = path.join(dir, "a.vma")
  fs.writeFileSync(archive, bytes)
  const files = { conf: path.join(dir, "qemu-server.conf"), fw: path.join(dir, "qemu-server.fw") }
  fs.writeFileSync(files.conf, conf)
  fs.writeFileSync(files.fw, fw)
  const d1 = path.join(dir, "d1.raw")
  const d2 = path.join(dir, "d2.raw")
  fs.writeFileSync(d1, disk1)
  fs.writeFileSync(d2, disk2)
  return { dir, archive, bytes, ...files, d1, d2 }
})

const listing = `CFG: size: ${conf.length} name: qemu-server.conf\n` +
  `CFG: size: ${fw.length} name: qemu-server.fw\n` +
  `DEV: dev_id=1 size: ${disk1.length} devname: drive-scsi0\n` +
  `DEV: dev_id=2 size: ${disk2.length} devname: drive-scsi1\n`

describe("vma CLI", () => {
  it.scopedLive("list, config and verify -v print Proxmox's texts", () =>
    Effect.gen(function*() {
      const f = yield* fixture
      const list = yield* cli("list", f.archive)
      assert.strictEqual(list.code, 0)
      assert.strictEqual(list.stdout, `${listing}CTIME: ${ctimeOf(ctime)}`)
      assert.strictEqual((yield* cli("config", f.archive)).stdout, conf)
      assert.strictEqual((yield* cli("config", f.archive, "-c", "qemu-server.fw")).stdout, fw)
      const missing = yield* cli("config", "-c", "nope.conf", f.archive)
      assert.deepStrictEqual([missing.code, missing.stderr], [255, "unable to find configuration data 'nope.conf'\n"])
      const verify = yield* cli("verify", f.archive, "-v")
      assert.strictEqual(verify.code, 0)
      const lines = verify.stdout.split("\n")
      assert.strictEqual(verify.stdout.slice(0, listing.length), listing)
      const clusters = 32 + 4
      const progress = lines.filter((l) => l.startsWith("progress "))
      assert.match(progress[0]!, /^progress 2% \(read 65536 bytes, duration \d+ sec\)$/)
      // Like Proxmox, the percentage is over floor(size / 64 KiB) clusters: an unaligned disk ends above 100 %.
      assert.match(
        progress[progress.length - 1]!,
        new RegExp(
          `^progress ${Math.floor((clusters * 100) / 35)}% \\(read ${clusters * CLUSTER} bytes, duration \\d+ sec\\)$`
        )
      )
      assert.match(
        lines[lines.length - 3]!,
        new RegExp(`^total bytes read ${clusters * CLUSTER}, sparse bytes \\d+ \\(\\d+(\\.\\d+)?%\\)$`)
      )
      assert.match(lines[lines.length - 2]!, /^space reduction due to 4K zero blocks \d+(\.\d+)?%$/)
      const quiet = yield* cli("verify", f.archive)
      assert.deepStrictEqual([quiet.code, quiet.stdout, quiet.stderr], [0, "", ""])
    }))

  it.scopedLive("extract: DEVINFO lines, raw disks and configs; the target must not exist; -d selects drives", () =>
    Effect.gen(function*() {
      const f = yield* fixture
      const x = path.join(f.dir, "x")
      const result = yield* cli("extract", f.archive, x)
      assert.strictEqual(result.code, 0, result.stderr)
      assert.strictEqual(
        result.stdout,
        `DEVINFO ${x}/tmp-disk-drive-scsi0.raw ${disk1.length}\nDEVINFO ${x}/tmp-disk-drive-scsi1.raw ${disk2.length}\n`
      )
      assert.deepStrictEqual(fs.readdirSync(x).sort(), [
        "disk-drive-scsi0.raw",
        "disk-drive-scsi1.raw",
        "qemu-server.conf",
        "qemu-server.fw"
      ])
      assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi0.raw")), sha256(disk1))
      assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi1.raw")), sha256(disk2))
      assert.strictEqual(fs.readFileSync(path.join(x, "qemu-server.fw"), "utf8"), fw)
      const again = yield* cli("extract", f.archive, x)
      assert.deepStrictEqual([again.code, again.stderr], [1, `unable to create target directory ${x} - File exists\n`])
      const y = path.join(f.dir, "y")
      assert.strictEqual((yield* cli("extract", "-d", "drive-scsi1", f.archive, y)).code, 0)
      assert.deepStrictEqual(fs.readdirSync(y).sort(), ["disk-drive-scsi1.raw", "qemu-server.conf", "qemu-server.fw"])
      const unknown = yield* cli("extract", "-d", "drive-sata7", f.archive, path.join(f.dir, "z"))
      assert.deepStrictEqual([unknown.code, unknown.stderr], [
        1,
        "restore failed - no device named 'drive-sata7' in the archive\n"
      ])
    }))

  it.scopedLive("create: configs and raw disks, -v progress, then list and extract give them back", () =>
    Effect.gen(function*() {
      const f = yield* fixture
      const archive = path.join(f.dir, "new.vma")
      const created = yield* cli(
        "create",
        archive,
        "-v",
        "-c",
        f.conf,
        "-c",
        f.fw,
        "-d",
        `format=raw:drive-scsi0=${f.d1}`,
        "-d",
        `format=raw:drive-scsi1=${f.d2}`
      )
      assert.strictEqual(created.code, 0, created.stderr)
      const total = disk1.length + disk2.length
      assert.match(created.stderr, new RegExp(`progress 100% ${total}/${total} \\d+\\n`))
      assert.match(created.stderr, new RegExp(`image drive-scsi0: size=${disk1.length} zeros=\\d+ saved=\\d+\\n`))
      assert.strictEqual((yield* cli("list", archive)).stdout.slice(0, listing.length), listing)
      const x = path.join(f.dir, "x")
      assert.strictEqual((yield* cli("extract", archive, x)).code, 0)
      assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi0.raw")), sha256(disk1))
      assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi1.raw")), sha256(disk2))
      // diskless, as vzdump runs it for VMs without disks
      const diskless = path.join(f.dir, "diskless.vma")
      assert.strictEqual((yield* cli("create", diskless, "-c", f.conf)).code, 0)
      assert.strictEqual((yield* cli("config", diskless)).stdout, conf)
      assert.strictEqual((yield* cli("verify", diskless)).code, 0)
      // legacy positional devices (deprecated): `[devname=]path`, default names disk<N>
      const legacy = path.join(f.dir, "legacy.vma")
      const old = yield* cli("create", legacy, f.d2, `drive-scsi0=${f.d1}`)
      assert.strictEqual(old.code, 0)
      assert.include(old.stderr, "Specifying a device without a format is deprecated")
      assert.include((yield* cli("list", legacy)).stdout, `DEV: dev_id=1 size: ${disk2.length} devname: disk0\n`)
    }))

  it.scopedLive("create: many small devices and devices ending in a partial chunk come back intact", () =>
    Effect.gen(function*() {
      // An extent gathers the clusters of many short chunks here, so read buffers must not be reused while
      // it still refers to them (the reads run ahead and the archive writes behind).
      const dir = yield* tempDir
      const sizes = [4 * 1024 * 1024 + CLUSTER + 7, ...Array.from({ length: 11 }, (_, i) => 100_000 + i * 4096), 9 << 20]
      const disks = sizes.map((size, i) => makeImage(size, 100 + i))
      const args: Array<string> = []
      disks.forEach((disk, i) => {
        const file = path.join(dir, `d${i}.raw`)
        fs.writeFileSync(file, disk)
        args.push("-d", `format=raw:d${i}=${file}`)
      })
      const archive = path.join(dir, "many.vma")
      const created = yield* cli("create", archive, ...args)
      assert.strictEqual(created.code, 0, created.stderr)
      const x = path.join(dir, "x")
      assert.strictEqual((yield* cli("extract", archive, x)).code, 0)
      for (const [i, disk] of disks.entries()) {
        assert.strictEqual(yield* sha256File(path.join(x, `disk-d${i}.raw`)), sha256(disk), `d${i}`)
      }
    }))

  it.scopedLive("create: refuses an existing archive, rejects bad arguments, leaves no partial archive", () =>
    Effect.gen(function*() {
      const f = yield* fixture
      const before = sha256(fs.readFileSync(f.archive))
      const exists = yield* cli("create", f.archive, "-c", f.conf, "-d", `format=raw:drive-scsi0=${f.d1}`)
      assert.deepStrictEqual([exists.code, exists.stderr], [1, `can't open file ${f.archive} - File exists\n`])
      assert.strictEqual(sha256(fs.readFileSync(f.archive)), before, "the existing file is untouched")
      const target = path.join(f.dir, "never.vma")
      const failures: ReadonlyArray<readonly [ReadonlyArray<string>, string]> = [
        [["-c", path.join(f.dir, "missing.conf")], "Unable to read file: "],
        [["-d", `format=raw:drive-scsi0=${path.join(f.dir, "missing.raw")}`], "failed - No such file or directory"],
        [["-d", `drive-scsi0=${f.d1}`], `No format specified for device: 'drive-scsi0=${f.d1}'`],
        [["-d", `format=qcow2:drive-scsi0=${f.d1}`], "unsupported format 'qcow2'"],
        [["-d", `format=raw:drive-scsi0=${f.d1}`, f.d2], "Unexpected extra argument - specify all devices via '-d'"],
        [["-d", `format=raw:vmstate=${f.d1}`], "device name 'vmstate' is reserved"],
        [["--compress", "bzip2"], "unknown compression 'bzip2'"]
      ]
      for (const [args, message] of failures) {
        const r = yield* cli("create", target, ...args)
        assert.strictEqual(r.code, 1, args.join(" "))
        assert.include(r.stderr, message)
        assert.strictEqual(r.stderr.split("\n").length, 2, "one line")
        assert.isFalse(fs.existsSync(target), args.join(" "))
      }
      const disk = `format=raw:drive-scsi0=${f.d1}`
      const exec = yield* cli("create", "exec:cat > /dev/null; exit 5", "-c", f.conf, "-d", disk)
      assert.strictEqual(exec.code, 1)
      assert.include(
        exec.stderr,
        "creating vma archive failed - command 'sh -c cat > /dev/null; exit 5' failed: exit status 5"
      )
      // Interrupted half way (a 16 GiB sparse disk takes a while to read): the archive is removed.
      const big = path.join(f.dir, "big.raw")
      writeSparseFile(big, 16 * 1024 * 1024 * 1024, [[0, randomBytes(4096)]])
      const fiber = yield* Effect.fork(cli("create", target, "-d", `format=raw:drive-scsi0=${big}`))
      while (!fs.existsSync(target) || fs.statSync(target).size === 0) yield* Effect.sleep("20 millis")
      yield* Fiber.interrupt(fiber)
      assert.isFalse(fs.existsSync(target), "interrupted create leaves nothing behind")
    }), 30_000)

  it.effect("usage and option errors", () =>
    Effect.gen(function*() {
      const none = yield* cli()
      assert.strictEqual(none.code, 1)
      assert.isTrue(none.stdout.startsWith("usage: vma command [command options]\n"))
      assert.strictEqual((yield* cli("list")).code, 1)
      const bad = yield* cli("verify", "-x", "a.vma")
      assert.strictEqual(bad.code, 1)
      assert.strictEqual(bad.stderr, "vma: invalid option -- 'x'\n")
      const missing = yield* cli("list", "/nonexistent/a.vma")
      assert.deepStrictEqual([missing.code, missing.stderr], [
        1,
        "can't open file /nonexistent/a.vma - No such file or directory\n"
      ])
    }))

  it.scopedLive("the vma binary: compressed round trips (zstd, gzip, lzo) read from stdin; sparse output", () =>
    Effect.gen(function*() {
      const f = yield* fixture
      // a sparse disk whose data is a few scattered blocks
      const sparse = path.join(f.dir, "sparse.raw")
      const size = 32 * 1024 * 1024
      writeSparseFile(sparse, size, [
        [4096, randomBytes(4096)],
        [9 * CLUSTER, randomBytes(8192)],
        [size - 4096, randomBytes(4096)]
      ])
      const disks = ["-d", `format=raw:drive-scsi0=${sparse}`, "-d", `format=raw:drive-scsi1=${f.d2}`]
      const zst = path.join(f.dir, "a.vma.zst")
      const created = yield* bin(["create", zst, "-c", f.conf, ...disks])
      assert.strictEqual(created.code, 0, created.stderr)
      assert.deepStrictEqual([...fs.readFileSync(zst).subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd])
      for (const ext of ["gz", "lzo"]) {
        const r = yield* cli("create", path.join(f.dir, `a.vma.${ext}`), "-c", f.conf, ...disks)
        assert.strictEqual(r.code, 0, r.stderr)
      }
      const sparseSum = yield* sha256File(sparse)
      for (const ext of ["zst", "gz", "lzo"]) {
        const x = path.join(f.dir, `x-${ext}`)
        const r = yield* bin(["extract", "-", x], { stdin: path.join(f.dir, `a.vma.${ext}`) })
        assert.strictEqual(r.code, 0, r.stderr)
        assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi0.raw")), sparseSum, ext)
        assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi1.raw")), sha256(disk2), ext)
        assert.isBelow(allocated(path.join(x, "disk-drive-scsi0.raw")), 256 * 1024, "sparse output")
      }
      const list = yield* bin(["list", "-"], { stdin: f.archive })
      assert.strictEqual(list.stdout, `${listing}CTIME: ${ctimeOf(ctime)}`)
      const truncated = path.join(f.dir, "cut.vma")
      fs.writeFileSync(truncated, f.bytes.subarray(0, f.bytes.length - 5000))
      const verify = yield* bin(["verify", "-"], { stdin: truncated })
      assert.strictEqual(verify.code, 1)
      assert.match(verify.stderr, /^verify failed - short vma extent \(\d+ < \d+\) \(extent at offset \d+\)\n$/)
    }), 60_000)
})
