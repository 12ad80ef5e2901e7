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
import { backing, checkRange, type Link, MAX_STATUS_REQUEST, type Pending } from "./nbdConnection.js"
import { CMD_READ } from "./nbdProtocol.js"
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

/** Free buffers beyond `concurrency` that a stream keeps for reuse. */
const POOL_SPARE = 4
/** Chunks known without reading (Zero, Clean) that may wait in the window beside the reads. */
const MAX_KNOWN_AHEAD = 1024

/**
 * Chunk buffers of one stream. `take` reuses a released buffer or allocates one; `give` keeps at most
 * `capacity` free buffers and leaves the rest to the garbage collector. It never waits: a consumer
 * that does not release only loses the reuse. Reuse matters: a fresh multi-MiB buffer costs page
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

/** One chunk of the stream's window: known at once (Zero, Clean) or being read. */
interface Slot {
  readonly offset: number
  readonly length: number
  /** Being read (counts against the window's `concurrency`), as opposed to known at once. */
  readonly read: boolean
  /** The result once known. */
  chunk: ExportChunk | undefined
  error: NbdRequestFailure | undefined
  /** Aligned range actually read (differs from the chunk only at unaligned stream bounds). */
  readStart: number
  buffer: Buffer | undefined
  /** Pooled buffer behind `buffer`, or undefined when it was allocated for this chunk only. */
  pooled: Buffer | undefined
  requests: Array<Pending>
  remaining: number
  pieces: Array<ReadPiece>
}

/**
 * The in-order read window behind {@link stream}: at most `concurrency` chunks being read or read and
 * waiting for their turn, requests issued with callbacks (no fiber per request), results emitted
 * strictly in offset order. Memory: `concurrency` chunk buffers plus whatever the consumer holds.
 */
class ReadWindow {
  /** Slots in offset order; emitted ones before `head` are cleared, so nothing pins their buffers. */
  private readonly slots: Array<Slot | undefined> = []
  private head = 0
  private plans: ReadonlyArray<Plan> = []
  private planAt = 0
  private reads = 0
  private closed = false
  waiter: (() => void) | undefined = undefined

  constructor(
    private readonly conn: Link,
    private readonly pool: BufferPool,
    private readonly concurrency: number
  ) {}

  get size(): number {
    return this.slots.length - this.head
  }

  /** All plans started and room for another read: time to fetch the next status window. */
  get wantsPlans(): boolean {
    return this.planAt >= this.plans.length && this.reads < this.concurrency
  }

  get headDone(): boolean {
    const slot = this.slots[this.head]
    return slot !== undefined && (slot.chunk !== undefined || slot.error !== undefined)
  }

  addPlans(plans: ReadonlyArray<Plan>): void {
    this.plans = plans
    this.planAt = 0
  }

  /** Starts as many planned chunks as the window allows. */
  fill(): void {
    while (this.planAt < this.plans.length && !this.closed) {
      const plan = this.plans[this.planAt]
      if (plan._tag === "Read") {
        if (this.reads >= this.concurrency) return
        this.planAt++
        this.reads++
        this.start(plan.offset, plan.length)
      } else {
        if (this.size >= this.concurrency + MAX_KNOWN_AHEAD) return
        this.planAt++
        this.slots.push({
          offset: plan.offset,
          length: plan.length,
          read: false,
          chunk: plan,
          error: undefined,
          readStart: plan.offset,
          buffer: undefined,
          pooled: undefined,
          requests: [],
          remaining: 0,
          pieces: []
        })
      }
    }
  }

  private start(offset: number, length: number): void {
    const conn = this.conn
    const min = conn.minBlock
    const readStart = offset - (offset % min)
    const readEnd = Math.min(conn.size, roundUp(offset + length, min))
    const readLength = readEnd - readStart
    let pooled: Buffer | undefined
    let buffer: Buffer
    if (readLength === this.pool.size || (readStart === offset && readEnd === offset + length)) {
      pooled = this.pool.take()
      buffer = readLength === pooled.length ? pooled : pooled.subarray(0, readLength)
    } else {
      buffer = Buffer.allocUnsafeSlow(readLength)
    }
    const max = conn.maxRequest
    const parts = Math.ceil(readLength / max)
    const slot: Slot = {
      offset,
      length,
      read: true,
      chunk: undefined,
      error: undefined,
      readStart,
      buffer,
      pooled,
      requests: [],
      remaining: parts,
      pieces: []
    }
    this.slots.push(slot)
    for (let at = 0; at < readLength && slot.error === undefined; at += max) {
      const n = Math.min(max, readLength - at)
      slot.requests.push(
        conn.request(CMD_READ, readStart + at, n, buffer.subarray(at, at + n), (failure, value) => {
          if (failure !== undefined) this.failed(slot, failure)
          else this.partDone(slot, value as ReadResult)
        })
      )
    }
  }

  private failed(slot: Slot, failure: NbdRequestFailure): void {
    if (slot.error !== undefined || slot.chunk !== undefined) return
    slot.error = failure
    // the other parts may still write into the buffer: cancel them, never pool the buffer again
    for (const request of slot.requests) request.owner.cancel(request)
    slot.pooled = undefined
    this.wake(slot)
  }

  private partDone(slot: Slot, result: ReadResult): void {
    if (slot.error !== undefined) return
    for (const piece of result.pieces) slot.pieces.push(piece)
    if (--slot.remaining > 0) return
    const buffer = slot.buffer!
    const pieces = slot.pieces
    if (pieces.length > 1) pieces.sort((a, b) => a.offset - b.offset)
    let data = false
    for (const piece of pieces) {
      if ("data" in piece) data = true
      else buffer.fill(0, piece.offset - slot.readStart, piece.offset - slot.readStart + piece.length)
    }
    const pooled = slot.pooled
    slot.requests = []
    slot.buffer = undefined
    slot.pieces = []
    if (!data) {
      if (pooled !== undefined) this.pool.give(pooled)
      slot.chunk = { _tag: "Zero", offset: slot.offset, length: slot.length }
    } else {
      let view: ReadResult = { offset: slot.readStart, length: buffer.length, pieces }
      if (slot.readStart !== slot.offset || buffer.length !== slot.length) {
        backing.set(view, buffer)
        view = clip(view, slot.offset, slot.length)
      }
      let released = false
      slot.chunk = {
        _tag: "Data",
        offset: slot.offset,
        length: slot.length,
        data: slot.readStart === slot.offset && buffer.length === slot.length
          ? buffer
          : buffer.subarray(slot.offset - slot.readStart, slot.offset - slot.readStart + slot.length),
        pieces: view.pieces,
        release: pooled === undefined ? noRelease : () => {
          if (released) return
          released = true
          this.pool.give(pooled)
        }
      }
    }
    this.wake(slot)
  }

  private wake(slot: Slot): void {
    if (this.slots[this.head] !== slot) return
    const waiter = this.waiter
    this.waiter = undefined
    waiter?.()
  }

  /** Leading finished chunks (in order), or the head's failure. */
  takeReady(): Array<ExportChunk> | NbdRequestFailure {
    const out: Array<ExportChunk> = []
    while (this.head < this.slots.length) {
      const slot = this.slots[this.head]!
      if (slot.error !== undefined) return out.length > 0 ? out : slot.error
      if (slot.chunk === undefined) break
      out.push(slot.chunk)
      if (slot.read) this.reads--
      this.slots[this.head++] = undefined
    }
    if (this.head > 64 && this.head * 2 > this.slots.length) {
      this.slots.splice(0, this.head)
      this.head = 0
    }
    return out
  }

  /** The stream ended or was interrupted: abandon requests in flight (their buffers are not reused). */
  close(): void {
    this.closed = true
    this.waiter = undefined
    for (let i = this.head; i < this.slots.length; i++) {
      for (const request of this.slots[i]!.requests) request.owner.cancel(request)
    }
    this.slots.length = 0
    this.head = 0
  }
}

/**
 * In-order chunks of the export: block status per `statusWindow`, then at most `concurrency` chunks
 * read ahead (in flight, or read and waiting for an earlier one). Chunks known without reading are
 * emitted in batches.
 */
export const stream = (
  conn: Link,
  options: StreamOptions = {}
): Stream.Stream<ExportChunk, NbdRequestFailure> =>
  Stream.unwrapScoped(Effect.gen(function*() {
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

    const reader = new ReadWindow(conn, new BufferPool(chunkSize, concurrency + POOL_SPARE), concurrency)
    yield* Effect.addFinalizer(() => Effect.sync(() => reader.close()))

    let pos = offset
    /** Block status for the next window, planned into chunks. */
    const nextPlans = Effect.suspend(() => {
      const from = pos
      const windowEnd = Math.min(end, from + window)
      const status = needed.length === 0
        ? Effect.succeed<ReadonlyMap<string, ReadonlyArray<Extent>>>(new Map())
        : extents(conn, from, windowEnd - from, needed)
      return Effect.map(status, (map) => {
        reader.addPlans(planWindow(
          from,
          windowEnd,
          chunkSize,
          allocation === undefined ? undefined : map.get(allocation),
          dirty === undefined ? undefined : map.get(dirty)
        ))
        pos = windowEnd
      })
    })
    const headDone = Effect.async<void>((resume) => {
      if (reader.headDone) return resume(Effect.void)
      reader.waiter = () => resume(Effect.void)
      return Effect.sync(() => {
        reader.waiter = undefined
      })
    })
    const pull: Effect.Effect<Chunk.Chunk<ExportChunk>, Option.Option<NbdRequestFailure>> = Effect.suspend(() => {
      reader.fill()
      if (reader.wantsPlans && pos < end) return Effect.zipRight(Effect.mapError(nextPlans, Option.some), pull)
      if (reader.size === 0) return Effect.fail(Option.none())
      if (!reader.headDone) return Effect.zipRight(headDone, pull)
      const ready = reader.takeReady()
      return Array.isArray(ready) ? Effect.succeed(Chunk.unsafeFromArray(ready)) : Effect.fail(Option.some(ready))
    })
    return Stream.repeatEffectChunkOption(pull)
  }))
