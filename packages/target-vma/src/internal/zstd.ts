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
/** The worker's output buffers; one goes out when less than OUT_SLACK bytes are left in it. */
const OUT_SIZE = 2 * 1024 * 1024
const OUT_SLACK = 128 * 1024
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
 * The worker: feeds each slot or shared chunk it is given to zstd and gives it back once zstd has taken
 * it; the output goes out through a ring of buffers written in order with asynchronous writes (EAGAIN on
 * non-blocking pipes retried), so feeding zstd never waits for the kernel's copy.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads")
const fs = require("node:fs")
const zstd = require(workerData.binding)
const { fd, level, threads, slots, outSize, slack } = workerData
const views = slots.map((s) => Buffer.from(s))
// Output buffers: filled by zstd on this thread, written in order on libuv's pool, so zstd is fed
// while the kernel copies.
const freeOut = [0, 1, 2, 3].map(() => Buffer.allocUnsafe(outSize))
const writes = []
let writing = false
let current = null
let used = 0
const inputs = []
let active = null
let ending = false
let failed = false
let cctx
const fail = (e, operation) => {
  if (failed) return
  failed = true
  parentPort.postMessage({
    error: { operation, code: typeof e.code === "string" ? e.code : undefined, message: String(e.message) }
  })
}
const nextWrite = () => {
  if (writing || failed) return
  const w = writes.shift()
  if (w === undefined) {
    if (ending && active === null && inputs.length === 0 && current === null) parentPort.postMessage({ done: true })
    return
  }
  writing = true
  const step = (at) => {
    fs.write(fd, w.buffer, at, w.length - at, null, (e, n) => {
      if (e && e.code === "EAGAIN") return void setTimeout(() => step(at), 2)
      if (e) return fail(e, "write")
      if (at + n < w.length) return step(at + n)
      writing = false
      freeOut.push(w.buffer)
      nextWrite()
      pump()
    })
  }
  step(0)
}
const handOver = () => {
  if (current !== null && used > 0) writes.push({ buffer: current, length: used })
  else if (current !== null) freeOut.push(current)
  current = null
  used = 0
  nextWrite()
}
const pump = () => {
  try {
    while (!failed) {
      if (active === null) {
        const m = inputs.shift()
        if (m === undefined) return
        active = m.end === true
          ? { end: true, src: new Uint8Array(0) }
          : { m, src: m.shared !== undefined ? new Uint8Array(m.shared, m.offset, m.length) : views[m.slot].subarray(0, m.length) }
      }
      if (current === null) {
        if (freeOut.length === 0) return
        current = freeOut.pop()
        used = 0
      }
      const r = cctx.compressStream2(current.subarray(used), active.src, active.end ? zstd.EndDirective.end : zstd.EndDirective.continue)
      used += r[1]
      active.src = active.src.subarray(r[2])
      if (outSize - used < slack) handOver()
      if (active.end === true) {
        if (r[0] === 0) {
          active = null
          ending = true
          handOver()
        }
      } else if (active.src.length === 0) {
        const m = active.m
        active = null
        parentPort.postMessage(m.shared !== undefined ? { consumed: m.id } : { free: m.slot })
      }
    }
  } catch (e) {
    fail(e, "compress")
  }
}
try {
  cctx = new zstd.CCtx()
  cctx.setParameter(zstd.CParameter.compressionLevel, level)
  cctx.setParameter(zstd.CParameter.checksumFlag, 1)
  cctx.setParameter(zstd.CParameter.nbWorkers, threads)
} catch (e) {
  fail(e, "compress")
}
parentPort.on("message", (m) => {
  inputs.push(m)
  pump()
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
              outSize: OUT_SIZE,
              slack: OUT_SLACK
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
