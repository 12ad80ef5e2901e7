import { assert, describe, it } from "@effect/vitest"
import * as ChildProcess from "node:child_process"
import * as VzdumpLog from "../src/VzdumpLog.js"

const GiB = 1024 ** 3
const MiB = 1024 ** 2

const hasPerl = ChildProcess.spawnSync("perl", ["-e", "1"]).status === 0

describe("formatFixed", () => {
  it("rounds exact ties to even like C printf", () => {
    assert.strictEqual(VzdumpLog.formatFixed(0.25, 1), "0.2")
    assert.strictEqual(VzdumpLog.formatFixed(0.75, 1), "0.8")
    assert.strictEqual(VzdumpLog.formatFixed(1.25, 1), "1.2")
    assert.strictEqual(VzdumpLog.formatFixed(2.5, 0), "2")
    assert.strictEqual(VzdumpLog.formatFixed(3.5, 0), "4")
    // 1.005 is slightly below 1.005 in binary: no tie
    assert.strictEqual(VzdumpLog.formatFixed(1.005, 2), "1.00")
    assert.strictEqual(VzdumpLog.formatFixed(9.96, 1), "10.0")
    assert.strictEqual(VzdumpLog.formatFixed(0, 2), "0.00")
    assert.strictEqual(VzdumpLog.formatFixed(-1.25, 1), "-1.2")
    assert.strictEqual(VzdumpLog.formatFixed(123456789, 2), "123456789.00")
  })

  it.skipIf(!hasPerl)("agrees with Perl's sprintf on many values", () => {
    const values: Array<number> = []
    for (let i = 0; i < 400; i++) {
      values.push(i / 8, i / 20 + 0.05, (i * 1_234_567) / 1024 ** (i % 5), i * 0.125 + 0.0625)
    }
    for (const v of [1.5, 2.5, 1023.95, 1023.96, 0.05, 0.15, 0.35, 1e15 / 3, 31.999999, 4095.999]) values.push(v)
    const digits = [0, 1, 2]
    const script = "while (<STDIN>) { chomp; my ($v, $d) = split / /; printf(\"%.${d}f\\n\", $v); }"
    const input = values.flatMap((v) => digits.map((d) => `${v.toPrecision(17)} ${d}`)).join("\n") + "\n"
    const perl = ChildProcess.spawnSync("perl", ["-e", script], { input, encoding: "utf8" })
    assert.strictEqual(perl.status, 0)
    const expected = perl.stdout.trimEnd().split("\n")
    const actual = values.flatMap((v) => digits.map((d) => VzdumpLog.formatFixed(Number(v.toPrecision(17)), d)))
    assert.deepStrictEqual(actual, expected)
  })
})

describe("renderBytes", () => {
  it("uses binary units with the given precision", () => {
    assert.strictEqual(VzdumpLog.renderBytes(0), "0.00 B")
    assert.strictEqual(VzdumpLog.renderBytes(1023), "1023.00 B")
    assert.strictEqual(VzdumpLog.renderBytes(1024), "1.00 KiB")
    assert.strictEqual(VzdumpLog.renderBytes(32 * GiB), "32.00 GiB")
    assert.strictEqual(VzdumpLog.renderBytes(32 * GiB, 1), "32.0 GiB")
    assert.strictEqual(VzdumpLog.renderBytes(1717986918, 1), "1.6 GiB")
    assert.strictEqual(VzdumpLog.renderBytes(140 * MiB, 1), "140.0 MiB")
    assert.strictEqual(VzdumpLog.renderBytes(92 * MiB, 1), "92.0 MiB")
    assert.strictEqual(VzdumpLog.renderBytes(20 * GiB, 1), "20.0 GiB")
    assert.strictEqual(VzdumpLog.renderBytes(1024 ** 4 * 3), "3.00 TiB")
    assert.strictEqual(VzdumpLog.renderBytes(1024 ** 5), "1.00 PiB")
    // precision 0 means the default, as in `$precision || 2`
    assert.strictEqual(VzdumpLog.renderBytes(1536, 0), "1.50 KiB")
    // a tie rounds to even
    assert.strictEqual(VzdumpLog.renderBytes(1.25 * MiB, 1), "1.2 MiB")
  })
})

describe("renderDuration", () => {
  it("renders weeks to seconds", () => {
    assert.strictEqual(VzdumpLog.renderDuration(0), "0s")
    assert.strictEqual(VzdumpLog.renderDuration(12), "12s")
    assert.strictEqual(VzdumpLog.renderDuration(65), "1m 5s")
    assert.strictEqual(VzdumpLog.renderDuration(3600), "1h")
    assert.strictEqual(VzdumpLog.renderDuration(2 * 3600 + 3 * 60 + 4), "2h 3m 4s")
    assert.strictEqual(VzdumpLog.renderDuration(8 * 86400 + 1), "1w 1d 1s")
    assert.strictEqual(VzdumpLog.renderDuration(0.4), "0s")
    assert.strictEqual(VzdumpLog.renderDuration(59.5), "1m")
  })
})

describe("disk sizes", () => {
  it("formats with the largest exact unit", () => {
    assert.strictEqual(VzdumpLog.formatDiskSize(32 * GiB), "32G")
    assert.strictEqual(VzdumpLog.formatDiskSize(500 * MiB), "500M")
    assert.strictEqual(VzdumpLog.formatDiskSize(4 * MiB), "4M")
    assert.strictEqual(VzdumpLog.formatDiskSize(528 * 1024), "528K")
    assert.strictEqual(VzdumpLog.formatDiskSize(1024 ** 4), "1T")
    assert.strictEqual(VzdumpLog.formatDiskSize(1536 * GiB), "1536G")
    assert.strictEqual(VzdumpLog.formatDiskSize(2048 * GiB), "2T")
    assert.strictEqual(VzdumpLog.formatDiskSize(1000), "1000")
    assert.strictEqual(VzdumpLog.formatDiskSize(0), "0T")
  })

  it("parses sizes to bytes", () => {
    assert.strictEqual(VzdumpLog.parseDiskSize("32G"), 32 * GiB)
    assert.strictEqual(VzdumpLog.parseDiskSize("512M"), 512 * MiB)
    assert.strictEqual(VzdumpLog.parseDiskSize("1T"), 1024 ** 4)
    assert.strictEqual(VzdumpLog.parseDiskSize("4K"), 4096)
    assert.strictEqual(VzdumpLog.parseDiskSize("1.5G"), 1610612736)
    assert.strictEqual(VzdumpLog.parseDiskSize("123456"), 123456)
    assert.strictEqual(VzdumpLog.parseDiskSize("32g"), undefined)
    assert.strictEqual(VzdumpLog.parseDiskSize("32 G"), undefined)
    assert.strictEqual(VzdumpLog.parseDiskSize("G"), undefined)
    assert.strictEqual(VzdumpLog.parseDiskSize("-1G"), undefined)
  })
})

describe("archive size and elapsed time", () => {
  it("formats like PVE::VZDump::format_size", () => {
    assert.strictEqual(VzdumpLog.formatArchiveSize(1000), "0KB")
    assert.strictEqual(VzdumpLog.formatArchiveSize(500 * 1024), "500KB")
    assert.strictEqual(VzdumpLog.formatArchiveSize(700 * MiB + 5), "700MB")
    assert.strictEqual(VzdumpLog.formatArchiveSize(1288490189), "1.20GB")
    assert.strictEqual(VzdumpLog.formatArchiveSize(2.5 * 1024 * GiB), "2.50TB")
  })

  it("formats HH:MM:SS", () => {
    assert.strictEqual(VzdumpLog.formatElapsed(0), "00:00:00")
    assert.strictEqual(VzdumpLog.formatElapsed(83), "00:01:23")
    assert.strictEqual(VzdumpLog.formatElapsed(3 * 3600 + 4 * 60 + 5), "03:04:05")
    assert.strictEqual(VzdumpLog.formatElapsed(100 * 3600), "100:00:00")
  })
})

describe("log lines", () => {
  const at = new Date("2026-11-27T09:00:00Z")

  it("prefixes task-log lines by level", () => {
    assert.deepStrictEqual(VzdumpLog.formatTaskLines(VzdumpLog.info("status = running")), ["INFO: status = running"])
    assert.deepStrictEqual(VzdumpLog.formatTaskLines(VzdumpLog.warn("careful")), ["WARN: careful"])
    assert.deepStrictEqual(VzdumpLog.formatTaskLines(VzdumpLog.err("broken\n")), ["ERROR: broken"])
  })

  it("splits multi-line messages and drops empty ones", () => {
    assert.deepStrictEqual(VzdumpLog.formatTaskLines(VzdumpLog.info("a\n\nb\n\n")), ["INFO: a", "INFO: ", "INFO: b"])
    assert.deepStrictEqual(VzdumpLog.formatTaskLines(VzdumpLog.info("")), [])
    assert.deepStrictEqual(VzdumpLog.formatTaskLines(VzdumpLog.info("\n")), [])
  })

  it("timestamps log-file lines in the given zone", () => {
    assert.deepStrictEqual(
      VzdumpLog.formatLogFileLines(VzdumpLog.info("Starting Backup of VM 100 (qemu)"), at, "Europe/Vienna"),
      ["2026-11-27 10:00:00 INFO: Starting Backup of VM 100 (qemu)"]
    )
    assert.deepStrictEqual(VzdumpLog.formatLogFileLines(VzdumpLog.err("x\ny"), at, "UTC"), [
      "2026-11-27 09:00:00 ERROR: x",
      "2026-11-27 09:00:00 ERROR: y"
    ])
    assert.deepStrictEqual(
      VzdumpLog.formatLogFileLines(VzdumpLog.warn("w"), new Date("2026-07-01T23:30:05Z"), "America/New_York"),
      ["2026-07-01 19:30:05 WARN: w"]
    )
  })

  it("builds vzdump's message texts", () => {
    const M = VzdumpLog.Messages
    assert.strictEqual(M.startingBackup(100), "Starting Backup of VM 100 (qemu)")
    assert.strictEqual(M.backupStartedAt(at, "Europe/Vienna"), "Backup started at 2026-11-27 10:00:00")
    assert.strictEqual(
      M.includeDisk("scsi0", "local-lvm:vm-100-disk-0", 32 * GiB),
      "include disk 'scsi0' 'local-lvm:vm-100-disk-0' 32G"
    )
    assert.strictEqual(M.includeDisk("scsi0", "/dev/sdb"), "include disk 'scsi0' '/dev/sdb'")
    assert.strictEqual(
      M.excludeDisk("scsi1", "local-lvm:vm-100-disk-1", "backup=no"),
      "exclude disk 'scsi1' 'local-lvm:vm-100-disk-1' (backup=no)"
    )
    assert.strictEqual(M.bandwidthLimit(10240), "bandwidth limit: 10240 KiB/s")
    assert.strictEqual(M.archiveFileSize(1288490189), "archive file size: 1.20GB")
    assert.strictEqual(M.finishedBackup(100, 83), "Finished Backup of VM 100 (00:01:23)")
    assert.strictEqual(M.backupFailed(100, "boom"), "Backup of VM 100 failed - boom")
    assert.strictEqual(M.guestOnlineAgain(0), "guest is online again after <1 seconds")
    assert.strictEqual(M.guestOnlineAgain(3), "guest is online again after 3 seconds")
    assert.strictEqual(M.creatingVzdumpArchive("/b/x.vma.zst"), "creating vzdump archive '/b/x.vma.zst'")
  })
})
