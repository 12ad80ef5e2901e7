/**
 * Names in a datastore (spec §4.5, §4.6): backup types, ids, times and their directory form,
 * namespaces, archive names, and the `#qmdump#map` line of a VM config.
 *
 * @since 0.1.0
 */
import * as Either from "effect/Either"
import { PbsClientError } from "./PbsError.js"

/**
 * @since 0.1.0
 * @category models
 */
export type BackupType = "vm" | "ct" | "host"

/**
 * A snapshot's identity.
 *
 * @since 0.1.0
 * @category models
 */
export interface SnapshotId {
  readonly backupType: BackupType
  readonly backupId: string
  /** Epoch seconds, ≥ 1. */
  readonly backupTime: number
  /** Namespace path such as `a/b`; root when absent or empty. */
  readonly ns?: string | undefined
}

/**
 * A snapshot id from options where the backup type may be left out (default `vm`).
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (options: {
  readonly backupType?: BackupType | undefined
  readonly backupId: string
  readonly backupTime: number
  readonly ns?: string | undefined
}): SnapshotId => ({
  backupType: options.backupType ?? "vm",
  backupId: options.backupId,
  backupTime: options.backupTime,
  ns: options.ns
})

const SAFE_ID = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/

/**
 * `[A-Za-z0-9_][A-Za-z0-9._\-]*`.
 *
 * @since 0.1.0
 * @category validation
 */
export const isSafeId = (value: string): boolean => SAFE_ID.test(value)

/**
 * @since 0.1.0
 * @category validation
 */
export const isBackupType = (value: string): value is BackupType => value === "vm" || value === "ct" || value === "host"

/**
 * A safe id ending in `.fidx`, `.didx` or `.blob`.
 *
 * @since 0.1.0
 * @category validation
 */
export const isArchiveName = (value: string): boolean =>
  isSafeId(value) && (value.endsWith(".fidx") || value.endsWith(".didx") || value.endsWith(".blob"))

/**
 * Splits a namespace into its components; `undefined` when invalid (more than 7 levels below the
 * root, more than 256 characters, or a component that is not a safe id).
 *
 * @since 0.1.0
 * @category validation
 */
export const parseNamespace = (ns: string | undefined): ReadonlyArray<string> | undefined => {
  if (ns === undefined || ns === "") return []
  if (ns.length > 256) return undefined
  const parts = ns.split("/")
  if (parts.length > 7 || !parts.every(isSafeId)) return undefined
  return parts
}

/**
 * `YYYY-MM-DDTHH:MM:SSZ` of an epoch time.
 *
 * @since 0.1.0
 * @category formatting
 */
export const formatBackupTime = (epoch: number): string =>
  new Date(epoch * 1000).toISOString().replace(/\.\d{3}Z$/, "Z")

const TIME_DIR = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z$/

/**
 * The epoch seconds of a snapshot directory name; `undefined` when it does not match.
 *
 * @since 0.1.0
 * @category parsing
 */
export const parseBackupTime = (name: string): number | undefined => {
  const m = TIME_DIR.exec(name)
  if (m === null) return undefined
  const ms = Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!, +m[6]!)
  const epoch = ms / 1000
  return Number.isFinite(epoch) && formatBackupTime(epoch) === name ? epoch : undefined
}

/**
 * `vm/100/2024-06-05T12:00:00Z`, prefixed by `ns/<a>/ns/<b>/` in a namespace.
 *
 * @since 0.1.0
 * @category formatting
 */
export const snapshotPath = (id: SnapshotId): string =>
  [
    ...(parseNamespace(id.ns) ?? []).flatMap((part) => ["ns", part]),
    id.backupType,
    id.backupId,
    formatBackupTime(id.backupTime)
  ].join("/")

/**
 * Checks a snapshot id as the server would.
 *
 * @since 0.1.0
 * @category validation
 */
export const validate = (id: SnapshotId): Either.Either<SnapshotId, PbsClientError> => {
  const invalid = (detail: string) => Either.left(new PbsClientError({ reason: "InvalidInput", detail }))
  if (!isBackupType(id.backupType)) return invalid(`invalid backup type '${id.backupType}'`)
  if (!isSafeId(id.backupId)) return invalid(`invalid backup id '${id.backupId}'`)
  if (!Number.isSafeInteger(id.backupTime) || id.backupTime < 1) {
    return invalid(`invalid backup time ${id.backupTime}`)
  }
  if (parseNamespace(id.ns) === undefined) return invalid(`invalid namespace '${id.ns}'`)
  return Either.right(id)
}

/**
 * The archive name of a VM disk: `drive-<dev>.img.fidx`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const driveArchiveName = (device: string): string => `drive-${device}.img.fidx`

/**
 * The `#qmdump#map:<dev>:drive-<dev>:<storeid>:<format>:` line that tells a PVE restore which
 * archive goes to which device.
 *
 * @since 0.1.0
 * @category formatting
 */
export const qmdumpMapLine = (device: string, storeId: string, format: string): string =>
  `#qmdump#map:${device}:drive-${device}:${storeId}:${format}:`
