/**
 * The config files stored inside a VM backup (vzdump's `assemble`): `qemu-server.conf` is the VM
 * config up to its first section header (snapshots, `[PENDING]`, `[special:…]` are dropped), without
 * `unusedN:` (each logged), `lock:`, `parent:` and old `#qmdump#`/`#vzdump#` lines, followed by one
 * `#qmdump#map:<virtdev>:<qmdevice>:<storeid>:<format>:` line per backed-up disk;
 * `qemu-server.fw` is the firewall config, when the VM has one.
 *
 * @since 0.1.0
 */
import * as VmConfig from "./VmConfig.js"
import * as VzdumpLog from "./VzdumpLog.js"

/**
 * The archive blob names.
 *
 * @since 0.1.0
 * @category constants
 */
export const configName = "qemu-server.conf"

/**
 * @since 0.1.0
 * @category constants
 */
export const firewallName = "qemu-server.fw"

/**
 * What a map line records about a disk.
 *
 * @since 0.1.0
 * @category models
 */
export interface MapEntry {
  readonly virtdev: string
  readonly qmdevice: string
  /** Empty or undefined for a path. */
  readonly storeid?: string | undefined
  /** Empty or undefined when unknown (restore then assumes `raw`). */
  readonly format?: string | undefined
}

/**
 * `#qmdump#map:<virtdev>:<qmdevice>:<storeid>:<format>:`
 *
 * @example
 * mapLine({ virtdev: "scsi0", qmdevice: "drive-scsi0", storeid: "local-lvm", format: "raw" })
 * // "#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:"
 *
 * @since 0.1.0
 * @category formatting
 */
export const mapLine = (entry: MapEntry): string =>
  `#qmdump#map:${entry.virtdev}:${entry.qmdevice}:${entry.storeid ?? ""}:${entry.format ?? ""}:`

/**
 * The map lines of an archive config, as restore reads them (`^#qmdump#map:(\S+):(\S+):(\S*):(\S*):$`).
 *
 * @since 0.1.0
 * @category parsing
 */
export const parseMapLines = (config: string): ReadonlyArray<MapEntry> =>
  config.split("\n").flatMap((line) => {
    const m = /^#qmdump#map:(\S+):(\S+):(\S*):(\S*):$/.exec(line)
    return m === null ? [] : [{ virtdev: m[1]!, qmdevice: m[2]!, storeid: m[3]!, format: m[4]! }]
  })

/**
 * The assembled files and the lines vzdump logs while assembling.
 *
 * @since 0.1.0
 * @category models
 */
export interface AssembledConfig {
  /** `qemu-server.conf` */
  readonly config: string
  /** `qemu-server.fw`, when the VM has a firewall config. */
  readonly firewall: string | undefined
  readonly log: ReadonlyArray<VzdumpLog.LogEntry>
}

/**
 * Assembles `qemu-server.conf` from the VM config file text (as a string or a parsed `VmConfig`,
 * whose text is used as written) and the disks being backed up, in their archive order (as
 * `VmVolumes.select` returns them). Lines are kept byte for byte, including blank lines before
 * the first section; a last line without newline gets one before the map lines.
 *
 * @since 0.1.0
 * @category assembling
 */
export const assemble = (
  source: string | VmConfig.VmConfig,
  volumes: ReadonlyArray<MapEntry>,
  options?: { readonly firewall?: string | undefined }
): AssembledConfig => {
  const text = typeof source === "string" ? source : VmConfig.serialize(source)
  const log: Array<VzdumpLog.LogEntry> = []
  const lines = text.length === 0 ? [] : text.split(/(?<=\n)/)
  let out = ""
  let foundSnapshot = false
  let foundPending = false
  let foundSpecial = false
  for (const line of lines) {
    if (/^#vzdump#/.test(line) || /^#qmdump#/.test(line)) continue
    const header = /^\[(.*)\]\s*$/.exec(line)
    if (header !== null) {
      if (/^PENDING$/i.test(header[1]!)) foundPending = true
      else if (/^special:.*$/.test(header[1]!)) foundSpecial = true
      else foundSnapshot = true
    }
    if (foundSnapshot || foundPending || foundSpecial) continue
    const unused = /^unused\d+:\s*(\S+)\s*/.exec(line)
    if (unused !== null) {
      log.push(VzdumpLog.info(VzdumpLog.Messages.skipUnusedDrive(unused[1]!)))
      continue
    }
    if (/^lock:/.test(line) || /^parent:/.test(line)) continue
    out += line
  }
  if (out.length > 0 && !out.endsWith("\n")) out += "\n"
  for (const volume of volumes) out += `${mapLine(volume)}\n`
  if (foundSpecial) log.push(VzdumpLog.info(VzdumpLog.Messages.specialSectionFound))
  if (foundSnapshot) log.push(VzdumpLog.info(VzdumpLog.Messages.snapshotsFound))
  if (foundPending) log.push(VzdumpLog.info(VzdumpLog.Messages.pendingFound))
  return { config: out, firewall: options?.firewall, log }
}
