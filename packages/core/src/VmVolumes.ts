/**
 * Which disks vzdump backs up (`PVE::QemuConfig::get_backup_volumes` and the VM plugin's
 * `prepare`), with its log lines:
 *
 * - every drive of the main config in vzdump's order (ide, scsi, virtio, sata, efidisk0, tpmstate0);
 * - CD-ROMs (`media=cdrom`, including cloud-init drives) are skipped without a line;
 * - `backup=0` → `exclude disk 'scsi1' '<volid>' (backup=no)`;
 * - an `efidisk` without `bios: ovmf` → `exclude disk 'efidisk0' '<volid>' (efidisk but no OVMF BIOS)`;
 * - `tpmstate0` is included, as QEMU device `drive-tpmstate0-backup`;
 * - `unusedN` volumes are never considered;
 * - included → `include disk 'scsi0' 'local-lvm:vm-100-disk-0' 32G` (size from `size=`, omitted without).
 *
 * vzdump has no option to exclude single disks of a VM other than `backup=0`.
 *
 * @since 0.1.0
 */
import type * as VmConfig from "./VmConfig.js"
import * as VzdumpLog from "./VzdumpLog.js"

/**
 * `PVE::Storage::parse_volume_id`: `local-lvm:vm-100-disk-0` → storage id and volume name;
 * `undefined` for absolute paths and anything else that is not a volume id.
 *
 * @since 0.1.0
 * @category volumes
 */
export const parseVolumeId = (
  volid: string
): { readonly storeid: string; readonly volname: string } | undefined => {
  const m = /^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$/is.exec(volid)
  return m === null ? undefined : { storeid: m[1]!, volname: m[2]! }
}

/**
 * Where a volume's format came from.
 *
 * @since 0.1.0
 * @category models
 */
export type FormatSource = "property" | "extension" | "fixed" | "default"

/**
 * The image format of a drive as far as the config tells: TPM state is always `raw`; else the
 * `format=` option; else the volume name's extension (`.qcow2`, `.raw`, `.vmdk`, `.qed`, `.qcow`,
 * `.cloop`); else `raw` (LVM, ZFS, RBD volumes). Proxmox asks the storage layer; a caller that can
 * run `qemu-img info` may refine a `default`.
 *
 * @since 0.1.0
 * @category volumes
 */
export const driveFormat = (drive: VmConfig.Drive): { readonly format: string; readonly source: FormatSource } => {
  if (drive.interface === "tpmstate") return { format: "raw", source: "fixed" }
  if (drive.format !== undefined) return { format: drive.format, source: "property" }
  const ext = /\.(raw|qcow2|qcow|qed|vmdk|cloop)$/.exec(drive.file)
  if (ext !== null) return { format: ext[1]!, source: "extension" }
  return { format: "raw", source: "default" }
}

/**
 * One disk that goes into the backup (vzdump's `task->{disks}` entry).
 *
 * @since 0.1.0
 * @category models
 */
export interface BackupVolume {
  /** Config key: `scsi0`, `efidisk0`, `tpmstate0`. */
  readonly virtdev: string
  /** QEMU device / archive device name: `drive-scsi0`; `drive-tpmstate0-backup` for TPM state. */
  readonly qmdevice: string
  /** Volume id or absolute path. */
  readonly volid: string
  /** Storage id; `undefined` for a path. */
  readonly storeid: string | undefined
  readonly volname: string | undefined
  /** `size=` from the config in bytes; the real size comes from the storage or QEMU. */
  readonly size: number | undefined
  readonly format: string
  readonly formatSource: FormatSource
  readonly drive: VmConfig.Drive
}

/**
 * vzdump's verdict on one drive.
 *
 * @since 0.1.0
 * @category models
 */
export interface VolumeDecision {
  readonly virtdev: string
  readonly volid: string
  readonly included: boolean
  /** `backup=yes`, `backup=no` or `efidisk but no OVMF BIOS`. */
  readonly reason: string
}

/**
 * @since 0.1.0
 * @category models
 */
export interface VolumeSelection {
  /** Included disks sorted by config key as strings (vzdump's `sort keys`): the order of the
   * `#qmdump#map` lines, the `devlist` and the archive's devices. */
  readonly volumes: ReadonlyArray<BackupVolume>
  /** All non-CD-ROM drives in vzdump's iteration order. */
  readonly decisions: ReadonlyArray<VolumeDecision>
  /** `include disk …` / `exclude disk …` lines in vzdump's order. */
  readonly log: ReadonlyArray<VzdumpLog.LogEntry>
}

/**
 * The QEMU device name vzdump uses for a config key.
 *
 * @since 0.1.0
 * @category volumes
 */
export const qmdevice = (virtdev: string): string =>
  virtdev === "tpmstate0" ? "drive-tpmstate0-backup" : `drive-${virtdev}`

/**
 * Selects the disks of the main config for backup, as vzdump does.
 *
 * @since 0.1.0
 * @category selection
 */
export const select = (config: VmConfig.VmConfig): VolumeSelection => {
  const main = config.sections[0]!
  const decisions: Array<VolumeDecision> = []
  const log: Array<VzdumpLog.LogEntry> = []
  const included: Array<BackupVolume> = []
  for (const drive of main.drives) {
    if (drive.interface === "unused" || drive.isCdrom) continue
    let isIncluded = drive.backup ?? true
    let reason = drive.backup === undefined ? "backup=yes" : "backup=no"
    if (drive.interface === "efidisk" && main.bios !== "ovmf") {
      isIncluded = false
      reason = "efidisk but no OVMF BIOS"
    }
    decisions.push({ virtdev: drive.key, volid: drive.file, included: isIncluded, reason })
    if (!isIncluded) {
      log.push(VzdumpLog.info(VzdumpLog.Messages.excludeDisk(drive.key, drive.file, reason)))
      continue
    }
    log.push(VzdumpLog.info(VzdumpLog.Messages.includeDisk(drive.key, drive.file, drive.size)))
    const id = parseVolumeId(drive.file)
    const { format, source } = driveFormat(drive)
    included.push({
      virtdev: drive.key,
      qmdevice: qmdevice(drive.key),
      volid: drive.file,
      storeid: id?.storeid,
      volname: id?.volname,
      size: drive.size,
      format,
      formatSource: source,
      drive
    })
  }
  included.sort((a, b) => a.virtdev < b.virtdev ? -1 : a.virtdev > b.virtdev ? 1 : 0)
  return { volumes: included, decisions, log }
}

/**
 * vzdump's `devlist` QMP argument: the included devices joined with `,`.
 *
 * @since 0.1.0
 * @category selection
 */
export const devlist = (volumes: ReadonlyArray<Pick<BackupVolume, "qmdevice">>): string =>
  volumes.map((v) => v.qmdevice).join(",")
