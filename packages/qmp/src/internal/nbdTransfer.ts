/**
 * Reads and block status on top of a connection: splitting and aligning reads, covering a range with
 * block status requests, and the in-order chunk stream used by the backup engines.
 *
 * @internal
 */
import * as Chunk from "effect/Chunk"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import * as Stream from "effect/Stream"
import type { ExportChunk, Extent, ReadPiece, ReadResult, StreamOptions } from "../NbdClient.js"
import { backing, checkRange, type Link, MAX_STATUS_REQUEST } from "./nbdConnection.js"
import { NbdProtocolError, NbdRequestError } from "./nbdErrors.js"
import type { NbdRequestFailure } from "./nbdErrors.js"

export const BASE_ALLOCATION = "base:allocation"
export const DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
export const STATE_HOLE = 1
export const STATE_ZERO = 2
export const STATE_DIRTY = 1

const roundUp = (n: number, m: number) => Math.ceil(n / m) * m

/** Copies a result into one buffer, zero-filling holes (in place when the client owns the buffer). */
export const toBuffer = (result: ReadResult): Buffer => {
  const base = backing.get(result)
  if (base !== undefined) {
    for (const piece of result.pieces) {
      if (!("data" in piece)) base.fill(0, piece.offset - result.offset, piece.offset - result.offset + piece.length)
    }
    return base
  }
  const pieces = result.pieces
  if (pieces.length === 1) {
    const only = pieces[0]
    if ("data" in only && only.data.length === result.length) {
      return Buffer.isBuffer(only.data)
        ? only.data
        : Buffer.from(only.data.buffer, only.data.byteOffset, only.data.byteLength)
    }
  }
  const hasData = pieces.some((p) => "data" in p)
  const out = hasData ? Buffer.allocUnsafe(result.length) : Buffer.alloc(result.length)
  if (hasData) {
    for (const piece of pieces) {
      const at = piece.offset - result.offset
      if ("data" in piece) out.set(piece.data, at)
      else out.fill(0, at, at + piece.length)
    }
  }
  return out
}

/** Restricts a result to `[offset, offset + length)`. */
const clip = (result: ReadResult, offset: number, length: number): ReadResult => {
  if (result.offset === offset && result.length === length) return result
  const end = offset + length
  const pieces: Array<ReadPiece> = []
  for (const piece of result.pieces) {
    const pLength = "data" in piece ? piece.data.length : piece.length
    const s = Math.max(piece.offset, offset)
    const e = Math.min(piece.offset + pLength, end)
    if (e <= s) continue
    if ("data" in piece) pieces.push({ offset: s, data: piece.data.subarray(s - piece.offset, e - piece.offset) })
    else pieces.push({ offset: s, length: e - s, hole: true })
  }
  const clipped: ReadResult = { offset, length, pieces }
  const base = backing.get(result)
  if (base !== undefined) backing.set(clipped, base.subarray(offset - result.offset, end - result.offset))
  return clipped
}

/** Reads any range of the export: aligned to the minimum block size, split at the request limit. */
export const read = (
  conn: Link,
  offset: number,
  length: number
): Effect.Effect<ReadResult, NbdRequestFailure> =>
  Effect.flatMap(checkRange(conn, offset, length), () => {
    if (length === 0) return Effect.succeed<ReadResult>({ offset, length, pieces: [] })
    const min = conn.minBlock
    const start = offset - (offset % min)
    const end = Math.min(conn.size, roundUp(offset + length, min))
    const max = conn.maxRequest
    if (end - start <= max) {
      return Effect.map(conn.readOnce(start, end - start), (r) => clip(r, offset, length))
    }
    const parts: Array<[number, number]> = []
    for (let at = start; at < end; at += max) parts.push([at, Math.min(max, end - at)])
    return Effect.map(
      Effect.forEach(parts, ([at, n]) => conn.readOnce(at, n), { concurrency: "unbounded" }),
      (results) =>
        clip({ offset: start, length: end - start, pieces: results.flatMap((r) => r.pieces) }, offset, length)
    )
  })

const noContext = (name: string, available: ReadonlyArray<string>) =>
  new NbdRequestError({
    reason: "NoMetaContext",
    detail: `meta context ${name} was not negotiated (have: ${available.length === 0 ? "none" : available.join(", ")})`
  })

const negotiated = (conn: Link): Array<string> => Array.from(conn.contexts.values())

/** One block status request; the reply may cover less than asked for. */
export const blockStatus = (
  conn: Link,
  offset: number,
  length: number
): Effect.Effect<ReadonlyMap<string, ReadonlyArray<Extent>>, NbdRequestFailure> =>
  Effect.flatMap(checkRange(conn, offset, length), () => {
    if (conn.contexts.size === 0) return Effect.fail(noContext("(any)", []))
    if (length === 0) return Effect.succeed(new Map())
    const min = conn.minBlock
    const start = offset - (offset % min)
    const end = Math.min(conn.size, roundUp(offset + length, min), start + MAX_STATUS_REQUEST)
    return conn.blockStatusOnce(start, end - start)
  })

const push = (list: Array<Extent>, offset: number, length: number, flags: number) => {
  const last = list[list.length - 1]
  if (last !== undefined && last.flags === flags && last.offset + last.length === offset) {
    list[list.length - 1] = { offset: last.offset, length: last.length + length, flags }
  } else {
    list.push({ offset, length, flags })
  }
}

/**
 * Extents covering exactly `[offset, offset + length)` for each context (adjacent extents with equal
 * flags merged), issuing as many block status requests as the server needs.
 */
export const extents = (
  conn: Link,
  offset: number,
  length: number,
  contexts?: ReadonlyArray<string>
): Effect.Effect<ReadonlyMap<string, ReadonlyArray<Extent>>, NbdRequestFailure> =>
  Effect.flatMap(checkRange(conn, offset, length), () =>
    Effect.gen(function*() {
      const available = negotiated(conn)
      const names = contexts ?? available
      for (const name of names) {
        if (!available.includes(name)) return yield* Effect.fail(noContext(name, available))
      }
      if (names.length === 0) return yield* Effect.fail(noContext("(any)", available))
      const end = offset + length
      const cursors = new Map<string, number>(names.map((n) => [n, offset]))
      const out = new Map<string, Array<Extent>>(names.map((n) => [n, []]))
      while (true) {
        let from = end
        for (const c of cursors.values()) if (c < from) from = c
        if (from >= end) break
        const reply = yield* blockStatus(conn, from, end - from)
        let progressed = false
        for (const name of names) {
          let cursor = cursors.get(name)!
          if (cursor >= end) continue
          const list = out.get(name)!
          for (const e of reply.get(name) ?? []) {
            const eEnd = e.offset + e.length
            if (eEnd <= cursor) continue
            if (e.offset > cursor) break
            const stop = Math.min(eEnd, end)
            push(list, cursor, stop - cursor, e.flags)
            cursor = stop
            progressed = true
            if (cursor >= end) break
          }
          cursors.set(name, cursor)
        }
        if (!progressed) {
          return yield* Effect.fail(
            new NbdProtocolError({
              phase: "Transmission",
              detail: `block status at ${from} returned no extents for the requested contexts`
            })
          )
        }
      }
      return out as ReadonlyMap<string, ReadonlyArray<Extent>>
    })
  )

type Plan =
  | { readonly _tag: "Read"; readonly offset: number; readonly length: number }
  | ExportChunk

/** True when every extent overlapping `[start, end)` satisfies `test`; `cursor` moves forward. */
const allIn = (
  list: ReadonlyArray<Extent>,
  cursor: { i: number },
  start: number,
  end: number,
  test: (flags: number) => boolean
): boolean => {
  while (cursor.i < list.length && list[cursor.i].offset + list[cursor.i].length <= start) cursor.i++
  for (let j = cursor.i; j < list.length && list[j].offset < end; j++) {
    if (!test(list[j].flags)) return false
  }
  return true
}

const planWindow = (
  start: number,
  end: number,
  chunkSize: number,
  allocation: ReadonlyArray<Extent> | undefined,
  dirty: ReadonlyArray<Extent> | undefined
): Array<Plan> => {
  const plans: Array<Plan> = []
  const a = { i: 0 }
  const d = { i: 0 }
  for (let at = start; at < end; at += chunkSize) {
    const length = Math.min(chunkSize, end - at)
    if (dirty !== undefined && allIn(dirty, d, at, at + length, (f) => (f & STATE_DIRTY) === 0)) {
      plans.push({ _tag: "Clean", offset: at, length })
    } else if (
      allocation !== undefined && allIn(allocation, a, at, at + length, (f) => (f & STATE_ZERO) !== 0)
    ) {
      plans.push({ _tag: "Zero", offset: at, length })
    } else {
      plans.push({ _tag: "Read", offset: at, length })
    }
  }
  return plans
}

const noRelease = (): void => {}

const toChunk = (result: ReadResult): ExportChunk =>
  result.pieces.some((p) => "data" in p)
    ? {
      _tag: "Data",
      offset: result.offset,
      length: result.length,
      data: toBuffer(result),
      pieces: result.pieces,
      release: noRelease
    }
    : { _tag: "Zero", offset: result.offset, length: result.length }

/** Free buffers beyond `concurrency` that a stream keeps for reuse. */
const POOL_SPARE = 4

/**
 * Chunk buffers of one stream. `take` reuses a released buffer or allocates one; `give` keeps at most
 * `capacity` free buffers and leaves the rest to the garbage collector. It never waits: a consumer
 * that does not release only loses the reuse. Reusing matters: a fresh multi-MiB buffer costs page
 * faults on first touch and external-memory GC pressure, which halves throughput and lets RSS grow by
 * hundreds of MiB before the collector catches up.
 */
class BufferPool {
  private readonly free: Array<Buffer> = []
  constructor(readonly size: number, readonly capacity: number) {}
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size)
  }
  give(buffer: Buffer): void {
    if (this.free.length < this.capacity) this.free.push(buffer)
  }
}

/**
 * Reads one chunk into a pooled buffer (`offset` and `length` aligned to the minimum block size, or
 * `length` ending at the export end). All-hole replies give the buffer back at once and become Zero
 * chunks; a Data chunk's `release` gives it back. On failure or interruption the buffer is dropped,
 * not pooled: a late reply may still be written into it.
 */
const pooledRead = (
  conn: Link,
  pool: BufferPool,
  offset: number,
  length: number
): Effect.Effect<ExportChunk, NbdRequestFailure> =>
  Effect.suspend(() => {
    const full = pool.take()
    const buffer = length === full.length ? full : full.subarray(0, length)
    const max = conn.maxRequest
    let request: Effect.Effect<ReadResult, NbdRequestFailure>
    if (length <= max) {
      request = conn.readOnce(offset, length, buffer)
    } else {
      const parts: Array<number> = []
      for (let at = 0; at < length; at += max) parts.push(at)
      request = Effect.map(
        Effect.forEach(
          parts,
          (at) => {
            const n = Math.min(max, length - at)
            return conn.readOnce(offset + at, n, buffer.subarray(at, at + n))
          },
          { concurrency: "unbounded" }
        ),
        (results): ReadResult => ({ offset, length, pieces: results.flatMap((r) => r.pieces) })
      )
    }
    return Effect.map(request, (result): ExportChunk => {
      let data = false
      for (const piece of result.pieces) {
        if ("data" in piece) data = true
        else buffer.fill(0, piece.offset - offset, piece.offset - offset + piece.length)
      }
      if (!data) {
        pool.give(full)
        return { _tag: "Zero", offset, length }
      }
      let released = false
      return {
        _tag: "Data",
        offset,
        length,
        data: buffer,
        pieces: result.pieces,
        release: () => {
          if (released) return
          released = true
          pool.give(full)
        }
      }
    })
  })

/** In-order chunks of the export; reads run `concurrency` at a time. */
export const stream = (
  conn: Link,
  options: StreamOptions = {}
): Stream.Stream<ExportChunk, NbdRequestFailure> =>
  Stream.unwrap(Effect.gen(function*() {
    const offset = options.offset ?? 0
    const length = options.length ?? Math.max(0, conn.size - offset)
    yield* checkRange(conn, offset, length)
    const chunkSize = options.chunkSize ?? 4 * 1024 * 1024
    const concurrency = options.concurrency ?? 8
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0 || chunkSize % conn.minBlock !== 0) {
      return yield* Effect.fail(
        new NbdRequestError({
          reason: "InvalidArgument",
          detail: `chunkSize ${chunkSize} must be a positive multiple of the minimum block size ${conn.minBlock}`
        })
      )
    }
    if (!Number.isSafeInteger(concurrency) || concurrency < 1) {
      return yield* Effect.fail(
        new NbdRequestError({ reason: "InvalidArgument", detail: `concurrency ${concurrency} must be >= 1` })
      )
    }
    const available = negotiated(conn)
    const allocation = (options.useAllocation ?? true) && available.includes(BASE_ALLOCATION)
      ? BASE_ALLOCATION
      : undefined
    const dirty = options.dirtyBitmap === undefined
      ? undefined
      : options.dirtyBitmap.startsWith(DIRTY_BITMAP_PREFIX)
      ? options.dirtyBitmap
      : DIRTY_BITMAP_PREFIX + options.dirtyBitmap
    if (dirty !== undefined && !available.includes(dirty)) return yield* Effect.fail(noContext(dirty, available))
    const needed = [allocation, dirty].filter((n): n is string => n !== undefined)
    const window = Math.max(chunkSize, Math.floor((options.statusWindow ?? 1024 * 1024 * 1024) / chunkSize) * chunkSize)
    const end = offset + length

    const plans = Stream.unfoldChunkEffect(offset, (pos) => {
      if (pos >= end) return Effect.succeed(Option.none())
      const windowEnd = Math.min(end, pos + window)
      const status = needed.length === 0
        ? Effect.succeed<ReadonlyMap<string, ReadonlyArray<Extent>>>(new Map())
        : extents(conn, pos, windowEnd - pos, needed)
      return Effect.map(status, (map) => {
        const list = planWindow(
          pos,
          windowEnd,
          chunkSize,
          allocation === undefined ? undefined : map.get(allocation),
          dirty === undefined ? undefined : map.get(dirty)
        )
        return Option.some([Chunk.unsafeFromArray(list), windowEnd] as const)
      })
    })
    const pool = new BufferPool(chunkSize, concurrency + POOL_SPARE)
    const min = conn.minBlock
    const readChunk = (at: number, n: number): Effect.Effect<ExportChunk, NbdRequestFailure> =>
      at % min === 0 && (n % min === 0 || at + n === conn.size)
        ? pooledRead(conn, pool, at, n)
        : Effect.map(read(conn, at, n), toChunk)
    return Stream.mapEffect(
      plans,
      (plan): Effect.Effect<ExportChunk, NbdRequestFailure> =>
        plan._tag === "Read" ? readChunk(plan.offset, plan.length) : Effect.succeed(plan),
      { concurrency }
    )
  }))
