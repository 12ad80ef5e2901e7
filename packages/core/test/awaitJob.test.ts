import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Fiber, TestClock } from "effect"
import type { RunningBackup } from "../src/BackupEngine.js"
import type { BackupStatus } from "../src/BackupStatus.js"
import { awaitJob } from "../src/internal/awaitJob.js"
import type * as VzdumpLog from "../src/VzdumpLog.js"

const MiB = 1024 ** 2

/** A job whose status turns to done once `done` completes; `settled` is offered when `signal` is set. */
const makeJob = (done: Deferred.Deferred<void>, signal: boolean) => {
  let polls = 0
  const status = Effect.map(Deferred.isDone(done), (isDone): BackupStatus => {
    polls++
    return {
      status: isDone ? "done" : "active",
      total: 4 * MiB,
      transferred: isDone ? 4 * MiB : 0,
      "zero-bytes": 0,
      reused: 0,
      uuid: "00000000-0000-4000-8000-000000000000",
      finishing: false
    }
  })
  const job: RunningBackup = {
    uuid: "00000000-0000-4000-8000-000000000000",
    status,
    cancel: Effect.void,
    ...(signal ? { settled: Deferred.await(done) } : {})
  }
  return { job, polls: () => polls }
}

const log = (lines: Array<string>) => ({
  entries: (entries: ReadonlyArray<VzdumpLog.LogEntry>) =>
    Effect.sync(() => {
      for (const e of entries) lines.push(e.message)
    }),
  progress: () => Effect.void
})

describe("awaitJob (the workflow's status loop)", () => {
  it.effect("polls once a second; an engine's end signal ends the wait at once", () =>
    Effect.gen(function*() {
      const done = yield* Deferred.make<void>()
      const { job, polls } = makeJob(done, true)
      const lines: Array<string> = []
      const fiber = yield* Effect.fork(awaitJob(job, "test", log(lines), false))
      yield* TestClock.adjust("2 seconds")
      assert.strictEqual(polls(), 3, "at once, then after each second")
      yield* Deferred.succeed(done, undefined)
      // no clock movement: the signal alone lets the loop read the final status
      const last = yield* Fiber.join(fiber)
      assert.strictEqual(last.status, "done")
      assert.strictEqual(polls(), 4)
      assert.isTrue(lines.some((l) => l.startsWith("transferred 4.00 MiB in")), lines.join("\n"))
    }))

  it.effect("without the signal, the final status is read at the next second", () =>
    Effect.gen(function*() {
      const done = yield* Deferred.make<void>()
      const { job, polls } = makeJob(done, false)
      const fiber = yield* Effect.fork(awaitJob(job, "test", log([]), false))
      yield* TestClock.adjust("1 second")
      yield* Deferred.succeed(done, undefined)
      yield* Effect.yieldNow()
      assert.isNull(yield* Fiber.poll(fiber).pipe(Effect.map((o) => o._tag === "None" ? null : o)))
      yield* TestClock.adjust("1 second")
      assert.strictEqual((yield* Fiber.join(fiber)).status, "done")
      assert.strictEqual(polls(), 3)
    }))
})
