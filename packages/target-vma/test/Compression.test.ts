import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import * as VzdumpNames from "@vzdump/core/VzdumpNames"
import { Effect } from "effect"
import * as VmaCompression from "../src/VmaCompression.js"
import * as VmaInput from "../src/VmaInput.js"
import * as VmaOutput from "../src/VmaOutput.js"
import * as VmaReader from "../src/VmaReader.js"
import * as VmaWriter from "../src/VmaWriter.js"
import { CLUSTER, makeImage, sha256, sha256File, tempDir } from "./utils.js"

const image = makeImage(3 * 1024 * 1024 + 4096, 31)

const writeArchive = (output: VmaOutput.VmaOutput) =>
  Effect.flatMap(
    VmaWriter.make({
      output,
      configs: [{ name: "qemu-server.conf", data: "name: z\n" }],
      devices: [{ name: "drive-scsi0", size: image.length }]
    }),
    (writer) => Effect.zipRight(writer.writeData(1, 0, image), writer.finish)
  )

const extractFile = (file: string, directory: string) =>
  Effect.scoped(Effect.gen(function*() {
    const input = yield* VmaInput.file(file)
    const archive = yield* VmaReader.open(input)
    yield* VmaReader.extract(archive, { directory })
    return input.format
  }))

const formats: ReadonlyArray<readonly [VmaCompression.Compression, ReadonlyArray<number>]> = [
  [{ format: "zstd", threads: 2, level: 1 }, [0x28, 0xb5, 0x2f, 0xfd]],
  [{ format: "gzip" }, [0x1f, 0x8b]],
  [{ format: "gzip", pigz: 2 }, [0x1f, 0x8b]],
  [{ format: "lzo" }, [0x89, 0x4c, 0x5a, 0x4f]]
]

describe("compression", () => {
  for (const [compression, magic] of formats) {
    const command = VmaCompression.compressorCommand(compression)
    it.scopedLive(`${command.command} ${command.args.join(" ")}: write, recognise, decompress, extract`, () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        const file = path.join(dir, `a.vma${VmaCompression.extension(compression)}`)
        yield* Effect.scoped(Effect.flatMap(VmaOutput.file(file, { compression }), writeArchive))
        assert.deepStrictEqual([...fs.readFileSync(file).subarray(0, magic.length)], [...magic])
        const format = yield* extractFile(file, path.join(dir, "x"))
        assert.strictEqual(format, compression.format)
        assert.strictEqual(yield* sha256File(path.join(dir, "x", "disk-drive-scsi0.raw")), sha256(image))
      }), 30_000)
  }

  it.scopedLive("a failing compressor process fails the write with its exit status", () =>
    Effect.gen(function*() {
      const fd = fs.openSync("/dev/full", "w")
      yield* Effect.addFinalizer(() => Effect.sync(() => fs.closeSync(fd)))
      const error = yield* Effect.flip(
        Effect.scoped(Effect.flatMap(VmaOutput.fd(fd, { compression: { format: "lzo" } }), writeArchive))
      )
      assert.strictEqual(error._tag, "VmaProcessError")
      if (error._tag !== "VmaProcessError") return
      assert.isAbove(error.exitCode ?? 0, 0)
      assert.include(error.message, `command 'lzop' failed: exit status ${error.exitCode}`)
    }), 30_000)

  it.scopedLive("in-process zstd: a failing write (ENOSPC) fails the archive with the I/O error", () =>
    Effect.gen(function*() {
      const fd = fs.openSync("/dev/full", "w")
      yield* Effect.addFinalizer(() => Effect.sync(() => fs.closeSync(fd)))
      const error = yield* Effect.flip(
        Effect.scoped(Effect.flatMap(VmaOutput.fd(fd, { compression: { format: "zstd" } }), writeArchive))
      )
      assert.strictEqual(error._tag, "VmaIoError")
      if (error._tag !== "VmaIoError") return
      assert.strictEqual(error.code, "ENOSPC")
      assert.include(error.message, "No space left on device")
    }), 30_000)

  it.scopedLive("in-process zstd: data in shared memory (compressed in place) round-trips like copied data", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const shared = new Uint8Array(new SharedArrayBuffer(image.length))
      shared.set(image)
      const file = path.join(dir, "shared.vma.zst")
      yield* Effect.scoped(Effect.gen(function*() {
        const output = yield* VmaOutput.file(file, { compression: { format: "zstd", threads: 2 } })
        const writer = yield* VmaWriter.make({
          output,
          writeBehind: true,
          configs: [{ name: "qemu-server.conf", data: "name: z\n" }],
          devices: [{ name: "drive-scsi0", size: image.length }]
        })
        // in several calls, so in-place chunks and copied headers interleave
        for (let at = 0; at < image.length; at += 16 * CLUSTER) {
          yield* writer.writeData(1, at, shared.subarray(at, Math.min(image.length, at + 16 * CLUSTER)))
        }
        yield* writer.finish
      }))
      yield* extractFile(file, path.join(dir, "x"))
      assert.strictEqual(yield* sha256File(path.join(dir, "x", "disk-drive-scsi0.raw")), sha256(image))
    }), 30_000)

  it.scopedLive("in-process zstd: frames carry a checksum, the level is applied, `zstd -t` accepts them", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      // compressible data: words from a small vocabulary in pseudo-random order
      const words = ["backup", "cluster", "extent", "device", "archive", "qemu", "snapshot", "fleece"]
      let s = 7
      let text = ""
      while (text.length < 2 * CLUSTER * 16) {
        s = (s * 1103515245 + 12345) >>> 0
        text += words[(s >>> 16) % words.length] + ((s >>> 8) % 7 === 0 ? "\n" : " ")
      }
      const data = new TextEncoder().encode(text).subarray(0, 2 * CLUSTER * 16)
      const sizes: Array<number> = []
      for (const level of [1, 19]) {
        const file = path.join(dir, `l${level}.vma.zst`)
        yield* Effect.scoped(Effect.gen(function*() {
          const output = yield* VmaOutput.file(file, { compression: { format: "zstd", level, threads: 2 } })
          const writer = yield* VmaWriter.make({ output, devices: [{ name: "drive-scsi0", size: data.length }] })
          yield* writer.writeData(1, 0, data)
          yield* writer.finish
        }))
        const test = spawnSync("zstd", ["-t", file], { encoding: "utf8" })
        assert.strictEqual(test.status, 0, test.stderr)
        const info = spawnSync("zstd", ["-lv", file], { encoding: "utf8" })
        assert.match(info.stdout, /Check:\s+XXH64/)
        sizes.push(fs.statSync(file).size)
      }
      assert.isBelow(sizes[1]!, sizes[0]! * 0.9, `level 19 (${sizes[1]}) compresses better than level 1 (${sizes[0]})`)
    }), 60_000)

  it.scopedLive("a failing decompressor (truncated .zst) fails the read with its exit status", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const file = path.join(dir, "a.vma.zst")
      yield* Effect.scoped(Effect.flatMap(VmaOutput.file(file, { compression: { format: "zstd" } }), writeArchive))
      fs.truncateSync(file, Math.floor(fs.statSync(file).size / 2))
      const error = yield* Effect.flip(extractFile(file, path.join(dir, "x")))
      assert.strictEqual(error._tag, "VmaProcessError")
      assert.include(error.message, "command 'zstd -q -d -c' failed: exit status 1")
    }), 30_000)

  it.scopedLive("vzdump's temporary name: renamed on success, removed with nothing left on failure", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const final = path.join(dir, "vzdump-qemu-100-2026_01_02-03_04_05.vma.zst")
      const temporary = VmaCompression.temporaryPath(final)
      assert.strictEqual(temporary, path.join(dir, "vzdump-qemu-100-2026_01_02-03_04_05.vma.dat"))
      yield* Effect.scoped(Effect.gen(function*() {
        const output = yield* VmaOutput.file(final, { compression: { format: "zstd" }, temporaryPath: temporary })
        const writer = yield* VmaWriter.make({ output, devices: [{ name: "d", size: image.length }] })
        yield* writer.writeData(1, 0, image)
        assert.isTrue(fs.existsSync(temporary))
        assert.isFalse(fs.existsSync(final))
        yield* writer.finish
      }))
      assert.deepStrictEqual(fs.readdirSync(dir), [path.basename(final)])
      // Failure: the writer is never finished (a cluster is missing), the scope closes with the error.
      const failed = path.join(dir, "failed.vma")
      const error = yield* Effect.flip(Effect.scoped(Effect.gen(function*() {
        const output = yield* VmaOutput.file(failed, { temporaryPath: VmaCompression.temporaryPath(failed) })
        const writer = yield* VmaWriter.make({ output, devices: [{ name: "d", size: 100 * CLUSTER }] })
        yield* writer.writeData(1, 0, makeImage(90 * CLUSTER))
        assert.isTrue(fs.existsSync(path.join(dir, "failed.dat")))
        return yield* writer.finish
      })))
      assert.strictEqual(error._tag, "VmaWriterError")
      assert.deepStrictEqual(fs.readdirSync(dir), [path.basename(final)])
      // An existing file is never overwritten.
      const exists = yield* Effect.flip(Effect.scoped(VmaOutput.file(final)))
      assert.strictEqual(exists._tag === "VmaIoError" ? exists.code : "", "EEXIST")
    }), 30_000)

  it.scopedLive("exec: commands get the archive on stdin; their exit status is checked", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const file = path.join(dir, "piped.vma.gz")
      yield* Effect.scoped(Effect.flatMap(VmaOutput.command(`gzip -1 > '${file}'`), writeArchive))
      yield* extractFile(file, path.join(dir, "x"))
      assert.strictEqual(yield* sha256File(path.join(dir, "x", "disk-drive-scsi0.raw")), sha256(image))
      const error = yield* Effect.flip(
        Effect.scoped(Effect.flatMap(VmaOutput.command("cat > /dev/null; exit 3"), writeArchive))
      )
      assert.strictEqual(error._tag === "VmaProcessError" ? error.exitCode : -1, 3)
      const early = yield* Effect.flip(Effect.scoped(Effect.flatMap(VmaOutput.command("exit 4"), writeArchive)))
      assert.strictEqual(early._tag === "VmaProcessError" ? early.exitCode : -1, 4)
    }), 30_000)

  it("vzdump's options, commands and names", () => {
    assert.deepStrictEqual(VmaCompression.fromVzdumpOption("1"), { format: "lzo" })
    assert.deepStrictEqual(VmaCompression.fromVzdumpOption("zstd", { zstd: 4 }), { format: "zstd", threads: 4 })
    assert.strictEqual(VmaCompression.fromVzdumpOption("0"), undefined)
    assert.deepStrictEqual(VmaCompression.compressorCommand({ format: "zstd" }), {
      command: "zstd",
      args: ["--threads=1"]
    })
    assert.deepStrictEqual(VmaCompression.compressorCommand({ format: "gzip" }), {
      command: "gzip",
      args: ["--rsyncable"]
    })
    assert.deepStrictEqual(VmaCompression.compressorCommand({ format: "gzip", pigz: 3 }), {
      command: "pigz",
      args: ["-p", "3", "--rsyncable"]
    })
    assert.deepStrictEqual(VmaCompression.compressorCommand({ format: "lzo" }), { command: "lzop", args: [] })
    // 0 / 1 = "half the CPUs" by vzdump's rule, int((n + 1) / 2): the same command line as core's VzdumpNames
    const half = Math.trunc((os.availableParallelism() + 1) / 2)
    assert.deepStrictEqual(VmaCompression.compressorCommand({ format: "zstd", threads: 0, level: 1 }), {
      command: "zstd",
      args: ["-1", `--threads=${half}`]
    })
    assert.deepStrictEqual(VmaCompression.compressorCommand({ format: "gzip", pigz: 1 }).args, [
      "-p",
      String(half),
      "--rsyncable"
    ])
    assert.strictEqual(
      VzdumpNames.compressor({ compress: "zstd", zstd: 0 })?.argv.join(" "),
      ["zstd", ...VmaCompression.compressorCommand({ format: "zstd", threads: 0 }).args].join(" ")
    )
    assert.deepStrictEqual(VmaCompression.fromVzdumpOption(true), { format: "lzo" })
    assert.deepStrictEqual(VmaCompression.fromVzdumpOption("true"), { format: "lzo" })
    assert.strictEqual(VmaCompression.fromVzdumpOption("false"), undefined)
    assert.strictEqual(VmaCompression.fromVzdumpOption("bzip2"), undefined)
    assert.strictEqual(VmaCompression.temporaryPath("/d/x.vma"), "/d/x.dat")
    assert.strictEqual(VmaCompression.extension({ format: "gzip" }), ".gz")
    assert.strictEqual(VmaCompression.detect(Uint8Array.of(0x56, 0x4d, 0x41, 0)), "vma")
  })
})
