/**
 * Schemas of the QMP messages and of the replies, arguments and events this project uses, as QEMU 7.2 sends
 * them (`qapi/*.json`). Field names stay as on the wire (`"node-name"`), so QEMU's documentation applies
 * unchanged. Reply schemas ignore fields they do not list, so newer QEMUs decode too.
 *
 * @since 0.1.0
 */
import * as Schema from "effect/Schema"

// ---------------------------------------------------------------------------------------------------------------
// Protocol
// ---------------------------------------------------------------------------------------------------------------

/**
 * `{"major": 7, "minor": 2, "micro": 22}`
 *
 * @since 0.1.0
 * @category protocol
 */
export const VersionTriple = Schema.Struct({
  major: Schema.Int,
  minor: Schema.Int,
  micro: Schema.Int
})

/**
 * @since 0.1.0
 * @category protocol
 */
export interface VersionTriple extends Schema.Schema.Type<typeof VersionTriple> {}

/**
 * The reply of `query-version`, and the `version` of the greeting.
 *
 * @since 0.1.0
 * @category replies
 */
export const VersionInfo = Schema.Struct({
  qemu: VersionTriple,
  package: Schema.String
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface VersionInfo extends Schema.Schema.Type<typeof VersionInfo> {}

/**
 * The first message QEMU sends on a QMP connection:
 * `{"QMP": {"version": {"qemu": {…}, "package": "…"}, "capabilities": ["oob"]}}`.
 *
 * @since 0.1.0
 * @category protocol
 */
export const QmpGreeting = Schema.Struct({
  QMP: Schema.Struct({
    version: VersionInfo,
    capabilities: Schema.Array(Schema.String)
  })
})

/**
 * @since 0.1.0
 * @category protocol
 */
export interface QmpGreeting extends Schema.Schema.Type<typeof QmpGreeting> {}

/**
 * An asynchronous event: `{"event": "STOP", "data": {…}, "timestamp": {"seconds": …, "microseconds": …}}`.
 *
 * @since 0.1.0
 * @category events
 */
export const QmpEvent = Schema.Struct({
  event: Schema.String,
  data: Schema.optional(Schema.Record({ key: Schema.String, value: Schema.Unknown })),
  timestamp: Schema.Struct({ seconds: Schema.Number, microseconds: Schema.Number })
})

/**
 * @since 0.1.0
 * @category events
 */
export interface QmpEvent extends Schema.Schema.Type<typeof QmpEvent> {}

/**
 * The body of an error reply.
 *
 * @since 0.1.0
 * @category protocol
 */
export const QmpErrorBody = Schema.Struct({
  class: Schema.String,
  desc: Schema.String
})

// ---------------------------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------------------------

/**
 * QEMU's `RunState`.
 *
 * @since 0.1.0
 * @category replies
 */
export const RunState = Schema.Literal(
  "debug",
  "inmigrate",
  "internal-error",
  "io-error",
  "paused",
  "postmigrate",
  "prelaunch",
  "finish-migrate",
  "restore-vm",
  "running",
  "save-vm",
  "shutdown",
  "suspended",
  "watchdog",
  "guest-panicked",
  "colo"
)

/**
 * @since 0.1.0
 * @category replies
 */
export type RunState = Schema.Schema.Type<typeof RunState>

/**
 * The reply of `query-status`, e.g. `{"status": "prelaunch", "singlestep": false, "running": false}`.
 *
 * @since 0.1.0
 * @category replies
 */
export const StatusInfo = Schema.Struct({
  running: Schema.Boolean,
  status: RunState,
  singlestep: Schema.optional(Schema.Boolean)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface StatusInfo extends Schema.Schema.Type<typeof StatusInfo> {}

/**
 * Information about an image (`ImageInfo`); `backing-image` nests.
 *
 * @since 0.1.0
 * @category replies
 */
export interface ImageInfo {
  readonly filename: string
  readonly format: string
  readonly "virtual-size": number
  readonly "actual-size"?: number | undefined
  readonly "cluster-size"?: number | undefined
  readonly "dirty-flag"?: boolean | undefined
  readonly "backing-filename"?: string | undefined
  readonly "backing-image"?: ImageInfo | undefined
}

/**
 * @since 0.1.0
 * @category replies
 */
export const ImageInfo: Schema.Schema<ImageInfo> = Schema.Struct({
  filename: Schema.String,
  format: Schema.String,
  "virtual-size": Schema.Number,
  "actual-size": Schema.optional(Schema.Number),
  "cluster-size": Schema.optional(Schema.Number),
  "dirty-flag": Schema.optional(Schema.Boolean),
  "backing-filename": Schema.optional(Schema.String),
  "backing-image": Schema.optional(Schema.suspend((): Schema.Schema<ImageInfo> => ImageInfo))
})

/**
 * A dirty bitmap of a node (`BlockDirtyInfo`). Anonymous internal bitmaps have no `name`.
 *
 * @since 0.1.0
 * @category replies
 */
export const BlockDirtyInfo = Schema.Struct({
  name: Schema.optional(Schema.String),
  count: Schema.Number,
  granularity: Schema.Number,
  recording: Schema.Boolean,
  busy: Schema.Boolean,
  persistent: Schema.Boolean,
  inconsistent: Schema.optional(Schema.Boolean)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface BlockDirtyInfo extends Schema.Schema.Type<typeof BlockDirtyInfo> {}

/**
 * A block node (`BlockDeviceInfo`): the `inserted` member of `query-block` and each element of
 * `query-named-block-nodes`.
 *
 * @since 0.1.0
 * @category replies
 */
export const BlockDeviceInfo = Schema.Struct({
  file: Schema.String,
  "node-name": Schema.optional(Schema.String),
  ro: Schema.Boolean,
  drv: Schema.String,
  "backing_file": Schema.optional(Schema.String),
  "backing_file_depth": Schema.Number,
  encrypted: Schema.Boolean,
  "detect_zeroes": Schema.String,
  image: ImageInfo,
  "dirty-bitmaps": Schema.optional(Schema.Array(BlockDirtyInfo))
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface BlockDeviceInfo extends Schema.Schema.Type<typeof BlockDeviceInfo> {}

/**
 * An element of `query-block`. With `-blockdev`, `device` is `""` and `qdev` names the device
 * (`scsi0`, or `/machine/peripheral/virtio1/virtio-backend` for virtio-blk).
 *
 * @since 0.1.0
 * @category replies
 */
export const BlockInfo = Schema.Struct({
  device: Schema.String,
  qdev: Schema.optional(Schema.String),
  type: Schema.String,
  removable: Schema.Boolean,
  locked: Schema.Boolean,
  inserted: Schema.optional(BlockDeviceInfo),
  "io-status": Schema.optional(Schema.String),
  "tray_open": Schema.optional(Schema.Boolean)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface BlockInfo extends Schema.Schema.Type<typeof BlockInfo> {}

/**
 * QEMU's `JobStatus`.
 *
 * @since 0.1.0
 * @category replies
 */
export const JobStatus = Schema.Literal(
  "undefined",
  "created",
  "running",
  "paused",
  "ready",
  "standby",
  "waiting",
  "pending",
  "aborting",
  "concluded",
  "null"
)

/**
 * @since 0.1.0
 * @category replies
 */
export type JobStatus = Schema.Schema.Type<typeof JobStatus>

/**
 * An element of `query-jobs`.
 *
 * @since 0.1.0
 * @category replies
 */
export const JobInfo = Schema.Struct({
  id: Schema.String,
  type: Schema.String,
  status: JobStatus,
  "current-progress": Schema.Number,
  "total-progress": Schema.Number,
  error: Schema.optional(Schema.String)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface JobInfo extends Schema.Schema.Type<typeof JobInfo> {}

/**
 * An element of `query-block-jobs`.
 *
 * @since 0.1.0
 * @category replies
 */
export const BlockJobInfo = Schema.Struct({
  type: Schema.String,
  device: Schema.String,
  len: Schema.Number,
  offset: Schema.Number,
  busy: Schema.Boolean,
  paused: Schema.Boolean,
  speed: Schema.Number,
  "io-status": Schema.String,
  ready: Schema.Boolean,
  status: JobStatus,
  "auto-finalize": Schema.Boolean,
  "auto-dismiss": Schema.Boolean,
  error: Schema.optional(Schema.String)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface BlockJobInfo extends Schema.Schema.Type<typeof BlockJobInfo> {}

/**
 * An element of `query-block-exports`.
 *
 * @since 0.1.0
 * @category replies
 */
export const BlockExportInfo = Schema.Struct({
  id: Schema.String,
  type: Schema.String,
  "node-name": Schema.String,
  "shutting-down": Schema.Boolean
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface BlockExportInfo extends Schema.Schema.Type<typeof BlockExportInfo> {}

/**
 * An fd set of `query-fdsets` (descriptors added with `add-fd`).
 *
 * @since 0.1.0
 * @category replies
 */
export const FdsetInfo = Schema.Struct({
  "fdset-id": Schema.Number,
  fds: Schema.Array(Schema.Struct({ fd: Schema.Number, opaque: Schema.optional(Schema.String) }))
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface FdsetInfo extends Schema.Schema.Type<typeof FdsetInfo> {}

/**
 * The reply of `add-fd`.
 *
 * @since 0.1.0
 * @category replies
 */
export const AddfdInfo = Schema.Struct({
  "fdset-id": Schema.Number,
  fd: Schema.Number
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface AddfdInfo extends Schema.Schema.Type<typeof AddfdInfo> {}

/**
 * The `{}` reply of commands that return nothing. Anything is accepted.
 *
 * @since 0.1.0
 * @category replies
 */
export const Empty = Schema.Unknown

// ---------------------------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------------------------

/**
 * `blockdev-add` options: a driver, usually a `node-name`, and driver-specific members.
 *
 * @since 0.1.0
 * @category arguments
 */
export interface BlockdevOptions {
  readonly driver: string
  readonly "node-name"?: string
  readonly [member: string]: unknown
}

/**
 * @since 0.1.0
 * @category arguments
 */
export type MirrorSyncMode = "top" | "full" | "none" | "incremental" | "bitmap"

/**
 * @since 0.1.0
 * @category arguments
 */
export type BlockdevOnError = "report" | "ignore" | "enospc" | "stop" | "auto"

/**
 * `blockdev-backup` arguments (QEMU 7.2 has no `discard-source`).
 *
 * @since 0.1.0
 * @category arguments
 */
export interface BlockdevBackupArgs {
  readonly "job-id"?: string
  readonly device: string
  readonly target: string
  readonly sync: MirrorSyncMode
  readonly speed?: number
  readonly bitmap?: string
  readonly "bitmap-mode"?: "on-success" | "never" | "always"
  readonly compress?: boolean
  readonly "on-source-error"?: BlockdevOnError
  readonly "on-target-error"?: BlockdevOnError
  readonly "auto-finalize"?: boolean
  readonly "auto-dismiss"?: boolean
  readonly "filter-node-name"?: string
  readonly "x-perf"?: {
    readonly "use-copy-range"?: boolean
    readonly "max-workers"?: number
    readonly "max-chunk"?: number
  }
}

/**
 * `block-dirty-bitmap-add` arguments.
 *
 * @since 0.1.0
 * @category arguments
 */
export interface BlockDirtyBitmapAddArgs {
  readonly node: string
  readonly name: string
  readonly granularity?: number
  readonly persistent?: boolean
  readonly disabled?: boolean
}

/**
 * Arguments of `block-dirty-bitmap-remove`, `-clear`, `-enable` and `-disable`.
 *
 * @since 0.1.0
 * @category arguments
 */
export interface BlockDirtyBitmapArgs {
  readonly node: string
  readonly name: string
}

/**
 * `block-dirty-bitmap-merge` arguments: merge `bitmaps` into `target` (all on `node` unless given as
 * `{ node, name }`).
 *
 * @since 0.1.0
 * @category arguments
 */
export interface BlockDirtyBitmapMergeArgs {
  readonly node: string
  readonly target: string
  readonly bitmaps: ReadonlyArray<string | BlockDirtyBitmapArgs>
}

/**
 * One action of `transaction`.
 *
 * @since 0.1.0
 * @category arguments
 */
export type TransactionAction =
  | { readonly type: "abort"; readonly data: Record<string, never> }
  | { readonly type: "block-dirty-bitmap-add"; readonly data: BlockDirtyBitmapAddArgs }
  | {
    readonly type:
      | "block-dirty-bitmap-remove"
      | "block-dirty-bitmap-clear"
      | "block-dirty-bitmap-enable"
      | "block-dirty-bitmap-disable"
    readonly data: BlockDirtyBitmapArgs
  }
  | { readonly type: "block-dirty-bitmap-merge"; readonly data: BlockDirtyBitmapMergeArgs }
  | { readonly type: "blockdev-backup"; readonly data: BlockdevBackupArgs }

/**
 * @since 0.1.0
 * @category arguments
 */
export interface TransactionProperties {
  readonly "completion-mode"?: "individual" | "grouped"
}

/**
 * The legacy socket address `nbd-server-start` takes.
 *
 * @since 0.1.0
 * @category arguments
 */
export type SocketAddressLegacy =
  | { readonly type: "unix"; readonly data: { readonly path: string } }
  | { readonly type: "inet"; readonly data: { readonly host: string; readonly port: string } }

/**
 * `nbd-server-start` arguments.
 *
 * @since 0.1.0
 * @category arguments
 */
export interface NbdServerStartArgs {
  readonly addr: SocketAddressLegacy
  readonly "tls-creds"?: string
  readonly "tls-authz"?: string
  readonly "max-connections"?: number
}

/**
 * `block-export-add` arguments for an NBD export.
 *
 * @since 0.1.0
 * @category arguments
 */
export interface BlockExportNbdArgs {
  readonly type: "nbd"
  readonly id: string
  readonly "node-name": string
  readonly writable?: boolean
  readonly writethrough?: boolean
  readonly iothread?: string
  readonly "fixed-iothread"?: boolean
  readonly name?: string
  readonly description?: string
  readonly bitmaps?: ReadonlyArray<string | BlockDirtyBitmapArgs>
  readonly "allocation-depth"?: boolean
}

// ---------------------------------------------------------------------------------------------------------------
// Event data
// ---------------------------------------------------------------------------------------------------------------

/**
 * `data` of `JOB_STATUS_CHANGE`.
 *
 * @since 0.1.0
 * @category events
 */
export const JobStatusChangeData = Schema.Struct({
  id: Schema.String,
  status: JobStatus
})

/**
 * `data` of `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`, `BLOCK_JOB_READY` and `BLOCK_JOB_PENDING`
 * (the last two carry fewer members).
 *
 * @since 0.1.0
 * @category events
 */
export const BlockJobEventData = Schema.Struct({
  type: Schema.String,
  device: Schema.String,
  len: Schema.optional(Schema.Number),
  offset: Schema.optional(Schema.Number),
  speed: Schema.optional(Schema.Number),
  error: Schema.optional(Schema.String)
})

/**
 * `data` of `BLOCK_IO_ERROR`; `nospace: true` means the image ran out of space.
 *
 * @since 0.1.0
 * @category events
 */
export const BlockIoErrorData = Schema.Struct({
  device: Schema.String,
  "node-name": Schema.optional(Schema.String),
  operation: Schema.Literal("read", "write"),
  action: Schema.Literal("ignore", "report", "stop"),
  nospace: Schema.optional(Schema.Boolean),
  reason: Schema.String
})

/**
 * `data` of `BLOCK_EXPORT_DELETED`.
 *
 * @since 0.1.0
 * @category events
 */
export const BlockExportDeletedData = Schema.Struct({
  id: Schema.String
})

/**
 * `data` of `SHUTDOWN`.
 *
 * @since 0.1.0
 * @category events
 */
export const ShutdownData = Schema.Struct({
  guest: Schema.Boolean,
  reason: Schema.String
})
