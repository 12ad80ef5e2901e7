/**
 * zstd compression through the `zstd-napi` binding, on a worker thread, for archive outputs.
 *
 * `ZSTD_compressStream2` blocks its caller whenever zstd's workers are behind; on the main thread that
 * would also hold up every read and write waiting for the event loop (and, in a backup, the NBD client).
 * So a worker thread owns the compression context (zstd's multi-threaded mode with `threads` workers, like
 * `zstd --threads=N`) and writes the compressed bytes to the file descriptor itself. The main thread copies
 * the archive bytes into a ring of shared slots and hands each full slot over; a write returns as soon as
 * its bytes are copied, so callers may reuse their buffers at once. Bytes that already live in a
 * `SharedArrayBuffer` (the `vma` CLI reads disks into such buffers) are not copied: the worker reads them
 * in place, and the write returns once the worker has consumed them. The ring bounds memory and applies
 * back-pressure. Frames carry a content checksum, as the `zstd` command writes by default.
 */
import { createRequire } from "node:module"
import { Worker } from "node:worker_threads"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as FiberId from "effect/FiberId"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import type * as Scope from "effect/Scope"
import type { VmaIoError } from "../VmaError.js"
import * as io from "./io.js"

const SLOT_SIZE = 4 * 1024 * 1024
const SLOTS = 4
/** Shared chunks at least this large are compressed in place rather than copied into a slot. */
const IN_PLACE_MIN = 64 * 1024

export interface ZstdWriter {
  readonly write: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, VmaIoError>
  /** Ends the frame and waits until every compressed byte has been handed to the kernel. */
  readonly end: Effect.Effect<void, VmaIoError>
}

/** Messages from the worker. */
type FromWorker =
  | { readonly free: number }
  | { readonly consumed: number }
  | { readonly done: true }
  | { readonly error: { readonly operation: string; readonly code?: string; readonly message: string } }

/**
 * The worker: compresses each slot it is given and writes the output with blocking writes (retrying
 * EAGAIN on non-blocking pipes), then gives the slot back.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads")
const fs = require("node:fs")
const zstd = require(workerData.binding)
const { fd, level, threads, slots, outSize } = workerData
const views = slots.map((s) => Buffer.from(s))
const out = Buffer.allocUnsafe(outSize)
const pause = new Int32Array(new SharedArrayBuffer(4))
const writeOut = (length) => {
  let at = 0
  while (at < length) {
    try {
      at += fs.writeSync(fd, out, at, length - at)
    } catch (e) {
      if (e.code === "EAGAIN") { Atomics.wait(pause, 0, 0, 2); continue }
      throw Object.assign(e, { operation: "write" })
    }
  }
}
let cctx
try {
  cctx = new zstd.CCtx()
  cctx.setParameter(zstd.CParameter.compressionLevel, level)
  cctx.setParameter(zstd.CParameter.checksumFlag, 1)
  cctx.setParameter(zstd.CParameter.nbWorkers, threads)
} catch (e) {
  parentPort.postMessage({ error: { operation: "compress", message: String(e && e.message || e) } })
}
parentPort.on("message", (m) => {
  if (cctx === undefined) return
  try {
    if (m.end === true) {
      let remaining = 1
      while (remaining !== 0) {
        const r = cctx.compressStream2(out, new Uint8Array(0), zstd.EndDirective.end)
        remaining = r[0]
        writeOut(r[1])
      }
      parentPort.postMessage({ done: true })
      return
    }
    let src = m.shared !== undefined ? new Uint8Array(m.shared, m.offset, m.length) : views[m.slot].subarray(0, m.length)
    while (src.length > 0) {
      const r = cctx.compressStream2(out, src, zstd.EndDirective.continue)
      writeOut(r[1])
      src = src.subarray(r[2])
    }
    parentPort.postMessage(m.shared !== undefined ? { consumed: m.id } : { free: m.slot })
  } catch (e) {
    cctx = undefined
    parentPort.postMessage({
      error: { operation: e.operation || "compress", code: typeof e.code === "string" ? e.code : undefined, message: String(e.message) }
    })
  }
})
`

const bindingPath = (): string => createRequire(import.meta.url).resolve("zstd-napi/binding.js")

/**
 * A zstd stream (level `level`, 0 for zstd's default; `threads` ≥ 1 workers) onto `fd`. The worker thread
 * lives in the scope.
 */
export const make = (
  fd: number,
  name: string,
  options: { readonly level: number; readonly threads: number }
): Effect.Effect<ZstdWriter, VmaIoError, Scope.Scope> =>
  Effect.gen(function*() {
    const slots = Array.from({ length: SLOTS }, () => new SharedArrayBuffer(SLOT_SIZE))
    const views = slots.map((s) => new Uint8Array(s))
    const free = yield* Queue.unbounded<number>()
    yield* Queue.offerAll(free, views.map((_, i) => i))
    const failed = yield* Deferred.make<never, VmaIoError>()
    const finished = yield* Deferred.make<void>()
    const worker = yield* Effect.acquireRelease(
      Effect.try({
        try: () =>
          new Worker(WORKER_SOURCE, {
            eval: true,
            workerData: {
              binding: bindingPath(),
              fd,
              level: options.level,
              threads: Math.max(1, options.threads),
              slots,
              outSize: SLOT_SIZE
            }
          }),
        catch: (cause) => io.ioError("compress", name, cause)
      }),
      (w) => Effect.promise(() => w.terminate())
    )
    const fail = (operation: string, cause: { readonly code?: string | undefined; readonly message: string }) =>
      Deferred.unsafeDone(failed, Effect.fail(io.ioError(operation, name, cause)))
    // Shared chunks handed over in place, by message id, until the worker has consumed them.
    const inPlace = new Map<number, Deferred.Deferred<void>>()
    let nextId = 0
    worker.on("message", (m: FromWorker) => {
      if ("free" in m) Queue.unsafeOffer(free, m.free)
      else if ("consumed" in m) {
        const done = inPlace.get(m.consumed)
        inPlace.delete(m.consumed)
        if (done !== undefined) Deferred.unsafeDone(done, Effect.void)
      }
      else if ("done" in m) Deferred.unsafeDone(finished, Effect.void)
      else fail(m.error.operation, m.error)
    })
    worker.on("error", (e) => fail("compress", e))
    worker.on("exit", (code) => fail("compress", { message: `compressor thread exited (${code})` }))
    // A free slot, or the worker's failure.
    const takeSlot = Effect.raceFirst(Queue.take(free), Deferred.await(failed))
    let slot: number | undefined
    let used = 0
    const post = (): void => {
      if (slot !== undefined && used > 0) {
        worker.postMessage({ slot, length: used })
        slot = undefined
        used = 0
      }
    }
    let ended = false
    return {
      write: (chunks) =>
        Effect.gen(function*() {
          if (ended) return yield* Effect.fail(io.ioError("write", name, { code: "EBADF" }))
          const waits: Array<Deferred.Deferred<void>> = []
          for (const chunk of chunks) {
            if (chunk.buffer instanceof SharedArrayBuffer && chunk.byteLength >= IN_PLACE_MIN) {
              post()
              const id = nextId++
              const done = Deferred.unsafeMake<void>(FiberId.none)
              inPlace.set(id, done)
              waits.push(done)
              worker.postMessage({ shared: chunk.buffer, offset: chunk.byteOffset, length: chunk.byteLength, id })
              continue
            }
            let at = 0
            while (at < chunk.byteLength) {
              if (slot === undefined) slot = yield* takeSlot
              const n = Math.min(chunk.byteLength - at, SLOT_SIZE - used)
              views[slot]!.set(chunk.subarray(at, at + n), used)
              used += n
              at += n
              if (used === SLOT_SIZE) post()
            }
          }
          for (const done of waits) yield* Effect.raceFirst(Deferred.await(done), Deferred.await(failed))
          const failure = yield* Deferred.poll(failed)
          if (Option.isSome(failure)) yield* failure.value
        }),
      end: Effect.gen(function*() {
        if (ended) return
        ended = true
        post()
        worker.postMessage({ end: true })
        yield* Effect.raceFirst(Deferred.await(finished), Deferred.await(failed))
      })
    } satisfies ZstdWriter
  })
