import { assert, describe, it } from "@effect/vitest"
import * as VzdumpProgress from "../src/VzdumpProgress.js"

const MiB = 1024 ** 2
const GiB = 1024 ** 3

/** Feeds samples at given times, collecting lines, until an outcome other than Continue. */
const run = (
  start: VzdumpProgress.ProgressStart,
  polls: ReadonlyArray<readonly [number, VzdumpProgress.StatusSample]>
) => {
  let state = start.state
  const lines = [...start.lines]
  let outcome: VzdumpProgress.ProgressOutcome = { _tag: "Continue" }
  for (const [now, sample] of polls) {
    const result = VzdumpProgress.step(state, sample, now)
    state = result.state
    lines.push(...result.lines)
    outcome = result.outcome
    if (outcome._tag !== "Continue") break
  }
  return { state, lines, outcome }
}

describe("progress lines", () => {
  it("formats the spec's example line", () => {
    assert.strictEqual(
      VzdumpProgress.progressLine({
        percent: 5,
        transferred: 1717986918,
        target: 32 * GiB,
        elapsed: 12,
        read: "140.0 MiB/s",
        write: "120.0 MiB/s"
      }),
      "  5% (1.6 GiB of 32.0 GiB) in 12s, read: 140.0 MiB/s, write: 120.0 MiB/s"
    )
  })

  it("formats rates", () => {
    assert.strictEqual(VzdumpProgress.formatRate(0, 5), "0 B/s")
    assert.strictEqual(VzdumpProgress.formatRate(-10, 5), "0 B/s")
    assert.strictEqual(VzdumpProgress.formatRate(420 * MiB, 3), "140.0 MiB/s")
    assert.strictEqual(VzdumpProgress.formatRate(1000, 3), "333.0 B/s")
  })

  it("formats the summary lines", () => {
    assert.strictEqual(
      VzdumpProgress.sparseLine(10 * GiB, 32 * GiB),
      "backup is sparse: 10.00 GiB (31%) total zero data"
    )
    assert.strictEqual(VzdumpProgress.sparseLine(5, 0), "backup is sparse: 5.00 B (0%) total zero data")
    assert.strictEqual(
      VzdumpProgress.reusedLine(6 * GiB, 10 * GiB),
      "backup was done incrementally, reused 6.00 GiB (60%)"
    )
    assert.strictEqual(VzdumpProgress.transferredLine(32 * GiB, 20), "transferred 32.00 GiB in 20 seconds (1.6 GiB/s)")
    assert.strictEqual(VzdumpProgress.transferredLine(4 * MiB, 0), "transferred 4.00 MiB in <1 seconds")
  })

  it("formats the 2020 status lines", () => {
    assert.strictEqual(
      VzdumpProgress.legacyStatusLine({
        transferred: 1073741824,
        total: 21474836480,
        zero: 429916160,
        elapsed: 12,
        readBytes: 1073741824,
        writeBytes: 643825664,
        interval: 12
      }),
      "status: 5% (1073741824/21474836480), sparse 2% (429916160), duration 12, read/write 89/53 MB/s"
    )
    assert.strictEqual(
      VzdumpProgress.legacyTransferredLine(21474836480, 100),
      "transferred 21474 MB in 100 seconds (214 MB/s)"
    )
    assert.strictEqual(VzdumpProgress.legacyTransferredLine(21474836480, 0), undefined)
  })
})

describe("status loop", () => {
  it("prints when the percentage changed and more than 2 s passed, then the summary", () => {
    const start = VzdumpProgress.start({ jobUuid: "u1", now: 1000 })
    assert.deepStrictEqual(start.lines, [])
    const active = (transferred: number, zero: number): VzdumpProgress.StatusSample => ({
      status: "active",
      uuid: "u1",
      total: 32 * GiB,
      transferred,
      "zero-bytes": zero,
      finishing: false
    })
    const result = run(start, [
      [1001, active(0, 0)], // changed percentage, but only 1 s: silent
      [1003, active(420 * MiB, 60 * MiB)],
      [1004, active(500 * MiB, 60 * MiB)], // same percentage
      [1010, active(1120 * MiB, 200 * MiB)],
      [1020, { status: "done", uuid: "u1", total: 32 * GiB, transferred: 32 * GiB, "zero-bytes": 10 * GiB }]
    ])
    assert.deepStrictEqual(result.outcome, { _tag: "Done" })
    assert.deepStrictEqual(result.lines, [
      "  1% (420.0 MiB of 32.0 GiB) in 3s, read: 140.0 MiB/s, write: 120.0 MiB/s",
      "  3% (1.1 GiB of 32.0 GiB) in 10s, read: 100.0 MiB/s, write: 80.0 MiB/s",
      "100% (32.0 GiB of 32.0 GiB) in 20s, read: 3.1 GiB/s, write: 2.1 GiB/s"
    ])
    const summary = VzdumpProgress.finish(result.state, 1020)
    assert.deepStrictEqual(summary.lines, [
      "backup is sparse: 10.00 GiB (31%) total zero data",
      "transferred 32.00 GiB in 20 seconds (1.6 GiB/s)"
    ])
    assert.strictEqual(summary.total, 32 * GiB)
  })

  it("divides by dirty when it is below total", () => {
    const start = VzdumpProgress.start({ jobUuid: "u", now: 0 })
    const step = VzdumpProgress.step(start.state, {
      status: "active",
      uuid: "u",
      total: 10 * GiB,
      dirty: 1 * GiB,
      transferred: 512 * MiB
    }, 3)
    assert.deepStrictEqual(step.lines, [" 50% (512.0 MiB of 1.0 GiB) in 3s, read: 170.7 MiB/s, write: 170.7 MiB/s"])
  })

  it("reports PBS reuse, the validation wait and the incremental summary", () => {
    const start = VzdumpProgress.start({ jobUuid: "p", now: 1000 })
    const result = run(start, [
      [1004, { status: "active", uuid: "p", total: 10 * GiB, transferred: 3 * GiB, reused: 2 * GiB, finishing: false }],
      [1008, { status: "active", uuid: "p", total: 10 * GiB, transferred: 10 * GiB, reused: 6 * GiB, finishing: true }],
      [1010, { status: "done", uuid: "p", total: 10 * GiB, transferred: 10 * GiB, reused: 6 * GiB, finishing: true }]
    ])
    assert.deepStrictEqual(result.outcome, { _tag: "Done" })
    assert.deepStrictEqual(result.lines, [
      " 30% (3.0 GiB of 10.0 GiB) in 4s, read: 768.0 MiB/s, write: 256.0 MiB/s",
      "100% (10.0 GiB of 10.0 GiB) in 8s, read: 1.8 GiB/s, write: 768.0 MiB/s",
      "Waiting for server to finish backup validation..."
    ])
    assert.deepStrictEqual(VzdumpProgress.finish(result.state, 1010).lines, [
      "backup was done incrementally, reused 6.00 GiB (60%)",
      "transferred 10.00 GiB in 10 seconds (1.0 GiB/s)"
    ])
  })

  it("prints dirty-bitmap lines and uses the bitmap target", () => {
    const bitmapInfo: ReadonlyArray<VzdumpProgress.BitmapInfo> = [
      { drive: "drive-scsi0", action: "used", size: 20 * GiB, dirty: 92 * MiB },
      { drive: "drive-efidisk0", action: "new", size: 528 * 1024, dirty: 528 * 1024 },
      { drive: "drive-tpmstate0-backup", action: "missing-recreated", size: 4 * MiB, dirty: 4 * MiB },
      { drive: "drive-virtio1", action: "used", size: 1 * GiB, dirty: 0 }
    ]
    const start = VzdumpProgress.start({ jobUuid: "b", now: 0, bitmapInfo })
    assert.deepStrictEqual(start.lines, [
      "efidisk0: dirty-bitmap status: created new",
      "scsi0: dirty-bitmap status: OK (92.0 MiB of 20.0 GiB dirty)",
      "tpmstate0-backup: dirty-bitmap status: created new",
      "virtio1: dirty-bitmap status: OK (drive clean)",
      "using fast incremental mode (dirty-bitmap), 96.5 MiB dirty of 21.0 GiB total"
    ])
    // the target stays the bitmap's even when a reply says otherwise
    const step = VzdumpProgress.step(start.state, {
      status: "active",
      uuid: "b",
      total: 21 * GiB,
      dirty: 21 * GiB,
      transferred: 48 * MiB
    }, 3)
    assert.strictEqual(step.lines[0]!.startsWith(" 49% (48.0 MiB of 96.5 MiB) in 3s"), true)

    const template = VzdumpProgress.start({ jobUuid: "b", now: 0, bitmapInfo, isTemplate: true })
    assert.deepStrictEqual(
      template.lines,
      ["using fast incremental mode (dirty-bitmap), 96.5 MiB dirty of 21.0 GiB total"]
    )
  })

  it("names the other bitmap actions", () => {
    const text = (action: string, drive = "drive-scsi0") =>
      VzdumpProgress.bitmapActionText({ drive, action, size: 1, dirty: 1 })
    assert.strictEqual(text("not-used"), "disabled (no support)")
    assert.strictEqual(text("not-used-removed"), "disabled (old bitmap cleared)")
    assert.strictEqual(text("invalid"), "existing bitmap was invalid and has been cleared")
    assert.strictEqual(text("missing-recreated"), "expected bitmap was missing and has been recreated")
    assert.strictEqual(text("other"), "unknown")
  })

  it("fails on a foreign uuid, an error status and an unknown status", () => {
    const { state } = VzdumpProgress.start({ jobUuid: "mine", now: 0 })
    assert.deepStrictEqual(VzdumpProgress.step(state, { status: "active", uuid: "other" }, 1).outcome, {
      _tag: "Failed",
      message: "got unexpected uuid"
    })
    assert.deepStrictEqual(VzdumpProgress.step(state, { status: "active" }, 1).outcome, {
      _tag: "Failed",
      message: "got unexpected uuid"
    })
    const failed = VzdumpProgress.step(state, {
      status: "error",
      uuid: "mine",
      total: 4 * GiB,
      transferred: 1 * GiB,
      errmsg: "job failed with err -5 - Input/output error"
    }, 4)
    assert.deepStrictEqual(failed.outcome, { _tag: "Failed", message: "job failed with err -5 - Input/output error" })
    assert.deepStrictEqual(failed.lines, [" 25% (1.0 GiB of 4.0 GiB) in 4s, read: 256.0 MiB/s, write: 256.0 MiB/s"])
    assert.deepStrictEqual(VzdumpProgress.step(state, { status: "error", uuid: "mine" }, 1).outcome, {
      _tag: "Failed",
      message: "unknown error"
    })
    assert.deepStrictEqual(VzdumpProgress.step(state, { uuid: "mine" }, 1).outcome, {
      _tag: "Failed",
      message: "got unexpected status 'unknown'"
    })
  })

  it("says <1 seconds for a job done within the start second", () => {
    const start = VzdumpProgress.start({ jobUuid: "q", now: 50 })
    const result = run(start, [[50, { status: "done", uuid: "q", total: 4 * MiB, transferred: 4 * MiB }]])
    assert.deepStrictEqual(result.lines, ["100% (4.0 MiB of 4.0 MiB) in 0s, read: 4.0 MiB/s, write: 4.0 MiB/s"])
    assert.deepStrictEqual(VzdumpProgress.finish(result.state, 50).lines, ["transferred 4.00 MiB in <1 seconds"])
  })
})
