/**
 * "The backup command": what starts the point-in-time copy of a VM's disks, reports its progress
 * in Proxmox's `BackupStatus` shape and can be cancelled. Two engines implement it: the stock-QEMU
 * engine (fleecing + NBD pull, our code writing the archive through `BackupTarget`) and the
 * Proxmox-QEMU engine (the patched `backup` QMP command).
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import type * as Effect from "effect/Effect"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import type { BackupStatus } from "./BackupStatus.js"
import type { ArchiveSession } from "./BackupTarget.js"
import type { BitmapInfo } from "./VzdumpProgress.js"

/**
 * @since 0.1.0
 * @category errors
 */
export class BackupEngineError extends Schema.TaggedError<BackupEngineError>("@vzdump/core/BackupEngineError")(
  "BackupEngineError",
  {
    engine: Schema.String,
    reason: Schema.Literal("Prepare", "Start", "Status", "Transfer", "NoSpace", "Cancelled", "Cleanup"),
    detail: Schema.String
  }
) {
  override get message(): string {
    return this.detail
  }
}

/**
 * One disk to back up, as the workflow planned it.
 *
 * @since 0.1.0
 * @category models
 */
export interface EngineDevice {
  /** Config key: `scsi0`, `virtio1`, `efidisk0`. */
  readonly virtdev: string
  /** QEMU drive id and archive device name: `drive-scsi0`. */
  readonly qmdevice: string
  readonly path: string
  readonly format: string
  readonly size: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface EngineJob {
  readonly vmid: number
  readonly devices: ReadonlyArray<EngineDevice>
  /** The VM's monitor connection, shared with the workflow for the whole backup. */
  readonly qmp: QmpClientService
  /** The open archive; `devices[i]` is archive device `i`. */
  readonly archive: ArchiveSession
  /** Bandwidth limit in bytes per second; 0 = unlimited. */
  readonly speed: number
  /** Called for log lines the engine wants in the backup log (`INFO:` level unless it says `WARN`). */
  readonly log: (level: "info" | "warn", message: string) => Effect.Effect<void>
  /** The VM is a template (no dirty bitmap, no fleecing). */
  readonly template?: boolean | undefined
  /** vzdump's `performance: max-workers=N`. */
  readonly maxWorkers?: number | undefined
  /** vzdump's `fleecing: enabled=1` (Proxmox engine). */
  readonly fleecing?: boolean | undefined
}

/**
 * A started job. It lives in the scope `start` ran in: closing that scope tears the job's
 * resources down (and cancels it if it has not finished).
 *
 * @since 0.1.0
 * @category models
 */
export interface RunningBackup {
  readonly uuid: string
  readonly status: Effect.Effect<BackupStatus, BackupEngineError>
  readonly cancel: Effect.Effect<void>
  /** Per-drive dirty-bitmap outcome, for vzdump's `dirty-bitmap status` lines. */
  readonly bitmapInfo?: ReadonlyArray<BitmapInfo> | undefined
  /**
   * Completes once the job has ended (done, failed or cancelled), when the engine can tell. The
   * workflow still polls `status` once a second for vzdump's progress lines, but reads the final
   * status as soon as this completes instead of sleeping out the second.
   */
  readonly settled?: Effect.Effect<void> | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface BackupEngineService {
  readonly name: string
  /**
   * Runs before the guest is frozen: removes leftovers of a crashed earlier run (exports, jobs, nodes,
   * files) and sets up what the job needs, so that the freeze covers only the point in time. What it
   * sets up lives in the scope.
   */
  readonly prepare: (job: EngineJob) => Effect.Effect<void, BackupEngineError, Scope.Scope>
  /**
   * Takes the point in time and starts the transfer; returns once the copy is consistent, so the
   * workflow can thaw and resume the guest right after.
   */
  readonly start: (job: EngineJob) => Effect.Effect<RunningBackup, BackupEngineError, Scope.Scope>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class BackupEngine extends Context.Tag("@vzdump/core/BackupEngine")<BackupEngine, BackupEngineService>() {}
