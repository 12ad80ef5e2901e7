/**
 * vzdump's `query-backup` status loop as a pure state machine: which progress lines it prints and
 * when (`  5% (1.6 GiB of 32.0 GiB) in 12s, read: 140.0 MiB/s, write: 120.0 MiB/s`, printed when the
 * percentage changed and more than 2 s passed), the dirty-bitmap lines before it, the summary lines
 * after it (`backup is sparse: …`, `backup was done incrementally, reused …`, `transferred … in N
 * seconds (…)`), and the errors it ends with. The caller polls once a second and feeds each reply in
 * with the current time; nothing here sleeps or prints.
 *
 * Also the 2020 status line (`status: P% (transferred/total), sparse Z% (zero), duration D,
 * read/write R/W MB/s`) for comparison with older logs.
 *
 * @since 0.1.0
 */
import * as perl from "./internal/perlFormat.js"
import { renderBytes, renderDuration } from "./VzdumpLog.js"

/**
 * The fields of a `query-backup` reply the loop reads (structurally compatible with
 * `BackupStatus.BackupStatus`).
 *
 * @since 0.1.0
 * @category models
 */
export interface StatusSample {
  readonly status?: string | undefined
  readonly errmsg?: string | undefined
  readonly total?: number | undefined
  readonly dirty?: number | undefined
  readonly transferred?: number | undefined
  readonly "zero-bytes"?: number | undefined
  readonly reused?: number | undefined
  readonly uuid?: string | undefined
  readonly finishing?: boolean | undefined
}

/**
 * One entry of `query-pbs-bitmap-info`.
 *
 * @since 0.1.0
 * @category models
 */
export interface BitmapInfo {
  /** QEMU device name, e.g. `drive-scsi0`. */
  readonly drive: string
  readonly action: string
  readonly size: number
  readonly dirty: number
}

/**
 * The loop's memory between polls (vzdump's `$last_*` variables).
 *
 * @since 0.1.0
 * @category models
 */
export interface ProgressState {
  readonly jobUuid: string
  /** Seconds (Unix time) when the loop started. */
  readonly startTime: number
  readonly lastTime: number
  readonly lastPercent: number
  readonly lastTotal: number
  readonly lastTarget: number
  readonly lastZero: number
  readonly lastTransferred: number
  readonly lastReused: number
  readonly lastFinishing: boolean
  /** Bytes the job has to copy: fixed from the bitmap info, or taken from each reply. */
  readonly target: number
  readonly targetFromBitmap: boolean
  readonly transferred: number
  readonly reused: number | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface ProgressStart {
  readonly state: ProgressState
  /** `scsi0: dirty-bitmap status: …` and `using fast incremental mode …` lines (INFO). */
  readonly lines: ReadonlyArray<string>
}

/**
 * What one poll decided.
 *
 * @since 0.1.0
 * @category models
 */
export type ProgressOutcome =
  | { readonly _tag: "Continue" }
  | { readonly _tag: "Done" }
  /** The job failed: `message` is vzdump's error text (`errmsg`, `unknown error`, `got unexpected …`). */
  | { readonly _tag: "Failed"; readonly message: string }

/**
 * @since 0.1.0
 * @category models
 */
export interface ProgressStep {
  readonly state: ProgressState
  /** INFO lines to log now. */
  readonly lines: ReadonlyArray<string>
  readonly outcome: ProgressOutcome
}

/**
 * @since 0.1.0
 * @category models
 */
export interface ProgressSummary {
  /** INFO lines: sparse, incremental, transferred. */
  readonly lines: ReadonlyArray<string>
  /** Total bytes of the job (vzdump's `task->{size}` for PBS). */
  readonly total: number
  readonly reused: number | undefined
}

/**
 * vzdump's human text for a `query-pbs-bitmap-info` action.
 *
 * @since 0.1.0
 * @category formatting
 */
export const bitmapActionText = (info: BitmapInfo): string => {
  switch (info.action) {
    case "not-used":
      return "disabled (no support)"
    case "not-used-removed":
      return "disabled (old bitmap cleared)"
    case "new":
      return "created new"
    case "used":
      return info.dirty === 0
        ? "OK (drive clean)"
        : `OK (${renderBytes(info.dirty, 1)} of ${renderBytes(info.size, 1)} dirty)`
    case "invalid":
      return "existing bitmap was invalid and has been cleared"
    case "missing-recreated":
      // the TPM state is attached anew for every backup
      return info.drive === "drive-tpmstate0-backup"
        ? "created new"
        : "expected bitmap was missing and has been recreated"
    default:
      return "unknown"
  }
}

/**
 * `render_bytes(int(bytes / seconds), 1) . "/s"`, `0 B/s` for no progress.
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatRate = (bytes: number, seconds: number): string =>
  bytes <= 0 ? "0 B/s" : `${renderBytes(perl.int(bytes / seconds), 1)}/s`

/**
 * One progress line: `sprintf("%3d%% (X of Y) in D, read: R, write: W")`.
 *
 * @example
 * progressLine({ percent: 5, transferred: 1717986918, target: 34359738368, elapsed: 12,
 *   read: "140.0 MiB/s", write: "120.0 MiB/s" })
 * // "  5% (1.6 GiB of 32.0 GiB) in 12s, read: 140.0 MiB/s, write: 120.0 MiB/s"
 *
 * @since 0.1.0
 * @category formatting
 */
export const progressLine = (options: {
  readonly percent: number
  readonly transferred: number
  readonly target: number
  readonly elapsed: number
  readonly read: string
  readonly write: string
}): string =>
  `${String(perl.int(options.percent)).padStart(3, " ")}% (${renderBytes(options.transferred, 1)} of ${
    renderBytes(options.target, 1)
  }) in ${renderDuration(options.elapsed)}, read: ${options.read}, write: ${options.write}`

/**
 * `backup is sparse: X (P%) total zero data`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const sparseLine = (zero: number, target: number): string =>
  `backup is sparse: ${renderBytes(zero)} (${target ? perl.int((zero * 100) / target) : 0}%) total zero data`

/**
 * `backup was done incrementally, reused X (P%)`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const reusedLine = (reused: number, total: number): string =>
  `backup was done incrementally, reused ${renderBytes(reused)} (${total ? perl.int((reused * 100) / total) : 0}%)`

/**
 * `transferred X in N seconds (R)`, or `transferred X in <1 seconds` when no full second passed.
 *
 * @since 0.1.0
 * @category formatting
 */
export const transferredLine = (transferred: number, seconds: number): string =>
  seconds
    ? `transferred ${renderBytes(transferred)} in ${seconds} seconds (${formatRate(transferred, seconds)})`
    : `transferred ${renderBytes(transferred)} in <1 seconds`

/**
 * The 2020 plugin's status line (decimal MB, integer rates), e.g.
 * `status: 5% (1073741824/21474836480), sparse 2% (429916160), duration 12, read/write 89/53 MB/s`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const legacyStatusLine = (options: {
  readonly transferred: number
  readonly total: number
  readonly zero: number
  readonly elapsed: number
  readonly readBytes: number
  readonly writeBytes: number
  readonly interval: number
}): string => {
  const percent = options.total ? perl.int((options.transferred * 100) / options.total) : 0
  const zeroPercent = options.total ? perl.int((options.zero * 100) / options.total) : 0
  const mbps = (bytes: number) => bytes > 0 ? perl.int(bytes / options.interval / (1000 * 1000)) : 0
  return `status: ${percent}% (${options.transferred}/${options.total}), sparse ${zeroPercent}% (${options.zero}), ` +
    `duration ${options.elapsed}, read/write ${mbps(options.readBytes)}/${mbps(options.writeBytes)} MB/s`
}

/**
 * The 2020 plugin's final line: `transferred X MB in N seconds (Y MB/s)` (decimal MB); `undefined`
 * when it printed none.
 *
 * @since 0.1.0
 * @category formatting
 */
export const legacyTransferredLine = (transferred: number, seconds: number): string | undefined =>
  transferred && seconds
    ? `transferred ${perl.int(transferred / (1000 * 1000))} MB in ${seconds} seconds (${
      perl.int(transferred / seconds / (1000 * 1000))
    } MB/s)`
    : undefined

/**
 * Starts the loop. With `bitmapInfo` (QEMU reports `query-bitmap-info`), the target is the sum of the
 * dirty bytes and the bitmap lines are returned; they are not printed for templates.
 *
 * @since 0.1.0
 * @category constructors
 */
export const start = (options: {
  readonly jobUuid: string
  /** Unix time in seconds. */
  readonly now: number
  readonly bitmapInfo?: ReadonlyArray<BitmapInfo> | undefined
  readonly isTemplate?: boolean | undefined
}): ProgressStart => {
  const lines: Array<string> = []
  let target = 0
  let lastReused = 0
  if (options.bitmapInfo !== undefined) {
    let total = 0
    const sorted = [...options.bitmapInfo].sort((a, b) => a.drive < b.drive ? -1 : a.drive > b.drive ? 1 : 0)
    for (const entry of sorted) {
      if (!options.isTemplate) {
        lines.push(`${entry.drive.replace(/^drive-/, "")}: dirty-bitmap status: ${bitmapActionText(entry)}`)
      }
      target += entry.dirty
      total += entry.size
      lastReused += entry.size - entry.dirty
    }
    if (target < total) {
      lines.push(
        `using fast incremental mode (dirty-bitmap), ${renderBytes(target, 1)} dirty of ${renderBytes(total, 1)} total`
      )
    }
  }
  return {
    state: {
      jobUuid: options.jobUuid,
      startTime: options.now,
      lastTime: options.now,
      lastPercent: -1,
      lastTotal: 0,
      lastTarget: 0,
      lastZero: 0,
      lastTransferred: 0,
      lastReused,
      lastFinishing: false,
      target,
      targetFromBitmap: options.bitmapInfo !== undefined,
      transferred: 0,
      reused: undefined
    },
    lines
  }
}

/**
 * Feeds one `query-backup` reply, polled at `now` (Unix seconds).
 *
 * @since 0.1.0
 * @category combinators
 */
export const step = (state: ProgressState, sample: StatusSample, now: number): ProgressStep => {
  const total = sample.total || 0
  const dirty = sample.dirty
  const target = state.targetFromBitmap ? state.target : dirty !== undefined && dirty < total ? dirty : total
  const transferred = sample.transferred || 0
  const reused = sample.reused
  const percent = target ? perl.int((transferred * 100) / target) : 100
  const zero = sample["zero-bytes"] || 0
  const current: ProgressState = { ...state, target, transferred, reused }

  if (!sample.uuid || sample.uuid !== state.jobUuid) {
    return { state: current, lines: [], outcome: { _tag: "Failed", message: "got unexpected uuid" } }
  }

  const elapsed = now - state.startTime
  const readBytes = transferred - state.lastTransferred
  const writeBytes = reused ? readBytes - (reused - state.lastReused) : readBytes - (zero - state.lastZero)
  const interval = now - state.lastTime || 1
  const line = progressLine({
    percent,
    transferred,
    target,
    elapsed,
    read: formatRate(readBytes, interval),
    write: formatRate(writeBytes, interval)
  })

  const result = sample.status || "unknown"
  if (result !== "active") {
    const lines = state.lastPercent < 100 ? [line] : []
    if (result !== "done") {
      const message = result === "error" ? sample.errmsg || "unknown error" : `got unexpected status '${result}'`
      return { state: current, lines, outcome: { _tag: "Failed", message } }
    }
    return {
      state: {
        ...current,
        lastTarget: target || state.lastTarget,
        lastTotal: total || state.lastTotal,
        lastZero: zero || state.lastZero,
        lastTransferred: transferred || state.lastTransferred
      },
      lines,
      outcome: { _tag: "Done" }
    }
  }

  if (percent !== state.lastPercent && interval > 2) {
    const lines = [line]
    const finishing = sample.finishing === true
    if (!state.lastFinishing && finishing) lines.push("Waiting for server to finish backup validation...")
    return {
      state: {
        ...current,
        lastPercent: percent,
        lastTarget: target || state.lastTarget,
        lastTotal: total || state.lastTotal,
        lastZero: zero || state.lastZero,
        lastTransferred: transferred || state.lastTransferred,
        lastTime: now,
        lastReused: reused ?? 0,
        lastFinishing: finishing
      },
      lines,
      outcome: { _tag: "Continue" }
    }
  }
  return { state: current, lines: [], outcome: { _tag: "Continue" } }
}

/**
 * The lines after a `Done` outcome, at `now` (Unix seconds).
 *
 * @since 0.1.0
 * @category combinators
 */
export const finish = (state: ProgressState, now: number): ProgressSummary => {
  const elapsed = now - state.startTime
  const lines: Array<string> = []
  if (state.lastZero) lines.push(sparseLine(state.lastZero, state.lastTarget))
  if (state.reused) lines.push(reusedLine(state.reused, state.lastTotal))
  if (state.transferred) lines.push(transferredLine(state.transferred, elapsed))
  return { lines, total: state.lastTotal, reused: state.reused }
}
