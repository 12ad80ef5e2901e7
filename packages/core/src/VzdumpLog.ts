/**
 * vzdump's log lines and the number formats inside them, byte for byte: the `INFO:`/`WARN:`/`ERROR:`
 * task-log lines, the per-guest log file's timestamped lines, `render_bytes`, `render_duration`, the
 * disk-size format of `include disk …` and the `archive file size: …`/`Finished Backup …` formats.
 * Third-party tools parse these lines, so the texts here follow vzdump exactly.
 *
 * Everything here is pure: log entries are data, printing them is the caller's business.
 *
 * @since 0.1.0
 */
import * as perl from "./internal/perlFormat.js"

/**
 * The three levels of vzdump's log function.
 *
 * @since 0.1.0
 * @category models
 */
export type LogLevel = "info" | "warn" | "err"

/**
 * One log message. A message may span several lines; each becomes its own log line.
 *
 * @since 0.1.0
 * @category models
 */
export interface LogEntry {
  readonly level: LogLevel
  readonly message: string
}

/**
 * @since 0.1.0
 * @category constructors
 */
export const info = (message: string): LogEntry => ({ level: "info", message })

/**
 * @since 0.1.0
 * @category constructors
 */
export const warn = (message: string): LogEntry => ({ level: "warn", message })

/**
 * @since 0.1.0
 * @category constructors
 */
export const err = (message: string): LogEntry => ({ level: "err", message })

/**
 * The prefix vzdump prints for a level.
 *
 * @since 0.1.0
 * @category formatting
 */
export const levelPrefix = (level: LogLevel): "INFO:" | "WARN:" | "ERROR:" =>
  level === "info" ? "INFO:" : level === "warn" ? "WARN:" : "ERROR:"

const messageLines = (message: string): Array<string> => {
  const chomped = message.endsWith("\n") ? message.slice(0, -1) : message
  // Perl's `return if !$msg`: an empty message (and the string "0") prints nothing
  if (chomped === "" || chomped === "0") return []
  const lines = chomped.split("\n")
  // Perl's split drops trailing empty fields
  while (lines.length > 0 && lines[lines.length - 1] === "") lines.pop()
  return lines
}

/**
 * The task-log (stderr) lines of an entry: `INFO: <line>` per message line.
 *
 * @example
 * formatTaskLines(info("status = running")) // ["INFO: status = running"]
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatTaskLines = (entry: LogEntry): Array<string> => {
  const prefix = levelPrefix(entry.level)
  return messageLines(entry.message).map((line) => `${prefix} ${line}`)
}

/**
 * The per-guest log file lines of an entry: `YYYY-MM-DD HH:MM:SS INFO: <line>`, in local time
 * (`timeZone` is an IANA zone; the process's zone when omitted).
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatLogFileLines = (entry: LogEntry, at: Date, timeZone?: string): Array<string> => {
  const prefix = `${perl.timestamp(at, timeZone)} ${levelPrefix(entry.level)}`
  return messageLines(entry.message).map((line) => `${prefix} ${line}`)
}

/**
 * `strftime("%F %H:%M:%S", localtime)`, e.g. `2026-11-27 10:00:00`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const renderTimestamp = (at: Date, timeZone?: string): string => perl.timestamp(at, timeZone)

/**
 * `sprintf("%.<digits>f")` with C rounding (ties to even on the exact binary value).
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatFixed = (value: number, digits: number): string => perl.fixed(value, digits)

const byteUnits = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] as const

/**
 * `PVE::Format::render_bytes`: binary units, `precision` decimals (default 2; 0 also means 2, as in
 * Perl's `$precision || 2`).
 *
 * @example
 * renderBytes(1717986918, 1) // "1.6 GiB"
 * renderBytes(34359738368)   // "32.00 GiB"
 *
 * @since 0.1.0
 * @category formatting
 */
export const renderBytes = (value: number, precision?: number): string => {
  let unit = 0
  let scaled = value
  if (value > 1023) {
    unit = Math.min(perl.int(Math.log(value) / Math.log(1024)), byteUnits.length - 1)
    scaled = value / 1024 ** unit
  }
  return `${perl.fixed(scaled, precision || 2)} ${byteUnits[unit]}`
}

/**
 * `PVE::Format::render_duration`: `0s`, `12s`, `1m 5s`, `2h 3m 4s`, `1w 2d 3h 4m 5s`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const renderDuration = (seconds: number): string => {
  let rest = perl.roundHalfAway(seconds)
  if (!rest) return "0s"
  const parts: Array<string> = []
  for (const [unit, length] of [["w", 7 * 24 * 3600], ["d", 24 * 3600], ["h", 3600], ["m", 60], ["s", 1]] as const) {
    const v = perl.int(rest / length)
    if (v > 0) {
      parts.push(`${v}${unit}`)
      rest -= v * length
    }
  }
  return parts.join(" ")
}

/**
 * `PVE::JSONSchema::format_size`, the disk-size format of configs and of `include disk … 32G`: the
 * largest unit (K, M, G, T) that divides the size exactly, else plain bytes.
 *
 * @example
 * formatDiskSize(34359738368) // "32G"
 * formatDiskSize(524288000)   // "500M"
 * formatDiskSize(1000)        // "1000"
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatDiskSize = (bytes: number): string => {
  const size = perl.int(bytes)
  const kb = perl.int(size / 1024)
  if (kb * 1024 !== size) return String(size)
  const mb = perl.int(kb / 1024)
  if (mb * 1024 !== kb) return `${kb}K`
  const gb = perl.int(mb / 1024)
  if (gb * 1024 !== mb) return `${mb}M`
  const tb = perl.int(gb / 1024)
  if (tb * 1024 !== gb) return `${gb}G`
  return `${tb}T`
}

/**
 * `PVE::JSONSchema::parse_size`: `32G`, `512M`, `1T`, `4K`, `1.5G`, plain bytes → bytes (truncated
 * to an integer). `undefined` when the text is not a size.
 *
 * @since 0.1.0
 * @category parsing
 */
export const parseDiskSize = (text: string): number | undefined => {
  const match = /^(\d+(?:\.\d+)?)([KMGT])?$/.exec(text)
  if (match === null) return undefined
  const value = Number(match[1])
  const factor = match[2] === undefined ? 1 : 1024 ** ("KMGT".indexOf(match[2]) + 1)
  return perl.int(value * factor)
}

/**
 * `PVE::VZDump::format_size`, used for `archive file size: …`: `KB`/`MB` truncated, `GB`/`TB` with
 * two decimals (decimal point, binary units).
 *
 * @example
 * formatArchiveSize(1288490189) // "1.20GB"
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatArchiveSize = (bytes: number): string => {
  const kb = bytes / 1024
  if (kb < 1024) return `${perl.int(kb)}KB`
  const mb = bytes / (1024 * 1024)
  if (mb < 1024) return `${perl.int(mb)}MB`
  const gb = mb / 1024
  if (gb < 1024) return `${perl.fixed(gb, 2)}GB`
  return `${perl.fixed(gb / 1024, 2)}TB`
}

/**
 * `PVE::VZDump::format_time`: `HH:MM:SS` (hours not wrapped).
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatElapsed = (seconds: number): string => {
  const hours = perl.int(seconds / 3600)
  const rest = seconds - hours * 3600
  const minutes = perl.int(rest / 60)
  return `${perl.pad2(hours)}:${perl.pad2(minutes)}:${perl.pad2(rest - minutes * 60)}`
}

/**
 * The texts of vzdump's per-guest messages (without the `INFO:` prefix). Log them with `info`
 * unless noted.
 *
 * @since 0.1.0
 * @category messages
 */
export const Messages = {
  startingBackup: (vmid: number, type = "qemu"): string => `Starting Backup of VM ${vmid} (${type})`,
  /** Task log only (not the per-guest log file). */
  backupStartedAt: (at: Date, timeZone?: string): string => `Backup started at ${perl.timestamp(at, timeZone)}`,
  status: (running: boolean): string => `status = ${running ? "running" : "stopped"}`,
  vmName: (name: string): string => `VM Name: ${name}`,
  includeDisk: (virtdev: string, volid: string, size?: number): string =>
    `include disk '${virtdev}' '${volid}'${size === undefined ? "" : ` ${formatDiskSize(size)}`}`,
  excludeDisk: (virtdev: string, volid: string, reason: string): string =>
    `exclude disk '${virtdev}' '${volid}' (${reason})`,
  backupMode: (mode: string): string => `backup mode: ${mode}`,
  bandwidthLimit: (kibPerSecond: number): string => `bandwidth limit: ${kibPerSecond} KiB/s`,
  ionicePriority: (priority: number): string => `ionice priority: ${priority}`,
  stoppingGuest: "stopping virtual guest",
  suspendingGuest: "suspending guest",
  guestOnlineAgain: (delaySeconds: number): string =>
    `guest is online again after ${delaySeconds < 1 ? "<1" : perl.int(delaySeconds)} seconds`,
  skipUnusedDrive: (volid: string): string => `skip unused drive '${volid}' (not included into backup)`,
  specialSectionFound: "special config section found (not included into backup)",
  snapshotsFound: "snapshots found (not included into backup)",
  pendingFound: "pending configuration changes found (not included into backup)",
  sendingToStdout: "sending archive to stdout",
  creatingVzdumpArchive: (path: string): string => `creating vzdump archive '${path}'`,
  creatingPbsArchive: (snapshot: string): string => `creating Proxmox Backup Server archive '${snapshot}'`,
  backupContainsNoDisks: "backup contains no disks",
  startingDisklessBackup: "starting diskless backup",
  startingKvm: "starting kvm to execute backup task",
  attachingTpm: "attaching TPM drive to QEMU for backup",
  attachingFleecing: (qmdevice: string, volid: string): string =>
    `${qmdevice}: attaching fleecing image ${volid} to QEMU`,
  issuingFsFreeze: "issuing guest-agent 'fs-freeze' command",
  startingBackupViaQmp: "starting backup via QMP command",
  issuingFsThaw: "issuing guest-agent 'fs-thaw' command",
  startedBackupTask: (uuid: string): string => `started backup task '${uuid}'`,
  resumingVm: (afterSeconds?: number): string =>
    afterSeconds === undefined ? "resuming VM again" : `resuming VM again after ${afterSeconds} seconds`,
  abortingBackupJob: "aborting backup job",
  stoppingKvm: "stopping kvm after backup task",
  kvmStatusChanged: (status: string): string => `kvm status changed after backup ('${status}') - keep VM running`,
  /** Log with `warn`. */
  leftOverJob: "left-over backup job still running inside QEMU - canceling now",
  archiveFileSize: (bytes: number): string => `archive file size: ${formatArchiveSize(bytes)}`,
  addingNotes: "adding notes to backup",
  markingProtected: "marking backup as protected",
  finishedBackup: (vmid: number, elapsedSeconds: number): string =>
    `Finished Backup of VM ${vmid} (${formatElapsed(elapsedSeconds)})`,
  /** Log with `err`. */
  backupFailed: (vmid: number, error: string): string => `Backup of VM ${vmid} failed - ${error}`,
  /** Task log only. */
  backupFinishedAt: (at: Date, timeZone?: string): string => `Backup finished at ${perl.timestamp(at, timeZone)}`,
  /** Task log only. */
  failedAt: (at: Date, timeZone?: string): string => `Failed at ${perl.timestamp(at, timeZone)}`
} as const
