/**
 * The status of a running backup job, in the shape of Proxmox's `query-backup` reply
 * (`BackupStatus`), whichever engine runs the job.
 *
 * @since 0.1.0
 */
import * as Schema from "effect/Schema"

/**
 * `query-backup`'s reply. Every field but `finishing` is optional on the wire: before any backup ran
 * in a QEMU process the reply is `{"finishing": false}`.
 *
 * @since 0.1.0
 * @category schemas
 */
export const BackupStatus = Schema.Struct({
  status: Schema.optional(Schema.Literal("active", "done", "error")),
  errmsg: Schema.optional(Schema.String),
  total: Schema.optional(Schema.Number),
  dirty: Schema.optional(Schema.Number),
  transferred: Schema.optional(Schema.Number),
  "zero-bytes": Schema.optional(Schema.Number),
  reused: Schema.optional(Schema.Number),
  "start-time": Schema.optional(Schema.Number),
  "end-time": Schema.optional(Schema.Number),
  "backup-file": Schema.optional(Schema.String),
  uuid: Schema.optional(Schema.String),
  finishing: Schema.Boolean
})

/**
 * @since 0.1.0
 * @category models
 */
export type BackupStatus = typeof BackupStatus.Type
