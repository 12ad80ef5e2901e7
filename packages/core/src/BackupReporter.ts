/**
 * Where the workflow's log lines and progress go. vzdump prints `INFO:`/`WARN:`/`ERROR:` lines to
 * its task log; the workflow reports typed `BackupEvent`s to this service, and the layer decides:
 * `layerStderr` prints vzdump's task-log lines, `layerQueue` offers every event to a queue an
 * orchestrator reads as a Stream.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Queue from "effect/Queue"
import type { BackupStatus } from "./BackupStatus.js"
import * as VzdumpLog from "./VzdumpLog.js"

/**
 * One event of a VM's backup.
 *
 * @since 0.1.0
 * @category models
 */
export type BackupEvent =
  | {
    readonly _tag: "Log"
    readonly vmid: number
    readonly level: VzdumpLog.LogLevel
    readonly message: string
    readonly time: Date
  }
  | { readonly _tag: "Progress"; readonly vmid: number; readonly status: BackupStatus; readonly time: Date }

/**
 * @since 0.1.0
 * @category models
 */
export interface BackupReporterService {
  readonly report: (event: BackupEvent) => Effect.Effect<void>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class BackupReporter extends Context.Tag("@vzdump/core/BackupReporter")<
  BackupReporter,
  BackupReporterService
>() {}

/**
 * Prints log events as vzdump's task log does (`INFO: …` lines) to standard error; progress events
 * are not printed (the progress lines are log events already).
 *
 * @since 0.1.0
 * @category layers
 */
export const layerStderr: Layer.Layer<BackupReporter> = Layer.succeed(
  BackupReporter,
  BackupReporter.of({
    report: (event) =>
      event._tag === "Log"
        ? Effect.sync(() => {
          for (const line of VzdumpLog.formatTaskLines(event)) process.stderr.write(`${line}\n`)
        })
        : Effect.void
  })
)

/**
 * Offers every event to `queue` (an unbounded or sliding queue keeps the backup from waiting on a
 * slow reader).
 *
 * @since 0.1.0
 * @category layers
 */
export const layerQueue = (queue: Queue.Enqueue<BackupEvent>): Layer.Layer<BackupReporter> =>
  Layer.succeed(BackupReporter, BackupReporter.of({ report: (event) => Effect.asVoid(Queue.offer(queue, event)) }))

/**
 * Drops every event.
 *
 * @since 0.1.0
 * @category layers
 */
export const layerSilent: Layer.Layer<BackupReporter> = Layer.succeed(
  BackupReporter,
  BackupReporter.of({ report: () => Effect.void })
)
