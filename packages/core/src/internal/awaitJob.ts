/**
 * vzdump's status loop of the workflow (`BackupJob`), apart so it can be tested on its own.
 */
import * as Clock from "effect/Clock"
import * as Effect from "effect/Effect"
import { BackupEngineError } from "../BackupEngine.js"
import type { RunningBackup } from "../BackupEngine.js"
import type { BackupStatus } from "../BackupStatus.js"
import * as VzdumpLog from "../VzdumpLog.js"
import * as VzdumpProgress from "../VzdumpProgress.js"

/** Where the loop writes: log lines, and each status polled. */
export interface JobProgressLog {
  readonly entries: (entries: ReadonlyArray<VzdumpLog.LogEntry>) => Effect.Effect<void>
  readonly progress: (status: BackupStatus) => Effect.Effect<void>
}

/** vzdump's `time()`: whole seconds. */
const wholeSeconds = Effect.map(Clock.currentTimeMillis, (millis) => Math.floor(millis / 1000))

/**
 * vzdump's status loop: polls the job (at once, then once a second) and logs the progress lines
 * until it is done; fails with the job's error message.
 */
export const awaitJob = (job: RunningBackup, engine: string, log: JobProgressLog, isTemplate: boolean) =>
  Effect.gen(function*() {
    const begin = VzdumpProgress.start({
      jobUuid: job.uuid,
      now: yield* wholeSeconds,
      bitmapInfo: job.bitmapInfo,
      isTemplate
    })
    yield* log.entries(begin.lines.map(VzdumpLog.info))
    let state = begin.state
    let settled = job.settled
    while (true) {
      const last = yield* job.status
      yield* log.progress(last)
      const step = VzdumpProgress.step(state, last, yield* wholeSeconds)
      state = step.state
      yield* log.entries(step.lines.map(VzdumpLog.info))
      if (step.outcome._tag === "Failed") {
        return yield* new BackupEngineError({ engine, reason: "Transfer", detail: step.outcome.message })
      }
      if (step.outcome._tag === "Done") {
        const summary = VzdumpProgress.finish(state, yield* wholeSeconds)
        yield* log.entries(summary.lines.map(VzdumpLog.info))
        return last
      }
      // once a second, as vzdump polls; an engine that signals the end cuts the last wait short (once:
      // should its status lag behind the signal, polling goes on at the normal pace)
      if (settled === undefined) {
        yield* Effect.sleep("1 second")
      } else if (yield* Effect.raceFirst(Effect.as(Effect.sleep("1 second"), false), Effect.as(settled, true))) {
        settled = undefined
      }
    }
  })

