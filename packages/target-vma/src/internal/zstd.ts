/**
 * zstd compression in this process through the `zstd-napi` binding, for archive outputs.
 *
 * The compression context runs in zstd's multi-threaded mode with `threads` workers (zstd's own threads,
 * like `zstd --threads=N`), so the main thread only hands input over; the compressed bytes go to the file
 * descriptor through a bounded ring of output buffers written in order on libuv's pool. A write returns
 * once its input has been consumed by zstd; the ring's size bounds memory and applies back-pressure.
 * The frames carry a content checksum, as the `zstd` command writes by default.
 */
import binding from "zstd-napi/binding.js"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Queue from "effect/Queue"
import type * as Scope from "effect/Scope"
import type { VmaIoError } from "../VmaError.js"
import * as io from "./io.js"

/** Output buffers of the ring: a buffer goes out when less than SLACK bytes are left in it. */
const OUT_SIZE = 2 * 1024 * 1024
const OUT_BUFFERS = 4
const SLACK = 128 * 1024

export interface ZstdWriter {
  readonly write: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, VmaIoError>
  /** Ends the frame, writes the rest and waits until every byte has been handed to the kernel. */
  readonly end: Effect.Effect<void, VmaIoError>
}

interface Filled {
  readonly buffer: Buffer
  readonly length: number
}

/**
 * A zstd stream (level `level`, 0 for zstd's default; `threads` ≥ 1 workers) onto `fd`. The writer fiber
 * lives in the scope.
 */
export const make = (
  fd: number,
  name: string,
  options: { readonly level: number; readonly threads: number }
): Effect.Effect<ZstdWriter, VmaIoError, Scope.Scope> =>
  Effect.gen(function*() {
    const compressError = (cause: unknown) => io.ioError("compress", name, cause)
    const cctx = yield* Effect.try({
      try: () => {
        const c = new binding.CCtx()
        c.setParameter(binding.CParameter.compressionLevel, options.level)
        c.setParameter(binding.CParameter.checksumFlag, 1)
        c.setParameter(binding.CParameter.nbWorkers, Math.max(1, options.threads))
        return c
      },
      catch: compressError
    })
    const free = yield* Queue.bounded<Buffer>(OUT_BUFFERS)
    yield* Queue.offerAll(free, Array.from({ length: OUT_BUFFERS }, () => Buffer.allocUnsafe(OUT_SIZE)))
    // `null` ends the writer fiber after everything before it was written. Unbounded: the ring already
    // bounds what it can hold, and offering must not block once the writer has failed.
    const filled = yield* Queue.unbounded<Filled | null>()
    const failed = yield* Deferred.make<never, VmaIoError>()
    const written = yield* Deferred.make<void>()
    const writerLoop: Effect.Effect<void> = Effect.gen(function*() {
      while (true) {
        const next = yield* Queue.take(filled)
        if (next === null) return yield* Deferred.succeed(written, undefined)
        const ok = yield* io.writeAll(fd, [next.buffer.subarray(0, next.length)], null, name).pipe(
          Effect.as(true),
          Effect.catchAll((e) => Effect.as(Deferred.fail(failed, e), false))
        )
        if (!ok) return
        yield* Queue.offer(free, next.buffer)
      }
    })
    yield* Effect.forkScoped(writerLoop)
    // A buffer from the ring, or the writer's failure.
    const takeBuffer = Effect.raceFirst(Queue.take(free), Deferred.await(failed))
    let current: Buffer | undefined
    let used = 0
    const handOver = Effect.suspend(() => {
      if (current === undefined || used === 0) return Effect.void
      const buffer = current
      const length = used
      current = undefined
      used = 0
      return Queue.offer(filled, { buffer, length })
    })
    /** Feeds `src` (or ends the frame) until all is consumed (and, at the end, flushed). */
    const feed = (src: Uint8Array, end: boolean): Effect.Effect<void, VmaIoError> =>
      Effect.gen(function*() {
        let rest = src
        while (true) {
          if (current === undefined) current = yield* takeBuffer
          const buffer: Buffer = current
          const step = yield* Effect.try({
            try: () =>
              cctx.compressStream2(
                buffer.subarray(used),
                rest,
                end ? binding.EndDirective.end : binding.EndDirective.continue
              ),
            catch: compressError
          })
          const [remaining, produced, consumed] = step
          used += produced
          rest = rest.subarray(consumed)
          if (OUT_SIZE - used < SLACK) yield* handOver
          if (end ? remaining === 0 : rest.length === 0) return
        }
      })
    let ended = false
    return {
      write: (chunks) =>
        Effect.gen(function*() {
          if (ended) return yield* Effect.fail(io.ioError("write", name, { code: "EBADF" }))
          for (const chunk of chunks) if (chunk.byteLength > 0) yield* feed(chunk, false)
          // zstd keeps up to a job of input buffered; what it produced so far may still be in `current`.
        }),
      end: Effect.gen(function*() {
        if (ended) return
        ended = true
        yield* feed(new Uint8Array(0), true)
        yield* handOver
        yield* Queue.offer(filled, null)
        yield* Effect.raceFirst(Deferred.await(written), Deferred.await(failed))
      })
    } satisfies ZstdWriter
  })
