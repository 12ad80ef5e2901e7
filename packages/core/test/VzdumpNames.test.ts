import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Either, Schema } from "effect"
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as VzdumpNames from "../src/VzdumpNames.js"

// 2026-11-27 09:00:00 UTC = 10:00:00 in Vienna (CET, +01:00)
const at = new Date("2026-11-27T09:00:00Z")

describe("backup names", () => {
  it("names archive, temp file and side files in the given zone", () => {
    const names = VzdumpNames.backupNames({ vmid: 100, at, compression: "zst", timeZone: "Europe/Vienna" })
    assert.deepStrictEqual(names, {
      basename: "vzdump-qemu-100-2026_11_27-10_00_00",
      archive: "vzdump-qemu-100-2026_11_27-10_00_00.vma.zst",
      temp: "vzdump-qemu-100-2026_11_27-10_00_00.vma.dat",
      log: "vzdump-qemu-100-2026_11_27-10_00_00.log",
      notes: "vzdump-qemu-100-2026_11_27-10_00_00.vma.zst.notes",
      protected: "vzdump-qemu-100-2026_11_27-10_00_00.vma.zst.protected",
      tmpDir: "vzdump-qemu-100-2026_11_27-10_00_00.tmp"
    })
  })

  it("replaces the only extension of an uncompressed archive with .dat", () => {
    const names = VzdumpNames.backupNames({ vmid: 999999999, at, timeZone: "UTC" })
    assert.strictEqual(names.archive, "vzdump-qemu-999999999-2026_11_27-09_00_00.vma")
    assert.strictEqual(names.temp, "vzdump-qemu-999999999-2026_11_27-09_00_00.dat")
    assert.strictEqual(
      VzdumpNames.backupNames({ vmid: 101, at, compression: "gz", timeZone: "UTC" }).archive.endsWith(".vma.gz"),
      true
    )
    assert.strictEqual(
      VzdumpNames.backupNames({ vmid: 101, at, compression: "lzo", timeZone: "UTC" }).temp.endsWith(".vma.dat"),
      true
    )
  })

  it("uses the zone's daylight saving time and pads every field", () => {
    const summer = new Date("2026-07-04T22:05:09Z")
    assert.strictEqual(VzdumpNames.timestampSuffix(summer, "Europe/Vienna"), "-2026_07_05-00_05_09")
    assert.strictEqual(VzdumpNames.timestampSuffix(summer, "America/Los_Angeles"), "-2026_07_04-15_05_09")
    assert.strictEqual(
      VzdumpNames.timestampSuffix(new Date("2027-01-01T00:00:00Z"), "Asia/Kolkata"),
      "-2027_01_01-05_30_00"
    )
  })

  describe("in the process's local time zone", () => {
    let saved: string | undefined
    beforeAll(() => {
      saved = process.env.TZ
      process.env.TZ = "Asia/Tokyo"
    })
    afterAll(() => {
      if (saved === undefined) delete process.env.TZ
      else process.env.TZ = saved
    })
    it("follows TZ when no zone is given", () => {
      assert.strictEqual(
        VzdumpNames.backupNames({ vmid: 100, at }).archive,
        "vzdump-qemu-100-2026_11_27-18_00_00.vma"
      )
    })
  })

  it("names PBS snapshots in UTC and the working log", () => {
    assert.strictEqual(VzdumpNames.pbsSnapshotName(100, at), "vm/100/2026-11-27T09:00:00Z")
    assert.strictEqual(VzdumpNames.workingLogPath(100), "/var/log/vzdump/qemu-100.log")
    assert.strictEqual(VzdumpNames.groupPrefix(100), "vzdump-qemu-100")
  })
})

describe("parseArchiveName", () => {
  it("takes standard names apart", () => {
    assert.deepStrictEqual(VzdumpNames.parseArchiveName("vzdump-qemu-100-2026_11_27-10_00_00.vma.zst"), {
      type: "qemu",
      vmid: 100,
      format: "vma",
      compression: "zst",
      time: { year: 2026, month: 11, day: 27, hour: 10, minute: 0, second: 0 }
    })
    assert.strictEqual(VzdumpNames.parseArchiveName("vzdump-qemu-100-2026_11_27-10_00_00.vma")?.compression, undefined)
    assert.strictEqual(VzdumpNames.parseArchiveName("vzdump-lxc-105-2020_01_02-03_04_05.tar.bz2")?.compression, "bz2")
    assert.strictEqual(VzdumpNames.parseArchiveName("vzdump-openvz-105-2020_01_02-03_04_05.tgz")?.format, "tgz")
  })

  it("rejects other names", () => {
    for (
      const name of [
        "vzdump-qemu-99-2026_11_27-10_00_00.vma",
        "vzdump-qemu-0100-2026_11_27-10_00_00.vma",
        "vzdump-qemu-1000000000-2026_11_27-10_00_00.vma",
        "vzdump-qemu-100-2026_11_27-10_00_00.vma.xz",
        "vzdump-qemu-100-2026_11_27-10_00_00.tgz.gz",
        "vzdump-qemu-100-2026_11_27-10_00_00.dat",
        "my-backup.vma.zst",
        "vzdump-qemu-100-2026_11_27-10_00_00.vma.zst.notes"
      ]
    ) {
      assert.strictEqual(VzdumpNames.parseArchiveName(name), undefined, name)
    }
  })

  it("round-trips with backupNames", () => {
    const names = VzdumpNames.backupNames({ vmid: 4711, at, compression: "lzo", timeZone: "Europe/Vienna" })
    const info = VzdumpNames.parseArchiveName(names.archive)
    assert.strictEqual(info?.vmid, 4711)
    assert.strictEqual(info?.compression, "lzo")
    assert.deepStrictEqual(info?.time, { year: 2026, month: 11, day: 27, hour: 10, minute: 0, second: 0 })
  })
})

describe("compression", () => {
  it("decodes the compress option", () => {
    const decode = Schema.decodeUnknownEither(VzdumpNames.CompressOption)
    assert.deepStrictEqual(decode("0"), Either.right("none"))
    assert.deepStrictEqual(decode("1"), Either.right("lzo"))
    assert.deepStrictEqual(decode(1), Either.right("lzo"))
    assert.deepStrictEqual(decode(false), Either.right("none"))
    assert.deepStrictEqual(decode("lzo"), Either.right("lzo"))
    assert.deepStrictEqual(decode("gzip"), Either.right("gzip"))
    assert.deepStrictEqual(decode("zstd"), Either.right("zstd"))
    assert.strictEqual(Either.isLeft(decode("xz")), true)
    assert.deepStrictEqual(Schema.encodeSync(VzdumpNames.CompressOption)("none"), "0")
  })

  it("picks vzdump's compressor command lines", () => {
    assert.strictEqual(VzdumpNames.compressor({ compress: "none" }), undefined)
    assert.deepStrictEqual(VzdumpNames.compressor({ compress: "lzo" }), {
      commandLine: "lzop",
      argv: ["lzop"],
      extension: "lzo"
    })
    assert.deepStrictEqual(VzdumpNames.compressor({ compress: "gzip" }), {
      commandLine: "gzip --rsyncable",
      argv: ["gzip", "--rsyncable"],
      extension: "gz"
    })
    assert.strictEqual(
      VzdumpNames.compressor({ compress: "gzip", pigz: 1, cpus: 8 })?.commandLine,
      "pigz -p 4 --rsyncable"
    )
    assert.strictEqual(
      VzdumpNames.compressor({ compress: "gzip", pigz: 1, cpus: 3 })?.commandLine,
      "pigz -p 2 --rsyncable"
    )
    assert.strictEqual(VzdumpNames.compressor({ compress: "gzip", pigz: 6 })?.commandLine, "pigz -p 6 --rsyncable")
    assert.deepStrictEqual(VzdumpNames.compressor({ compress: "zstd" }), {
      commandLine: "zstd --threads=1",
      argv: ["zstd", "--threads=1"],
      extension: "zst"
    })
    assert.strictEqual(VzdumpNames.compressor({ compress: "zstd", zstd: 0, cpus: 16 })?.commandLine, "zstd --threads=8")
    assert.strictEqual(VzdumpNames.compressor({ compress: "zstd", zstd: 4 })?.commandLine, "zstd --threads=4")
  })

  const programs = ["zstd", "gzip", "pigz", "lzop", "zcat"]
  const available = programs.every((p) => ChildProcess.spawnSync("sh", ["-c", `command -v ${p}`]).status === 0)

  it.skipIf(!available)("compressor and decompressor command lines round-trip data through the real tools", () => {
    const data = Buffer.concat([Crypto.randomBytes(64 * 1024), Buffer.alloc(256 * 1024), Crypto.randomBytes(1000)])
    const cases: ReadonlyArray<VzdumpNames.CompressorOptions> = [
      { compress: "zstd", zstd: 2 },
      { compress: "gzip" },
      { compress: "gzip", pigz: 2 },
      { compress: "lzo" }
    ]
    for (const options of cases) {
      const c = VzdumpNames.compressor(options)!
      const packed = ChildProcess.spawnSync(c.argv[0]!, c.argv.slice(1), { input: data })
      assert.strictEqual(packed.status, 0, `${c.commandLine}: ${packed.stderr}`)
      assert.strictEqual(packed.stdout.length < data.length, true, c.commandLine)
      const d = VzdumpNames.decompressor(c.extension)!
      const unpacked = ChildProcess.spawnSync(d[0]!, d.slice(1), { input: packed.stdout, maxBuffer: 16 * 1024 * 1024 })
      assert.strictEqual(unpacked.status, 0, `${d.join(" ")}: ${unpacked.stderr}`)
      assert.strictEqual(Buffer.compare(unpacked.stdout, data), 0, c.commandLine)
    }
    assert.deepStrictEqual(VzdumpNames.decompressor("bz2"), ["bzcat", "-q"])
    assert.strictEqual(VzdumpNames.decompressor("xz"), undefined)
  })
})

describe("Vmid", () => {
  it("accepts 100 … 999999999", () => {
    const decode = Schema.decodeUnknownEither(VzdumpNames.Vmid)
    assert.strictEqual(Either.isRight(decode(100)), true)
    assert.strictEqual(Either.isRight(decode(999_999_999)), true)
    assert.strictEqual(Either.isLeft(decode(99)), true)
    assert.strictEqual(Either.isLeft(decode(1_000_000_000)), true)
    assert.strictEqual(Either.isLeft(decode(100.5)), true)
  })
})
